"""The argument and state handling shared by every transform in `sofo.transforms`.

A transform differentiates `fun(*args, **kwargs)` with respect to the values of some States
(`grad_states`) and some positional arguments (`argnums`). All of them see the function through one
pure function of a single pytree, `diff`, shaped like the gradients they return:

  * states only:       diff = the states' values, in the structure of `grad_states`   -> var_grads
  * arguments only:    diff = args[argnums] (a tuple of them when argnums is a tuple)  -> arg_grads
  * both:              diff = (state values, argument values)                         -> (var_grads, arg_grads)

so `jax.grad(pure)(diff)` (or jacfwd, hessian, the SOFO engine) already has the structure of the return
table. The pure function swaps the traced state values in, calls `fun`, collects the values of every
state `fun` wrote and puts every state back (see `_state.Frame`). The written values leave the jax
transform as auxiliary outputs, so they are concrete when they are written back.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sofo.transforms import _state
from sofo.transforms._state import State

MISSING: Any = object()


def fun_name(fun: Any) -> str:
    return getattr(fun, "__name__", None) or type(fun).__name__


@dataclasses.dataclass
class Record:
    """What one traced call of the user's function did."""

    reads: set = dataclasses.field(default_factory=set)
    written: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a transform differentiates, checked once when the transform is built."""

    transform: str
    fun: Callable[..., Any]
    states: tuple[State, ...]
    state_paths: tuple[str, ...]
    states_treedef: Any
    argnums: int | tuple[int, ...] | None
    has_aux: bool
    return_value: bool
    check_states: bool

    @property
    def has_states(self) -> bool:
        return self.states_treedef is not None

    @property
    def argnum_tuple(self) -> tuple[int, ...]:
        if self.argnums is None:
            return ()
        return (self.argnums,) if isinstance(self.argnums, int) else self.argnums

    # -- the diff pytree ------------------------------------------------------------------------------

    def check_args(self, args: Sequence[Any], what: str = "") -> None:
        """Checks, before any work, that every index in argnums names a positional argument."""
        for index in self.argnum_tuple:
            if index >= len(args):
                n = len(args)
                valid = f"indices 0..{n - 1}" if n else "none"
                raise ValueError(
                    f"{self.transform}: argnums={self.argnums!r} selects positional argument {index}, but "
                    f"{fun_name(self.fun)} was called with {n} positional argument(s) ({valid}){what}. Pass "
                    f"that argument positionally, or choose argnums below {n}."
                )

    def pack(self, var_values: Sequence[Any], args: Sequence[Any]) -> Any:
        """Builds diff from the states' values and the positional arguments (see the module doc)."""
        var_part = self.states_treedef.unflatten(list(var_values)) if self.has_states else None
        if self.argnums is None:
            return var_part
        if isinstance(self.argnums, int):
            arg_part = args[self.argnums]
        else:
            arg_part = tuple(args[i] for i in self.argnums)
        return (var_part, arg_part) if self.has_states else arg_part

    def unpack(self, diff: Any) -> tuple[list[Any], dict[int, Any]]:
        """Inverse of `pack`: the per-state values (in `states` order) and {argnum: value}."""
        if self.has_states and self.argnums is not None:
            var_part, arg_part = diff
        elif self.has_states:
            var_part, arg_part = diff, None
        else:
            var_part, arg_part = None, diff
        var_values = self.states_treedef.flatten_up_to(var_part) if self.has_states else []
        if self.argnums is None:
            arg_values = {}
        elif isinstance(self.argnums, int):
            arg_values = {self.argnums: arg_part}
        else:
            arg_values = dict(zip(self.argnums, arg_part))
        return var_values, arg_values

    def grad_path(self, path: tuple) -> str:
        """Names a leaf of the returned gradients, e.g. "var_grads['w']" or "arg_grads[1]"."""
        if self.has_states and self.argnums is not None:
            head = "var_grads" if path[0].idx == 0 else "arg_grads"
            return head + jax.tree_util.keystr(path[1:])
        return ("var_grads" if self.has_states else "arg_grads") + jax.tree_util.keystr(path)

    # -- calling the user's function ------------------------------------------------------------------

    def call(self, diff: Any, args: Sequence[Any], kwargs: dict, record: Record) -> tuple[Any, Any, list]:
        """Runs `fun` with diff swapped in; returns (output, aux, written values) and fills `record`.

        A state whose entry in diff is None keeps its own value (the SOFO front uses this for states
        the function does not read). Every state is restored before this returns or raises.
        """
        var_values, arg_values = self.unpack(diff)
        call_args = list(args)
        for index, value in arg_values.items():
            call_args[index] = value
        with _state.tracking() as frame:
            for state, value in zip(self.states, var_values):
                if value is not None:
                    frame.swap_in(state, value)
            with frame.watch():
                result = self.fun(*call_args, **kwargs)
            written = list(frame.written)
            written_values = [frame.value_of(state) for state in written]
        record.reads, record.written = frame.reads, written
        output, aux = self.split_aux(result)
        return output, aux, written_values

    def split_aux(self, result: Any) -> tuple[Any, Any]:
        if not self.has_aux:
            return result, None
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            got = f"a {type(result).__name__} of length {len(result)}" if isinstance(result, (tuple, list)) else (
                f"a {type(result).__name__}"
            )
            raise TypeError(
                f"{self.transform}(has_aux=True) expects {fun_name(self.fun)} to return a pair (output, aux); "
                f"it returned {got}. Return `output, aux` from {fun_name(self.fun)}, or set has_aux=False."
            )
        return result[0], result[1]

    def discover(self, diff: Any, args: Sequence[Any], kwargs: dict) -> Record:
        """Traces `fun` abstractly (no FLOPs) to learn which states it reads and writes, and checks them.

        Raises here, before any work, for a has_aux function that returns no pair and (with
        check_states) for a grad state that `fun` never reads.
        """
        record = Record()

        def trace(d):
            self.call(d, args, kwargs, record)

        jax.eval_shape(trace, diff)
        if self.check_states:
            unread = [(path, s) for path, s in zip(self.state_paths, self.states) if s not in record.reads]
            if unread:
                names = "; ".join(f"{path} ({_state.describe(s)})" for path, s in unread)
                raise ValueError(
                    f"{self.transform}: {fun_name(self.fun)} never reads {names}, so its gradient would be zero. "
                    f"Remove it from grad_states, or pass check_states=False to get zeros for it."
                )
        return record

    def unread_states(self, record: Record) -> list[State]:
        return [s for s in self.states if s not in record.reads]

    # -- results --------------------------------------------------------------------------------------

    def assemble(self, grads: Any, value: Any, aux: Any) -> Any:
        """The return table: grads, then the value if return_value, then aux if has_aux."""
        result = (grads,)
        if self.return_value:
            result += (value,)
        if self.has_aux:
            result += (aux,)
        return result[0] if len(result) == 1 else result


