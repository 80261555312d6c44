"""Levenberg-Marquardt damping and subspace memory over the engine's subspace quadratic model.

Nothing here samples tangents, builds a sketch or solves: the engine returns g~ = V^T grad, G~ = V^T G V
and c = (G~ + lambda max_eig I)^-1 g~ in its `SofoInfo`, and the fronts pass lambda (and the memory) back in
at run time. This module only compares the model's predicted reduction with the actual one and adjusts
lambda, the classic trust-region schedule (More, "The Levenberg-Marquardt algorithm: implementation and
theory", 1978; Martens, "Deep learning via Hessian-free optimization", ICML 2010, Section 4.1).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class AdaptiveDamping(NamedTuple):
    """The Levenberg-Marquardt schedule for the (relative) damping.

    After each step, with rho = actual reduction / predicted reduction on the same batch:
    a rejected step (the loss went up, or a non-finite loss or direction) or rho < `lower_ratio`
    multiplies the damping by `increase`; rho > `upper_ratio` divides it by `decrease`; otherwise it
    stays. It is then clipped to [max(`min_damping`, K * eps), `max_damping`], with K * eps the floor
    of the computation dtype (K the number of tangents; 3.8e-6 for K=32 in float32): below it the K x K
    sketch's small eigenvalues, and the step along them, are round-off. The initial damping is clipped
    to the same bounds. A `max_damping` below that floor is refused when the optimizer state is built
    (raise it, use fewer tangents or float64).

    Attributes:
      min_damping: the smallest damping (relative to the top curvature eigenvalue).
      max_damping: the largest damping. Near it the step is a scaled gradient step.
      increase: the factor applied after a poor or rejected step (> 1).
      decrease: the divisor applied after a very good step (> 1).
      lower_ratio: rho below this counts as poor.
      upper_ratio: rho above this counts as very good.
    """

    min_damping: float = 1e-8
    max_damping: float = 1e4
    increase: float = 3.0
    decrease: float = 3.0
    lower_ratio: float = 0.25
    upper_ratio: float = 0.75


def check_adaptive(adaptive: Any) -> AdaptiveDamping | None:
    """Normalises `adaptive_damping` (bool or AdaptiveDamping) and validates it, naming what is wrong."""
    if adaptive is False or adaptive is None:
        return None
    if adaptive is True:
        return AdaptiveDamping()
    if not isinstance(adaptive, AdaptiveDamping):
        raise TypeError(
            f"adaptive_damping must be True, False or a sofo.AdaptiveDamping(...); got {type(adaptive).__name__}. "
            f"Pass e.g. adaptive_damping=sofo.AdaptiveDamping(increase=2.0) (under optax.inject_hyperparams, "
            f"list adaptive_damping in static_args)."
        )
    for name in AdaptiveDamping._fields:
        value = getattr(adaptive, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(f"AdaptiveDamping.{name} must be a finite float; got {value!r}.")
    if not 0 < adaptive.min_damping <= adaptive.max_damping:
        raise ValueError(
            f"AdaptiveDamping needs 0 < min_damping <= max_damping; got min_damping={adaptive.min_damping!r}, "
            f"max_damping={adaptive.max_damping!r}."
        )
    if adaptive.increase <= 1 or adaptive.decrease <= 1:
        raise ValueError(
            f"AdaptiveDamping needs increase > 1 and decrease > 1 (they are factors); got "
            f"increase={adaptive.increase!r}, decrease={adaptive.decrease!r}."
        )
    if not 0 <= adaptive.lower_ratio <= adaptive.upper_ratio:
        raise ValueError(
            f"AdaptiveDamping needs 0 <= lower_ratio <= upper_ratio; got lower_ratio={adaptive.lower_ratio!r}, "
            f"upper_ratio={adaptive.upper_ratio!r}."
        )
    return adaptive


def predicted_reduction(info: Any, step_size: Any = 1.0) -> jax.Array:
    """The subspace quadratic model's predicted loss reduction for the step params - step_size * direction.

    pred = step_size * c.g~ - step_size^2 / 2 * c^T G~ c, with the undamped sketch G~ (as in
    Levenberg-Marquardt), from a `SofoInfo`.

    Args:
      info: the `SofoInfo` of the step (its coefficients, directional derivatives and curvature).
      step_size: the learning rate applied to the direction.

    Returns:
      The predicted reduction, a scalar (positive for a descent step on a convex model).
    """
    c = info.coefficients
    linear = jnp.dot(c, info.directional_derivatives.astype(c.dtype))
    quadratic = jnp.dot(c, info.curvature.astype(c.dtype) @ c)
    return step_size * linear - 0.5 * step_size**2 * quadratic


def damping_bounds(config: AdaptiveDamping, tangent_size: int, dtype: Any) -> tuple[float, float]:
    """[max(min_damping, K * eps), max_damping]: the range every damping (the initial one included) lies in.

    Raises a ValueError when `max_damping` is below the floor K * eps of `dtype`, rather than override it.
    """
    floor = tangent_size * float(jnp.finfo(dtype).eps)
    if config.max_damping < floor:
        raise ValueError(
            f"AdaptiveDamping(max_damping={config.max_damping!r}) lies below the damping floor K * eps = "
            f"{tangent_size} * {float(jnp.finfo(dtype).eps):.3g} = {floor:.3g} for tangent_size={tangent_size} "
            f"in {jnp.dtype(dtype).name} (below it the K x K solve is round-off, so the damping never goes "
            f"lower). Pass max_damping >= {floor:.3g}, fewer tangents, or float64 parameters."
        )
    return max(config.min_damping, floor), config.max_damping


def initial_damping(damping: Any, config: AdaptiveDamping | None, tangent_size: int, dtype: Any) -> jax.Array:
    """The damping a state starts from: clipped to `damping_bounds` with adaptive damping, as given without."""
    if config is None:
        return jnp.asarray(damping, dtype)
    low, high = damping_bounds(config, tangent_size, dtype)
    return jnp.clip(jnp.asarray(damping, dtype), low, high)


def finite_step_size(step_size: Any) -> jax.Array:
    """True when the learning rate is a finite number >= 0 (a schedule or inject_hyperparams may give NaN)."""
    step_size = jnp.asarray(step_size)
    return jnp.isfinite(step_size) & (step_size >= 0)


def reduction_ratio(value: jax.Array, new_value: jax.Array, predicted: jax.Array) -> jax.Array:
    """rho = (value - new_value) / predicted; 0 where the model predicts no reduction (a poor step)."""
    actual = value - new_value
    positive = predicted > 0
    return jnp.where(positive, actual / jnp.where(positive, predicted, 1), 0.0)


def next_damping_fn(damping: jax.Array, ratio: jax.Array, accepted: jax.Array, config: AdaptiveDamping) -> jax.Array:
    """One Levenberg-Marquardt update of the damping (see `AdaptiveDamping`)."""
    poor = jnp.logical_or(jnp.logical_not(accepted), ratio < config.lower_ratio)
    good = jnp.logical_and(accepted, ratio > config.upper_ratio)
    damping = jnp.where(poor, damping * config.increase, jnp.where(good, damping / config.decrease, damping))
    return jnp.clip(damping, config.min_damping, config.max_damping)


def rollout_loss(cell, loss_fn, params, z0, xs, ys):
    """sum_t loss_fn(y_t, ys[t]) along one rollout without tangents (adaptive damping's extra pass)."""
    leaves = jax.tree_util.tree_leaves(params)
    dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32) if leaves else jnp.float32
    if any(jnp.shape(x)[0] == 0 for x in jax.tree_util.tree_leaves(xs) if jnp.ndim(x)):
        # T = 0: the empty sum, without calling loss_fn (as the engine does).
        return jnp.zeros((), dtype)

    def step(carry, inputs):
        z, total = carry
        x, target = inputs
        z, y = cell(params, z, x)
        return (z, total + jnp.asarray(loss_fn(y, target), dtype)), None

    (_, total), _ = jax.lax.scan(step, (z0, jnp.zeros((), dtype)), (xs, ys))
    return total


