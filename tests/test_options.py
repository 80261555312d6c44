"""One set of options (issue 19): every front validates the shared options in one place (`sofo._options`).

The same bad value of a shared option is refused by every front that takes it, when the front is built
(before any work), with the same exception type and the same message core, prefixed by the front's name.
"""

import re

import jax.numpy as jnp
import pytest

import sofo
from sofo import _options

pytest.importorskip("optax")


def _fun(p):
    return jnp.tanh(p)


def _loss(y):
    return jnp.sum(y**2)


def _cell(p, z, x):
    return jnp.tanh(z * p + x), z


def _step_loss(y, t):
    return jnp.sum((y - t) ** 2)


# front name -> (builder taking the options as keywords, the options it takes, its name for the curvature
# form and for the learning rate, or None where it has none under that rule)
FRONTS = {
    "sofo.value_and_sofo_grad": (
        lambda **kw: sofo.value_and_sofo_grad(_fun, _loss, **kw), "engine", "curvature", None,
    ),
    "sofo.value_and_sofo_grad_scan": (
        lambda **kw: sofo.value_and_sofo_grad_scan(_cell, _step_loss, **kw), "engine", "curvature", None,
    ),
    "sofo.scale_by_sofo": (lambda **kw: sofo.scale_by_sofo(**kw), "optimizer", "curvature", "learning_rate"),
    "sofo.sofo": (lambda **kw: sofo.sofo(**kw), "optimizer", "curvature", "learning_rate"),
    "sofo_grad": (
        lambda **kw: sofo.sofo_grad(_fun, _loss, argnums=0, **kw), "optimizer", "curvature", "learning_rate",
    ),
    "sofo_grad_scan": (
        lambda **kw: sofo.transforms.sofo_grad_scan(_cell, _step_loss, argnums=0, **kw),
        "optimizer", "curvature", "learning_rate",
    ),
    "sofo.optim.SOFO": (lambda **kw: sofo.optim.SOFO(_fun, _step_loss, **kw), "optimizer", "loss", "lr"),
    "sofo.optim.SOFOScan": (lambda **kw: sofo.optim.SOFOScan(_cell, _step_loss, **kw), "optimizer", "loss", "lr"),
}

# option -> (bad value, exception type, message core); "{name}" is the front's own name for the option.
BAD = {
    "tangent_size": (0, ValueError, "tangent_size must be a positive int (the number K of random tangents"),
    "damping": (-1.0, ValueError, "damping must be a finite non-negative float"),
    "curvature": ("hessian", ValueError, "{name}='hessian' is not a known curvature form; choose one of 'exact'"),
    "sampler": ("gauss", ValueError, "sampler='gauss' is not a known tangent sampler; choose one of"),
    "tangent_chunk_size": (0, ValueError, "tangent_chunk_size must be None (all tangents at once) or a positive int"),
    "tangent_sharding": ("k", TypeError, "tangent_sharding must be None or a jax.sharding.NamedSharding"),
    "memory_size": (-1, ValueError, "memory_size must be an int with 0 <= memory_size < tangent_size=8"),
    "adaptive_damping": ("yes", TypeError, "adaptive_damping must be True, False or a sofo.AdaptiveDamping"),
    "learning_rate": (0.0, ValueError, "{name} must be a positive float or an optax schedule"),
}
ENGINE_ONLY = {"tangent_sharding"}
OPTIMIZER_ONLY = {"memory_size", "adaptive_damping", "learning_rate"}


def cases():
    for front, (_, kind, _curvature_name, lr_name) in FRONTS.items():
        for option in BAD:
            if option in ENGINE_ONLY and kind != "engine" or option in OPTIMIZER_ONLY and kind == "engine":
                continue
            if option == "learning_rate" and lr_name in (None, "lr"):
                continue  # sofo.optim's lr takes braintools schedulers too: its own check
            yield pytest.param(front, option, id=f"{front}-{option}")


@pytest.mark.parametrize("front, option", list(cases()))
def test_every_front_refuses_the_same_bad_option_with_the_same_message(front, option):
    build, _, curvature_name, lr_name = FRONTS[front]
    value, error, core = BAD[option]
    name = {"curvature": curvature_name, "learning_rate": lr_name}.get(option, option)
    core = core.format(name=name)
    with pytest.raises(error) as raised:
        build(tangent_size=8, **{name: value}) if option != "tangent_size" else build(**{name: value})
    message = str(raised.value)
    assert message.startswith(f"{front}: "), message
    assert core in message, message


def test_the_cases_cover_every_front_and_option():
    covered = {(f, o) for f, o in (p.values for p in cases())}
    assert {f for f, _ in covered} == set(FRONTS)
    assert {o for _, o in covered} == set(BAD)
    # every front shares the five engine options
    for front in FRONTS:
        for option in ("tangent_size", "damping", "curvature", "sampler", "tangent_chunk_size"):
            assert (front, option) in covered


def test_make_options_returns_the_validated_frozen_options():
    options = _options.make_options(
        "f", tangent_size=8, damping=1e-3, sampler="balanced", memory_size=2, adaptive_damping=True,
        learning_rate=0.5,
    )
    assert options == _options.Options(
        tangent_size=8, damping=1e-3, curvature="exact", sampler="balanced", tangent_chunk_size=None,
        tangent_sharding=None, memory_size=2, adaptive=sofo.AdaptiveDamping(),
    )
    assert options.engine() == dict(
        tangent_size=8, damping=1e-3, curvature="exact", sampler="balanced", tangent_chunk_size=None,
        tangent_sharding=None,
    )
    with pytest.raises(AttributeError):
        options.tangent_size = 4  # frozen
    with pytest.raises(ValueError, match=re.escape("f: memory_size must be an int")):
        _options.make_options("f", tangent_size=2, damping=0.0, sampler="normal", memory_size=2)