def _check_argnums(transform: str, argnums: Any) -> int | tuple[int, ...] | None:
    if argnums is None:
        return None

    def index(i: Any) -> int:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, numbers.Integral):
            raise TypeError(
                f"{transform}: argnums must be an int or a tuple of ints (positions of positional arguments); "
                f"got {argnums!r}. Pass e.g. argnums=0 or argnums=(0, 1)."
            )
        if i < 0:
            raise ValueError(
                f"{transform}: argnums={argnums!r} holds the negative index {int(i)}; negative argument indices "
                f"are not supported. Count positions from 0 (the first positional argument is 0)."
            )
        return int(i)

    if isinstance(argnums, (tuple, list)):
        indices = tuple(index(i) for i in argnums)
        if not indices:
            raise ValueError(
                f"{transform}: argnums={argnums!r} selects no argument. Pass argnums=None to differentiate only "
                f"grad_states, or name at least one position."
            )
        if len(set(indices)) != len(indices):
            raise ValueError(f"{transform}: argnums={argnums!r} repeats an index; name each position once.")
        return indices
    return index(argnums)


def _flatten_states(transform: str, grad_states: Any) -> tuple[tuple[State, ...], tuple[str, ...], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        grad_states, is_leaf=lambda x: x is None or _state.is_state(x)
    )
    states, paths = [], []
    for path, leaf in leaves:
        where = "grad_states" + jax.tree_util.keystr(path)
        if not _state.is_state(leaf):
            shown = repr(leaf)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise TypeError(
                f"{transform}: {where} is a {type(leaf).__name__} ({shown}), not a sofo.State or a brainstate "
                f"State. grad_states takes a State, or a list, tuple or dict of States (e.g. module.states()). "
                f"Wrap the value in sofo.State(...), or pass it as a positional argument and select it with argnums."
            )
        if any(leaf is s for s in states):
            first = paths[next(i for i, s in enumerate(states) if s is leaf)]
            raise ValueError(
                f"{transform}: the same State appears twice in grad_states, at {first} and {where}; list each "
                f"State once."
            )
        states.append(leaf)
        paths.append(where)
    if not states:
        raise ValueError(
            f"{transform}: grad_states={grad_states!r} holds no State. Pass None to differentiate only the "
            f"arguments selected by argnums, or pass the States to differentiate."
        )
    return tuple(states), tuple(paths), treedef