def all_finite(tree: Any) -> jax.Array:
    """True when every number in the pytree is finite."""
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def init_memory(params: Any, size: int) -> Any:
    """An empty memory: `size` all-zero directions shaped like `params` (the engine skips zero slots)."""
    if not size:
        return None
    return jax.tree_util.tree_map(lambda p: jnp.zeros((size,) + jnp.shape(p), jnp.result_type(p)), params)


def push_memory(memory: Any, direction: Any) -> Any:
    """The memory with `direction` (normalised to unit global norm) first and the oldest entry dropped."""
    if memory is None:
        return None
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32)))) for leaf in jax.tree_util.tree_leaves(direction)))
    scale = jnp.where(norm > 0, 1 / jnp.where(norm > 0, norm, 1), 0)

    def leaf(stored, new):
        unit = (new * scale.astype(new.dtype))[None]
        return jnp.concatenate([unit.astype(stored.dtype), stored[:-1]], axis=0)

    return jax.tree_util.tree_map(leaf, memory, direction)


class StepResult(NamedTuple):
    """What one adaptive step decided (see `adaptive_step`)."""

    value: jax.Array
    direction: Any
    info: Any
    damping: jax.Array
    ratio: jax.Array
    accepted: jax.Array
    memory: Any


def adaptive_step(step, evaluate, params, damping, memory, step_size, config: AdaptiveDamping | None, dtype):
    """One SOFO step with (optionally) Levenberg-Marquardt damping and memory, shared by every front.

    Args:
      step: `step(damping, memory) -> (value, direction, info)`, the engine call on the current batch.
      evaluate: `evaluate(params) -> loss` on the same batch (used only with `config`).
      params: the current parameters.
      damping: the damping for this step (a scalar).
      memory: the stored directions (or None).
      step_size: the learning rate that will be applied to the direction.
      config: the `AdaptiveDamping` schedule, or None for fixed damping (no re-evaluation).
      dtype: the dtype of the scalar diagnostics.

    Returns:
      A `StepResult`: the direction (zeros if the step was rejected), the loss before the step, the next
      damping, the ratio rho, whether the step was accepted, and the next memory. A step size that is not
      a finite number >= 0 (a schedule or an injected learning rate gone NaN) rejects the step, with or
      without `config`: no scaling of its zeros could keep the parameters finite. The damping then stays.
    """
    value, direction, info = step(damping, memory)
    ratio = jnp.zeros([], dtype)
    step_ok = finite_step_size(step_size)
    accepted = step_ok
    next_damping = jnp.asarray(damping, dtype)
    if config is not None:
        # A NaN step size must not reach the candidate (or the ratio): evaluate at a harmless 0 instead.
        usable = jnp.where(step_ok, step_size, 0)
        candidate = jax.tree_util.tree_map(
            lambda p, h: (p - usable * h).astype(jnp.result_type(p)), params, direction
        )
        new_value = evaluate(candidate)
        finite = accepted & jnp.isfinite(value) & jnp.isfinite(new_value) & all_finite(direction)
        accepted = finite & (new_value <= value)
        ratio = reduction_ratio(value, new_value, predicted_reduction(info, usable))
        ratio = jnp.where(finite, ratio, 0.0).astype(dtype)
        # Below about K * eps (relative to the top eigenvalue) the K x K sketch's small eigenvalues are
        # round-off, and so is the step along them: in float32 the damping must not go lower.
        low, high = damping_bounds(config, info.coefficients.shape[0], info.coefficients.dtype)
        adapted = jnp.clip(next_damping_fn(next_damping, ratio, accepted, config), low, high)
        # A step refused for its step size says nothing about the model: the damping stays.
        next_damping = jnp.where(step_ok, adapted, next_damping).astype(dtype)
    direction = jax.tree_util.tree_map(lambda h: jnp.where(accepted, h, jnp.zeros_like(h)), direction)
    if memory is not None:
        # Without adaptive damping every step is applied, but a non-finite one must not poison the memory.
        keep = accepted & all_finite(direction)
        pushed = push_memory(memory, direction)
        memory = jax.tree_util.tree_map(lambda new, old: jnp.where(keep, new, old), pushed, memory)
    return StepResult(value, direction, info, next_damping, ratio, accepted, memory)
