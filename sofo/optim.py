"""Optimizer objects over stateful models: `SOFO` and `SOFOScan`, a drop-in for braintools 0.4's.

    opt = sofo.optim.SOFO(model, loss_fn, lr=1.0, tangent_size=32)
    opt.register_trainable_weights(model.states(brainstate.ParamState))
    loss = opt.step(inputs, targets)   # the parameters in the States move; the loss before the step

The step is an optax transform with `update(updates, state, params, *, fun, loss_fn)` (or `cell=`,
`z0=`, `xs=`, `ys=` for `SOFOScan`), so nothing here computes a direction: it maps the trainable States
onto `params`, calls the optimizer and writes the new values back. Eagerly, each step is compiled once
per input shapes (States the model reads besides the trainable ones are inputs, never frozen
constants). The optimizer state and the step count live in States (brainstate
`LongTermState` objects once brainstate is imported), so `opt.step` also runs inside
`brainstate.transform.jit` and `brainstate.transform.for_loop`, which carry them.
"""

from __future__ import annotations

import numbers
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sofo import _alias, _checks, _optax, _options
from sofo.transforms import _state, _wrapper
from sofo.transforms._wrapper import Record

__all__ = ["SOFO", "SOFOScan", "NotRegisteredError"]

_LOSSES = ("mse", "ce", "exact")
_TIME_LOSSES = ("mean", "sum", "stacked")


class NotRegisteredError(RuntimeError, ValueError):
    """`step` before `register_trainable_weights` (a ValueError as in braintools, and a RuntimeError)."""


def _is_braintools_scheduler(lr: Any) -> bool:
    """A braintools `LRScheduler` (duck-typed: sofo never imports braintools)."""
    return hasattr(lr, "current_lrs") and hasattr(lr, "base_lrs") and hasattr(lr, "get_last_lr")


def _holder(value: Any) -> Any:
    """A State for the optimizer's own values: a brainstate `LongTermState` if brainstate is imported (so
    brainstate's jit and for_loop carry it), else a `sofo.State`."""
    brainstate = sys.modules.get("brainstate")
    if brainstate is not None:
        return brainstate.LongTermState(value)
    return _state.State(value)


def _has_tracer(tree: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def _has_sofo_state(opt_state: Any) -> bool:
    """Whether an optimizer state holds a `sofo.scale_by_sofo` (its optimizer computes its own direction)."""
    is_sofo = lambda x: isinstance(x, _optax.SofoState)  # noqa: E731
    return any(is_sofo(x) for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_sofo))