def resolve_migration(
    transform: str, grad_states: Any, grad_vars: Any, dyn_vars: Any, reduce_axes: Any
) -> Any:
    """Maps brainpy's arguments: grad_vars is grad_states, dyn_vars does nothing, reduce_axes must be ()."""
    if grad_vars is not MISSING:
        if grad_states is not None:
            raise TypeError(
                f"{transform}: pass grad_states or its brainpy alias grad_vars, not both (got both). "
                f"Keep grad_states=..."
            )
        grad_states = grad_vars
    if dyn_vars is not MISSING and dyn_vars is not None:
        warnings.warn(
            f"{transform}: dyn_vars has no effect in sofo.transforms and is deprecated: the States a function "
            f"reads or writes are found automatically. Remove dyn_vars=...",
            DeprecationWarning,
            stacklevel=3,
        )
    if reduce_axes is not None and tuple(reduce_axes) != ():
        raise ValueError(
            f"{transform}: reduce_axes={reduce_axes!r} is not supported (jax removed reduce_axes from its "
            f"autodiff, and sofo does not emulate it). Reduce over those axes inside the function instead "
            f"(e.g. jnp.sum / jax.lax.psum) and leave reduce_axes=()."
        )
    return grad_states


def make_spec(
    transform: str,
    fun: Any,
    *,
    grad_states: Any,
    argnums: Any,
    has_aux: Any,
    return_value: Any,
    check_states: Any,
) -> Spec:
    """Checks a transform's arguments (raising before any work) and returns its `Spec`."""
    if not callable(fun):
        raise TypeError(
            f"{transform} needs a function to transform as its first argument; got {type(fun).__name__} "
            f"({fun!r})."
        )
    for flag_name, flag in (("has_aux", has_aux), ("return_value", return_value), ("check_states", check_states)):
        if flag is not None and not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{transform}: {flag_name} must be True or False; got {flag!r}.")
    if grad_states is None:
        states, paths, treedef = (), (), None
    else:
        states, paths, treedef = _flatten_states(transform, grad_states)
    argnums = _check_argnums(transform, argnums)
    if argnums is None and treedef is None:
        argnums = 0
    return Spec(
        transform=transform,
        fun=fun,
        states=states,
        state_paths=paths,
        states_treedef=treedef,
        argnums=argnums,
        has_aux=bool(has_aux),
        return_value=bool(return_value),
        check_states=bool(check_states),
    )


def current_values(spec: Spec) -> list[Any]:
    """The grad states' values (read through `.value`, so an enclosing transform sees the read)."""
    return [state.value for state in spec.states]


def _has_tracer(value: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(value))


