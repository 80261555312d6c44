"""The package's own key sequence: fresh SOFO tangents on every call when no key is passed.

The sequence starts from seed 0, so a script gives the same results every run; `seed(n)` restarts it.
Each draw splits the current key, so no two calls share tangents. Under a jax trace a draw would be
frozen into the compiled function (and every step would reuse its tangents), so it raises instead.
"""

from __future__ import annotations

import contextlib
import numbers
import threading
from typing import Any, Iterator

import jax

_lock = threading.Lock()
_seed = 0
_key = None  # created lazily, so importing sofo does not start a jax backend


def seed(value: int) -> None:
    """Restarts the key sequence that `sofo_grad(..., key=None)` draws from.

    Args:
      value: a non-negative int seed. The sequence starts at seed 0 when the package is imported.

    Returns:
      None. Every later `sofo_grad` / `sofo_grad_scan` call without `key=` draws the next key of the
      sequence `jax.random.key(value)`, split once per call.
    """
    global _seed, _key
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"seed takes a non-negative int; got {value!r}. Call e.g. sofo.transforms.seed(0).")
    with _lock:
        _seed, _key = int(value), None


def next_key(transform: str) -> jax.Array:
    """Draws the next key of the sequence; raises under a jax trace, where a draw would be frozen."""
    return _draw(transform)[0]


def _draw(transform: str) -> tuple[jax.Array, Any, Any]:
    """(key, sequence state after the draw, sequence state before it)."""
    global _key
    with _lock:
        old_base = _key
        base = jax.random.key(_seed) if _key is None else _key
        new_base, key = jax.random.split(base)
        if isinstance(key, jax.core.Tracer):
            raise RuntimeError(
                f"{transform}(key=None) draws a fresh key from sofo's own sequence on every call, which cannot "
                f"work under a jax trace (jax.jit, jax.eval_shape, lax.scan, ...): the draw would be frozen into "
                f"the traced function and every call would reuse the same tangents. Pass key= explicitly, e.g. "
                f"carry a key through the jitted step, split it and build {transform}(..., key=step_key) inside."
            )
        _key = new_base
    return key, new_base, old_base


@contextlib.contextmanager
def step_key(transform: str, fixed_key: Any) -> Iterator[jax.Array]:
    """The key of one call: `fixed_key`, or the next key of the sequence, given back if the call fails.

    A failed call consumes no key, so the next good call draws the tangents it would have drawn (unless
    another thread drew a key in between: that draw stands).
    """
    global _key
    if fixed_key is not None:
        yield fixed_key
        return
    key, new_base, old_base = _draw(transform)
    try:
        yield key
    except BaseException:
        with _lock:
            if _key is new_base:
                _key = old_base
        raise
