"""Property tests (hypothesis): random problems against dense numpy/jax linear algebra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import sofo
from sofo import _solve

SETTINGS = settings(max_examples=10, deadline=None)
# Each example of the two model-level properties compiles a new step (new shapes): a few by default, many
# more in the slow set (`pytest -m slow`, also run by CI).
FAST = settings(max_examples=2, deadline=None)
SLOW = settings(max_examples=25, deadline=None)
LEAST_SQUARES = dict(
    seed=st.integers(0, 2**31 - 1), rows=st.integers(3, 12), cols=st.integers(1, 6),
    damping=st.sampled_from([1e-8, 1e-4, 1e-1]),
)
DESCENT = dict(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 20), loss=st.sampled_from(["mse", "ce"]))


@FAST
@given(**LEAST_SQUARES)
def test_least_squares_gives_the_damped_gauss_newton_step(seed, rows, cols, damping):
    _check_least_squares(seed, rows, cols, damping)


@pytest.mark.slow
@SLOW
@given(**LEAST_SQUARES)
def test_least_squares_gives_the_damped_gauss_newton_step_slow(seed, rows, cols, damping):
    _check_least_squares(seed, rows, cols, damping)


def _check_least_squares(seed, rows, cols, damping):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(rows, cols))
    b = rng.normal(size=(rows, 2))
    theta = {"w": jnp.asarray(rng.normal(size=(cols, 2)))}

    def loss_fn(y):
        return 0.5 * jnp.mean(jnp.sum((y - b) ** 2, axis=-1))

    n = 2 * cols
    _, direction, _ = sofo.value_and_sofo_grad(
        lambda p: a @ p["w"], loss_fn, tangent_size=n, damping=damping, sampler="orthonormal"
    )(seed, theta)
    # Dense, independent: G = kron(A^T A / rows, I_2) in the row-major flattening of w.
    ggn = np.kron(a.T @ a / rows, np.eye(2))
    grad = (a.T @ (a @ np.asarray(theta["w"]) - b) / rows).ravel()
    lam = damping * np.linalg.eigvalsh(ggn)[-1]
    expected = np.linalg.solve(ggn + lam * np.eye(n), grad)
    np.testing.assert_allclose(np.asarray(direction["w"]).ravel(), expected, rtol=1e-5, atol=1e-9 * np.abs(expected).max())
    if damping == 1e-8 and np.linalg.matrix_rank(a) == cols:
        # One full Gauss-Newton step with lr = 1 lands on the least-squares solution, up to the bias the
        # damping leaves (relative size lam / smallest eigenvalue).
        solved = np.asarray(theta["w"]) - np.asarray(direction["w"])
        solution = np.linalg.lstsq(a, b, rcond=None)[0]
        bias = lam / np.linalg.eigvalsh(ggn)[0]
        error = np.linalg.norm(solved - solution)
        assert error <= 10 * bias * np.linalg.norm(solution - np.asarray(theta["w"])) + 1e-10


@FAST
@given(**DESCENT)
def test_direction_is_a_descent_direction_for_psd_curvature(seed, k, loss):
    _check_descent(seed, k, loss)


@pytest.mark.slow
@SLOW
@given(**DESCENT)
def test_direction_is_a_descent_direction_for_psd_curvature_slow(seed, k, loss):
    _check_descent(seed, k, loss)


def _check_descent(seed, k, loss):
    keys = jax.random.split(jax.random.key(seed % 1000), 4)
    params = {"w1": jax.random.normal(keys[0], (3, 5)), "w2": jax.random.normal(keys[1], (5, 4))}
    x = jax.random.normal(keys[2], (8, 3))
    t = jax.random.normal(keys[3], (8, 4))
    fun = lambda p: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
    if loss == "mse":
        loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))  # noqa: E731
    else:
        loss_fn = lambda y: -jnp.mean(jnp.sum(jax.nn.softmax(t) * jax.nn.log_softmax(y), -1))  # noqa: E731
    _, direction, info = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=k, curvature=loss)(seed, params)
    grad = ravel_pytree(jax.grad(lambda p: loss_fn(fun(p)))(params))[0]
    assert np.linalg.eigvalsh(np.asarray(info.curvature))[0] > -1e-10 * max(float(info.top_eigenvalue), 1.0)
    assert float(ravel_pytree(direction)[0] @ grad) > 0


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 8), scale=st.floats(1e-3, 1e3))
def test_rescaling_the_tangents_leaves_the_direction_unchanged(seed, k, scale):
    rng = np.random.default_rng(seed)
    n = 10
    half = rng.normal(size=(n, n))
    ggn = half @ half.T  # a dense PSD curvature
    grad = rng.normal(size=n)
    tangents = rng.normal(size=(k, n))

    def direction(v):
        coefficients, _ = _solve.damped_solve(jnp.asarray(v @ ggn @ v.T), jnp.asarray(v @ grad), 1e-3)
        return np.asarray(_solve.combine(jnp.asarray(v), coefficients))

    np.testing.assert_allclose(direction(scale * tangents), direction(tangents), rtol=1e-7, atol=1e-12)
