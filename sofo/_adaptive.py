"""Levenberg-Marquardt damping and subspace memory over the engine's subspace quadratic model.

Nothing here samples tangents, builds a sketch or solves: the engine returns g~ = V^T grad, G~ = V^T G V
and c = (G~ + lambda max_eig I)^-1 g~ in its `SofoInfo`, and the fronts pass lambda (and the memory) back in
at run time. This module only compares the model's predicted reduction with the actual one and adjusts
lambda, the classic trust-region schedule (More, "The Levenberg-Marquardt algorithm: implementation and
theory", 1978; Martens, "Deep learning via Hessian-free optimization", ICML 2010, Section 4.1).

With minibatches the ratio on the batch a step was fitted to is biased upwards (the step fits that batch's
noise), so each step is re-judged on the next call's batch, which it was not fitted to: the held-out
ratio, the reduction ratio measured with independent samples as in stochastic trust-region methods
(Chen, Menickelly & Scheinberg, "Stochastic optimization using a trust-region method and random models",
Math. Programming 2018; Blanchet, Cartis, Menickelly & Scheinberg, INFORMS J. Optimization 2019).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The subspace memory's policy lives with the optimizer state (`sofo._memory`); `adaptive_step` pushes.
from sofo._memory import init_memory, push_memory  # noqa: F401


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

    With `next_batch` (the default) that same-batch verdict is provisional. The next call re-evaluates
    the previous step on its own batch, which the step was not fitted to (one extra forward pass, and one
    parameter-sized buffer holding the last step): the held-out ratio
    rho~ = (L_next(theta_prev) - L_next(theta)) / q, with q = step_size^2 / 2 * c^T G~ c the curvature term
    of the step's predicted reduction. The previous damping update is then redone from the damping the
    previous step was taken with, using min(rho, rho~), and the current step's provisional verdict is
    applied on top. For a quadratic with the right curvature along the step, rho~ = 2a - 1 with a the
    held-out-optimal length relative to the step's, so rho~ >= `lower_ratio` says the step was at most
    2 / (1 + lower_ratio) times too long for data it was not fitted to, whatever the damping. With
    full-batch training the next batch is the same batch; q <= the predicted reduction makes rho~ >= rho
    for any accepted step, so the verdict, and the schedule, are unchanged (up to round-off).

    With `held_out_average` = beta in (0, 1) (opt-in; 0, the default, is the per-step rule above) the
    held-out verdict is the ratio of running averages rho_bar = EMA_beta(L_next(theta_prev) - L_next(theta))
    / EMA_beta(q), with both thresholds lowered by `lower_ratio`: poor when rho_bar < 0 (the recent steps
    did not, on average, lower the loss on data they were not fitted to), good when rho_bar >
    `upper_ratio` - `lower_ratio`. Each held-out difference is an unbiased sample of the expected loss
    decrease of its step (the next batch is independent of both parameters), so the average tests the
    mean progress, where a single ratio is noise: its noise grows like one over the step length as the damping grows.
    Measured: better with fresh trials, worse on minibatch digits (BENCHMARKS.md, issue 15).

    With `held_out_compare` = w > 1 (opt-in; 0, the default, is off) the held-out ratio is replaced by a
    paired comparison of two dampings on the next batch, a next-batch version of K-FAC's greedy damping
    adjustment (Martens & Grosse 2015, Section 6.6). Each step also forms, from the same sketch and
    eigendecomposition, the step at one alternative damping lambda' = lambda * w or lambda / w (the two
    alternate from step to step; one more K x K back-substitution and projection, and one more
    parameter-sized buffer). The next call evaluates its batch at the point that step would have reached,
    L_next(theta_prev - step_size * direction(lambda')) (one forward pass, instead of the held-out
    ratio's), next to L_next(theta) = L_next(theta_prev - step_size * direction(lambda)), which the
    engine computes anyway; when lambda' was better, the damping is multiplied by lambda' / lambda. Both
    losses come from the same batch (common random numbers), so its noise enters the two symmetrically:
    noise alone drives the damping neither way, where the held-out ratio's verdict "poor" drifts it up.
    The same-batch verdict is kept only as the safety net: a rejected step, or rho < `lower_ratio`,
    still multiplies the damping by `increase` (and a rejected step is not compared); rho >
    `upper_ratio` no longer lowers it (the comparison does). The alternative itself may lie outside
    [min_damping, max_damping] (at the floor, lambda / w is below it); the damping kept is always clipped
    back into them, so winning there leaves it at the bound. The state records only which side the next
    alternative lies on; w is always this configuration's, so a state saved with another w goes on with
    this one (the step judged first keeps the factor it was taken with). Measured (BENCHMARKS.md, issue
    15): slightly better on minibatch digits (within the seed spread) and on full-batch flip-flop, no
    better with fresh trials, where the damping that is best one batch ahead is higher than the one that
    trains best over many steps (the short-horizon bias of greedy step-size choice).

    Attributes:
      min_damping: the smallest damping (relative to the top curvature eigenvalue).
      max_damping: the largest damping. Near it the step is a scaled gradient step.
      increase: the factor applied after a poor or rejected step (> 1).
      decrease: the divisor applied after a very good step (> 1).
      lower_ratio: rho below this counts as poor.
      upper_ratio: rho above this counts as very good.
      next_batch: re-judge each step with its held-out ratio on the next call's batch (see above).
      held_out_average: 0 (default) for the per-step held-out ratio, or beta in (0, 1) for the running
        average verdict above (with `next_batch` only).
      held_out_compare: 0 (default) for the held-out ratio, or the factor w > 1 between the damping and
        the alternative one compared on the next batch (see above; with `next_batch` only, not with
        `held_out_average`).

    References:
      More, "The Levenberg-Marquardt algorithm: implementation and theory", 1978; Martens, "Deep learning
      via Hessian-free optimization", ICML 2010, Section 4.1; Martens & Grosse, "Optimizing neural
      networks with Kronecker-factored approximate curvature", ICML 2015, Section 6.6 (the greedy
      comparison of dampings); Chen, Menickelly & Scheinberg, Math. Programming 2018; Wu, Ren, Liao &
      Grosse, "Understanding short-horizon bias in stochastic meta-optimization", ICLR 2018.
    """

    min_damping: float = 1e-8
    max_damping: float = 1e4
    increase: float = 3.0
    decrease: float = 3.0
    lower_ratio: float = 0.25
    upper_ratio: float = 0.75
    next_batch: bool = True
    held_out_average: float = 0.0
    held_out_compare: float = 0.0


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
    if not isinstance(adaptive.next_batch, (bool, np.bool_)):
        raise ValueError(f"AdaptiveDamping.next_batch must be True or False; got {adaptive.next_batch!r}.")
    for name in AdaptiveDamping._fields:
        if name == "next_batch":
            continue
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
    if not 0 <= adaptive.held_out_average < 1:
        raise ValueError(
            f"AdaptiveDamping.held_out_average must lie in [0, 1) (0 for the per-step held-out ratio, e.g. 0.99 "
            f"for a running average over about 100 steps); got {adaptive.held_out_average!r}."
        )
    if adaptive.held_out_average and not adaptive.next_batch:
        raise ValueError(
            f"AdaptiveDamping.held_out_average={adaptive.held_out_average!r} averages the next-batch verdicts, "
            f"so it needs next_batch=True; pass next_batch=True or held_out_average=0."
        )
    if adaptive.held_out_compare and adaptive.held_out_compare <= 1:
        raise ValueError(
            f"AdaptiveDamping.held_out_compare must be 0 (off) or the factor w > 1 between the damping and the "
            f"alternative one compared on the next batch (e.g. 3.0); got {adaptive.held_out_compare!r}."
        )
    if adaptive.held_out_compare and not adaptive.next_batch:
        raise ValueError(
            f"AdaptiveDamping.held_out_compare={adaptive.held_out_compare!r} compares two dampings on the next "
            f"batch, so it needs next_batch=True; pass next_batch=True or held_out_compare=0."
        )
    if adaptive.held_out_compare and adaptive.held_out_average:
        raise ValueError(
            f"AdaptiveDamping: held_out_compare={adaptive.held_out_compare!r} and held_out_average="
            f"{adaptive.held_out_average!r} are two different next-batch verdicts; pass only one of them (the "
            f"other 0)."
        )
    return adaptive