def write_back(spec: Spec, states: Sequence[State], values: Sequence[Any]) -> None:
    """Stores the new values of the states `fun` wrote, refusing tracers outside an enclosing transform."""
    if not _state.tracking_active():
        # A brainstate State that already holds a tracer belongs to an enclosing brainstate transform
        # (brainstate.transform.jit, ...), which takes the traced value out itself.
        leaked = [
            s for s, v in zip(states, values)
            if _has_tracer(v) and not (_state.is_brainstate_state(s) and _has_tracer(s.value))
        ]
        if leaked:
            names = ", ".join(_state.describe(s) for s in leaked)
            raise RuntimeError(
                f"{spec.transform}: {fun_name(spec.fun)} wrote {names} while running under a jax trace "
                f"(jax.jit, jax.vmap, ...), so the new value is a tracer, which a State must not keep; every "
                f"state was left as it was. Call the transform outside the jax transformation, or return the "
                f"new value from the traced function and assign it to the state outside."
            )
    for state, value in zip(states, values):
        _state.assign(state, value)


def check_nan(spec: Spec, grads: Any) -> None:
    """debug_nan: raises FloatingPointError naming the first gradient leaf that holds NaN."""
    leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    if not leaves:
        return
    paths = [spec.grad_path(path) for path, _ in leaves]
    flags = [jnp.any(jnp.isnan(getattr(leaf, "mantissa", leaf))) for _, leaf in leaves]

    def raise_first(*host_flags):
        for where, flag in zip(paths, host_flags):
            if bool(flag):
                raise FloatingPointError(
                    f"{spec.transform}(debug_nan=True): the gradient {where} holds NaN (first such leaf, "
                    f"in the order of the returned gradients). Locate the operation that makes it with "
                    f"jax.config.update('jax_debug_nans', True), or guard it (e.g. jnp.where before a "
                    f"sqrt, log or division)."
                )

    if any(isinstance(flag, jax.core.Tracer) for flag in flags):
        # Under jax.jit the values exist only when the program runs: check there.
        jax.debug.callback(raise_first, *flags)
    else:
        raise_first(*flags)


_CACHE_SIZE = 32  # compiled steps kept per transform


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


def run_cached(cache: dict, body: Callable[..., Any], context: Sequence[Any], inputs: tuple) -> Any:
    """Runs `body(*inputs)` compiled once per input structure, so eager calls do not recompile.

    Array leaves of `inputs` are the compiled function's arguments; every other leaf is static (part of
    the cache key; an unhashable one turns caching off for the call). `context` lists the States `fun`
    reads or writes besides the differentiated ones: their values are arguments too (swapped in during
    the call), so a cached function never holds a stale State value. Under a jax trace or inside another
    transform the body runs as it is: the enclosing transformation compiles it.
    """
    context = list(context)
    context_values = [state.value for state in context]
    leaves, treedef = jax.tree_util.tree_flatten((context_values, inputs))
    if _state.tracking_active() or any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return body(*inputs)
    dynamic = tuple(_is_array(leaf) for leaf in leaves)
    static = tuple(leaf for leaf, is_dynamic in zip(leaves, dynamic) if not is_dynamic)
    cache_key = (treedef, dynamic, static, tuple(context))
    try:
        compiled = cache.get(cache_key)
    except TypeError:  # an unhashable static leaf
        return body(*inputs)
    if compiled is None:

        def traced(arrays):
            arrays, statics = iter(arrays), iter(static)
            full = [next(arrays) if is_dynamic else next(statics) for is_dynamic in dynamic]
            values, call_inputs = treedef.unflatten(full)
            with _state.tracking() as frame:
                for state, value in zip(context, values):
                    frame.swap_in(state, value)
                return body(*call_inputs)

        if len(cache) >= _CACHE_SIZE:  # e.g. a new closure passed on every call: keep memory bounded
            cache.clear()
        compiled = cache[cache_key] = jax.jit(traced)
    return compiled([leaf for leaf, is_dynamic in zip(leaves, dynamic) if is_dynamic])


def context_states(spec: Spec, record: Record) -> list[Any]:
    """The states `fun` reads or writes other than the differentiated ones, in a fixed order."""
    own = set(spec.states)
    return [s for s in dict.fromkeys([*record.reads, *record.written]) if s not in own]
