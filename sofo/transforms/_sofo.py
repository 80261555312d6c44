"""`sofo_grad` and `sofo_grad_scan`: brainstate-style fronts over the SOFO engine.

The direction always comes from `sofo.value_and_sofo_grad` / `sofo.value_and_sofo_grad_scan`; this module
only maps States and arguments onto the engine's `params` (the `diff` pytree of `_wrapper`) and back.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sofo import _adaptive, _checks, _engine, _memory, _options, _scan, _tangents
from sofo.transforms import _keys, _state, _wrapper
from sofo.transforms._wrapper import MISSING, Record, Spec


def _check_loss_fn(transform: str, loss_fn: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(
            f"{transform} needs loss_fn, a function from the model's outputs to a scalar loss; got "
            f"{type(loss_fn).__name__} ({loss_fn!r}). Pass e.g. loss_fn=lambda y: 0.5 * jnp.mean(y ** 2)."
        )


def _check_float_leaves(value: Any, where: str) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
        python_scalar = isinstance(leaf, (float, int, complex, bool))
        dtype = jnp.result_type(leaf) if python_scalar else getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            got = dtype if dtype is not None else type(leaf).__name__
            raise TypeError(
                f"{where}{jax.tree_util.keystr(path)} has dtype {got}, but SOFO moves only floating parameters. "
                f"Cast it (e.g. jnp.asarray(x, jnp.float32)), or do not differentiate it (leave it out of "
                f"grad_states / argnums)."
            )


def _check_float_params(spec: Spec, values: list, unread: set, args: tuple) -> None:
    """SOFO needs floating parameters: names the offending state or argument, before any work."""
    for path, state, value in zip(spec.state_paths, spec.states, values):
        if state not in unread:
            _check_float_leaves(value, path)
    for index in spec.argnum_tuple:
        _check_float_leaves(args[index], f"args[{index}]")
    if spec.argnums is None and len(unread) == len(spec.states):
        raise ValueError(
            f"{spec.transform}: {_wrapper.fun_name(spec.fun)} reads none of grad_states and no argument is "
            f"selected by argnums, so there is nothing to optimise. Pass the States the function reads."
        )


def _engine_params(spec: Spec, values: list, unread: set, args: tuple) -> Any:
    """diff with None for unread states: the engine then neither samples nor moves them."""
    if not unread:
        return spec.pack(values, args)
    return spec.pack([None if s in unread else v for s, v in zip(spec.states, values)], args)


def _fill_unread(spec: Spec, direction: Any, values: list, unread: set) -> Any:
    """Puts zeros (shaped like the state) where the engine left None for an unread state."""
    if not unread:
        return direction
    var_values, arg_values = spec.unpack(direction)
    filled = [
        jax.tree_util.tree_map(jnp.zeros_like, value) if state in unread else d
        for state, value, d in zip(spec.states, values, var_values)
    ]
    return spec.pack(filled, arg_values)


class AdaptiveState:
    """Levenberg-Marquardt damping and memory kept between the calls of a transformed function.

    Attributes (after each call):
      damping: the damping the next call will use.
      ratio: the last reduction ratio rho = actual / predicted reduction (None before any call).
      accepted: whether the last direction was returned (False: it was rejected, zeros were returned).
      memory: the stored directions (in the engine's parameter layout), or None.
      held_out_ratio: the previous step's reduction ratio on this call's data (`sofo.AdaptiveDamping`'s
        next_batch; with held_out_compare, the alternative damping's gain over the step's curvature term
        q instead; None before any call and without next_batch, 0 after the first call).
      previous: the last step, kept to re-judge it on the next call's data, or None.
    """

    def __init__(self, transform, options, learning_rate):
        """`options` come validated from `sofo._options.make_options` (learning_rate included)."""
        if callable(learning_rate):
            raise ValueError(
                f"{transform}: learning_rate must be a positive float here (no step count is kept)."
            )
        self.config = options.adaptive
        self.memory_size = options.memory_size
        self.transform = transform
        self.tangent_size = options.tangent_size
        self.step_size = float(learning_rate)
        self.damping = options.damping
        self.ratio = None
        self.accepted = None
        self.memory = None
        self.held_out_ratio = None
        self.previous = None

    @property
    def active(self) -> bool:
        return self.config is not None or self.memory_size > 0

    def inputs(self, params: Any, arrays: Any) -> tuple[Any, Any]:
        """The (damping, memory) to pass into a step; refuses traced calls (the state lives in Python)."""
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(arrays)):
            raise TypeError(
                f"{self.transform}(adaptive_damping=..., memory_size=...) keeps its damping and memory between "
                f"calls, so it must be called eagerly, not under jax.jit or another trace. Under jit use "
                f"sofo.sofo(...) or sofo.scale_by_sofo(adaptive_damping=True, ...), whose state is explicit."
            )
        if self.memory is None and self.memory_size:
            self.memory = _memory.init_memory(params, self.memory_size)
        dtype = _tangents.compute_dtype(params)
        if self.config is not None:
            # The initial damping within the schedule's bounds, as every later one (a no-op after a call).
            self.damping = float(_adaptive.initial_damping(self.damping, self.config, self.tangent_size, dtype))
        if self.previous is not None and (
            jax.tree_util.tree_structure(_adaptive.previous_buffer(self.previous))
            != jax.tree_util.tree_structure(params)
        ):
            self.previous = None  # the differentiated States changed: nothing comparable to re-judge
        if self.previous is None:
            self.previous = _adaptive.init_previous(params, self.config, self.damping, dtype)
        return jnp.asarray(self.damping, dtype), self.memory, self.previous

    def run(self, engine_call, evaluate, params, damping, memory, previous):
        """Inside the compiled step: one adaptive step; returns (direction, the new state's arrays)."""
        dtype = _tangents.compute_dtype(params)
        result = _adaptive.adaptive_step(
            engine_call, evaluate, params, damping, memory, self.step_size, self.config, dtype, previous
        )
        new_state = (
            result.damping, result.ratio, result.accepted, result.memory, result.held_out_ratio, result.previous
        )
        return result.direction, new_state

    def update(self, new_state) -> None:
        damping, ratio, accepted, memory, held_out_ratio, previous = new_state
        self.damping = float(damping)
        self.ratio = float(ratio) if self.config is not None else None
        self.accepted = bool(accepted)
        self.memory = memory
        self.previous = previous
        self.held_out_ratio = float(held_out_ratio) if previous is not None else None


def sofo_grad(
    fun: Callable[..., Any],
    loss_fn: Callable[[Any], jax.Array],
    grad_states: Any = None,
    argnums: int | tuple[int, ...] | None = None,
    has_aux: bool | None = None,
    return_value: bool = False,
    check_states: bool = True,
    loss: str | None = None,
    tangent_size: int = 100,
    damping: float = 1e-5,
    key: Any = None,
    sampler: str = "normal",
    tangent_chunk_size: int | None = None,
    *,
    curvature: str | None = None,
    adaptive_damping: Any = False,
    learning_rate: float = _checks.DEFAULT_LEARNING_RATE,
    step_size: float | None = None,
    memory_size: int = 0,
    grad_vars: Any = MISSING,
    dyn_vars: Any = MISSING,
    reduce_axes: Any = (),
) -> Callable[..., Any]:
    """SOFO direction (a damped Gauss-Newton step in a random subspace) w.r.t. States and/or arguments.

    Args:
      fun: the model, `fun(*args, **kwargs) -> outputs` (or `(outputs, aux)` with has_aux); it may read
        its parameters from States.
      loss_fn: `loss_fn(outputs) -> scalar`.
      grad_states, argnums, has_aux, return_value, check_states, grad_vars, dyn_vars, reduce_axes: as in
        `sofo.transforms.grad`; States may be `sofo.State` objects or brainstate's own (e.g.
        `module.states(brainstate.ParamState)`). A state `fun` does not read (with check_states=False) gets
        a zero direction.
      loss, curvature: the curvature form (`loss` is brainstate's name, `curvature` sofo's; pass one): as
        `curvature` in `sofo.value_and_sofo_grad`. None (default) is "exact", right for any `loss_fn`;
        "mse" and "ce" are fast paths checked against `loss_fn` (a `CurvatureWarning` when they differ).
      tangent_size, damping, sampler, tangent_chunk_size: as in `sofo.value_and_sofo_grad`.
      key: a `jax.random.key`, legacy PRNGKey or int seed used for every call of the returned function
        (build the transform per step with a fresh key, e.g. inside a jitted step). With None, each call
        draws the next key of sofo's own sequence (seed it with `sofo.transforms.seed(n)`); a call that
        raises gives its key back. That needs concrete execution, so under jax.jit pass key=.
      adaptive_damping, learning_rate, memory_size: Levenberg-Marquardt damping and subspace memory as in
        `sofo.scale_by_sofo` (`damping` is then the initial value, and `learning_rate` must be the one you
        apply: `value - learning_rate * direction`). Each call also evaluates the loss at
        `params - learning_rate * direction`; a step that would raise the loss (or is not finite) is rejected
        and a zero direction returned. The damping and memory live on the returned function, as
        `fn.adaptive` (an `AdaptiveState`: `damping`, `ratio`, `accepted`), between eager calls; under
        jax.jit use `sofo.sofo`, whose state is explicit.
      step_size: the old name of `learning_rate` (deprecated: a DeprecationWarning; not both).

    Returns:
      A function with `fun`'s arguments returning the direction in the layout of `grad`'s return table
      (subtract it: `params - lr * direction`), then, with return_value, what `fun` returns (the model
      output, not the loss: brainstate's `sofo_grad` returned it too, so `grads, pred = g(x);
      loss = loss_fn(pred)` carries over), and aux with has_aux. The direction is
      `sofo.value_and_sofo_grad(...)(key, params)` on `params` = that same layout of the current values.
      `fun` also runs once primal only, compiled together with the engine, to produce its output, aux and
      the values of the States it writes. Eager calls are compiled once per structure, shapes and dtypes
      of the arguments (Python scalars and other non-array arguments are static), so later calls compile
      nothing; the States `fun` reads are passed in, never frozen into the compiled function.

    References:
      Yu et al., "Second-order forward-mode optimization of recurrent neural networks for neuroscience",
      NeurIPS 2024.
    """
    grad_states = _wrapper.resolve_migration("sofo_grad", grad_states, grad_vars, dyn_vars, reduce_axes)
    spec = _wrapper.make_spec(
        "sofo_grad", fun, grad_states=grad_states, argnums=argnums, has_aux=has_aux,
        return_value=return_value, check_states=check_states,
    )
    _check_loss_fn("sofo_grad", loss_fn)
    _checks.check_loss_signature(loss_fn, 1, "sofo.transforms.sofo_grad", "its model fun")
    curvature = _checks.resolve_curvature(curvature, loss, "sofo_grad", deprecated=False)
    learning_rate = _checks.resolve_learning_rate(learning_rate, step_size, "sofo_grad")
    options = _options.make_options(
        "sofo_grad", tangent_size=tangent_size, damping=damping, curvature=curvature, sampler=sampler,
        tangent_chunk_size=tangent_chunk_size, memory_size=memory_size, adaptive_damping=adaptive_damping,
        learning_rate=learning_rate,
    )
    fixed_key = None if key is None else _checks.as_key(key)
    adaptive = AdaptiveState("sofo_grad", options, learning_rate)
    cache: dict = {}

    def step(key, values, unread, args, kwargs, adaptive_inputs):
        params = _engine_params(spec, values, unread, args)

        def model(p):
            return spec.call(p, args, kwargs, Record())[0]

        engine = _engine.build(model, loss_fn, options, front="sofo.transforms.sofo_grad")
        new_adaptive = None
        if adaptive_inputs is None:
            _, direction, _ = engine(key, params)
        else:
            direction, new_adaptive = adaptive.run(
                lambda d, m, e=None: engine(key, params, damping=d, memory=m, extra_dampings=e),
                lambda p: loss_fn(model(p)), params,
                *adaptive_inputs,
            )
        direction = _fill_unread(spec, direction, values, unread)
        # The engine's traced passes cannot hand out fun's output, aux or written values; one primal
        # call does (XLA shares its work with the engine's primal pass when they are compiled together).
        output, aux, written_values = spec.call(spec.pack(values, args), args, kwargs, Record())
        return direction, output, aux, written_values, new_adaptive

    @functools.wraps(fun)
    def transformed(*args, **kwargs):
        with _state.exclusive():
            spec.check_args(args)
            values = _wrapper.current_values(spec)
            diff = spec.pack(values, args)
            record = spec.discover(diff, args, kwargs)
            unread = set(spec.unread_states(record))
            _check_float_params(spec, values, unread, args)
            unread_flags = tuple(s in unread for s in spec.states)
            adaptive_inputs = None
            if adaptive.active:
                adaptive_inputs = adaptive.inputs(_engine_params(spec, values, unread, args), (values, args))
            with _keys.step_key("sofo_grad", fixed_key) as key:
                direction, output, aux, written_values, new_adaptive = _wrapper.run_cached(
                    cache,
                    lambda k, v, flags, a, kw, ad: step(
                        k, v, {s for s, u in zip(spec.states, flags) if u}, a, kw, ad
                    ),
                    _wrapper.context_states(spec, record),
                    # the flags are static: in the cache key
                    (key, values, unread_flags, tuple(args), kwargs, adaptive_inputs),
                )
            if new_adaptive is not None:
                adaptive.update(new_adaptive)
            _wrapper.write_back(spec, record.written, written_values)
            return spec.assemble(direction, output, aux)

    transformed.adaptive = adaptive
    return transformed


def _first_step(transform: str, xs: Any) -> Any:
    def first(path, leaf):
        if np.ndim(leaf) == 0:
            raise ValueError(
                f"{transform}: xs{jax.tree_util.keystr(path)} is a scalar; every leaf of xs needs a leading "
                f"time axis (time-major inputs, shape (T, ...))."
            )
        if np.shape(leaf)[0] == 0:
            # T = 0: no step to index; a stand-in of one step's shape is enough to trace the cell.
            return jnp.zeros(np.shape(leaf)[1:], jnp.result_type(leaf))
        return leaf[0]

    return jax.tree_util.tree_map_with_path(first, xs)


def sofo_grad_scan(
    cell: Callable[..., Any],
    loss_fn: Callable[[Any, Any], jax.Array],
    grad_states: Any = None,
    argnums: int | tuple[int, ...] | None = None,
    has_aux: bool | None = None,
    return_value: bool = False,
    check_states: bool = True,
    loss: str | None = None,
    tangent_size: int = 100,
    damping: float = 1e-5,
    key: Any = None,
    sampler: str = "normal",
    tangent_chunk_size: int | None = None,
    *,
    curvature: str | None = None,
    adaptive_damping: Any = False,
    learning_rate: float = _checks.DEFAULT_LEARNING_RATE,
    step_size: float | None = None,
    memory_size: int = 0,
    grad_vars: Any = MISSING,
    dyn_vars: Any = MISSING,
    reduce_axes: Any = (),
) -> Callable[..., Any]:
    """Recurrent SOFO direction, memory constant in time, w.r.t. States and/or the cell's arguments.

    The returned function is called as `g(*cell_args, z0, xs, ys, **kwargs)`: the last three positional
    arguments are always the initial latent `z0` and the time-major inputs `xs` and targets `ys`, and the
    cell is called as `cell(*cell_args, z, x, **kwargs)`. `argnums` counts within `cell_args` (so it
    defaults to 0, the first cell argument, when there are no grad_states); `z0`, `xs` and `ys` are never
    differentiated.

    Args:
      cell: `cell(*cell_args, z, x) -> (z_new, y)`, or `((z_new, y), aux)` with has_aux; it may read its
        parameters from States but must not write States (carry such values in `z`).
      loss_fn: `loss_fn(y_t, ys_t) -> scalar`; the total loss is its sum over time.
      grad_states, argnums, has_aux, return_value, check_states, key: as in `sofo_grad`. With has_aux
        the per-step aux is returned stacked over time, as `lax.scan` stacks it (the cell is scanned once
        more, primal only, to produce it).
      adaptive_damping, learning_rate, memory_size, grad_vars, dyn_vars, reduce_axes: as in `sofo_grad` (with
        adaptive damping the extra evaluation is one rollout of the cell without tangents).
      loss, curvature, tangent_size, damping, sampler, tangent_chunk_size: as in `sofo_grad` and
        `sofo.value_and_sofo_grad_scan`.

    Returns:
      A function returning the direction in the layout of `grad`'s return table (over grad_states and
      the selected cell arguments), then, with return_value, the cell's outputs y_t stacked over time
      (shape (T, ...), as `lax.scan` stacks them; not the loss), and the stacked aux with has_aux. The
      direction is `sofo.value_and_sofo_grad_scan(...)(key, params, z0, xs, ys)`. Eager calls compile
      once per input structure, as in `sofo_grad`.

    Example:
      >>> W = sofo.State(w0)
      >>> def cell(z, x):
      ...   z = jnp.tanh(z @ W.value + x)
      ...   return z, z
      >>> g = sofo.transforms.sofo_grad_scan(cell, lambda y, t: 0.5 * jnp.mean((y - t) ** 2), grad_states=W)
      >>> W.value = W.value - 0.5 * g(z0, xs, ys)

    References:
      Yu et al., NeurIPS 2024, Section 3 (recurrent networks).
    """
    transform = "sofo_grad_scan"
    grad_states = _wrapper.resolve_migration(transform, grad_states, grad_vars, dyn_vars, reduce_axes)
    spec = _wrapper.make_spec(
        transform, cell, grad_states=grad_states, argnums=argnums, has_aux=has_aux,
        return_value=return_value, check_states=check_states,
    )
    _check_loss_fn(transform, loss_fn)
    _checks.check_loss_signature(loss_fn, 2, "sofo.transforms.sofo_grad_scan", "its cell")
    curvature = _checks.resolve_curvature(curvature, loss, transform, deprecated=False)
    learning_rate = _checks.resolve_learning_rate(learning_rate, step_size, transform)
    options = _options.make_options(
        transform, tangent_size=tangent_size, damping=damping, curvature=curvature, sampler=sampler,
        tangent_chunk_size=tangent_chunk_size, memory_size=memory_size, adaptive_damping=adaptive_damping,
        learning_rate=learning_rate,
    )
    fixed_key = None if key is None else _checks.as_key(key)
    adaptive = AdaptiveState(transform, options, learning_rate)
    cache: dict = {}

    def step(key, values, unread, cell_args, z0, xs, ys, kwargs, adaptive_inputs):
        params = _engine_params(spec, values, unread, cell_args)

        def engine_cell(p, z, x):
            return spec.call(p, cell_args + (z, x), kwargs, Record())[0]

        engine = _scan.build(engine_cell, loss_fn, options, front="sofo.transforms.sofo_grad_scan")
        new_adaptive = None
        if adaptive_inputs is None:
            _, direction, _ = engine(key, params, z0, xs, ys)
        else:
            direction, new_adaptive = adaptive.run(
                lambda d, m, e=None: engine(key, params, z0, xs, ys, damping=d, memory=m, extra_dampings=e),
                lambda p: _adaptive.rollout_loss(engine_cell, loss_fn, p, z0, xs, ys),
                params,
                *adaptive_inputs,
            )
        direction = _fill_unread(spec, direction, values, unread)
        diff = spec.pack(values, cell_args)

        def primal_step(z, x):
            (z_new, y), aux_t, _ = spec.call(diff, cell_args + (z, x), kwargs, Record())
            return z_new, (y, aux_t)

        # The outputs (and aux) of every step, stacked as lax.scan stacks them, from one primal scan.
        _, (outputs, aux) = jax.lax.scan(primal_step, z0, xs)
        return direction, outputs, aux, new_adaptive

    @functools.wraps(cell)
    def transformed(*args, **kwargs):
        if len(args) < 3:
            raise TypeError(
                f"{transform}: the transformed function takes (*cell_args, z0, xs, ys) and was called with "
                f"{len(args)} positional argument(s). Pass the initial latent z0, the time-major inputs xs and "
                f"the targets ys as the last three positional arguments."
            )
        cell_args, (z0, xs, ys) = tuple(args[:-3]), args[-3:]
        with _state.exclusive():
            spec.check_args(cell_args, " before the trailing z0, xs, ys")
            values = _wrapper.current_values(spec)
            diff = spec.pack(values, cell_args)
            record = spec.discover(diff, cell_args + (z0, _first_step(transform, xs)), kwargs)
            if record.written:
                names = ", ".join(_state.describe(s) for s in record.written)
                raise ValueError(
                    f"{transform}: {_wrapper.fun_name(cell)} writes {names}; a scanned cell cannot write States "
                    f"(each step's value would be a tracer). Carry that value in the latent z instead."
                )
            unread = set(spec.unread_states(record))
            _check_float_params(spec, values, unread, cell_args)
            unread_flags = tuple(s in unread for s in spec.states)
            adaptive_inputs = None
            if adaptive.active:
                adaptive_inputs = adaptive.inputs(
                    _engine_params(spec, values, unread, cell_args), (values, cell_args, z0, xs, ys)
                )
            with _keys.step_key(transform, fixed_key) as key:
                direction, outputs, aux, new_adaptive = _wrapper.run_cached(
                    cache,
                    lambda k, v, flags, a, z, x, y, kw, ad: step(
                        k, v, {s for s, u in zip(spec.states, flags) if u}, a, z, x, y, kw, ad
                    ),
                    _wrapper.context_states(spec, record),
                    (key, values, unread_flags, cell_args, z0, xs, ys, kwargs, adaptive_inputs),
                )
            if new_adaptive is not None:
                adaptive.update(new_adaptive)
            return spec.assemble(direction, outputs, aux)

    transformed.adaptive = adaptive
    return transformed
