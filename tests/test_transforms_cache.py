"""Eager transforms compile once per structure; failed calls consume no key; int States are named."""

import logging
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sofo
import sofo.transforms as st


class _CompileCounter(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        if "Compiling" in record.getMessage():
            self.count += 1


@pytest.fixture
def compiles():
    counter = _CompileCounter()
    logger = logging.getLogger("jax")
    logger.addHandler(counter)
    jax.config.update("jax_log_compiles", True)
    try:
        yield counter
    finally:
        jax.config.update("jax_log_compiles", False)
        logger.removeHandler(counter)


X = jax.random.normal(jax.random.key(0), (8, 3))
T = jax.random.normal(jax.random.key(1), (8, 2))


def loss_fn(y):
    return 0.5 * jnp.mean(jnp.sum((y - T) ** 2, -1))


def test_sofo_grad_second_eager_call_compiles_nothing(compiles):
    w = sofo.State(jnp.ones((3, 2)) * 0.1)
    shift = sofo.State(jnp.zeros(2))
    shifts = [jnp.zeros(2) + i for i in range(3)]
    g = st.sofo_grad(
        lambda x: jnp.tanh(x @ w.value) + shift.value, loss_fn, grad_states=w, tangent_size=4, key=2,
        return_value=True,
    )
    g(X)
    first = compiles.count
    assert first > 0
    results = []
    for value in shifts:
        shift.value = value  # a State fun only reads: passed in, not frozen into the compiled function
        results.append(g(X))
    assert compiles.count == first
    for value, (direction, output) in zip(shifts, results):
        _, expected, _ = sofo.value_and_sofo_grad(
            lambda p, value=value: jnp.tanh(X @ p) + value, loss_fn, tangent_size=4
        )(2, w.value)
        np.testing.assert_allclose(direction, expected, rtol=1e-6)
        np.testing.assert_allclose(output, jnp.tanh(X @ w.value) + value, rtol=1e-6)


def test_sofo_grad_scan_second_eager_call_compiles_nothing(compiles):
    w = sofo.State(jnp.eye(2) * 0.5)

    def cell(z, x):
        z = jnp.tanh(z @ w.value + x)
        return z, z

    g = st.sofo_grad_scan(cell, lambda y, t: jnp.mean((y - t) ** 2), grad_states=w, tangent_size=3)
    xs, ys, z0 = jnp.ones((4, 5, 2)), jnp.zeros((4, 5, 2)), jnp.zeros((5, 2))
    xs2 = xs + 1.0
    g(z0, xs, ys)
    first = compiles.count
    g(z0, xs, ys)
    g(z0, xs2, ys)
    assert compiles.count == first


def test_fixed_key_cached_call_matches_the_engine():
    w = sofo.State(jnp.ones((3, 2)) * 0.1)
    g = st.sofo_grad(lambda x: jnp.tanh(x @ w.value), loss_fn, grad_states=w, tangent_size=4, key=7)
    _, expected, _ = sofo.value_and_sofo_grad(lambda p: jnp.tanh(X @ p), loss_fn, tangent_size=4)(7, w.value)
    for _ in range(2):
        np.testing.assert_allclose(g(X), expected, rtol=1e-6)


def test_failed_call_consumes_no_key():
    w = sofo.State(jnp.ones((3, 2)) * 0.1)

    def fun(x, fail=False):
        if fail:
            raise ZeroDivisionError("boom")
        return jnp.tanh(x @ w.value)

    g = st.sofo_grad(fun, loss_fn, grad_states=w, tangent_size=4)
    st.seed(11)
    reference = g(X)
    st.seed(11)
    with pytest.raises(ZeroDivisionError):
        g(X, fail=True)
    np.testing.assert_array_equal(g(X), reference)


def test_failed_engine_call_consumes_no_key():
    w = sofo.State(jnp.ones((3, 2)) * 0.1)
    g = st.sofo_grad(lambda x: jnp.tanh(x @ w.value), loss_fn, grad_states=w, tangent_size=4)
    bad = st.sofo_grad(lambda x: jnp.tanh(x @ w.value), lambda y: y, grad_states=w, tangent_size=4)
    st.seed(3)
    reference = g(X)
    st.seed(3)
    with pytest.raises(TypeError, match="loss_fn must return a floating scalar"):
        bad(X)  # loss_fn returns no scalar: fails inside the engine, after the key was drawn
    np.testing.assert_array_equal(g(X), reference)


@pytest.mark.parametrize("kind", ["grad", "hessian", "jacfwd"])
def test_int_state_is_named(kind):
    counter = sofo.State(jnp.arange(3), name="counter")
    f = lambda x: jnp.sum(x * counter.value)
    with pytest.raises(TypeError, match=r"grad_states\['c'\].*counter.*int(32|64).*float"):
        getattr(st, kind)(f, grad_states={"c": counter})(jnp.ones(3))


def test_threads_sofo_state_never_keeps_a_tracer():
    w = sofo.State(jnp.ones((8, 16)) / 8)
    x = jax.random.normal(jax.random.key(0), (4, 8))
    g = st.grad(lambda x: jnp.mean(jnp.tanh(x @ w.value) ** 2), grad_states=w)
    expected = jax.grad(lambda wv: jnp.mean(jnp.tanh(x @ wv) ** 2))(w.value)
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda i: g(x), range(40)))
    for r in results:
        np.testing.assert_allclose(r, expected, rtol=1e-6)
    assert not isinstance(w.value, jax.core.Tracer)
    np.testing.assert_allclose(g(x), expected, rtol=1e-6)


def test_threads_sofo_grad_and_writes():
    """Concurrent SOFO calls and State writes: each thread sees its own trace; no State keeps a tracer."""
    w = sofo.State(jnp.ones((3, 2)) * 0.1)
    steps = sofo.State(jnp.zeros(()))

    def fun(x):
        steps.value = steps.value + 1.0
        return jnp.tanh(x @ w.value)

    g = st.sofo_grad(fun, loss_fn, grad_states=w, tangent_size=4, key=1)
    _, expected, _ = sofo.value_and_sofo_grad(lambda p: jnp.tanh(X @ p), loss_fn, tangent_size=4)(1, w.value)
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda i: g(X), range(16)))
    for r in results:
        np.testing.assert_allclose(r, expected, rtol=1e-6)
    assert not isinstance(w.value, jax.core.Tracer) and not isinstance(steps.value, jax.core.Tracer)
    assert float(steps.value) >= 1.0
