"""Step 1 of SOFO: keyed samplers of K random tangents shaped like the parameters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def compute_dtype(params: Any) -> jnp.dtype:
    """The dtype SOFO's small linear algebra runs in: the parameters' widest float, at least float32."""
    dtypes = [jnp.result_type(leaf) for leaf in jax.tree_util.tree_leaves(params)]
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def sample(key: jax.Array, params: Any, tangent_size: int, sampler: str, indices: jax.Array | None = None) -> Any:
    """Draws tangents; returns a pytree like `params` with a leading tangent axis on each leaf.

    `normal`: i.i.d. Gaussian tangents, each scaled to unit global L2 norm. Tangent k depends only on
    `fold_in(key, k)`, so any subset (`indices`) can be drawn on its own: chunked engines regenerate
    their tangents chunk by chunk instead of holding all K.
    `orthonormal`: K orthonormal vectors in parameter space (requires K <= n), from a QR decomposition of
    a Gaussian n x K matrix; with K = n they span every direction. Drawn all at once (`indices` unused).
    Each leaf is cast to its parameter's dtype (a JVP needs matching dtypes).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shapes = [jnp.shape(leaf) for leaf in leaves]
    sizes = [int(np.prod(shape)) for shape in shapes]
    dtype = compute_dtype(params)
    offsets = np.cumsum([0] + sizes)
    if sampler == "normal":
        indices = jnp.arange(tangent_size) if indices is None else indices

        def one(index):
            # One flat draw per tangent (a draw per leaf compiles an order of magnitude slower).
            raw = jax.random.normal(jax.random.fold_in(key, index), (sum(sizes),), dtype)
            raw = raw / jnp.linalg.norm(raw)
            # Non-empty leaves only: lax.map cannot batch an empty output (it divides by its size).
            return [raw[a:b].reshape(shape) for a, b, shape in zip(offsets, offsets[1:], shapes) if a < b]

        # Small vmapped batches under lax.map: the same tangents as one vmap over all K, but the PRNG's
        # K x n work buffers and a flat K x n copy are never live at once (they set the scan engine's peak).
        filled = iter(jax.lax.map(one, indices, batch_size=min(16, indices.shape[0])))
        blocks = [
            next(filled) if size else jnp.zeros(indices.shape + shape, dtype) for size, shape in zip(sizes, shapes)
        ]
    elif sampler == "orthonormal":
        flat = jnp.linalg.qr(jax.random.normal(key, (sum(sizes), tangent_size), dtype))[0].T
        blocks = [
            flat[:, a:b].reshape((tangent_size,) + shape) for a, b, shape in zip(offsets, offsets[1:], shapes)
        ]
    else:  # the fronts validate first; this guards direct use
        raise ValueError(f"unknown sampler {sampler!r}")
    blocks = [block.astype(jnp.result_type(leaf)) for block, leaf in zip(blocks, leaves)]
    return jax.tree_util.tree_unflatten(treedef, blocks)
