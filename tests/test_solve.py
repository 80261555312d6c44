"""The damped solve against dense references, on the cases where round-off decides the damping's scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sofo
from sofo import _solve


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_concave_loss_gives_the_bounded_step_g_over_damping(dtype):
    """The issue's reproducer: loss -0.5 o^2 (concave), so the exact sketch has no positive curvature;
    round-off used to make the top eigenvalue a tiny positive number and the step ~1e10. With K = n
    orthonormal tangents the step is exactly grad / damping."""
    x = jnp.linspace(0.1, 1, 10).astype(dtype)
    fun = lambda p: jnp.sum(p * x)  # noqa: E731
    loss_fn = lambda o: -0.5 * o**2  # noqa: E731
    params = jnp.full(10, 0.1, dtype)
    _, direction, _ = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=10, damping=1e-3, curvature="exact",
                                               sampler="orthonormal")(0, params)
    grad = jax.grad(lambda p: loss_fn(fun(p)))(params)
    rtol = 1e-4 if dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(direction, grad / 1e-3, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(grad))) / 1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_concave_loss_with_normal_tangents_is_bounded(dtype):
    x = jnp.linspace(0.1, 1, 10).astype(dtype)
    fun = lambda p: jnp.sum(p * x)  # noqa: E731
    loss_fn = lambda o: -0.5 * o**2  # noqa: E731
    params = jnp.full(10, 0.1, dtype)
    _, direction, info = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=4, damping=1e-3, curvature="exact")(0, params)
    # c = g~ / damping, so |direction| <= sqrt(K) |g~| / damping (unit-norm tangents)
    bound = np.sqrt(4) * float(jnp.linalg.norm(info.directional_derivatives)) / 1e-3
    assert float(jnp.linalg.norm(direction)) <= bound * (1 + 1e-5)
    np.testing.assert_allclose(info.coefficients, info.directional_derivatives / 1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_rank_deficient_least_squares_matches_the_dense_damped_step(dtype):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((12, 3)) @ rng.standard_normal((3, 6))  # rank 3 of 6
    a = jnp.asarray(a, dtype)
    b = jnp.asarray(rng.standard_normal(12), dtype)
    fun = lambda p: a @ p  # noqa: E731
    loss_fn = lambda y: 0.5 * jnp.sum((y - b) ** 2) / y.shape[0]  # noqa: E731
    params = jnp.zeros(6, dtype)
    _, direction, _ = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=6, damping=1e-2, sampler="orthonormal")(
        1, params
    )
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ggn = a64.T @ a64 / 12
    grad = a64.T @ (a64 @ np.zeros(6) - b64) / 12
    top = np.linalg.eigvalsh(ggn)[-1]
    expected = np.linalg.solve(ggn + 1e-2 * top * np.eye(6), grad)
    rtol = 2e-3 if dtype == jnp.float32 else 1e-9
    np.testing.assert_allclose(direction, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_zero_sketch_gives_g_over_damping_and_zero_damping_gives_zero():
    g = jnp.array([1.0, -2.0, 3.0])
    c, _ = _solve.damped_solve(jnp.zeros((3, 3)), g, 0.5)
    np.testing.assert_allclose(c, g / 0.5)
    c, _ = _solve.damped_solve(jnp.zeros((3, 3)), g, 0.0)
    np.testing.assert_allclose(c, 0.0)


def test_traced_damping():
    rng = np.random.default_rng(1)
    m = rng.standard_normal((4, 4))
    curvature = jnp.asarray(m @ m.T)
    g = jnp.asarray(rng.standard_normal(4))
    eager, _ = _solve.damped_solve(curvature, g, 0.1)
    traced, _ = jax.jit(lambda d: _solve.damped_solve(curvature, g, d))(jnp.asarray(0.1))
    top = np.linalg.eigvalsh(np.asarray(curvature))[-1]
    np.testing.assert_allclose(eager, np.linalg.solve(np.asarray(curvature) + 0.1 * top * np.eye(4), g), rtol=1e-9)
    np.testing.assert_allclose(traced, eager, rtol=1e-12)
