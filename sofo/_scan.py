"""The recurrent SOFO engine: `value_and_sofo_grad_scan`, memory constant in the number of time steps.

The same six steps as `sofo._engine` (the feedforward engine, whose pieces it reuses): 1. sample the K
tangents V (`sofo._tangents`); 2. push them through the cell at every time step, carrying the latent's
K tangents through `lax.scan` (`_engine._push`); 3. accumulate the loss and its K directional derivatives
and 4. the K x K curvature sketch step by step (`sofo._curvature`), so no output tangent is kept for all
T; 5. the damped solve and 6. the direction V c (`_engine._finish`).

References:
  Yu, Xia, Ma, Lengyel & Hennequin, "Second-order forward-mode optimization of recurrent neural networks
  for neuroscience", NeurIPS 2024, Section 3.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sofo import _checks, _curvature, _options, _solve, _tangents
from sofo._engine import SofoInfo, _finish, _loss_directions, _push


def value_and_sofo_grad_scan(
    cell: Callable[[Any, Any, Any], tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], jax.Array],
    *,
    tangent_size: int = 100,
    damping: float = 1e-5,
    curvature: str | None = None,
    sampler: str = "normal",
    tangent_chunk_size: int | None = None,
    axis_name: Any = None,
    tangent_sharding: jax.sharding.NamedSharding | None = None,
    loss: str | None = None,
) -> Callable[[Any, Any, Any, Any, Any], tuple[jax.Array, Any, SofoInfo]]:
    """Builds the recurrent SOFO step for sum_t loss_fn(y_t, ys[t]) with memory constant in T.

    The K tangents' effect on the latent state is carried through `lax.scan`; the directional derivatives
    and the K x K curvature are accumulated step by step, so no output tangent is kept for all T.

    Args:
      cell: `cell(params, z, x) -> (z_new, y)`; the latent `z` may be any pytree, but its structure,
        shapes and dtypes must not change between steps.
      loss_fn: `loss_fn(y_t, ys_t) -> scalar`; the total loss is its SUM over time. Masks or per-step
        weights may go in `ys`: the default curvature ("exact") takes them into account.
      tangent_size, damping, curvature, sampler, tangent_chunk_size, axis_name, tangent_sharding, loss: as
        in `value_and_sofo_grad`; the curvature form applies to each step's loss (so "mse" uses B = the
        leading-axis size of y_t, and its check runs on every step), and chunking applies to each step's
        forward pass.

    Returns:
      `f(key, params, z0, xs, ys, *, damping=None, memory=None, extra_dampings=None) -> (value, direction,
      info)` with `xs`, `ys` time-major pytrees of equal leading length T; `damping`, `memory` and
      `extra_dampings` as in `value_and_sofo_grad`. The initial latent `z0` is not differentiated (make it a
      parameter of `cell` to learn it). With the same key it draws the same tangents as `value_and_sofo_grad`,
      so on the unrolled rollout with the summed loss both give the same direction. Non-float leaves of the
      latent (an int step counter, a bool mask) are carried through without tangents. With T = 0 steps the
      loss is the empty sum, 0, and the direction is zero. NaN/inf behave as in `value_and_sofo_grad`; the
      overflow rescaling there is not applied per time step here.

    References:
      Yu et al., NeurIPS 2024, Section 3 (recurrent networks).
    """
    front = "sofo.value_and_sofo_grad_scan"
    curvature = _checks.resolve_curvature(curvature, loss, front)
    options = _options.make_options(
        front, tangent_size=tangent_size, damping=damping, curvature=curvature, sampler=sampler,
        tangent_chunk_size=tangent_chunk_size, tangent_sharding=tangent_sharding,
    )
    return build(cell, loss_fn, options, front=front, axis_name=axis_name)


def build(
    cell: Callable[[Any, Any, Any], tuple[Any, Any]], loss_fn: Callable[[Any, Any], jax.Array],
    options: _options.Options, *, front: str, axis_name: Any = None,
) -> Callable[..., tuple[jax.Array, Any, SofoInfo]]:
    """`value_and_sofo_grad_scan` from validated `Options` (what every recurrent front calls)."""
    tangent_size, sampler, curvature = options.tangent_size, options.sampler, options.curvature
    tangent_chunk_size, tangent_sharding = options.tangent_chunk_size, options.tangent_sharding
    default_damping = options.damping
    _checks.check_callable(cell, "cell", "cell(params, z, x) -> (z_new, y)")
    _checks.check_callable(loss_fn, "loss_fn", "loss_fn(y_t, ys_t) -> scalar")
    _checks.check_loss_signature(loss_fn, 2, front, "cell")

    def value_and_direction(key, params, z0, xs, ys, *, damping=None, memory=None, extra_dampings=None):
        key, damping = _checks.prepare_call(key, params, tangent_size, sampler, damping, default_damping, memory)
        extra_dampings = _checks.check_extra_dampings(extra_dampings)
        dtype = _tangents.compute_dtype(params)
        _checks.check_axis_name(axis_name)
        steps = _checks.check_cell(cell, loss_fn, curvature, params, z0, xs, ys)
        # Step 1: the K tangents, with the remembered directions (memory) as the sampler's basis.
        tangents = _tangents.sample(key, params, tangent_size, sampler, basis=memory)
        project = lambda c: _solve.combine(tangents, c)  # noqa: E731
        if steps == 0:
            # The empty sum: loss 0, no directional derivative, no curvature, so a zero direction.
            zeros = jnp.zeros((), dtype), jnp.zeros((tangent_size,), dtype), jnp.zeros((tangent_size,) * 2, dtype)
            return _finish(*zeros, project, damping, axis_name, extra_dampings)
        # Non-float latent leaves (counters, masks) are carried without tangents: only the float ones are
        # differentiated, the others are closed over and passed through.
        z_leaves, z_def = jax.tree_util.tree_flatten(z0)
        is_float = [jnp.issubdtype(jnp.result_type(a), jnp.inexact) for a in z_leaves]
        latent_tangents = [
            jnp.zeros((tangent_size,) + jnp.shape(a), jnp.result_type(a)) for a, f in zip(z_leaves, is_float) if f
        ]

        def merge(floats, others):
            floats, others = iter(floats), iter(others)
            return [next(floats) if f else next(others) for f in is_float]

        def split(leaves):
            return [a for a, f in zip(leaves, is_float) if f], [a for a, f in zip(leaves, is_float) if not f]

        # Steps 2-4 per time step: push the tangents (and the latent's tangents) through the cell, then
        # accumulate the loss, the directional derivatives and the curvature sketch.
        def step(carry, inputs):
            z, z_tangents, value, directional, sketch, mismatch = carry
            x, target = inputs
            z_floats, z_others = split(jax.tree_util.tree_leaves(z))

            def float_cell(p, floats):
                z_new, y = cell(p, jax.tree_util.tree_unflatten(z_def, merge(floats, z_others)), x)
                new_floats, new_others = split(jax.tree_util.tree_leaves(z_new))
                return new_floats, new_others, y

            (new_floats, new_others, y), (z_tangents, _, y_tangents) = _push(
                float_cell, (params, z_floats), (tangents, z_tangents), tangent_chunk_size, tangent_sharding,
            )
            z_new = jax.tree_util.tree_unflatten(z_def, merge(new_floats, new_others))
            step_loss = lambda out: loss_fn(out, target)  # noqa: E731
            step_value, step_directional = _loss_directions(step_loss, y, y_tangents)
            step_sketch = _curvature.sketch(curvature, step_loss, y, y_tangents, dtype)
            step_mismatch = _curvature.fast_path_mismatch(curvature, step_loss, y, y_tangents, dtype)
            return (
                z_new,
                z_tangents,
                value + step_value,
                directional + step_directional.astype(dtype),
                sketch + step_sketch,
                jnp.maximum(mismatch, step_mismatch),
            ), None

        init = (
            z0,
            latent_tangents,
            jnp.zeros((), dtype),
            jnp.zeros((tangent_size,), dtype),
            jnp.zeros((tangent_size, tangent_size), dtype),
            jnp.zeros((), dtype),
        )
        (_, _, value, directional, sketch, mismatch), _ = jax.lax.scan(step, init, (xs, ys))
        _curvature.warn_on_mismatch(curvature, mismatch, "sofo (recurrent)")
        # Steps 5-6: the damped solve and the direction V c.
        return _finish(value, directional, sketch, project, damping, axis_name, extra_dampings)

    return value_and_direction
