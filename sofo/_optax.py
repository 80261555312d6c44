"""SOFO as an optax gradient transformation: `optax.chain(sofo.scale_by_sofo(...), optax.sgd(lr))`.

The transform only calls the engine (`value_and_sofo_grad`, `value_and_sofo_grad_scan`); it adds the
state optax needs: the PRNG key that gives fresh tangents every step, a step count, and the last loss
value and top curvature eigenvalue for logging.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sofo import _adaptive, _checks, _engine, _memory, _options, _scan, _tangents

_FEEDFORWARD_CALL = (
    "updates, opt_state = optimizer.update(None, opt_state, params, fun=fun, loss_fn=loss_fn), "
    "with fun(params) -> outputs and loss_fn(outputs) -> scalar"
)
_SCAN_CALL = (
    "updates, opt_state = optimizer.update(None, opt_state, params, cell=cell, loss_fn=loss_fn, "
    "z0=z0, xs=xs, ys=ys), with cell(params, z, x) -> (z_new, y) and loss_fn(y_t, ys_t) -> scalar"
)


# `transform`'s old default step_size, compared by identity to say whether one was passed.
_TRANSFORM_DEFAULT_STEP = float("1.0")


class SofoState(NamedTuple):
    """State of `sofo.scale_by_sofo`.

    Attributes:
      key: the raw data (uint32, `jax.random.key_data`) of the PRNG key the next step splits for its
        tangents: plain arrays, so the state checkpoints anywhere; the key is rebuilt at each step.
      count: the number of steps taken (int32).
      value: the loss at the parameters passed to the last `update` (before that step); 0 before any.
      top_eigenvalue: the largest eigenvalue of the last step's K x K curvature sketch; 0 before any.
      damping: the (relative) damping the next step will use: fixed, or adapted by Levenberg-Marquardt.
      ratio: the last step's reduction ratio rho = actual / predicted reduction (adaptive damping only;
        0 otherwise and before any step).
      accepted: whether the last step was applied (always True without adaptive damping).
      memory: the last m update directions (unit norm, newest first), or None with `memory_size=0`.
      held_out_ratio: the previous step's reduction ratio on this call's batch, the one the damping
        follows (`sofo.AdaptiveDamping.next_batch`); 0 when there was nothing to judge or it is off. With
        `AdaptiveDamping(held_out_compare=w)`, the alternative damping's gain on this batch over the
        previous step's curvature term (positive when it won).
      previous: the last step and what re-judging it needs (a `PreviousStep`: one parameter-sized
        buffer, the step or, with `held_out_compare`, the alternative's offset), or None without adaptive
        damping or with `AdaptiveDamping(next_batch=False)`.
    """

    key: jax.Array
    count: jax.Array
    value: jax.Array
    top_eigenvalue: jax.Array
    damping: jax.Array
    ratio: jax.Array
    accepted: jax.Array
    memory: Any
    held_out_ratio: Any = None
    previous: Any = None


def scale_by_sofo(
    *,
    tangent_size: int = 100,
    damping: float = 1e-5,
    curvature: str | None = None,
    sampler: str = "normal",
    key: Any = 0,
    tangent_chunk_size: int | None = None,
    adaptive_damping: bool | _adaptive.AdaptiveDamping = False,
    learning_rate: Any = _checks.DEFAULT_LEARNING_RATE,
    memory_size: int | None = None,
    loss: str | None = None,
    step_size: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """SOFO's damped Gauss-Newton direction in a random K-dimensional subspace, as an optax transform.

    Put it first in a chain and follow it with any optax transform that scales or edits updates:
    `optax.chain(sofo.scale_by_sofo(...), optax.sgd(lr))`, with momentum, a schedule,
    `optax.add_decayed_weights` or `optax.clip_by_global_norm`. Its output is the engine's `direction`,
    a descent direction shaped like the gradient (positive sign), so `sgd(lr)` steps params - lr * h.

    `update(updates, state, params, *, fun, loss_fn)` evaluates `loss_fn(fun(params))`. `fun` and
    `loss_fn` are keyword extra args, usually closures over the current batch built inside the jitted
    step; `optax.chain` forwards them by name and the transforms that do not use them ignore them. The
    incoming `updates` are ignored and may be None: SOFO computes its own direction from forward-mode
    derivatives, so no backprop gradient is needed (anything placed before it in a chain is discarded).

    For a recurrent model pass the cell instead of `fun`:
    `update(updates, state, params, *, cell, loss_fn, z0, xs, ys)` runs `value_and_sofo_grad_scan`
    with `cell(params, z, x) -> (z_new, y)` and the loss `sum_t loss_fn(y_t, ys[t])`, its memory constant
    in T; `ys` may be omitted (then `loss_fn` receives None).

    Parameters may be any pytree of float arrays: nested dicts/lists/tuples, a flax linen
    `variables["params"]` dict (`fun = lambda p: model.apply({"params": p}, x)`), or the array part of an
    equinox module (`params, static = eqx.partition(model, eqx.is_inexact_array)`,
    `fun = lambda p: jax.vmap(eqx.combine(p, static))(x)`; `init` and `update` then see `params` only).

    Args:
      tangent_size: K, the number of random tangents per step.
      damping: relative damping; the curvature sketch is damped by `damping * max_eig`.
      curvature: the curvature form: "exact" (the default: the Hessian of `loss_fn`, right for any loss),
        or the fast paths "mse" and "ce", checked against `loss_fn` every step (see
        `sofo.value_and_sofo_grad`).
      sampler: "normal", "layerwise", "balanced", "orthonormal" or the structured "rank1", "rank2",
        "rank4" tangents (see `sofo.value_and_sofo_grad`).
      key: a `jax.random.key`, a legacy `PRNGKey` or an int seed. Step t draws its tangents from
        `jax.random.split(key_t)[1]` and keeps `[0]` as `key_{t+1}`: the same key gives the same
        trajectory.
      tangent_chunk_size: push the tangents through the model this many at a time to bound memory
        (same direction; see `sofo.value_and_sofo_grad`). None pushes all K at once.
      adaptive_damping: False (default: the paper's fixed `damping`), True (Levenberg-Marquardt with
        the default `sofo.AdaptiveDamping()` schedule) or a `sofo.AdaptiveDamping(...)`. With it,
        `damping` is the initial value, and each update also evaluates the loss at the candidate
        parameters `params - learning_rate * direction` on the same batch (one extra forward pass, or one
        rollout without tangents for a cell). A step whose loss is higher, or not finite, is rejected:
        the update is zeros (the parameters stay put) and the damping grows. Otherwise the ratio of the
        actual to the predicted reduction (`sofo.predicted_reduction`) adjusts it. By default the next
        update re-judges the step on its own batch (one more forward pass or rollout, and one
        parameter-sized buffer in the state), so that with minibatches or fresh trials the damping
        follows the held-out ratio (see `sofo.AdaptiveDamping`); this assumes the parameters passed next
        are these minus `learning_rate` times the update (as `sofo.sofo` applies them).
      learning_rate: the learning rate the rest of the chain applies to this transform's output, a float or
        an optax schedule of the step count; only used by adaptive damping, to predict the reduction of
        the step actually taken. It must match: use `sofo.sofo(learning_rate)`, which sets both, or
        `optax.chain(sofo.scale_by_sofo(..., learning_rate=lr), optax.sgd(lr))` with nothing else
        rescaling. A learning rate that is not a finite number >= 0 (a schedule or injected value gone NaN) rejects the
        step: zeros, which `sofo.sofo` applies as exact zeros (`optax.sgd(nan)` would make them NaN).
      memory_size: m, the number of past update directions (unit norm, newest first) that replace m of
        the K random tangents each step, carrying curvature information across steps. The state then
        holds m parameter-sized buffers. None or 0 (default) for none; less than `tangent_size`, so that
        every step still explores at least one fresh random direction.
      loss: the old name of `curvature` (deprecated: a DeprecationWarning; it still works).
      step_size: the old name of `learning_rate` (deprecated: a DeprecationWarning; it still works;
        passing both is a TypeError).

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state is a `SofoState` of plain arrays (the key
      as its raw uint32 data), so it checkpoints with flax.serialization, orbax, equinox, `np.savez` or
      pickle. `update` checks the state against this configuration (memory, key) and says what differs.

    References:
      Yu, Xia, Ma, Lengyel & Hennequin, "Second-order forward-mode optimization of recurrent neural
      networks for neuroscience", NeurIPS 2024.
    """
    front = "sofo.scale_by_sofo"
    curvature = _checks.resolve_curvature(curvature, loss, front)
    learning_rate = _checks.resolve_learning_rate(learning_rate, step_size, front)
    options = _options.make_options(
        front, tangent_size=tangent_size, damping=damping, curvature=curvature, sampler=sampler,
        tangent_chunk_size=tangent_chunk_size, memory_size=memory_size, adaptive_damping=adaptive_damping,
        learning_rate=learning_rate,
    )
    return build(front, options, key=key, learning_rate=learning_rate)


def transform(
    *,
    tangent_size: int = 100,
    damping: float = 1e-5,
    curvature: str | None = None,
    sampler: str = "normal",
    key: Any = 0,
    tangent_chunk_size: int | None = None,
    adaptive_damping: bool | _adaptive.AdaptiveDamping = False,
    step_size: Any = _TRANSFORM_DEFAULT_STEP,
    memory_size: int | None = None,
    loss: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Deprecated: the old name of `sofo.scale_by_sofo` (with `step_size` for its `learning_rate`).

    Calling it emits one DeprecationWarning and returns exactly `sofo.scale_by_sofo(...,
    learning_rate=step_size)`; its errors name `sofo.transform` and `step_size`. It keeps its old signature,
    so `optax.inject_hyperparams(sofo.transform)` still injects `step_size`. It will be removed in a future
    release.

    Args:
      tangent_size, damping, curvature, sampler, key: as in `sofo.scale_by_sofo`.
      tangent_chunk_size, adaptive_damping, memory_size, loss: as in `sofo.scale_by_sofo`.
      step_size: `sofo.scale_by_sofo`'s `learning_rate`.

    Returns:
      The `optax.GradientTransformationExtraArgs` of `sofo.scale_by_sofo`.
    """
    message = "sofo.transform is deprecated and will be removed in a future release; use sofo.scale_by_sofo"
    renamed = []
    if step_size is not _TRANSFORM_DEFAULT_STEP:
        renamed.append(f"learning_rate={step_size!r} for step_size")
    if loss is not None:
        renamed.append(f"curvature={loss!r} for loss")
    if renamed:
        message += f" with {' and '.join(renamed)}"
    # One warning per call, whatever old names it uses.
    warnings.warn(message + " (the same transform under optax's naming).", DeprecationWarning, stacklevel=2)
    curvature = _checks.resolve_curvature(curvature, loss, "sofo.transform", deprecated=False)
    options = _options.make_options(
        "sofo.transform", tangent_size=tangent_size, damping=damping, curvature=curvature, sampler=sampler,
        tangent_chunk_size=tangent_chunk_size, memory_size=memory_size, adaptive_damping=adaptive_damping,
        learning_rate=step_size, learning_rate_name="step_size",
    )
    return build("sofo.transform", options, key=key, learning_rate=step_size)


def build(
    front: str, options: _options.Options, *, key: Any, learning_rate: Any
) -> optax.GradientTransformationExtraArgs:
    """`scale_by_sofo` from validated `Options` (what `sofo.sofo` and `sofo.optim` call too); errors name `front`.

    `learning_rate` is checked by `make_options` where the user gives it (here it may be traced: sofo.optim
    rebuilds the transform each step with the step's learning rate).
    """
    tangent_size, damping, sampler = options.tangent_size, options.damping, options.sampler
    adaptive, memory_size = options.adaptive, options.memory_size
    step_size = learning_rate
    # The state holds the key's raw uint32 data, not a typed key: plain arrays checkpoint everywhere
    # (flax.serialization, np.savez, equinox); the key is rebuilt (same implementation) at each step.
    key = _named_key(front, key)
    key_impl = jax.random.key_impl(key)
    key_data = jax.random.key_data(key)

    def init_fn(params):
        if params is None:
            raise TypeError(f"{front}'s init needs the parameters to train; call opt_state = optimizer.init(params).")
        _checks.check_tangent_count(tangent_size, sampler, _checks.check_params(params))
        dtype = _tangents.compute_dtype(params)
        start = _adaptive.initial_damping(damping, adaptive, tangent_size, dtype)
        return SofoState(
            key=key_data,
            count=jnp.zeros([], jnp.int32),
            value=jnp.zeros([], dtype),
            top_eigenvalue=jnp.zeros([], dtype),
            damping=start,
            ratio=jnp.zeros([], dtype),
            accepted=jnp.asarray(True),
            memory=_memory.init_memory(params, memory_size),
            held_out_ratio=jnp.zeros([], dtype),
            previous=_adaptive.init_previous(params, adaptive, start, dtype),
        )

    def update_fn(
        updates,
        state,
        params=None,
        *,
        fun=None,
        loss_fn=None,
        cell=None,
        z0=None,
        xs=None,
        ys=None,
        **extra_args,
    ):
        # `updates` is not read: the direction comes from forward-mode derivatives of `fun`/`cell`.
        # Other extra args are meant for other transforms in the chain.
        del updates, extra_args
        step, evaluate = _step(
            state, params, fun=fun, loss_fn=loss_fn, cell=cell, z0=z0, xs=xs, ys=ys, options=options, front=front
        )
        _check_state(state, params, front, memory_size, key_data, adaptive)
        state_key = jnp.asarray(state.key)
        if not jnp.issubdtype(state_key.dtype, jax.dtypes.prng_key):
            state_key = jax.random.wrap_key_data(state_key, impl=key_impl)
        next_key, step_key = jax.random.split(state_key)
        # Fixed damping comes from the config (so optax.inject_hyperparams can schedule it); adaptive
        # damping is carried in the state.
        eta = step_size(state.count) if callable(step_size) else step_size
        result = _adaptive.adaptive_step(
            lambda d, m, e=None: step(step_key, d, m, e), evaluate, params,
            state.damping if adaptive is not None else damping, state.memory, eta, adaptive, state.value.dtype,
            state.previous,
        )
        new_state = SofoState(
            key=jax.random.key_data(next_key),
            count=optax.safe_increment(state.count),
            value=jnp.asarray(result.value, state.value.dtype),
            top_eigenvalue=jnp.asarray(result.info.top_eigenvalue, state.top_eigenvalue.dtype),
            damping=result.damping,
            ratio=result.ratio,
            accepted=result.accepted,
            memory=result.memory,
            held_out_ratio=result.held_out_ratio.astype(state.value.dtype),
            previous=result.previous,
        )
        return result.direction, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_state(state, params, front, memory_size, key_data, adaptive=None):
    """The state must come from this configuration: a memory of `memory_size` directions shaped like
    `params` (or none), a previous step for next-batch re-judging exactly when the schedule asks for one,
    and a key of the configured kind. Says what differs (e.g. after a checkpoint is restored into another
    configuration)."""
    fix = (
        f"The state was built by a differently configured optimizer (e.g. a checkpoint saved with other "
        f"options); restore it into {front}(...) with the options it was saved with, or start afresh from "
        f"opt_state = optimizer.init(params)."
    )
    held = None
    if state.memory is not None:
        counts = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree_util.tree_leaves(state.memory)}
        held = counts.pop() if len(counts) == 1 else sorted(counts, key=str)
    if (state.memory is None) != (memory_size == 0) or (memory_size and held != memory_size):
        what = "no memory" if state.memory is None else f"a memory of {held} directions"
        raise ValueError(
            f"{front}: the optimizer state holds {what}, but this optimizer has memory_size={memory_size}. {fix}"
        )
    if state.memory is not None:
        try:
            _checks.check_memory(state.memory, params, memory_size + 1)
        except ValueError as error:
            raise ValueError(f"{front}: the optimizer state's memory does not match params: {error} {fix}") from None
    wants_previous = adaptive is not None and adaptive.next_batch
    if (state.previous is not None) != wants_previous:
        what = "a previous step to re-judge" if state.previous is not None else "no previous step"
        raise ValueError(
            f"{front}: the optimizer state holds {what}, but this optimizer has "
            f"{'AdaptiveDamping(next_batch=True)' if wants_previous else 'no next-batch re-judging'}. {fix}"
        )
    compares = adaptive is not None and bool(adaptive.held_out_compare)
    if state.previous is not None and (state.previous.alternative is not None) != compares:
        what = "an alternative step to compare" if state.previous.alternative is not None else "no alternative step"
        raise ValueError(
            f"{front}: the optimizer state holds {what}, but this optimizer has "
            f"{'AdaptiveDamping(held_out_compare=...)' if compares else 'no held-out comparison of dampings'}. {fix}"
        )
    if state.previous is not None and (
        jax.tree_util.tree_structure(_adaptive.previous_buffer(state.previous))
        != jax.tree_util.tree_structure(params)
    ):
        raise ValueError(f"{front}: the optimizer state's previous step does not have params' structure. {fix}")
    key = jnp.asarray(state.key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.shape != key_data.shape or key.dtype != key_data.dtype:
        raise ValueError(
            f"{front}: the optimizer state's key has shape {key.shape} and dtype {key.dtype}; this optimizer's "
            f"key data is {key_data.shape} {key_data.dtype}. {fix}"
        )


def _named_key(front, key):
    """`_checks.as_key(key)`, its error prefixed with the front the user called."""
    try:
        return _checks.as_key(key)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{front}: {error}") from None


def _step(state, params, *, fun, loss_fn, cell, z0, xs, ys, options, front="sofo.scale_by_sofo"):
    """Checks the call and returns `step(key) -> (value, direction, info)` from the matching engine."""
    if not isinstance(state, SofoState):
        raise TypeError(
            f"state must be the SofoState returned by init; got {type(state).__name__}. Call "
            f"opt_state = optimizer.init(params) and pass opt_state back to update."
        )
    if fun is not None and cell is not None:
        raise TypeError(
            f"pass either fun= (feedforward) or cell= (recurrent), not both: {_FEEDFORWARD_CALL}; or {_SCAN_CALL}."
        )
    call = _SCAN_CALL if cell is not None else _FEEDFORWARD_CALL
    if params is None:
        raise TypeError(f"{front}'s update needs the current params (it evaluates the model at them): {call}.")
    if fun is None and cell is None:
        raise TypeError(f"{front}'s update needs the model and the loss as keyword arguments: {call}.")
    if loss_fn is None:
        raise TypeError(f"{front}'s update needs loss_fn=: {call}.")
    for name, f in (("fun", fun), ("cell", cell), ("loss_fn", loss_fn)):
        if f is not None and not callable(f):
            raise TypeError(f"{name} must be callable; got {type(f).__name__}: {call}.")
    _checks.check_loss_signature(loss_fn, 2 if cell is not None else 1, front, "cell=" if cell is not None else "fun=")
    if _holds_masked_node(params):
        # Under optax.multi_transform / optax.masked the parameters this transform does not own arrive as
        # optax.MaskedNode; a model that reads them fails deep inside its own code, so say what to do.
        fun, cell = _explain_masked_node(fun, "fun", front), _explain_masked_node(cell, "cell", front)
    if cell is None:
        stray = [name for name, v in (("z0", z0), ("xs", xs), ("ys", ys)) if v is not None]
        if stray:
            raise TypeError(
                f"{', '.join(stray)} only apply to a recurrent cell; pass cell= instead of fun=: {_SCAN_CALL}."
            )
        engine = _engine.build(fun, loss_fn, options, front=front)
        step = lambda key, damping, memory, extra=None: engine(  # noqa: E731
            key, params, damping=damping, memory=memory, extra_dampings=extra
        )
        return step, lambda candidate: loss_fn(fun(candidate))
    missing = [name for name, v in (("z0", z0), ("xs", xs)) if v is None]
    if missing:
        raise TypeError(f"with cell=, update also needs {' and '.join(m + '=' for m in missing)}: {_SCAN_CALL}.")
    engine = _scan.build(cell, loss_fn, options, front=front)
    step = lambda key, damping, memory, extra=None: engine(  # noqa: E731
        key, params, z0, xs, ys, damping=damping, memory=memory, extra_dampings=extra
    )
    return step, lambda candidate: _adaptive.rollout_loss(cell, loss_fn, candidate, z0, xs, ys)


def check_step_size(step_size: Any, name: str = "step_size") -> None:
    """`sofo._checks.check_learning_rate` (kept under its old name for the brainstate-style fronts)."""
    _checks.check_learning_rate(step_size, name)


def unmask(params, full_params):
    """Fills the `optax.MaskedNode` entries of `params` from `full_params`.

    Under `optax.multi_transform` or `optax.masked`, `sofo.scale_by_sofo` receives the parameters it trains
    and `optax.MaskedNode` in place of the others, but the model needs all of them. Close over the full
    parameters when building the model: `fun = lambda p: model(sofo.unmask(p, params), x)`. SOFO then
    draws tangents for, and moves, only its own parameters; the others enter the model as constants.
    Parameters without `MaskedNode` are returned unchanged, so the same `fun` works unwrapped.

    Args:
      params: a pytree that may hold `optax.MaskedNode` in place of subtrees.
      full_params: the full parameters; `params` is a prefix of its structure.

    Returns:
      `params` with each `optax.MaskedNode` replaced by the matching subtree of `full_params`.
    """
    if not _holds_masked_node(params):
        return params
    usage = (
        "Call it as sofo.unmask(p, params) with p what sofo.scale_by_sofo receives and params the full parameters "
        "(the ones given to the outer optimizer's update), e.g. fun = lambda p: model(sofo.unmask(p, params), x)."
    )
    if full_params is None:
        raise TypeError(f"sofo.unmask(params, full_params) got full_params=None. {usage}")
    try:
        return jax.tree_util.tree_map(
            lambda own, full: full if isinstance(own, optax.MaskedNode) else own,
            params,
            full_params,
            is_leaf=_is_masked_node,
        )
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"sofo.unmask(params, full_params): the structure of params (with optax.MaskedNode for the parameters "
            f"this transform does not train) must be a prefix of full_params'; params is "
            f"{jax.tree_util.tree_structure(params, is_leaf=_is_masked_node)} but full_params is "
            f"{jax.tree_util.tree_structure(full_params)}. {usage}"
        ) from error


def _is_masked_node(x):
    return isinstance(x, optax.MaskedNode)


def _holds_masked_node(params):
    return any(_is_masked_node(leaf) for leaf in jax.tree_util.tree_leaves(params, is_leaf=_is_masked_node))


_UNMASK_EXAMPLE = {
    "fun": "fun = lambda p: model(sofo.unmask(p, params), x)",
    "cell": "cell = lambda p, z, x: rnn_cell(sofo.unmask(p, params), z, x)",
}


def _explain_masked_node(f, name, front="sofo.scale_by_sofo"):
    """`f`, re-raising its errors with the fill-from-full-params fix (params hold optax.MaskedNode)."""
    if f is None:
        return None

    def explained(params, *args):
        try:
            return f(params, *args)
        except Exception as error:
            raise TypeError(
                f"{name} failed on params holding optax.MaskedNode ({type(error).__name__}: {error}). Under "
                f"optax.multi_transform or optax.masked, {front} sees optax.MaskedNode in place of the "
                f"parameters it does not train; fill them from the full parameters inside {name}, e.g. "
                f"{_UNMASK_EXAMPLE[name]} with params the full parameters."
            ) from error

    return explained
