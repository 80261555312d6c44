"""Step 1 of SOFO: keyed samplers of K random tangents shaped like the parameters.

A sampler may be handed a neutral `basis` of m given directions that replace m of the random tangents
(orthonormalised against the draws with "orthonormal"); it does not know where they come from. The
optimizers pass their remembered update directions (`sofo._memory`).

References:
  Yu, Xia, Ma, Lengyel & Hennequin, NeurIPS 2024, Algorithm 1 (step 1: sample V).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sofo._structured import LowRank, Split

# Structured samplers: "rank<r>" draws rank-r factored tangents a b^T for matrix parameters.
LOWRANK_SAMPLERS = ("rank1", "rank2", "rank4")


def compute_dtype(params: Any) -> jnp.dtype:
    """The dtype SOFO's small linear algebra runs in: the parameters' widest float, at least float32."""
    dtypes = [jnp.result_type(leaf) for leaf in jax.tree_util.tree_leaves(params)]
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def memory_count(memory: Any) -> int:
    """m, the number of stored directions in a memory pytree (leading axis of every leaf); 0 for None."""
    if memory is None:
        return 0
    leaves = jax.tree_util.tree_leaves(memory)
    return int(leaves[0].shape[0]) if leaves else 0


def _flat_memory(memory: Any, dtype) -> jax.Array:
    """The m memory directions as an m x n matrix in `dtype` (leaf order as in params)."""
    leaves = jax.tree_util.tree_leaves(memory)
    return jnp.concatenate([jnp.reshape(leaf, (leaf.shape[0], -1)).astype(dtype) for leaf in leaves], axis=1)


def sample(
    key: jax.Array,
    params: Any,
    tangent_size: int,
    sampler: str,
    indices: jax.Array | None = None,
    memory: Any = None,
    *,
    basis: Any = None,
) -> Any:
    """Draws tangents; returns a pytree like `params` with a leading tangent axis on each leaf.

    `normal`: i.i.d. Gaussian tangents, each scaled to unit global L2 norm. Tangent k depends only on
    `fold_in(key, k)`, so any subset (`indices`) can be drawn on its own: chunked engines regenerate
    their tangents chunk by chunk instead of holding all K.
    `layerwise`: the same Gaussian draws, but each leaf's block is scaled to norm 1/sqrt(L) (L the number
    of non-empty leaves), so every weight array gets an equal share of every tangent: a readout or bias
    with few entries is explored as much as a large recurrent matrix (with `normal`, a leaf's share of
    the squared norm is proportional to its size).
    `balanced`: in between: each leaf's share of the squared norm is proportional to the square root of
    its size. `sofo.sofo`'s default.
    `orthonormal`: K orthonormal vectors in parameter space (requires K <= n), from a QR decomposition of
    a Gaussian n x K matrix; with K = n they span every direction. Drawn all at once (`indices` unused).
    `rank1`, `rank2`, `rank4` (structured): each matrix (2-D) leaf's block of tangent k is a rank-r
    product a b^T, returned factored as a `sofo._structured.LowRank` (a: (K, m, r), b: (K, n, r), i.i.d.
    Gaussian), so the engine's structured push computes dW.h as a (b^T h) without forming dW; other
    leaves (biases, and matrices with min(m, n) <= r) get dense Gaussian blocks. Leaf shares of the norm
    are those of `balanced`. Tangent k depends only on `fold_in(key, k)`, as with `normal`.
    Each leaf is cast to its parameter's dtype (a JVP needs matching dtypes).

    `basis` (optional; `memory` is its older name): a pytree like `params` with a leading axis of m <= K
    given directions to include (the optimizer passes its remembered update directions; what it keeps,
    and when, is its own policy: `sofo._memory`). They take the place of tangents 0..m-1: with `normal`,
    tangent k < m is memory k scaled to unit norm; with `orthonormal`, the K tangents are the orthonormalisation of
    [memory, Gaussian draws], so the memory directions lie in their span. A memory direction that is all
    zeros (e.g. before any step) is replaced by the random tangent it would have displaced. With a
    structured sampler the remembered directions are dense: with `indices=None` the result is a
    `sofo._structured.Split` (the m dense tangents, then the K - m factored ones); with `indices` (a
    chunk, traced) every tangent of the chunk is materialised.
    """
    if basis is not None and memory is not None:
        raise TypeError("pass the directions to include as basis= (memory= is its older name), not both.")
    memory = basis if basis is not None else memory
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shapes = [jnp.shape(leaf) for leaf in leaves]
    sizes = [int(np.prod(shape)) for shape in shapes]
    dtype = compute_dtype(params)
    offsets = np.cumsum([0] + sizes)
    if sampler in ("normal", "layerwise", "balanced"):
        indices = jnp.arange(tangent_size) if indices is None else indices
        # Each leaf's share of a tangent's squared norm: equal ("layerwise"), or proportional to the
        # square root of its size ("balanced"); "normal" leaves it proportional to the size.
        weights = np.asarray([1.0 if size else 0.0 for size in sizes]) if sampler == "layerwise" else np.sqrt(sizes)
        shares = weights / max(float(np.sum(weights)), 1.0)

        def one(index):
            # One flat draw per tangent (a draw per leaf compiles an order of magnitude slower).
            raw = jax.random.normal(jax.random.fold_in(key, index), (sum(sizes),), dtype)
            if sampler == "normal":
                raw = raw / jnp.linalg.norm(raw)
                # Non-empty leaves only: lax.map cannot batch an empty output (it divides by its size).
                return [raw[a:b].reshape(shape) for a, b, shape in zip(offsets, offsets[1:], shapes) if a < b]
            blocks = []
            for a, b, shape, share in zip(offsets, offsets[1:], shapes, shares):
                if a < b:
                    block = raw[a:b]
                    blocks.append((block * (np.sqrt(share) / jnp.linalg.norm(block))).reshape(shape))
            return blocks

        # Small vmapped batches under lax.map: the same tangents as one vmap over all K, but the PRNG's
        # K x n work buffers and a flat K x n copy are never live at once (they set the scan engine's peak).
        filled = iter(jax.lax.map(one, indices, batch_size=min(16, indices.shape[0])))
        blocks = [
            next(filled) if size else jnp.zeros(indices.shape + shape, dtype) for size, shape in zip(sizes, shapes)
        ]
        blocks = _with_memory(blocks, indices, memory, dtype, offsets, shapes)
    elif sampler == "orthonormal":
        raw = jax.random.normal(key, (sum(sizes), tangent_size), dtype)
        count = memory_count(memory)
        if count:
            # QR keeps the span of the leading columns: the memory directions lie in span(V).
            flat_memory = _flat_memory(memory, dtype)
            norms = jnp.linalg.norm(flat_memory, axis=1)
            unit = flat_memory.T / jnp.where(norms > 0, norms, 1)[None, :]
            lead = jnp.where(norms[None, :] > 0, unit, raw[:, :count])
            raw = raw.at[:, :count].set(lead)
        flat = jnp.linalg.qr(raw)[0].T
        blocks = [
            flat[:, a:b].reshape((tangent_size,) + shape) for a, b, shape in zip(offsets, offsets[1:], shapes)
        ]
    elif sampler in LOWRANK_SAMPLERS:
        blocks = _lowrank(key, params, tangent_size, int(sampler[len("rank"):]), indices, memory)
        if not isinstance(blocks, list):  # a Split: already typed like the parameters
            return blocks
    else:  # the fronts validate first; this guards direct use
        raise ValueError(f"unknown sampler {sampler!r}")
    blocks = [_cast(block, leaf) for block, leaf in zip(blocks, leaves)]
    return jax.tree_util.tree_unflatten(treedef, blocks)


def _cast(block, leaf):
    dtype = jnp.result_type(leaf)
    if isinstance(block, LowRank):
        return LowRank(block.a.astype(dtype), block.b.astype(dtype))
    return block.astype(dtype)


def _with_memory(blocks, indices, memory, dtype, offsets, shapes):
    """Dense blocks with tangent k < m replaced by memory k (unit norm) unless that memory slot is empty."""
    count = memory_count(memory)
    if not count:
        return blocks
    # Tangent k < m is memory k (unit norm) unless that memory slot is still empty.
    flat_memory = _flat_memory(memory, dtype)
    norms = jnp.linalg.norm(flat_memory, axis=1)
    slot = jnp.minimum(indices, count - 1)
    use = (indices < count) & (norms[slot] > 0)
    unit = flat_memory[slot] / jnp.where(norms[slot] > 0, norms[slot], 1)[:, None]
    blocks = [
        jnp.where(use.reshape((-1,) + (1,) * len(shape)), unit[:, a:b].reshape(block.shape), block)
        if b > a else block
        for block, a, b, shape in zip(blocks, offsets, offsets[1:], shapes)
    ]
    return blocks


def _factored_shape(shape, rank):
    """(m, n) for a matrix leaf worth factoring at this rank (a rank-r tangent is cheaper than dense)."""
    return tuple(shape) if len(shape) == 2 and rank < min(shape) else None


def _lowrank(key, params, tangent_size, rank, indices, memory):
    """The blocks of the "rank<r>" sampler (see `sample`), or a `Split` with memory and indices=None."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
    sizes = [int(np.prod(shape)) for shape in shapes]
    dtype = compute_dtype(params)
    offsets = np.cumsum([0] + sizes)
    factored = [_factored_shape(shape, rank) for shape in shapes]
    # Flat draw per tangent: the factors (m + n) r numbers of a matrix leaf, else its entries.
    counts = [(f[0] + f[1]) * rank if f else size for f, size in zip(factored, sizes)]
    starts = np.cumsum([0] + counts)
    weights = np.sqrt(sizes)
    shares = weights / max(float(np.sum(weights)), 1.0)

    def one(index):
        raw = jax.random.normal(jax.random.fold_in(key, index), (max(int(starts[-1]), 1),), dtype)
        blocks = []
        for start, stop, f, shape, share in zip(starts, starts[1:], factored, shapes, shares):
            chunk = raw[start:stop]
            if f:
                a = chunk[: f[0] * rank].reshape(f[0], rank)
                b = chunk[f[0] * rank :].reshape(f[1], rank)
                # ||a b^T||_F^2 = sum((a^T a) * (b^T b)): the norm without forming a b^T.
                norm = jnp.sqrt(jnp.sum((a.T @ a) * (b.T @ b)))
                blocks.append(LowRank(a * (np.sqrt(share) / norm), b))
            elif stop > start:
                blocks.append((chunk * (np.sqrt(share) / jnp.linalg.norm(chunk))).reshape(shape))
            else:
                blocks.append(jnp.zeros(shape, dtype))
        return blocks

    def draw(ix):
        return jax.vmap(one)(ix)

    def dense(blocks):
        return [jnp.einsum("kmr,knr->kmn", b.a, b.b) if isinstance(b, LowRank) else b for b in blocks]

    count = memory_count(memory)
    if not count:
        return draw(jnp.arange(tangent_size) if indices is None else indices)
    if indices is not None:
        # A chunk of indices is traced (it may or may not hold memory slots): materialised, dense.
        return _with_memory(dense(draw(indices)), indices, memory, dtype, offsets, shapes)
    # The m remembered directions are dense (pushed densely); tangents m..K-1 stay factored.
    head_ix = jnp.arange(count)
    head = _with_memory(dense(draw(head_ix)), head_ix, memory, dtype, offsets, shapes)
    tail = draw(jnp.arange(count, tangent_size))
    return Split(
        jax.tree_util.tree_unflatten(treedef, [_cast(b, leaf) for b, leaf in zip(head, leaves)]),
        jax.tree_util.tree_unflatten(treedef, [_cast(b, leaf) for b, leaf in zip(tail, leaves)]),
    )
