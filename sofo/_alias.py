"""`sofo.sofo(learning_rate, ...)`: the recommended SOFO optimiser, an optax alias with the step included."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sofo import _adaptive, _checks, _optax, _options

# The recommended configuration: Levenberg-Marquardt damping from DEFAULT_DAMPING, and up to
# DEFAULT_MEMORY_SIZE remembered directions (at most a quarter of the tangents).
DEFAULT_DAMPING = 1e-2
DEFAULT_MEMORY_SIZE = 4


def default_memory_size(tangent_size: int) -> int:
    """min(4, K // 4): memory helps, but most of the K tangents stay random (fresh directions)."""
    return min(DEFAULT_MEMORY_SIZE, int(tangent_size) // 4) if _checks.is_int(tangent_size) else 0


def sofo(
    learning_rate: Any = 1.0,
    *,
    tangent_size: int = 100,
    curvature: str | None = None,
    key: Any = 0,
    sampler: str = "balanced",
    damping: float = DEFAULT_DAMPING,
    adaptive_damping: bool | _adaptive.AdaptiveDamping = True,
    memory_size: int | None = None,
    tangent_chunk_size: int | None = None,
    loss: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SOFO with adaptive (Levenberg-Marquardt) damping and subspace memory, as an optax optimiser.

    Like `optax.adam(learning_rate)`, it includes the step: `update` returns updates for
    `optax.apply_updates`, sign included. It is `optax.chain(sofo.scale_by_sofo(..., learning_rate=learning_rate),
    optax.scale_by_learning_rate(learning_rate))`, so the Levenberg-Marquardt ratio is computed for the step
    actually taken. The defaults are the configuration recommended without per-task tuning: a full
    Gauss-Newton step (learning_rate 1), damping that starts at 1e-2 of the top curvature eigenvalue and
    adapts every step, the last 4 update directions kept as 4 of the K tangents (at most K // 4), and
    "balanced" tangents.

    Use: `opt_state = opt.init(params)`, then per step
    `updates, opt_state = opt.update(None, opt_state, params, fun=fun, loss_fn=loss_fn)` for
    `loss_fn(fun(params))`, or `opt.update(None, opt_state, params, cell=cell, loss_fn=loss_fn, z0=z0,
    xs=xs, ys=ys)` for a recurrent cell, then `params = optax.apply_updates(params, updates)`. `updates`
    may be None (or any pytree; it is not read). A rejected step (the loss on the same batch would go up,
    or is not finite) returns zeros, so the parameters stay put and the damping grows; `opt_state[0]` is
    the `SofoState` with the damping, the last reduction ratio and whether the step was accepted.

    Args:
      learning_rate: the step size (a float or an optax schedule). 1.0, the full damped Gauss-Newton
        step, is the recommended value; the adaptive damping then acts as a trust region.
      tangent_size: K, the number of tangents per step (random ones plus `memory_size` remembered ones).
      curvature: the curvature form: "exact" (the default: the Hessian of `loss_fn` itself, right for any
        loss, masked or weighted ones included), or the fast paths "mse" (0.5 * mean squared error) and
        "ce" (mean softmax cross-entropy), which are checked against `loss_fn` every step and warn
        (`sofo.CurvatureWarning`) when they do not match it (see `sofo.value_and_sofo_grad`).
      key: a `jax.random.key`, a legacy `PRNGKey` or an int seed.
      sampler: "balanced" (default: Gaussian tangents whose share in each parameter array grows with the
        square root of its size, so readouts and biases are explored too), "layerwise", "normal",
        "orthonormal", or the structured "rank1" / "rank2" / "rank4" (rank-r matrix tangents kept
        factored through the matmuls: a cheaper step; see `sofo.value_and_sofo_grad`).
      damping: the initial relative damping.
      adaptive_damping: True (the default `sofo.AdaptiveDamping()` schedule, which also re-judges each
        step on the next update's batch so that minibatch noise raises the damping), a
        `sofo.AdaptiveDamping`, or False for fixed damping (then nothing is re-evaluated and every step is
        applied).
      memory_size: how many past update directions replace random tangents (0 for none); None (default)
        for min(4, tangent_size // 4).
      tangent_chunk_size: push the tangents through the model this many at a time to bound memory.
      loss: the old name of `curvature` (deprecated: a DeprecationWarning; it still works).

    Returns:
      An `optax.GradientTransformationExtraArgs`; its state is `(SofoState, ScaleByScheduleState or
      EmptyState)`.

    References:
      Yu, Xia, Ma, Lengyel & Hennequin, "Second-order forward-mode optimization of recurrent neural
      networks for neuroscience", NeurIPS 2024; More, "The Levenberg-Marquardt algorithm: implementation and
      theory", 1978.
    """
    front = "sofo.sofo"
    curvature = _checks.resolve_curvature(curvature, loss, front)
    if memory_size is None:
        memory_size = default_memory_size(tangent_size)
    options = _options.make_options(
        front, tangent_size=tangent_size, damping=damping, curvature=curvature, sampler=sampler,
        tangent_chunk_size=tangent_chunk_size, memory_size=memory_size, adaptive_damping=adaptive_damping,
        learning_rate=learning_rate,
    )
    return optax.chain(
        _optax.build(front, options, key=key, learning_rate=learning_rate),
        _scale_by_finite_learning_rate(learning_rate),
    )


def _scale_by_finite_learning_rate(learning_rate: Any) -> optax.GradientTransformation:
    """`optax.scale_by_learning_rate` (same state), with exact zeros where the learning rate is not finite.

    `sofo.scale_by_sofo` rejects a step whose learning rate (a schedule's value, or one set by
    `optax.inject_hyperparams`) is NaN or inf and returns zeros; scaled by that learning rate they would
    be NaN, and the parameters with them.
    """
    inner = optax.scale_by_learning_rate(learning_rate)

    def update_fn(updates, state, params=None):
        if callable(learning_rate):
            rate = learning_rate(state.count)
        else:
            rate = learning_rate
        scaled, new_state = inner.update(updates, state, params)
        finite = jnp.isfinite(rate)
        scaled = jax.tree_util.tree_map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), scaled)
        return scaled, new_state

    return optax.GradientTransformation(inner.init, update_fn)
