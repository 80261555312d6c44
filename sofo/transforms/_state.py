"""`State`, a mutable value read and written through `.value`, and the tracking the transforms rely on.

A transform opens a `Frame` while it traces the user's function. Every `State.value` read or write is
noted in each open frame, so the transform learns which states the function reads (for `check_states`)
and which it writes (to hand their new values back as concrete outputs). A frame also remembers each
touched state's value from before the trace and puts it back when the trace ends, so no state keeps a
tracer and an exception leaves every state as it was.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import jax
import numpy as np

_local = threading.local()


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
        for frame in _frames():
            frame.reads.add(self)
        return self._value

    @value.setter
    def value(self, new_value: Any) -> None:
        if isinstance(new_value, State):
            raise TypeError(
                f"cannot assign a State to {self.describe()}.value; assign its value instead "
                f"(state.value = other.value)."
            )
        for frame in _frames():
            frame.note_write(self)
        self._value = new_value

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
    """The record of one traced call: states read, states written, and their values before the call."""

    def __init__(self) -> None:
        self.reads: set[State] = set()
        self.written: dict[State, None] = {}  # insertion-ordered set
        self._originals: dict[State, Any] = {}

    def note_write(self, state: State) -> None:
        self._originals.setdefault(state, state._value)
        self.written[state] = None

    def swap_in(self, state: State, value: Any) -> None:
        """Puts a (traced) value into a state for the duration of the call; not a read nor a write."""
        self._originals.setdefault(state, state._value)
        state._value = value

    def restore(self) -> None:
        for state, value in self._originals.items():
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
        frame.restore()
        frames.remove(frame)


def tracking_active() -> bool:
    """Whether a transform is tracing a function right now (its outputs are then traced too)."""
    return bool(_frames())


def assign(state: State, value: Any) -> None:
    """Writes a transform's result into a state, as a write seen by any enclosing transform."""
    for frame in _frames():
        frame.note_write(state)
    state._value = value