def predicted_reduction(info: Any, learning_rate: Any = None, *, step_size: Any = None) -> jax.Array:
    """The subspace quadratic model's predicted loss reduction for the step params - learning_rate * direction.

    pred = learning_rate * c.g~ - learning_rate^2 / 2 * c^T G~ c, with the undamped sketch G~ (as in
    Levenberg-Marquardt), from a `SofoInfo`.

    Args:
      info: the `SofoInfo` of the step (its coefficients, directional derivatives and curvature).
      learning_rate: the learning rate applied to the direction; None (the default) for 1.0, the full step.
      step_size: the old name of `learning_rate` (deprecated: a DeprecationWarning; passing both is a
        TypeError).

    Returns:
      The predicted reduction, a scalar (positive for a descent step on a convex model).
    """
    if step_size is not None:
        if learning_rate is not None:
            raise TypeError(
                f"sofo.predicted_reduction: got both learning_rate={learning_rate!r} and step_size={step_size!r}; "
                f"they are the same option (step_size= is its old name). Pass only learning_rate=."
            )
        warnings.warn(
            f"sofo.predicted_reduction: step_size={step_size!r} is deprecated and will be removed in a future "
            f"release; pass learning_rate={step_size!r} instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        learning_rate = step_size
    if learning_rate is None:
        learning_rate = 1.0
    c = info.coefficients
    linear = jnp.dot(c, info.directional_derivatives.astype(c.dtype))
    quadratic = jnp.dot(c, info.curvature.astype(c.dtype) @ c)
    return learning_rate * linear - 0.5 * learning_rate**2 * quadratic


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


class PreviousStep(NamedTuple):
    """What the next call needs to re-judge a step on its own batch (see `AdaptiveDamping.next_batch`).

    Attributes:
      step: the step applied, step_size * direction (zeros if it was rejected), shaped like the params:
        the params before it are the params after it plus `step`. None with `held_out_compare`, which
        needs only `alternative` (one parameter-sized buffer either way).
      ratio: its reduction ratio on its own batch.
      curvature_term: the quadratic term of its predicted reduction, step_size^2 / 2 * c^T G~ c (0 if it
        was rejected or not finite, and before any step: nothing to re-judge).
      damping: the damping before the step's own update (with its predecessor's update already redone
        from the held-out verdict); the step itself used the provisional value.
      held_out_mean, curvature_mean: the running averages (`AdaptiveDamping.held_out_average`) of the
        held-out reductions and of the curvature terms of the steps judged so far (0 before any, and
        unused with the per-step rule).
      alternative: with `AdaptiveDamping.held_out_compare`, where the step at the alternative damping
        would have led, as an offset from the params after the step taken: step_size * (direction -
        alternative direction), shaped like the params; None otherwise.
      alternative_factor: the alternative damping over the step's damping (w or 1 / w; the next step
        uses the other one); None without `held_out_compare`.
    """

    step: Any
    ratio: jax.Array
    curvature_term: jax.Array
    damping: jax.Array
    held_out_mean: Any = 0.0
    curvature_mean: Any = 0.0
    alternative: Any = None
    alternative_factor: Any = None


def init_previous(params: Any, config: AdaptiveDamping | None, damping: Any, dtype: Any) -> PreviousStep | None:
    """An empty `PreviousStep` (nothing to re-judge), or None without next-batch re-judging."""
    if config is None or not config.next_batch:
        return None
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.result_type(p)), params)
    zero = jnp.zeros([], dtype)
    if not config.held_out_compare:
        return PreviousStep(zeros, zero, zero, jnp.asarray(damping, dtype), zero, zero)
    # The first step compares with lambda * w: its predecessor (none) is taken to have used lambda / w.
    factor = jnp.asarray(1 / config.held_out_compare, dtype)
    return PreviousStep(None, zero, zero, jnp.asarray(damping, dtype), zero, zero, zeros, factor)


