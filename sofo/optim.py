"""Optimizer objects over stateful models: `SOFO` and `SOFOScan`, braintools' call pattern over sofo.

    opt = sofo.optim.SOFO(model, loss_fn, lr=1.0, tangent_size=32)
    opt.register_trainable_weights(model.states(brainstate.ParamState))
    loss = opt.step(inputs, targets)   # the parameters in the States move; the loss before the step

The step is an optax transform with `update(updates, state, params, *, fun, loss_fn)` (or `cell=`,
`z0=`, `xs=`, `ys=` for `SOFOScan`), so nothing here computes a direction: it maps the trainable States
onto `params`, calls the optimizer and writes the new values back. Each step is compiled once per input
shapes (States the model reads besides the trainable ones are inputs, never frozen constants).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from sofo import _alias, _checks
from sofo.transforms import _state, _wrapper
from sofo.transforms._wrapper import Record

__all__ = ["SOFO", "SOFOScan"]


def _default_optimizer(lr: float, **options: Any) -> optax.GradientTransformationExtraArgs:
    """The optimizer `SOFO` and `SOFOScan` build when none is passed: `sofo.sofo`, the recommended
    configuration (Levenberg-Marquardt damping, subspace memory), with learning rate lr."""
    return _alias.sofo(lr, **options)


class _Optimizer:
    """What SOFO and SOFOScan share: the trainable States, the optax state, the compiled step."""

    _kind = ""

    def __init__(
        self,
        model: Callable[..., Any],
        loss_fn: Callable[..., Any],
        lr: float = 1.0,
        tangent_size: int = 100,
        *,
        damping: float = _alias.DEFAULT_DAMPING,
        loss: str | None = None,
        sampler: str = "balanced",
        key: Any = 0,
        tangent_chunk_size: int | None = None,
        adaptive_damping: Any = True,
        memory_size: int | None = None,
        optimizer: optax.GradientTransformationExtraArgs | None = None,
    ):
        for name, f in (("model", model), ("loss_fn", loss_fn)):
            if not callable(f):
                raise TypeError(f"sofo.optim.{self._kind} needs a callable {name}; got {type(f).__name__} ({f!r}).")
        self.model = model
        self.loss_fn = loss_fn
        self.lr = lr
        if optimizer is None:
            optimizer = _default_optimizer(
                lr, tangent_size=tangent_size, damping=damping,
                curvature=_checks.resolve_curvature(None, loss, f"sofo.optim.{self._kind}", deprecated=False),
                sampler=sampler, key=key,
                tangent_chunk_size=tangent_chunk_size, adaptive_damping=adaptive_damping, memory_size=memory_size,
            )
        self.optimizer = optimizer
        self.opt_state = None
        self._spec = None
        self._cache: dict = {}

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
        self._spec = _wrapper.make_spec(
            f"sofo.optim.{self._kind}.register_trainable_weights", self.model, grad_states=states,
            argnums=None, has_aux=False, return_value=False, check_states=True,
        )
        self.opt_state = self.optimizer.init(self._params())
        return self

    def _params(self) -> Any:
        return self._spec.pack([state.value for state in self._spec.states], ())

    def _require_weights(self) -> None:
        if self._spec is None:
            raise RuntimeError(
                f"sofo.optim.{self._kind}.step: no trainable weights; call "
                f"opt.register_trainable_weights(model.states(brainstate.ParamState)) first."
            )

    def _run(self, model_args: tuple, body: Callable[..., Any], inputs: tuple) -> jax.Array:
        """Checks the model reads the weights, runs the compiled step and writes the new values back."""
        self._require_weights()
        with _state.exclusive():
            params = self._params()
            leaves = jax.tree_util.tree_leaves((params, inputs))
            if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
                raise RuntimeError(
                    f"sofo.optim.{self._kind}.step was called under a jax trace (jax.jit, brainstate.transform.jit, "
                    f"...). It compiles itself once per input shapes and keeps the optimizer state in Python, so "
                    f"call opt.step(...) eagerly; or use the optax transform (opt.optimizer) inside your own jit."
                )
            record = self._spec.discover(params, model_args, {})
            new_params, new_opt_state, loss = _wrapper.run_cached(
                self._cache, body, _wrapper.context_states(self._spec, record), (params, self.opt_state) + inputs
            )
            self.opt_state = new_opt_state
            for state, value in zip(self._spec.states, self._spec.states_treedef.flatten_up_to(new_params)):
                _state.assign(state, value)
        return loss

    def _call(self, params: Any, args: tuple) -> Any:
        return self._spec.call(params, args, {}, Record())[0]


class SOFO(_Optimizer):
    """SOFO over a stateful model, with braintools' optimizer call pattern.

    Args:
      model: `model(inputs) -> outputs`, reading its parameters from States (a `brainstate.nn` module,
        or any function of `sofo.State`s / brainstate States).
      loss_fn: `loss_fn(outputs, targets) -> scalar`.
      lr: the learning rate: params <- params - lr * direction (1.0, the recommended value, by default).
      tangent_size, damping, sampler, key, tangent_chunk_size, adaptive_damping, memory_size: as in
        `sofo.sofo`, which is what runs by default (its recommended configuration: Levenberg-Marquardt
        damping from 1e-2, subspace memory, balanced tangents; a rejected step leaves the States as they
        were).
      loss: the curvature form (braintools' name for `sofo.sofo`'s `curvature`): None (default) for
        "exact", right for any `loss_fn`; "mse" or "ce" for the fast paths, checked against `loss_fn`.
      optimizer: an optax transform with `update(updates, state, params, *, fun, loss_fn)` to use
        instead of the default (`lr` and the SOFO options are then ignored).

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

        def body(params, opt_state, inputs, targets):
            fun = lambda p: self._call(p, (inputs,))
            loss_fn = lambda outputs: self.loss_fn(outputs, targets)
            zeros = jax.tree_util.tree_map(jax.numpy.zeros_like, params)
            updates, opt_state = self.optimizer.update(zeros, opt_state, params, fun=fun, loss_fn=loss_fn)
            return optax.apply_updates(params, updates), opt_state, loss_fn(fun(params))

        return self._run((inputs,), body, (inputs, targets))


