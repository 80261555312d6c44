"""One set of options: the SOFO hyperparameters every front shares, validated once, in one place.

Every public front (`value_and_sofo_grad`, `value_and_sofo_grad_scan`, `scale_by_sofo`, `sofo`,
`sofo_grad`, `sofo_grad_scan`, `sofo.optim.SOFO` / `SOFOScan`) keeps its own keyword arguments (optax's,
brainstate's or braintools' names and defaults) as a thin adapter and hands them to `make_options`, which
checks each one and returns a frozen `Options`. What runs afterwards (the engine, the optax transform, the
adaptive state) reads the `Options` and checks nothing again. An error names the front the user called,
what was wrong and the fix; the same bad value gets the same message core from every front.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from sofo import _adaptive, _checks


class Options(NamedTuple):
    """The validated SOFO hyperparameters (built by `make_options`; read-only).

    Attributes:
      tangent_size: K, the number of tangents per step (a Python int).
      damping: the relative damping (the initial one with adaptive damping): a float or a float jax scalar.
      curvature: the curvature form, "exact", "mse" or "ce".
      sampler: the tangent sampler (one of `sofo._checks.SAMPLERS`).
      tangent_chunk_size: the number of tangents pushed at a time, or None for all K.
      tangent_sharding: a `NamedSharding` for the K tangents, or None.
      memory_size: m, the number of remembered directions (0 for none; an int < K).
      adaptive: the `AdaptiveDamping` schedule, or None for fixed damping.
    """

    tangent_size: int
    damping: Any
    curvature: str
    sampler: str
    tangent_chunk_size: int | None = None
    tangent_sharding: Any = None
    memory_size: int = 0
    adaptive: _adaptive.AdaptiveDamping | None = None

    def engine(self) -> dict:
        """The options the engine's step is built from (`sofo._engine.build_feedforward` / `_scan.build`)."""
        return dict(
            tangent_size=self.tangent_size,
            damping=self.damping,
            curvature=self.curvature,
            sampler=self.sampler,
            tangent_chunk_size=self.tangent_chunk_size,
            tangent_sharding=self.tangent_sharding,
        )


_UNSET = object()


def _named(front: str, check, *args, **kwargs):
    """`check(*args, **kwargs)`, its ValueError/TypeError prefixed with the front the user called."""
    try:
        return check(*args, **kwargs)
    except (TypeError, ValueError) as error:
        message = str(error)
        if message.startswith(f"{front}: "):
            raise
        raise type(error)(f"{front}: {message}") from None


def make_options(
    front: str,
    *,
    tangent_size: Any,
    damping: Any,
    curvature: Any = None,
    sampler: Any,
    tangent_chunk_size: Any = None,
    tangent_sharding: Any = None,
    memory_size: Any = None,
    adaptive_damping: Any = False,
    learning_rate: Any = _UNSET,
    learning_rate_name: str = "learning_rate",
    curvature_name: str = "curvature",
) -> Options:
    """Checks every shared option once and returns them as `Options`; raises before any work.

    Args:
      front: the function or class the user called (e.g. "sofo.sofo"); every error starts with it.
      tangent_size, damping, curvature, sampler, tangent_chunk_size, tangent_sharding, memory_size,
        adaptive_damping: the options as the user passed them (`curvature` already resolved from a
        deprecated `loss=`; None means "exact"; `memory_size` None means 0).
      learning_rate: the learning rate, where the front takes one: a positive float, a float jax scalar or
        an optax schedule (checked, not stored: it may be traced or scheduled). Left out: not checked.
      learning_rate_name: the front's name for it (`learning_rate`, or `step_size` in the brainstate-style
        fronts and the deprecated `sofo.transform`), as the error says it.
      curvature_name: the front's name for the curvature form (`loss` in `sofo.optim`).

    Returns:
      The `Options`.
    """
    curvature = _checks.DEFAULT_CURVATURE if curvature is None else curvature
    _named(
        front, _checks.check_config, tangent_size=tangent_size, damping=damping, curvature=curvature,
        sampler=sampler, curvature_name=curvature_name,
    )
    _named(front, _checks.check_chunk_size, tangent_chunk_size)
    _named(front, _checks.check_tangent_sharding, tangent_sharding)
    adaptive = _named(front, _adaptive.check_adaptive, adaptive_damping)
    if learning_rate is not _UNSET:
        _named(front, _checks.check_learning_rate, learning_rate, learning_rate_name)
    memory_size = _named(front, _checks.check_memory_size, memory_size, tangent_size)
    return Options(
        tangent_size=int(tangent_size),
        damping=damping,
        curvature=curvature,
        sampler=sampler,
        tangent_chunk_size=tangent_chunk_size,
        tangent_sharding=tangent_sharding,
        memory_size=memory_size,
        adaptive=adaptive,
    )
