"""`grad`, `jacfwd` and `hessian` over States and arguments, with brainstate's return conventions."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

from sofo.transforms import _state, _wrapper
from sofo.transforms._wrapper import MISSING, Record


def _unit_module(transform: str):
    try:
        import brainunit
    except ImportError as error:
        raise ImportError(
            f"{transform}(unit_aware=True) needs the optional package brainunit, which is not installed. "
            f"Install it with `pip install 'sofo[units]'` (or `pip install brainunit`), or pass unit_aware=False."
        ) from error
    return brainunit.autograd


def _check_inexact_states(spec: _wrapper.Spec, values: list) -> None:
    """Names an integer (or bool) grad state before jax refuses it with a message that names no State."""
    for path, state, value in zip(spec.state_paths, spec.states, values):
        for leaf_path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
            dtype = jax.numpy.result_type(leaf)
            if not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
                raise TypeError(
                    f"{spec.transform}: {path}{jax.tree_util.keystr(leaf_path)} ({_state.describe(state)}) has "
                    f"dtype {dtype}, but only float or complex values can be differentiated. Cast its value "
                    f"(e.g. state.value = jnp.asarray(state.value, jnp.float32)), leave it out of grad_states, "
                    f"or pass allow_int=True (grad only) to get a float0 zero gradient for it."
                )


def _build(
    transform: str,
    make_jax_fn: Callable[[Callable[..., Any]], Callable[..., Any]],
    spec: _wrapper.Spec,
    debug_nan: bool = False,
    allow_int: bool = False,
) -> Callable[..., Any]:
    """Wraps `spec.fun` with one jax transform of the shared pure function (see `_wrapper`)."""

    @functools.wraps(spec.fun)
    def transformed(*args, **kwargs):
        with _state.exclusive():
            spec.check_args(args)
            values = _wrapper.current_values(spec)
            if not allow_int:
                _check_inexact_states(spec, values)
            diff = spec.pack(values, args)
            spec.discover(diff, args, kwargs)
            record = Record()

            def pure(d):
                output, aux, written_values = spec.call(d, args, kwargs, record)
                return output, (output, aux, written_values)

            grads, (value, aux, written_values) = make_jax_fn(pure)(diff)
            if debug_nan:
                _wrapper.check_nan(spec, grads)
            _wrapper.write_back(spec, record.written, written_values)
            return spec.assemble(grads, value, aux)

    return transformed


def grad(
    fun: Callable[..., Any] | None = None,
    grad_states: Any = None,
    argnums: int | tuple[int, ...] | None = None,
    holomorphic: bool = False,
    allow_int: bool = False,
    has_aux: bool | None = None,
    return_value: bool = False,
    unit_aware: bool = False,
    check_states: bool = True,
    debug_nan: bool = False,
    *,
    grad_vars: Any = MISSING,
    dyn_vars: Any = MISSING,
    reduce_axes: Any = (),
) -> Callable[..., Any]:
    """Gradient of a scalar function with respect to States and/or positional arguments.

    Args:
      fun: `fun(*args, **kwargs) -> scalar` (or `(scalar, aux)` with has_aux). Without it, `grad(...)`
        returns a decorator.
      grad_states: a `sofo.State` or a list, tuple or dict of States to differentiate; `var_grads` keeps
        this structure.
      argnums: an int or a tuple of ints, the positional arguments to differentiate. Defaults to 0 when
        grad_states is None, else to none.
      holomorphic, allow_int: as in `jax.grad`.
      has_aux: `fun` returns `(scalar, aux)`; aux is returned, not differentiated.
      return_value: also return `fun`'s value.
      unit_aware: differentiate with `brainunit.autograd.grad`, so gradients carry physical units (needs
        the optional package brainunit: `pip install 'sofo[units]'`).
      check_states: raise a ValueError for a grad state that `fun` never reads; with False its gradient
        is zeros.
      debug_nan: raise a FloatingPointError naming the first gradient leaf that holds NaN.
      grad_vars: brainpy's name for grad_states. dyn_vars: accepted from brainpy and ignored (states are
        found automatically); it warns. reduce_axes: must be () (brainpy compatibility).

    Returns:
      A function with `fun`'s arguments that returns `grads`, where `grads` is `arg_grads` (no
      grad_states), `var_grads` (grad_states and no argnums) or `(var_grads, arg_grads)` (both); then
      `(grads, value)` with return_value, `(grads, aux)` with has_aux and `(grads, value, aux)` with both.
      `arg_grads` is the selected argument's gradient for an int argnums, a tuple of them for a tuple.
      States that `fun` writes hold their new values after the call; on an exception every state keeps
      its value from before.
    """
    if fun is None:

        def decorator(f):
            return grad(
                f, grad_states, argnums, holomorphic, allow_int, has_aux, return_value, unit_aware,
                check_states, debug_nan, grad_vars=grad_vars, dyn_vars=dyn_vars, reduce_axes=reduce_axes,
            )

        return decorator
    grad_states = _wrapper.resolve_migration("grad", grad_states, grad_vars, dyn_vars, reduce_axes)
    spec = _wrapper.make_spec(
        "grad", fun, grad_states=grad_states, argnums=argnums, has_aux=has_aux,
        return_value=return_value, check_states=check_states,
    )
    autodiff = _unit_module("grad") if unit_aware else jax
    return _build(
        "grad",
        lambda pure: autodiff.grad(pure, has_aux=True, holomorphic=holomorphic, allow_int=allow_int),
        spec,
        debug_nan=bool(debug_nan),
        allow_int=bool(allow_int),
    )


def jacfwd(
    func: Callable[..., Any],
    grad_states: Any = None,
    argnums: int | tuple[int, ...] | None = None,
    has_aux: bool | None = None,
    return_value: bool = False,
    holomorphic: bool = False,
    unit_aware: bool = False,
    check_states: bool = True,
    *,
    grad_vars: Any = MISSING,
    dyn_vars: Any = MISSING,
    reduce_axes: Any = (),
) -> Callable[..., Any]:
    """Forward-mode Jacobian with respect to States and/or positional arguments.

    Args:
      func: `func(*args, **kwargs) -> outputs` (or `(outputs, aux)` with has_aux).
      grad_states, argnums, has_aux, return_value, check_states, grad_vars, dyn_vars, reduce_axes: as in
        `grad`.
      holomorphic: as in `jax.jacfwd`.
      unit_aware: use `brainunit.autograd.jacfwd` (needs brainunit: `pip install 'sofo[units]'`).

    Returns:
      A function returning the Jacobians in the layout of `grad`'s return table (each gradient leaf is
      replaced by the Jacobian block `outputs.shape + leaf.shape`; when `func` returns a pytree, each of
      its leaves holds such a structure, as with `jax.jacfwd`), followed by value and aux as in `grad`.
    """
    grad_states = _wrapper.resolve_migration("jacfwd", grad_states, grad_vars, dyn_vars, reduce_axes)
    spec = _wrapper.make_spec(
        "jacfwd", func, grad_states=grad_states, argnums=argnums, has_aux=has_aux,
        return_value=return_value, check_states=check_states,
    )
    autodiff = _unit_module("jacfwd") if unit_aware else jax
    return _build(
        "jacfwd", lambda pure: autodiff.jacfwd(pure, has_aux=True, holomorphic=holomorphic), spec
    )


def hessian(
    func: Callable[..., Any],
    grad_states: Any = None,
    argnums: int | tuple[int, ...] | None = None,
    return_value: bool = False,
    holomorphic: bool = False,
    has_aux: bool | None = None,
    unit_aware: bool = False,
    check_states: bool = True,
    *,
    grad_vars: Any = MISSING,
    dyn_vars: Any = MISSING,
    reduce_axes: Any = (),
) -> Callable[..., Any]:
    """Hessian of a scalar function with respect to States and/or positional arguments.

    Args:
      func: `func(*args, **kwargs) -> scalar` (or `(scalar, aux)` with has_aux).
      grad_states, argnums, has_aux, return_value, check_states, grad_vars, dyn_vars, reduce_axes: as in
        `grad`.
      holomorphic: as in `jax.hessian`.
      unit_aware: use `brainunit.autograd.hessian` (needs brainunit: `pip install 'sofo[units]'`).

    Returns:
      A function returning the Hessian in the layout of `grad`'s return table, nested as `jax.hessian`
      nests: the gradients' structure, each leaf of which holds the gradients' structure again, with
      blocks `leaf_i.shape + leaf_j.shape` (for argnums=(0, 1) exactly `jax.hessian(f, (0, 1))`),
      followed by value and aux as in `grad`.
    """
    grad_states = _wrapper.resolve_migration("hessian", grad_states, grad_vars, dyn_vars, reduce_axes)
    spec = _wrapper.make_spec(
        "hessian", func, grad_states=grad_states, argnums=argnums, has_aux=has_aux,
        return_value=return_value, check_states=check_states,
    )
    autodiff = _unit_module("hessian") if unit_aware else jax
    return _build(
        "hessian", lambda pure: autodiff.hessian(pure, has_aux=True, holomorphic=holomorphic), spec
    )