class SOFOScan(_Optimizer):
    """Recurrent SOFO (memory constant in time) over a stateful cell, with braintools' call pattern.

    Args:
      model: the cell, `cell(z, x) -> (z_new, y)`, reading its parameters from States; the latent `z`
        is carried explicitly (any pytree of arrays).
      loss_fn: `loss_fn(y_t, ys_t) -> scalar`; the loss is its sum over time.
      lr, tangent_size, damping, loss, sampler, key, tangent_chunk_size, adaptive_damping, memory_size: as
        in `SOFO`.
      optimizer: an optax transform with `update(updates, state, params, *, cell, loss_fn, z0, xs, ys)`.

    Example:
      >>> opt = sofo.optim.SOFOScan(cell, loss_fn, tangent_size=32)
      >>> opt.register_trainable_weights([w_rec, w_in])
      >>> loss = opt.step(z0, (xs, ys))   # xs, ys time-major: (T, batch, ...)
    """

    _kind = "SOFOScan"

    def step(self, z0: Any, data: tuple[Any, Any]) -> jax.Array:
        """One step on a sequence batch `(xs, ys)` from latent `z0`; returns the summed loss before it."""
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise TypeError(
                f"sofo.optim.SOFOScan.step takes (z0, (xs, ys)); got data of type {type(data).__name__}. Pass the "
                f"time-major inputs and targets as a pair."
            )
        xs, ys = data
        self._require_weights()
        first = jax.tree_util.tree_map(lambda leaf: leaf[0], xs)

        def body(params, opt_state, z0, xs, ys):
            cell = lambda p, z, x: self._call(p, (z, x))
            updates, opt_state = self.optimizer.update(
                jax.tree_util.tree_map(jax.numpy.zeros_like, params), opt_state, params,
                cell=cell, loss_fn=self.loss_fn, z0=z0, xs=xs, ys=ys,
            )

            def rollout(z, data_t):
                z, y = cell(params, z, data_t[0])
                return z, self.loss_fn(y, data_t[1])

            loss = jax.numpy.sum(jax.lax.scan(rollout, z0, (xs, ys))[1])
            return optax.apply_updates(params, updates), opt_state, loss

        return self._run((z0, first), body, (z0, xs, ys))