class _Optimizer:
    """What SOFO and SOFOScan share: the trainable States, the optimizer state, the compiled step."""

    _kind = ""

    def __init__(
        self,
        model: Callable[..., Any],
        loss_fn: Callable[..., Any],
        lr: Any = 1.0,
        loss: str | None = None,
        tangent_size: int = 100,
        damping: float = _alias.DEFAULT_DAMPING,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        grad_clip_norm: float | None = None,
        grad_clip_value: float | None = None,
        key: Any = None,
        *,
        sampler: str = "balanced",
        tangent_chunk_size: int | None = None,
        adaptive_damping: Any = True,
        memory_size: int | None = None,
        optimizer: optax.GradientTransformation | None = None,
    ):
        where = f"sofo.optim.{self._kind}"
        for name, f in (("model", model), ("loss_fn", loss_fn)):
            if not callable(f):
                raise TypeError(f"{where} needs a callable {name}; got {type(f).__name__} ({f!r}).")
        if loss is not None and not isinstance(loss, str):
            raise TypeError(
                f"{where}: loss must be one of {_LOSSES}; got {loss!r}. The positional order is braintools' "
                f"(model, loss_fn, lr, loss, tangent_size, damping, ...): pass tangent_size=... by keyword."
            )
        _check_lr(where, lr)
        for name, value, allow_zero in (
            ("momentum", momentum, True), ("weight_decay", weight_decay, True),
            ("grad_clip_norm", grad_clip_norm, False), ("grad_clip_value", grad_clip_value, False),
        ):
            if value is None and name.startswith("grad_clip"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or (
                value < 0 or (value == 0 and not allow_zero)
            ):
                bound = ">= 0" if allow_zero else "> 0 (or None for no clipping)"
                raise ValueError(f"{where}: {name} must be a finite number {bound}; got {value!r}.")
        if momentum >= 1:
            raise ValueError(f"{where}: momentum must lie in [0, 1); got {momentum!r}.")
        self.model = model
        self.loss_fn = loss_fn
        self.lr = lr
        self.loss = loss
        self.tangent_size = tangent_size
        self.damping = damping
        self.momentum = momentum
        self.nesterov = bool(nesterov)
        self.weight_decay = weight_decay
        self.grad_clip_norm = grad_clip_norm
        self.grad_clip_value = grad_clip_value
        self.key = key
        self._options = _options.make_options(
            where, tangent_size=tangent_size, damping=damping,
            curvature=_checks.resolve_curvature(None, loss, where, deprecated=False), sampler=sampler,
            tangent_chunk_size=tangent_chunk_size, adaptive_damping=adaptive_damping,
            memory_size=_alias.default_memory_size(tangent_size) if memory_size is None else memory_size,
            curvature_name="loss",
        )
        self._where = where
        self._custom = optimizer
        if optimizer is None:
            # Built once here so bad options are refused before any work; rebuilt per step with the
            # step's learning rate (a traced scalar), which leaves the state's structure unchanged.
            self._build(self._lr_value(0), key=0)
        self._holders: dict = {}
        self._spec = None
        self._cache: dict = {}

    # -- the optimizer --------------------------------------------------------------------------------

    def _build(self, lr: Any, key: Any) -> optax.GradientTransformation:
        """The default chain: sofo.scale_by_sofo (LM damping, memory), braintools' extras, then the step."""
        parts = [_optax.build(self._where, self._options, key=key, learning_rate=lr)]
        if self.grad_clip_norm is not None:
            parts.append(optax.clip_by_global_norm(self.grad_clip_norm))
        if self.grad_clip_value is not None:
            parts.append(optax.clip(self.grad_clip_value))
        if self.momentum > 0:
            parts.append(optax.trace(decay=self.momentum, nesterov=self.nesterov))
        if self.weight_decay > 0:
            parts.append(optax.add_decayed_weights(self.weight_decay))
        parts.append(_alias._scale_by_finite_learning_rate(lr))  # exact zeros where lr is not finite
        return optax.chain(*parts)

    @property
    def optimizer(self) -> optax.GradientTransformation:
        """The optax transform each step runs (the default one at the current learning rate)."""
        if self._custom is not None:
            return self._custom
        return self._build(self._lr_value(self._count_value()), key=0 if self.key is None else self.key)

    def _lr_value(self, count: Any) -> Any:
        """The learning rate of the step `count` (a positive number; a braintools scheduler's own lr)."""
        lr = self.lr
        if _is_braintools_scheduler(lr):
            # braintools' scheduler returns -lr when called (for its own optax chain); its current_lrs
            # hold the learning rate itself, which is what a SOFO step scales by.
            current = lr.current_lrs.value
            return jnp.asarray(current[0] if len(current) else lr.base_lrs[0])
        if callable(lr):
            return jnp.asarray(lr(count))
        return lr

    def _tangent_key(self) -> Any:
        if self.key is not None:
            return self.key
        brainstate = sys.modules.get("brainstate")
        # As braintools does: tangents follow brainstate.random.seed(...); without brainstate, seed 0.
        return brainstate.random.split_key() if brainstate is not None else 0

    # -- braintools' attributes -------------------------------------------------------------------------

    def _state_of(self, name: str, value: Any) -> Any:
        if name not in self._holders:
            self._holders[name] = _holder(value)
        return self._holders[name]

    @property
    def step_count(self) -> Any:
        """The number of steps taken, a State (read `.value`), as in braintools."""
        return self._state_of("step_count", jnp.asarray(0, jnp.int32))

    @property
    def opt_state(self) -> Any:
        """The optax state, a State (read `.value`), as in braintools; None before registration."""
        return self._holders.get("opt_state")

    def _count_value(self) -> Any:
        return self.step_count.value

    @property
    def current_lr(self) -> Any:
        """The learning rate the next step uses."""
        return self._lr_value(self._count_value())

    @property
    def base_lr(self) -> Any:
        lr = self.lr
        if _is_braintools_scheduler(lr):
            return lr.base_lrs[0]
        return lr(0) if callable(lr) else lr

    def get_last_lr(self) -> list:
        """[the current learning rate], as braintools' `get_last_lr`."""
        return [self.current_lr]

    @property
    def param_states(self) -> Any:
        """The registered trainable States, in the structure they were registered in."""
        return None if self._spec is None else self._spec.states_treedef.unflatten(self._spec.states)

    def register_trainable_weights(self, states: Any) -> "_Optimizer":
        """Registers the States to train and initialises the optimizer state from their values.

        Args:
          states: a State (`brainstate.ParamState`, `sofo.State`, ...) or a list, tuple or dict of them,
            e.g. `model.states(brainstate.ParamState)`.

        Returns:
          self.
        """
        if self._spec is not None:
            raise ValueError(
                f"sofo.optim.{self._kind}: trainable weights are already registered; register all of them in "
                f"one call (e.g. a dict of States), or build a new optimizer."
            )
        spec = _wrapper.make_spec(
            f"sofo.optim.{self._kind}.register_trainable_weights", self.model, grad_states=states,
            argnums=None, has_aux=False, return_value=False, check_states=True,
        )
        params = spec.pack([state.value for state in spec.states], ())
        optimizer = self._custom if self._custom is not None else self._build(
            self._lr_value(0), key=self._tangent_key()
        )
        opt_state = optimizer.init(params)
        self._spec = spec
        self._gradient = not _has_sofo_state(opt_state)
        self.step_count  # noqa: B018  (created before the first step, so a trace sees it)
        self._holders["opt_state"] = _holder(opt_state)
        return self

    def state_dict(self) -> dict:
        """The optimizer's state as a dict (braintools' keys: step_count, lr, base_lr, opt_state)."""
        return {
            "step_count": self.step_count.value,
            "lr": self.current_lr,
            "base_lr": self.base_lr,
            "opt_state": None if self.opt_state is None else self.opt_state.value,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores what `state_dict` returned (after `register_trainable_weights`, as in braintools).

        The optimizer state must have this optimizer's structure; a flax-serialised (msgpack) state
        dict is mapped back onto it when flax is installed.
        """
        where = f"sofo.optim.{self._kind}.load_state_dict"
        if not isinstance(state_dict, dict) or "step_count" not in state_dict:
            raise TypeError(f"{where} takes the dict opt.state_dict() returned; got {type(state_dict).__name__}.")
        saved = state_dict.get("opt_state")
        if saved is not None:
            self._require_weights()
            template = self.opt_state.value
            if _layout(saved) != _layout(template):
                try:
                    import flax.serialization as serialization
                except ImportError:
                    serialization = None
                try:
                    if serialization is None:
                        raise ValueError
                    saved = serialization.from_state_dict(template, serialization.to_state_dict(saved))
                    if _layout(saved) != _layout(template):
                        raise ValueError
                except Exception:  # noqa: BLE001  (reported below, with what to do)
                    raise ValueError(
                        f"{where}: the saved opt_state does not have this optimizer's structure (built with other "
                        f"options, or other trainable weights); build the optimizer as it was when saved."
                    ) from None
            self.opt_state.value = saved
        self.step_count.value = jnp.asarray(state_dict["step_count"], jnp.int32)

    # -- the step ---------------------------------------------------------------------------------------

    def _params(self) -> Any:
        return self._spec.pack([state.value for state in self._spec.states], ())

    def _require_weights(self) -> None:
        if self._spec is None:
            raise NotRegisteredError(
                f"sofo.optim.{self._kind}.step: no trainable weights; call "
                f"opt.register_trainable_weights(model.states(brainstate.ParamState)) first."
            )

    def _update(self, params: Any, opt_state: Any, lr: Any, loss_value: Callable[[Any], Any], **extra: Any):
        """One optimizer update: the SOFO chain with `extra` (fun/loss_fn or the cell's arguments), or a
        gradient optimizer fed jax.grad of the loss."""
        if self._gradient:
            grads = jax.grad(loss_value)(params)
            optimizer = self._custom
            return optimizer.update(grads, opt_state, params)
        optimizer = self._custom if self._custom is not None else self._build(lr, key=0)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        return optimizer.update(zeros, opt_state, params, **extra)

    def _run(self, model_args: tuple, body: Callable[..., Any], inputs: tuple) -> jax.Array:
        """Runs the step (compiled once per input shapes, or inside an enclosing brainstate trace) and
        writes the new parameters, optimizer state, step count and the States the model wrote."""
        self._require_weights()
        with _state.exclusive():
            params = self._params()
            opt_state = self.opt_state.value
            count = self.step_count.value
            lr = self._lr_value(count)
            traced = _has_tracer((params, inputs, opt_state, count, lr))
            if traced and not all(
                _state.is_brainstate_state(s) and _has_tracer(s.value) for s in self._spec.states
            ):
                raise RuntimeError(
                    f"sofo.optim.{self._kind}.step was called under a jax trace (jax.jit, jax.vmap, ...) that does "
                    f"not carry States, so the new parameters would be tracers. Use brainstate.transform.jit / "
                    f"for_loop over brainstate States (they carry the optimizer state too), or call opt.step(...) "
                    f"eagerly (it compiles itself once per input shapes)."
                )
            record = self._spec.discover(params, model_args, {})
            written = list(record.written)
            new_params, new_opt_state, loss, written_values = _wrapper.run_cached(
                self._cache, lambda *a: body(written, *a), _wrapper.context_states(self._spec, record),
                (params, opt_state, jnp.asarray(lr)) + inputs,
            )
            self.opt_state.value = new_opt_state
            self.step_count.value = count + 1
            for state, value in zip(self._spec.states, self._spec.states_treedef.flatten_up_to(new_params)):
                _state.assign(state, value)
            _wrapper.write_back(self._spec, written, written_values)
        return loss

    def _call(self, params: Any, args: tuple, written: list | None = None) -> Any:
        """The model at `params`; with `written`, also the values of those States it wrote, in order."""
        record = Record()
        output, _, values = self._spec.call(params, args, {}, record)
        if written is None:
            return output
        by_state = dict(zip(record.written, values))
        return output, [by_state[s] for s in written]

    def _direction_key(self) -> Any:
        key = _checks.as_key(0 if self.key is None else self.key)
        return jax.random.fold_in(key, self.step_count.value)

    def update(self, *args: Any) -> jax.Array:
        """Alias of `step`, taking the data (not gradients), as braintools' SOFO.update."""
        return self.step(*args)


def _layout(tree: Any) -> tuple:
    """A state's structure with each leaf's shape and dtype (what a restored state must match)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(leaf), str(getattr(leaf, "dtype", type(leaf).__name__))) for leaf in leaves)


def _check_lr(where: str, lr: Any) -> None:
    if _is_braintools_scheduler(lr) or callable(lr):
        return
    if not isinstance(lr, (bool, np.bool_)) and np.shape(lr) == () and jnp.issubdtype(
        getattr(lr, "dtype", type(lr)), jnp.floating
    ) and not isinstance(lr, jax.core.Tracer):
        lr = float(lr)  # a numpy / jax float scalar
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (np.isfinite(lr) and lr > 0):
        raise ValueError(
            f"{where}: lr must be a positive finite float, an optax schedule (step count -> lr) or a braintools "
            f"scheduler; got {lr!r}."
        )


_ARGS_DOC = """
      lr: the learning rate, params <- params - lr * direction: a float (1.0, the full damped Gauss-Newton
        step, by default: the adaptive damping acts as a trust region), an optax schedule of the step count,
        or a braintools scheduler (`braintools.optim.StepLR(...)`, ...; advance it with its `step()`).
      loss: the curvature form (braintools' name for `sofo.sofo`'s `curvature`): None (default) for
        "exact", the Hessian of `loss_fn` itself, right for any loss (braintools defaults to "mse", which
        is right only for 0.5 * mean squared error); "mse" or "ce" for the fast paths, checked against
        `loss_fn` every step (a `sofo.CurvatureWarning` when they differ).
      tangent_size: K, the number of tangents per step.
      damping: the initial relative damping (adapted every step unless adaptive_damping=False).
      momentum, nesterov, weight_decay, grad_clip_norm, grad_clip_value: as in braintools, applied to the
        SOFO direction in braintools' order (clip by norm, clip by value, momentum, decoupled weight
        decay) before the step.
      key: a `jax.random.key`, a legacy `PRNGKey` or an int seed; None (default) draws one from
        `brainstate.random` at registration (so `brainstate.random.seed` sets it), or seed 0 without
        brainstate. Each step draws fresh tangents from it.
      sampler, tangent_chunk_size, adaptive_damping, memory_size: keyword-only, as in `sofo.sofo`.
      optimizer: an optax transform to use instead of the default (`lr` and the SOFO options are then
        ignored). One that holds a `sofo.scale_by_sofo` gets the model through extra args; any other (e.g.
        `optax.adam(1e-2)`) is fed the gradient of the loss, by reverse mode (jax.grad).
"""


class SOFO(_Optimizer):
    __doc__ = """SOFO over a stateful model; braintools 0.4's `optim.SOFO` constructor and call pattern.

    By default it runs `sofo.sofo`, the recommended configuration (Levenberg-Marquardt damping from 1e-2,
    subspace memory, balanced tangents; a rejected step leaves the States as they were, unless momentum
    carries them). Where the defaults differ from braintools' (lr 1.0 instead of 1e-3, damping 1e-2
    adapted instead of 1e-5 fixed), it is because the adaptive damping makes the full step the right one.

    Args:
      model: `model(inputs) -> outputs`, reading its parameters from States (a `brainstate.nn` module,
        or any function of `sofo.State` objects / brainstate States). States it writes (a counter, a running
        mean) keep the value written at the parameters before the step, as with brainstate's transforms.
      loss_fn: `loss_fn(outputs, targets) -> scalar`.""" + _ARGS_DOC + """
    Example:
      >>> opt = sofo.optim.SOFO(net, lambda y, t: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1)), tangent_size=32)
      >>> opt.register_trainable_weights(net.states(brainstate.ParamState))
      >>> loss = opt.step(x, y)

    References:
      Yu, Xia, Ma, Lengyel & Hennequin, NeurIPS 2024.
    """

    _kind = "SOFO"

    def step(self, inputs: Any, targets: Any) -> jax.Array:
        """One SOFO step on a batch; returns the loss before the step. The States hold the new values."""

        def body(written, params, opt_state, lr, inputs, targets):
            fun = lambda p: self._call(p, (inputs,))  # noqa: E731
            loss_fn = lambda outputs: self.loss_fn(outputs, targets)  # noqa: E731
            outputs, written_values = self._call(params, (inputs,), written)
            updates, opt_state = self._update(
                params, opt_state, lr, lambda p: loss_fn(fun(p)), fun=fun, loss_fn=loss_fn
            )
            return optax.apply_updates(params, updates), opt_state, loss_fn(outputs), written_values

        return self._run((inputs,), body, (inputs, targets))

    def compute_direction(self, inputs: Any, targets: Any) -> tuple[Any, Any]:
        """The SOFO direction h at the current parameters (descent is -h), without a step.

        Uses the configured tangent_size, loss, sampler and (initial, fixed) damping with tangents from
        the key folded with the step count; a debugging aid, like braintools' `_compute_direction`
        (compiled per call: States the model reads besides the weights are taken as they are now).

        Returns:
          (direction shaped like the registered States, the model's outputs).
        """
        self._require_weights()
        from sofo import _engine

        def run(key, params, inputs, targets):
            engine = _engine.build(
                lambda p: self._call(p, (inputs,)), lambda outputs: self.loss_fn(outputs, targets),
                self._options, front=f"{self._where}.compute_direction",
            )
            return engine(key, params)[1], self._call(params, (inputs,))

        return jax.jit(run)(self._direction_key(), self._params(), inputs, targets)

class SOFOScan(_Optimizer):
    __doc__ = """Recurrent SOFO over a stateful cell; braintools 0.4's `optim.SOFOScan` constructor and calls.

    The loss is braintools': `loss_fn(predictions, targets)` on the outputs and targets of all T steps
    stacked into (T * batch, ...). For a loss that is a mean over its rows (`jnp.mean((p - t) ** 2)`,
    mean cross-entropy) that is the mean over time of each step's loss, which is what the default
    `time_loss="mean"` computes with the recurrent engine, its memory constant in T (the direction is the
    same as for the sum over time: the damping is relative to the top curvature eigenvalue, so a common
    scale cancels). `time_loss="sum"` reports the sum over time instead; `time_loss="stacked"` gives
    `loss_fn` the stacked outputs exactly as braintools does, for any loss, with memory linear in T.

    Args:
      model: the cell, `cell(z, x) -> (z_new, y)`, reading its parameters from States; the latent `z`
        is carried explicitly (any pytree of arrays). It must not write States (carry such values in z).
      loss_fn: `loss_fn(predictions, targets) -> scalar`, see above.""" + _ARGS_DOC + (
    """      time_loss: keyword-only, "mean" (default), "sum" or "stacked", see above."""
) + """

    Example:
      >>> opt = sofo.optim.SOFOScan(cell, loss_fn, tangent_size=32)
      >>> opt.register_trainable_weights([w_rec, w_in])
      >>> loss = opt.step(z0, (xs, ys))   # xs, ys time-major: (T, batch, ...)
    """

    _kind = "SOFOScan"

    def __init__(self, *args: Any, time_loss: str = "mean", **kwargs: Any):
        if time_loss not in _TIME_LOSSES:
            raise ValueError(f"sofo.optim.SOFOScan: time_loss must be one of {_TIME_LOSSES}; got {time_loss!r}.")
        self.time_loss = time_loss
        super().__init__(*args, **kwargs)

    def _check_data(self, data: Any) -> tuple[Any, Any]:
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise TypeError(
                f"sofo.optim.SOFOScan.step takes (z0, (xs, ys)); got data of type {type(data).__name__}. Pass the "
                f"time-major inputs and targets as a pair."
            )
        return data[0], data[1]

    def _stacked(self, params: Any, z0: Any, xs: Any) -> Any:
        """The outputs of all steps stacked into (T * batch, ...), as braintools gives them to loss_fn."""
        outputs = jax.lax.scan(lambda z, x: self._call(params, (z, x)), z0, xs)[1]
        return jax.tree_util.tree_map(lambda a: a.reshape((-1,) + a.shape[2:]), outputs)

    def step(self, z0: Any, data: tuple[Any, Any]) -> jax.Array:
        """One step on a sequence batch `(xs, ys)` from latent `z0`; returns the loss before it."""
        xs, ys = self._check_data(data)
        self._require_weights()
        first = jax.tree_util.tree_map(lambda leaf: leaf[0], xs)
        record = self._spec.discover(self._params(), (z0, first), {})
        if record.written:
            names = ", ".join(_state.describe(s) for s in record.written)
            raise ValueError(
                f"sofo.optim.SOFOScan.step: the cell writes {names}; a scanned cell cannot write States (each "
                f"time step's value would be lost). Carry that value in the latent z instead."
            )
        steps = jax.tree_util.tree_leaves(xs)[0].shape[0]
        flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731

        def body(written, params, opt_state, lr, z0, xs, ys):
            cell = lambda p, z, x: self._call(p, (z, x))  # noqa: E731
            if self.time_loss == "stacked":
                flat_ys = jax.tree_util.tree_map(flat, ys)
                fun = lambda p: self._stacked(p, z0, xs)  # noqa: E731
                loss_fn = lambda outputs: self.loss_fn(outputs, flat_ys)  # noqa: E731
                loss_value = lambda p: loss_fn(fun(p))  # noqa: E731
                updates, opt_state = self._update(params, opt_state, lr, loss_value, fun=fun, loss_fn=loss_fn)
                return optax.apply_updates(params, updates), opt_state, loss_value(params), []

            # The recurrent engine sums loss_fn over time; its direction is the same for the mean (a common
            # scale cancels in the relatively damped solve), so only the reported value is divided by T.
            scale = 1.0 / steps if (self.time_loss == "mean" and steps) else 1.0

            def rollout_loss(p):
                def one(z, data_t):
                    z, y = cell(p, z, data_t[0])
                    return z, self.loss_fn(y, data_t[1])

                return scale * jnp.sum(jax.lax.scan(one, z0, (xs, ys))[1])

            updates, opt_state = self._update(
                params, opt_state, lr, rollout_loss, cell=cell, loss_fn=self.loss_fn, z0=z0, xs=xs, ys=ys,
            )
            return optax.apply_updates(params, updates), opt_state, rollout_loss(params), []

        return self._run((z0, first), body, (z0, xs, ys))

    def compute_direction(self, z0: Any, data: tuple[Any, Any]) -> tuple[Any, Any]:
        """The recurrent SOFO direction h at the current parameters (descent is -h), without a step.

        As `SOFO.compute_direction`, with the recurrent engine (memory constant in T).

        Returns:
          (direction shaped like the registered States, the outputs stacked into (T * batch, ...)).
        """
        xs, ys = self._check_data(data)
        self._require_weights()
        from sofo import _scan

        engine = _scan.build(
            lambda p, z, x: self._call(p, (z, x)), self.loss_fn, self._options,
            front=f"{self._where}.compute_direction",
        )

        def run(key, params, z0, xs, ys):
            return engine(key, params, z0, xs, ys)[1], self._stacked(params, z0, xs)

        return jax.jit(run)(self._direction_key(), self._params(), z0, xs, ys)
