"""The names decided for issue 19: `sofo.scale_by_sofo` and `learning_rate=`, with the old names deprecated.

The old names (`sofo.transform`, `step_size=`) must give bit-identical results to the new ones, warn exactly
once per call (a DeprecationWarning naming the new name), and refuse being mixed with the new ones.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofo


def problem():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2))), "b": jnp.asarray(rng.standard_normal(2))}
    x, y = jnp.asarray(rng.standard_normal((8, 3))), jnp.asarray(rng.standard_normal((8, 2)))
    fun = lambda p: jnp.tanh(x @ p["w"] + p["b"])  # noqa: E731
    loss_fn = lambda out: 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))  # noqa: E731
    return fun, loss_fn, params


def deprecations(record):
    return [w for w in record if issubclass(w.category, DeprecationWarning)]


def run(tx, steps=3):
    """`steps` updates of `tx` on the problem; every update, state and parameter along the way."""
    fun, loss_fn, params = problem()
    state = tx.init(params)
    seen = []
    for _ in range(steps):
        updates, state = tx.update(None, state, params, fun=fun, loss_fn=loss_fn)
        params = jax.tree_util.tree_map(lambda p, u: p - 0.5 * u, params, updates)
        seen.append((updates, state, params))
    return seen


def assert_bit_identical(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


CONFIG = dict(tangent_size=3, damping=1e-2, key=4, adaptive_damping=True, memory_size=1)


def test_import_and_attribute_access_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert callable(sofo.transform) and callable(sofo.scale_by_sofo)
    assert "scale_by_sofo" in sofo.__all__


def test_new_names_do_not_warn():
    fun, _, params = problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(sofo.scale_by_sofo(learning_rate=0.5, **CONFIG), steps=1)
        _, _, info = sofo.value_and_sofo_grad(fun, lambda o: jnp.sum(o**2), tangent_size=3)(0, params)
        sofo.predicted_reduction(info, learning_rate=0.5)
        sofo.predicted_reduction(info, 0.5)


def test_transform_is_scale_by_sofo_bit_for_bit_and_warns_once_per_call():
    new = run(sofo.scale_by_sofo(learning_rate=0.5, **CONFIG))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        old_tx = sofo.transform(step_size=0.5, **CONFIG)
    (warning,) = deprecations(record)
    message = str(warning.message)
    assert "sofo.transform is deprecated" in message and "sofo.scale_by_sofo" in message
    assert "learning_rate=0.5" in message
    assert warning.filename == __file__  # points at the caller, not at sofo
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        old = run(old_tx)
    assert not deprecations(record)  # the transform it returns is the new one: update does not warn
    assert_bit_identical(old, new)


def test_transform_with_loss_warns_once_and_matches_curvature():
    new = run(sofo.scale_by_sofo(curvature="mse", **CONFIG))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        old_tx = sofo.transform(loss="mse", **CONFIG)
    (warning,) = deprecations(record)
    assert "curvature='mse' for loss" in str(warning.message)
    assert_bit_identical(run(old_tx), new)


def test_scale_by_sofo_step_size_warns_once_and_matches_learning_rate():
    new = run(sofo.scale_by_sofo(learning_rate=0.5, **CONFIG))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        old_tx = sofo.scale_by_sofo(step_size=0.5, **CONFIG)
    (warning,) = deprecations(record)
    assert "step_size=0.5 is deprecated" in str(warning.message)
    assert "learning_rate=0.5" in str(warning.message)
    assert warning.filename == __file__
    assert_bit_identical(run(old_tx), new)


@pytest.mark.parametrize("learning_rate", [1.0, 0.5])
def test_scale_by_sofo_refuses_both_learning_rate_and_step_size(learning_rate):
    # Even an explicit learning_rate=1.0 (the default's value) is refused: which one was meant is unclear.
    with pytest.raises(TypeError, match=r"sofo.scale_by_sofo: got both learning_rate=.* and step_size=0.5; .* Pass only learning_rate="):
        sofo.scale_by_sofo(learning_rate=learning_rate, step_size=0.5, **CONFIG)


def test_transform_errors_name_the_old_front_and_argument():
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="step_size must be a positive float"):
        sofo.transform(step_size=-1.0)
    with pytest.raises(ValueError, match="learning_rate must be a positive float"):
        sofo.scale_by_sofo(learning_rate=-1.0)
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="sofo.transform's init needs the parameters"):
        sofo.transform().init(None)


def test_inject_hyperparams_of_the_old_and_new_names():
    fun, loss_fn, params = problem()
    static = ("tangent_size", "sampler", "key", "adaptive_damping", "memory_size")
    new_tx = optax.inject_hyperparams(sofo.scale_by_sofo, static_args=static)(**CONFIG, learning_rate=0.5)
    old_tx = optax.inject_hyperparams(sofo.transform, static_args=static)(**CONFIG, step_size=0.5)
    new_state = new_tx.init(params)
    with pytest.warns(DeprecationWarning):  # inject_hyperparams builds the inner transform in init and update
        old_state = old_tx.init(params)
    assert set(new_state.hyperparams) == {"damping", "learning_rate"}
    assert set(old_state.hyperparams) == {"damping", "step_size"}
    new_u, _ = new_tx.update(None, new_state, params, fun=fun, loss_fn=loss_fn)
    with pytest.warns(DeprecationWarning):
        old_u, _ = old_tx.update(None, old_state, params, fun=fun, loss_fn=loss_fn)
    assert_bit_identical(old_u, new_u)


def test_predicted_reduction_step_size_is_deprecated():
    fun, loss_fn, params = problem()
    _, _, info = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=3, damping=1e-3)(1, params)
    new = sofo.predicted_reduction(info, learning_rate=0.3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        old = sofo.predicted_reduction(info, step_size=0.3)
    (warning,) = deprecations(record)
    assert "sofo.predicted_reduction: step_size=0.3 is deprecated" in str(warning.message)
    assert warning.filename == __file__
    np.testing.assert_array_equal(np.asarray(old), np.asarray(new))
    # The default is the full step, learning_rate=1: the model's reduction c.g - c^T G c / 2, by hand.
    c, g, curvature = info.coefficients, info.directional_derivatives, info.curvature
    np.testing.assert_allclose(sofo.predicted_reduction(info), c @ g - 0.5 * c @ curvature @ c, rtol=1e-12)
    with pytest.raises(TypeError, match="got both learning_rate=0.3 and step_size=0.3"):
        sofo.predicted_reduction(info, 0.3, step_size=0.3)


@pytest.mark.parametrize("front", ["sofo_grad", "sofo_grad_scan"])
def test_brainstate_style_step_size_is_the_deprecated_learning_rate(front):
    # sofo_grad / sofo_grad_scan with adaptive damping: step_size= gives the same directions, damping and
    # verdicts as learning_rate=, warns once per construction, and refuses being mixed with it.
    fun, loss_fn, params = problem()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((6, 4, 3)))
    y = jnp.asarray(np.random.default_rng(2).standard_normal((6, 4, 2)))

    def build(**lr):
        if front == "sofo_grad":
            g = sofo.sofo_grad(fun, loss_fn, argnums=0, tangent_size=3, key=2, adaptive_damping=True, **lr)
            return g, lambda p: g(p)
        cell = lambda w, z, xt: (jnp.tanh(xt @ w["w"] + z @ w["w"][:2] + w["b"]),) * 2  # noqa: E731
        g = sofo.transforms.sofo_grad_scan(
            cell, lambda o, t: 0.5 * jnp.mean((o - t) ** 2), argnums=0, tangent_size=3, key=2,
            adaptive_damping=True, **lr,
        )
        return g, lambda p: g(p, jnp.zeros((4, 2)), x, y)

    def trajectory(g, call):
        p, seen = params, []
        for _ in range(3):
            d = call(p)
            seen.append((d, g.adaptive.damping, g.adaptive.accepted))
            p = jax.tree_util.tree_map(lambda a, b: a - 0.7 * b, p, d)
        return seen

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = trajectory(*build(learning_rate=0.7))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        old_g, old_call = build(step_size=0.7)
    assert len(deprecations(record)) == 1 and "learning_rate=0.7" in str(deprecations(record)[0].message)
    assert_bit_identical(new, trajectory(old_g, old_call))
    with pytest.raises(TypeError, match="got both learning_rate"):
        build(learning_rate=0.7, step_size=0.7)
