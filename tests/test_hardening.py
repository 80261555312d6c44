"""Issue 12 (hardening): the adversarial reproducers as regression tests, plus hypothesis properties.

Every number is checked against an independent dense computation (jax.jacfwd / jax.hessian /
numpy.linalg.solve), never against the code's own earlier output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import sofo
from sofo import _checks, _solve

FAST = settings(max_examples=3, deadline=None)
SLOW = settings(max_examples=40, deadline=None)


def dense_direction(fun, loss_fn, params, damping, *, gauss_newton=True):
    """(G + lam I)^-1 g in float64 numpy, G the dense GGN (or Hessian), eigenvalues <= round-off as zero.

    lam = damping * top when the top eigenvalue is meaningfully positive, else damping (absolute).
    """
    flat, unravel = ravel_pytree(params)
    flat_out = lambda p: ravel_pytree(fun(unravel(p)))[0]  # noqa: E731
    out, unravel_out = ravel_pytree(fun(params))
    total = lambda o: loss_fn(unravel_out(o))  # noqa: E731
    grad = np.asarray(jax.grad(lambda p: total(flat_out(p)))(flat), np.float64)
    if gauss_newton:
        jac = np.asarray(jax.jacfwd(flat_out)(flat), np.float64)
        curvature = jac.T @ np.asarray(jax.hessian(total)(out), np.float64) @ jac
    else:
        curvature = np.asarray(jax.hessian(lambda p: total(flat_out(p)))(flat), np.float64)
    eig, vec = np.linalg.eigh(0.5 * (curvature + curvature.T))
    tol = 1e-12 * len(eig) * np.abs(eig).max() if eig.size else 0.0
    eig = np.where(eig > tol, eig, 0.0)
    lam = damping * eig[-1] if eig[-1] > 0 else damping
    return vec @ ((vec.T @ grad) / (eig + lam)), grad


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0], np.float64)


# ---------------------------------------------------------------- the damped solve at zero curvature


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_concave_exact_loss_gives_a_step_bounded_by_g_over_damping(dtype):
    x = jnp.linspace(0.1, 1, 10, dtype=dtype)
    fun = lambda p: jnp.sum(p * x)  # noqa: E731
    loss_fn = lambda o: -0.5 * o**2  # noqa: E731
    params = jnp.full(10, 0.1, dtype)
    # The reproducer: normal tangents, K = 4.
    _, direction, info = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=4, damping=1e-3, curvature="exact")(0, params)
    grad = np.asarray(jax.grad(lambda p: loss_fn(fun(p)))(params), np.float64)
    assert np.all(np.isfinite(direction))
    assert np.linalg.norm(direction) <= 1.001 * np.linalg.norm(grad) / 1e-3
    # K = n orthonormal: V V^T = I, the curvature is all clipped, so the direction is exactly g / damping.
    _, direction, _ = sofo.value_and_sofo_grad(
        fun, loss_fn, tangent_size=10, damping=1e-3, curvature="exact", sampler="orthonormal"
    )(0, params)
    rtol = 1e-4 if dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(np.asarray(direction, np.float64), grad / 1e-3, rtol=rtol, atol=rtol * np.abs(grad).max() / 1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_rank_deficient_least_squares_matches_the_dense_damped_step(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(12, 2)) @ rng.normal(size=(2, 6)), dtype)  # rank 2 in 6 parameters
    t = jnp.asarray(rng.normal(size=12), dtype)
    fun = lambda p: x @ p  # noqa: E731
    loss_fn = lambda y: 0.5 * jnp.mean((y - t) ** 2)  # noqa: E731
    params = jnp.asarray(rng.normal(size=6), dtype)
    _, direction, _ = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=6, damping=1e-2, sampler="orthonormal")(3, params)
    expected, _ = dense_direction(fun, loss_fn, params, 1e-2)
    rtol = 2e-3 if dtype == jnp.float32 else 1e-9
    np.testing.assert_allclose(flat(direction), expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_damped_solve_on_round_off_sketches_uses_absolute_damping(dtype):
    g = jnp.asarray([1.0, -2.0, 0.5], dtype)
    round_off = 4.7e-8 if dtype == jnp.float32 else 2.2e-19  # the values (below eps * K * max|eig|)
    for top in (round_off, -round_off, -1e-30, 0.0):
        # A concave sketch whose top eigenvalue is round-off of either sign.
        curvature = jnp.diag(jnp.asarray([-1.0, -0.5, top], dtype))
        coefficients, _ = _solve.damped_solve(curvature, g, 1e-3)
        np.testing.assert_allclose(np.asarray(coefficients, np.float64), np.asarray(g, np.float64) / 1e-3, rtol=1e-5)


def test_damped_solve_takes_a_traced_damping():
    curvature = jnp.diag(jnp.asarray([2.0, 1.0, 0.0]))
    g = jnp.ones(3)
    coefficients = jax.jit(lambda d: _solve.damped_solve(curvature, g, d)[0])(jnp.asarray(0.5))
    np.testing.assert_allclose(coefficients, 1 / (np.array([2.0, 1.0, 0.0]) + 0.5 * 2.0), rtol=1e-12)


# ---------------------------------------------------------------- zero-size leaves


@pytest.mark.parametrize("loss", ["mse", "ce", "exact"])
def test_empty_output_leaves_contribute_nothing(loss):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 3)))
    labels = jax.nn.one_hot(jnp.arange(4) % 2, 2)
    params = jnp.asarray(rng.normal(size=(3, 2)))
    if loss == "mse":
        loss_fn = lambda o: 0.5 * jnp.mean(jnp.sum((o["y"] - labels) ** 2, -1))  # noqa: E731
    else:
        loss_fn = lambda o: -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(o["y"]), -1))  # noqa: E731
    for empty in (jnp.zeros((0, 3)), jnp.zeros((4, 0))):
        fun = lambda p, empty=empty: {"y": x @ p, "e": empty * jnp.sum(p)}
        _, direction, info = sofo.value_and_sofo_grad(
            fun, loss_fn, tangent_size=6, damping=1e-3, curvature=loss, sampler="orthonormal"
        )(0, params)
        expected, _ = dense_direction(fun, loss_fn, params, 1e-3, gauss_newton=loss != "exact")
        assert np.all(np.isfinite(info.curvature))
        np.testing.assert_allclose(flat(direction), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("chunk", [None, 2, 3])
def test_empty_params_leaf_works_with_the_normal_sampler(chunk):
    x = jnp.linspace(-1, 1, 12).reshape(4, 3)
    t = jnp.arange(8.0).reshape(4, 2)
    params = {"w": jnp.ones((3, 2)), "e": jnp.zeros((0,))}
    fun = lambda p: x @ p["w"] + jnp.sum(p["e"])  # noqa: E731
    loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))  # noqa: E731
    value, direction, _ = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=5, tangent_chunk_size=chunk)(0, params)
    assert direction["e"].shape == (0,)
    grad = jax.grad(lambda p: loss_fn(fun(p)))(params)
    assert np.all(np.isfinite(direction["w"]))
    assert float(jnp.vdot(direction["w"], grad["w"])) > 0  # a descent direction
    # Chunking (streamed tangents) draws the same tangents: the same direction.
    _, unchunked, _ = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=5)(0, params)
    np.testing.assert_allclose(direction["w"], unchunked["w"], rtol=1e-10)


# ---------------------------------------------------------------- float32 overflow


def test_float32_overflowing_sketch_gives_the_dense_step():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 3))
    t = rng.normal(size=8)
    params = jnp.asarray(rng.normal(size=3) * 1e-20, jnp.float32)
    fun = lambda p: 1e20 * (jnp.asarray(x, jnp.float32) @ p)  # noqa: E731
    loss_fn = lambda y: 0.5 * jnp.mean((y - jnp.asarray(t, jnp.float32)) ** 2)  # noqa: E731
    value, direction, _ = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=3, damping=1e-3, sampler="orthonormal")(0, params)
    assert np.isfinite(value) and np.all(np.isfinite(direction))
    # Dense, in float64 numpy: G = 1e40 X^T X / B, g = 1e20 X^T (y - t) / B.
    p = np.asarray(params, np.float64)
    ggn = 1e40 * x.T @ x / 8
    grad = 1e20 * x.T @ (1e20 * x @ p - t) / 8
    expected = np.linalg.solve(ggn + 1e-3 * np.linalg.eigvalsh(ggn)[-1] * np.eye(3), grad)
    np.testing.assert_allclose(np.asarray(direction, np.float64), expected, rtol=1e-3)


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("seed", [2**63, 2**70, -(2**63) - 1])
def test_seeds_outside_the_key_range_are_a_value_error(seed):
    step = sofo.value_and_sofo_grad(lambda p: p, lambda y: jnp.sum(y**2), tangent_size=2)
    with pytest.raises(ValueError, match="outside"):
        step(seed, jnp.ones(3))


def test_seeds_beyond_32_bits_are_rejected_without_x64():
    jax.config.update("jax_enable_x64", False)
    try:
        for seed in (2**40, 2**31, -(2**31) - 1):
            with pytest.raises(ValueError, match=r"\[-2147483648, 2147483647\]"):
                _checks.as_key(seed)
        assert _checks.as_key(2**31 - 1).shape == ()
    finally:
        jax.config.update("jax_enable_x64", True)


# ---------------------------------------------------------------- early errors


def test_ce_on_a_scalar_output_is_an_early_error():
    step = sofo.value_and_sofo_grad(lambda p: jnp.sum(p), lambda y: y, curvature="ce", tangent_size=2)
    with pytest.raises(ValueError, match="curvature='ce'.*scalar"):
        step(0, jnp.ones(3))


def test_a_python_float_model_is_an_early_error():
    step = sofo.value_and_sofo_grad(lambda p: 1.0, lambda y: jnp.asarray(y), tangent_size=2)
    with pytest.raises(TypeError, match="Python float"):
        step(0, jnp.ones(3))


def test_axis_name_outside_shard_map_is_a_clear_error():
    step = sofo.value_and_sofo_grad(lambda p: p, lambda y: jnp.sum(y**2), tangent_size=2, axis_name="data")
    with pytest.raises(ValueError, match="shard_map"):
        step(0, jnp.ones(3))
    scan = sofo.value_and_sofo_grad_scan(
        lambda p, z, x: (z, p * x), lambda y, t: jnp.sum(y**2), tangent_size=2, axis_name="data"
    )
    with pytest.raises(ValueError, match="shard_map"):
        scan(0, jnp.ones(3), jnp.zeros(()), jnp.ones((2, 3)), None)


def test_non_callables_are_rejected_when_the_step_is_built():
    with pytest.raises(TypeError, match="fun must be callable"):
        sofo.value_and_sofo_grad(None, jnp.sum)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        sofo.value_and_sofo_grad(jnp.sin, 3)
    with pytest.raises(TypeError, match="cell must be callable"):
        sofo.value_and_sofo_grad_scan("cell", jnp.sum)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        sofo.value_and_sofo_grad_scan(lambda p, z, x: (z, x), None)


# ---------------------------------------------------------------- scan edge cases


def _rnn(p, z, x):
    h, count = z
    h_new = jnp.tanh(p["a"] * h + p["b"] * x)
    return (h_new, count + 1), h_new * (1.0 + 0.1 * count)


def _unrolled(p, xs, z0):
    z, ys = z0, []
    for x in xs:
        z, y = _rnn(p, z, x)
        ys.append(y)
    return jnp.stack(ys)


def test_scan_with_zero_steps_gives_zero_loss_and_zero_direction():
    params = {"a": jnp.ones(3) * 0.5, "b": jnp.ones(3)}
    step = sofo.value_and_sofo_grad_scan(_rnn, lambda y, t: 0.5 * jnp.sum((y - t) ** 2), tangent_size=4)
    value, direction, _ = step(0, params, (jnp.zeros(3), jnp.int32(0)), jnp.zeros((0, 3)), jnp.zeros((0, 3)))
    assert float(value) == 0.0
    for leaf in jax.tree_util.tree_leaves(direction):
        np.testing.assert_array_equal(leaf, 0.0)


@pytest.mark.parametrize("chunk", [None, 2])
def test_scan_carries_an_integer_latent_leaf_like_the_unrolled_model(chunk):
    rng = np.random.default_rng(4)
    params = {"a": jnp.asarray(rng.normal(size=3)), "b": jnp.asarray(rng.normal(size=3))}
    xs, ys = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(5, 3)))
    z0 = (jnp.asarray(rng.normal(size=3)), jnp.int32(0))
    loss_t = lambda y, t: 0.5 * jnp.sum((y - t) ** 2)  # noqa: E731
    value, direction, _ = sofo.value_and_sofo_grad_scan(
        _rnn, loss_t, tangent_size=6, damping=1e-4, curvature="exact", sampler="orthonormal", tangent_chunk_size=chunk
    )(0, params, z0, xs, ys)
    fun = lambda p: _unrolled(p, xs, z0)  # noqa: E731
    total = lambda y: jnp.sum(jax.vmap(loss_t)(y, ys))  # noqa: E731
    np.testing.assert_allclose(value, total(fun(params)), rtol=1e-12)
    expected, _ = dense_direction(fun, total, params, 1e-4)
    np.testing.assert_allclose(flat(direction), expected, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------- properties over random problems


def _problem(seed, batch, hidden, loss):
    rng = np.random.default_rng(seed)
    params = {"w1": jnp.asarray(rng.normal(size=(3, hidden))), "w2": jnp.asarray(rng.normal(size=(hidden, 2)))}
    x = jnp.asarray(rng.normal(size=(batch, 3)))
    labels = jax.nn.one_hot(jnp.asarray(rng.integers(0, 2, batch)), 2)
    fun = lambda p: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
    if loss == "ce":
        loss_fn = lambda y: -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(y), -1))  # noqa: E731
    else:
        loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - labels) ** 2, -1))  # noqa: E731
    return params, fun, loss_fn


def _check_properties(seed, batch, hidden, loss, damping):
    params, fun, loss_fn = _problem(seed, batch, hidden, loss)
    n = 5 * hidden
    # Dense parity in float64 with K = n orthonormal tangents.
    _, direction, _ = sofo.value_and_sofo_grad(
        fun, loss_fn, tangent_size=n, damping=damping, curvature=loss, sampler="orthonormal"
    )(seed, params)
    expected, grad = dense_direction(fun, loss_fn, params, damping)
    np.testing.assert_allclose(flat(direction), expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    # Random K < n: finite, a descent direction, the same whatever the chunk size.
    k = max(1, n // 2)
    _, direction, _ = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=k, damping=damping, curvature=loss)(seed, params)
    assert np.all(np.isfinite(flat(direction)))
    assert flat(direction) @ grad >= -1e-12 * np.linalg.norm(grad) * np.linalg.norm(flat(direction))
    _, chunked, _ = sofo.value_and_sofo_grad(
        fun, loss_fn, tangent_size=k, damping=damping, curvature=loss, tangent_chunk_size=2
    )(seed, params)
    np.testing.assert_allclose(flat(chunked), flat(direction), rtol=1e-8, atol=1e-12)


def _check_scan_is_unrolled(seed, steps):
    rng = np.random.default_rng(seed)
    params = {"a": jnp.asarray(rng.normal(size=2)), "b": jnp.asarray(rng.normal(size=2))}
    xs, ys = jnp.asarray(rng.normal(size=(steps, 2))), jnp.asarray(rng.normal(size=(steps, 2)))
    z0 = (jnp.asarray(rng.normal(size=2)), jnp.int32(0))
    loss_t = lambda y, t: 0.5 * jnp.sum((y - t) ** 2)  # noqa: E731
    _, direction, _ = sofo.value_and_sofo_grad_scan(
        _rnn, loss_t, tangent_size=4, damping=1e-3, curvature="exact", sampler="orthonormal"
    )(seed, params, z0, xs, ys)
    fun = lambda p: _unrolled(p, xs, z0)  # noqa: E731
    total = lambda y: jnp.sum(jax.vmap(loss_t)(y, ys))  # noqa: E731
    expected, _ = dense_direction(fun, total, params, 1e-3)
    np.testing.assert_allclose(flat(direction), expected, rtol=1e-7, atol=1e-10)


PROBLEMS = dict(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 6),
    hidden=st.integers(1, 3),
    loss=st.sampled_from(["mse", "ce"]),
    damping=st.sampled_from([1e-6, 1e-3, 1e-1]),
)


@FAST
@given(**PROBLEMS)
def test_random_problems_fast(seed, batch, hidden, loss, damping):
    _check_properties(seed, batch, hidden, loss, damping)


@FAST
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 4))
def test_scan_is_unrolled_fast(seed, steps):
    _check_scan_is_unrolled(seed, steps)


@pytest.mark.slow
@SLOW
@given(**PROBLEMS)
def test_random_problems_slow(seed, batch, hidden, loss, damping):
    _check_properties(seed, batch, hidden, loss, damping)


@pytest.mark.slow
@SLOW
@given(seed=st.integers(0, 2**16), steps=st.integers(1, 8))
def test_scan_is_unrolled_slow(seed, steps):
    _check_scan_is_unrolled(seed, steps)
