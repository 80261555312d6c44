"""Subspace memory: the optimizer's policy for the remembered update directions.

The optimizer state keeps the last m update directions (unit norm, newest first). Each step hands them to
the sampler as a neutral basis (`sofo._tangents.sample(..., basis=memory)`), where they replace m of the
K random tangents, so the subspace carries curvature information across steps. What is kept, and when
(`init_memory` before the first step, `push_memory` after an accepted finite one), is decided here and in
`sofo._adaptive.adaptive_step`, not by the sampler or the engine.

References:
  Yu, Xia, Ma, Lengyel & Hennequin, NeurIPS 2024 (SOFO); the memory of past directions follows the
  subspace-reuse idea of Krylov and L-BFGS-style methods.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def init_memory(params: Any, size: int) -> Any:
    """An empty memory: `size` all-zero directions shaped like `params` (the engine skips zero slots)."""
    if not size:
        return None
    return jax.tree_util.tree_map(lambda p: jnp.zeros((size,) + jnp.shape(p), jnp.result_type(p)), params)


def push_memory(memory: Any, direction: Any) -> Any:
    """The memory with `direction` (normalised to unit global norm) first and the oldest entry dropped."""
    if memory is None:
        return None
    norm = jnp.sqrt(
        sum(
            jnp.sum(jnp.square(leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32))))
            for leaf in jax.tree_util.tree_leaves(direction)
        )
    )
    scale = jnp.where(norm > 0, 1 / jnp.where(norm > 0, norm, 1), 0)

    def leaf(stored, new):
        unit = (new * scale.astype(new.dtype))[None]
        return jnp.concatenate([unit.astype(stored.dtype), stored[:-1]], axis=0)

    return jax.tree_util.tree_map(leaf, memory, direction)
