"""Step 1 of SOFO: keyed samplers of K random tangents shaped like the parameters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def compute_dtype(params: Any) -> jnp.dtype:
    """The dtype SOFO's small linear algebra runs in: the parameters' widest float, at least float32."""
    dtypes = [jnp.result_type(leaf) for leaf in jax.tree_util.tree_leaves(params)]
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def sample(key: jax.Array, params: Any, tangent_size: int, sampler: str) -> Any:
    """Draws `tangent_size` tangents; returns a pytree like `params` with a leading K axis on each leaf.

    `normal`: i.i.d. Gaussian tangents, each scaled to unit global L2 norm.
    `orthonormal`: K orthonormal vectors in parameter space (requires K <= n), from a QR decomposition of
    a Gaussian n x K matrix; with K = n they span every direction.
    Each leaf is cast to its parameter's dtype (a JVP needs matching dtypes).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    sizes = [jnp.size(leaf) for leaf in leaves]
    n = sum(sizes)
    dtype = compute_dtype(params)
    if sampler == "normal":
        flat = jax.random.normal(key, (tangent_size, n), dtype)
        flat = flat / jnp.linalg.norm(flat, axis=1, keepdims=True)
    elif sampler == "orthonormal":
        q, _ = jnp.linalg.qr(jax.random.normal(key, (n, tangent_size), dtype))
        flat = q.T
    else:  # the fronts validate first; this guards direct use
        raise ValueError(f"unknown sampler {sampler!r}")
    tangent_leaves, start = [], 0
    for leaf, size in zip(leaves, sizes):
        block = flat[:, start : start + size].reshape((tangent_size,) + jnp.shape(leaf))
        tangent_leaves.append(block.astype(jnp.result_type(leaf)))
        start += size
    return jax.tree_util.tree_unflatten(treedef, tangent_leaves)
