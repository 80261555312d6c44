"""`State`, a mutable value read and written through `.value`, and the tracking the transforms rely on.

A transform opens a `Frame` while it traces the user's function. Every `State.value` read or write is
noted in each open frame, so the transform learns which states the function reads (for `check_states`)
and which it writes (to hand their new values back as concrete outputs).

Frames live in thread-local storage and hold the traced values themselves (an overlay): while a frame
is open, a `sofo.State` read in that thread sees the frame's value and a write goes into the frame, never
into the State. So no State ever holds a tracer, concurrent transforms in other threads see the State's
own value, and an exception leaves every State as it was.

brainstate's own States (`brainstate.State`, `ParamState`, ...) are tracked through brainstate's public
machinery: a `brainstate.StateTraceStack` records their reads and writes, and `restore_value` swaps the
traced values in and the old values back. brainstate keeps one value per State, so frames that touch
brainstate States hold a process-wide lock while they are open (concurrent transforms over them run one
at a time). brainstate is never imported by sofo: a brainstate State can only exist once the user has
imported it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Iterator

import jax
import numpy as np

_local = threading.local()
_brainstate_lock = threading.RLock()


def _brainstate() -> Any:
    """The brainstate module if the user imported it, else None (sofo never imports it itself)."""
    return sys.modules.get("brainstate")


def is_brainstate_state(x: Any) -> bool:
    module = _brainstate()
    return module is not None and isinstance(x, module.State)


def is_state(x: Any) -> bool:
    """A `sofo.State` or one of brainstate's States."""
    return isinstance(x, State) or is_brainstate_state(x)


def describe(state: Any) -> str:
    """A short description of any supported state for messages."""
    if isinstance(state, State):
        return state.describe()
    name = getattr(state, "name", None)
    label = f"{type(state).__name__} {name!r}" if name else type(state).__name__
    return f"{label} holding {_summary(state.value)}"


def _frames() -> list["Frame"]:
    frames = getattr(_local, "frames", None)
    if frames is None:
        frames = _local.frames = []
    return frames


class State:
    """A mutable container for a value (an array or a pytree of arrays) used by stateful functions.

    Read and write it through `.value`. Pass states to `sofo.transforms.grad` and friends as
    `grad_states` to differentiate a function with respect to the values they hold.

    Args:
      value: the initial value.
      name: an optional name used in error messages.

    Example:
      >>> w = sofo.State(jnp.ones(3), name="w")
      >>> w.value = w.value * 2
    """

    __slots__ = ("_value", "name", "__weakref__")

    def __init__(self, value: Any, name: str | None = None):
        if isinstance(value, State):
            raise TypeError(
                f"State(value) got another State ({value!r}); a State holds a value, not a State. "
                f"Pass its value instead: State(other.value)."
            )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"State name must be a str or None; got {type(name).__name__} ({name!r}).")
        self._value = value
        self.name = name

    @property
    def value(self) -> Any:
        """The current value (inside a transform: the traced value of a state being differentiated)."""
        frames = _frames()
        for frame in frames:
            frame.reads[self] = None
        for frame in reversed(frames):
            if self in frame.overlay:
                return frame.overlay[self]
        return self._value

    @value.setter
    def value(self, new_value: Any) -> None:
        if isinstance(new_value, State):
            raise TypeError(
                f"cannot assign a State to {self.describe()}.value; assign its value instead "
                f"(state.value = other.value)."
            )
        _store(self, new_value)

    def describe(self) -> str:
        """A short description for messages: name, shape and dtype of the value."""
        label = f"State {self.name!r}" if self.name is not None else "State"
        return f"{label} holding {_summary(self._value)}"

    def __repr__(self) -> str:
        name = f"name={self.name!r}, " if self.name is not None else ""
        return f"State({name}value={_summary(self._value)})"


def _summary(value: Any) -> str:
    leaves = jax.tree_util.tree_leaves(value)
    if len(leaves) == 1 and leaves[0] is value and hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{value.dtype}{list(np.shape(value))}"
    if not leaves:
        return repr(value)
    shapes = [f"{getattr(leaf, 'dtype', type(leaf).__name__)}{list(np.shape(leaf))}" for leaf in leaves[:4]]
    more = ", ..." if len(leaves) > 4 else ""
    return f"{type(value).__name__} of {len(leaves)} leaves ({', '.join(shapes)}{more})"


class Frame:
    """The record of one traced call: states read, states written, and the values they hold in it."""

    def __init__(self) -> None:
        self.reads: dict[Any, None] = {}  # insertion-ordered sets
        self.written: dict[Any, None] = {}
        self.overlay: dict[State, Any] = {}  # sofo States: their values inside this call
        self._brainstate_originals: dict[Any, Any] = {}
        self._locked = 0

    def _lock_brainstate(self) -> None:
        _brainstate_lock.acquire()
        self._locked += 1

    def swap_in(self, state: Any, value: Any) -> None:
        """Gives a state a (traced) value for the duration of the call; not a read nor a write."""
        if isinstance(state, State):
            self.overlay[state] = value
            return
        self._lock_brainstate()
        if state not in self._brainstate_originals:
            self._brainstate_originals[state] = state.value
        state.restore_value(value)

    def value_of(self, state: Any) -> Any:
        """The value a state holds in this call, without noting a read."""
        return _visible(state) if isinstance(state, State) else state.value

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Runs the user's function: brainstate reads and writes are recorded by a StateTraceStack."""
        module = _brainstate()
        if module is None:
            yield
            return
        self._lock_brainstate()
        stack = module.StateTraceStack(name="sofo")
        try:
            with stack:
                yield
        finally:
            for state, original, was_written in zip(stack.states, stack.original_state_values, stack.been_writen):
                # brainstate cannot tell a write from a read-then-write: a written state counts as read.
                self._brainstate_originals.setdefault(state, original)
                self.reads[state] = None
                if was_written:
                    self.written[state] = None

    def restore(self) -> None:
        try:
            for state, value in self._brainstate_originals.items():
                state.restore_value(value)
        finally:
            for _ in range(self._locked):
                _brainstate_lock.release()
            self._locked = 0


def _visible(state: State) -> Any:
    """A sofo State's value as the innermost open frame of this thread sees it."""
    for frame in reversed(_frames()):
        if state in frame.overlay:
            return frame.overlay[state]
    return state._value


def _store(state: State, value: Any) -> None:
    frames = _frames()
    for frame in frames:
        frame.written[state] = None
    if frames:
        frames[-1].overlay[state] = value
    else:
        state._value = value


@contextlib.contextmanager
def tracking() -> Iterator[Frame]:
    """Opens a frame for one call; on exit every state it touched holds its value from before."""
    frame = Frame()
    frames = _frames()
    frames.append(frame)
    try:
        yield frame
    finally:
        frames.remove(frame)
        frame.restore()


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Holds the brainstate lock for a whole transform call (reading the states included), if brainstate
    is imported: brainstate States keep one value, which another thread's trace may have swapped."""
    if _brainstate() is None:
        yield
        return
    with _brainstate_lock:
        yield


def tracking_active() -> bool:
    """Whether a transform is tracing a function right now (its outputs are then traced too)."""
    return bool(_frames())


def assign(state: Any, value: Any) -> None:
    """Writes a transform's result into a state, as a write seen by any enclosing transform."""
    if isinstance(state, State):
        _store(state, value)
    else:
        for frame in _frames():
            frame.written[state] = None
        state.value = value