def previous_buffer(previous: PreviousStep) -> Any:
    """The parameter-shaped buffer a `PreviousStep` holds (`alternative` with held_out_compare, else `step`),
    for the fronts' check that a state matches the params."""
    return previous.alternative if previous.alternative is not None else previous.step


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


class StepResult(NamedTuple):
    """What one adaptive step decided (see `adaptive_step`)."""

    value: jax.Array
    direction: Any
    info: Any
    damping: jax.Array
    ratio: jax.Array
    accepted: jax.Array
    memory: Any
    held_out_ratio: Any = None
    previous: Any = None


def adaptive_step(
    step, evaluate, params, damping, memory, step_size, config: AdaptiveDamping | None, dtype, previous=None
):
    """One SOFO step with (optionally) Levenberg-Marquardt damping and memory, shared by every front.

    Args:
      step: `step(damping, memory) -> (value, direction, info)`, the engine call on the current batch;
        with `AdaptiveDamping.held_out_compare` it is called as `step(damping, memory, extra_dampings)`
        (the engine's `extra_dampings`, one alternative damping) and must return `info.extra_directions`.
      evaluate: `evaluate(params) -> loss` on the same batch (used only with `config`).
      params: the current parameters.
      damping: the damping for this step (a scalar).
      memory: the stored directions (or None).
      step_size: the learning rate that will be applied to the direction.
      config: the `AdaptiveDamping` schedule, or None for fixed damping (no re-evaluation).
      dtype: the dtype of the scalar diagnostics.
      previous: the `PreviousStep` returned by the last call (from `init_previous` before the first), or
        None to skip the next-batch re-judging. It assumes `params` = the last call's params + its step.

    Returns:
      A `StepResult`: the direction (zeros if the step was rejected), the loss before the step, the next
      damping, the ratio rho, whether the step was accepted, the next memory, the previous step's held-out
      ratio on this batch (0 when there was nothing to judge; with `held_out_compare`, the alternative's
      gain on this batch over the step's curvature term, (L(theta) - L(alternative)) / q, positive when
      the alternative damping won) and the next `PreviousStep` (or None). A step
      size that is not a finite number >= 0 (a schedule or an injected learning rate gone NaN) rejects the
      step, with or without `config`: no scaling of its zeros could keep the parameters finite. The damping
      then stays.
    """
    compare = config is not None and previous is not None and bool(config.held_out_compare)
    if compare:
        # The alternative damping alternates between lambda * w and lambda / w from step to step; the
        # engine solves the same sketch at it (one more back-substitution and projection). Only the side
        # (above or below) comes from the state, w from this config: a state restored into an optimizer
        # with another w goes on with the new w, rather than silently keeping the saved one.
        w = jnp.asarray(config.held_out_compare, dtype)
        factor = jnp.where(jnp.asarray(previous.alternative_factor, dtype) > 1, 1 / w, w).astype(dtype)
        value, direction, info = step(damping, memory, jnp.reshape(jnp.asarray(damping, dtype) * factor, (1,)))
        alternative_direction = jax.tree_util.tree_map(lambda h: h[0], info.extra_directions)
    else:
        value, direction, info = step(damping, memory)
    ratio = jnp.zeros([], dtype)
    held_out_ratio = jnp.zeros([], dtype)
    step_ok = finite_step_size(step_size)
    accepted = step_ok
    next_damping = jnp.asarray(damping, dtype)
    if config is not None:
        # Below about K * eps (relative to the top eigenvalue) the K x K sketch's small eigenvalues are
        # round-off, and so is the step along them: in float32 the damping must not go lower.
        low, high = damping_bounds(config, info.coefficients.shape[0], info.coefficients.dtype)
        if compare:
            # The paired comparison (K-FAC's greedy damping adjustment, on data neither step was fitted
            # to): this batch's loss where the previous step at the alternative damping would have led,
            # against its loss here, where the step at the previous damping did lead (`value`). Both on the
            # same batch, so its noise favours neither; the winner's damping is kept (up to this step's own
            # safety net below, applied to the damping this step used).
            alternative_point = jax.tree_util.tree_map(
                lambda p, a: (p + a).astype(jnp.result_type(p)), params, previous.alternative
            )
            alternative_value = evaluate(alternative_point)
            judged = (previous.curvature_term > 0) & jnp.isfinite(alternative_value) & jnp.isfinite(value)
            better = judged & (alternative_value < value)
            # Reported as the held-out ratio: the alternative's gain on this batch over the step's q.
            held_out_ratio = jnp.where(
                judged, reduction_ratio(value, alternative_value, previous.curvature_term), 0.0
            ).astype(dtype)
            moved = next_damping * jnp.asarray(previous.alternative_factor, dtype)
            next_damping = jnp.clip(jnp.where(better, moved, next_damping), low, high).astype(dtype)
            held_out_mean = jnp.asarray(previous.held_out_mean, dtype)
            curvature_mean = jnp.asarray(previous.curvature_mean, dtype)
        elif previous is not None:
            # Re-judge the previous step on this batch, which it was not fitted to (the ratio from
            # independent samples of stochastic trust-region methods; the same batch at both points cancels
            # most of the batch-to-batch noise), and redo its damping update with the worse of the two
            # verdicts. The held-out reduction is compared with the step's curvature term q: for a quadratic
            # along the step with the right curvature, it is (2 a - 1) q where a is the held-out-optimal
            # length relative to the step's, so ratio >= lower_ratio means the step was at most
            # 2 / (1 + lower_ratio) times too long for data it was not fitted to. Whatever the damping,
            # q <= the predicted reduction, so with full batches (same data) the verdict is the old one.
            earlier = jax.tree_util.tree_map(
                lambda p, s: (p + s).astype(jnp.result_type(p)), params, previous.step
            )
            earlier_value = evaluate(earlier)
            judged = (previous.curvature_term > 0) & jnp.isfinite(earlier_value) & jnp.isfinite(value)
            held_out_ratio = jnp.where(
                judged, reduction_ratio(earlier_value, value, previous.curvature_term), 0.0
            ).astype(dtype)
            held_out_mean = jnp.asarray(previous.held_out_mean, dtype)
            curvature_mean = jnp.asarray(previous.curvature_mean, dtype)
            if config.held_out_average:
                # The ratio of running averages: the mean held-out decrease of the recent steps (each an
                # unbiased sample of its step's expected decrease) over their mean curvature term, against
                # the thresholds lowered by lower_ratio (poor: no mean decrease on unseen data).
                beta = config.held_out_average
                held_out_mean = jnp.where(
                    judged, beta * held_out_mean + (1 - beta) * (earlier_value - value), held_out_mean
                ).astype(dtype)
                curvature_mean = jnp.where(
                    judged, beta * curvature_mean + (1 - beta) * previous.curvature_term, curvature_mean
                ).astype(dtype)
                averaged = reduction_ratio(held_out_mean, 0.0, curvature_mean) + config.lower_ratio
                held_out_verdict = jnp.where(judged, averaged, 0.0).astype(dtype)
            else:
                held_out_verdict = held_out_ratio
            verdict = jnp.minimum(jnp.asarray(previous.ratio, dtype), held_out_verdict)
            rejudged = jnp.clip(next_damping_fn(jnp.asarray(previous.damping, dtype), verdict, True, config), low, high)
            next_damping = jnp.where(judged, rejudged, next_damping).astype(dtype)
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
        base_damping = next_damping
        if compare:
            # The same-batch verdict as the safety net only: a rejected or poor step raises the damping;
            # only the comparison lowers it.
            poor = jnp.logical_or(jnp.logical_not(accepted), ratio < config.lower_ratio)
            adapted = jnp.clip(jnp.where(poor, next_damping * config.increase, next_damping), low, high)
        else:
            adapted = jnp.clip(next_damping_fn(next_damping, ratio, accepted, config), low, high)
        # A step refused for its step size says nothing about the model: the damping stays.
        next_damping = jnp.where(step_ok, adapted, next_damping).astype(dtype)
    direction = jax.tree_util.tree_map(lambda h: jnp.where(accepted, h, jnp.zeros_like(h)), direction)
    if config is not None and previous is not None:
        c = info.coefficients
        curvature_term = 0.5 * usable**2 * jnp.dot(c, info.curvature.astype(c.dtype) @ c)
        previous = PreviousStep(
            step=None if compare else jax.tree_util.tree_map(lambda h: (usable * h).astype(h.dtype), direction),
            ratio=ratio,
            curvature_term=jnp.where(accepted, curvature_term, 0.0).astype(dtype),
            damping=base_damping.astype(dtype),
            held_out_mean=held_out_mean,
            curvature_mean=curvature_mean,
        )
        if compare:
            # Where the alternative step would have led, from the params after this step: theta - step_size
            # * h' = (theta - step_size * h) + step_size * (h - h') (h zeros if rejected: then not compared).
            alternative = jax.tree_util.tree_map(
                lambda h, a: (usable * (h - a.astype(h.dtype))).astype(h.dtype), direction, alternative_direction
            )
            previous = previous._replace(alternative=alternative, alternative_factor=factor)
    if memory is not None:
        # Without adaptive damping every step is applied, but a non-finite one must not poison the memory.
        keep = accepted & all_finite(direction)
        pushed = push_memory(memory, direction)
        memory = jax.tree_util.tree_map(lambda new, old: jnp.where(keep, new, old), pushed, memory)
    return StepResult(value, direction, info, next_damping, ratio, accepted, memory, held_out_ratio, previous)
