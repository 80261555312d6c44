"""brainstate's own States in sofo.transforms, checked against jax on the same function written purely."""

from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sofo
import sofo.transforms as st

brainstate = pytest.importorskip("brainstate")
# Importing brainstate 0.5 switches jax_enable_x64 off (its default precision is 32; 0.6 leaves it as
# it is); the suite runs in float64 (conftest), so set it the brainstate way, which keeps its
# environment consistent on both lines.
brainstate.environ.set(precision=64)

X = jax.random.normal(jax.random.key(1), (6, 3))
Y = jax.random.normal(jax.random.key(2), (6, 2))


def _net():
    brainstate.random.seed(0)
    return brainstate.nn.Linear(3, 2)


def _pure_loss(params, x=X):
    return jnp.mean(jnp.tanh(x @ params["weight"] + params["bias"]) ** 2)


def test_grad_module_states_matches_jax():
    net = _net()
    states = net.states(brainstate.ParamState)
    params = dict(net.weight.value)
    g = st.grad(lambda x: jnp.mean(jnp.tanh(net(x)) ** 2), grad_states=states)
    grads = g(X)
    expected = jax.grad(_pure_loss)(params)
    got = list(grads.values())[0]
    np.testing.assert_allclose(got["weight"], expected["weight"], rtol=1e-5)
    np.testing.assert_allclose(got["bias"], expected["bias"], rtol=1e-5)
    assert not isinstance(net.weight.value["weight"], jax.core.Tracer)


@pytest.mark.parametrize("wrap", ["eager", "jax.jit", "brainstate.jit"])
def test_grad_single_dict_sequence_and_writes(wrap):
    w = brainstate.ParamState(jnp.linspace(0.1, 1.0, 3))
    b = brainstate.ParamState(jnp.float32(0.5))
    count = brainstate.ShortTermState(jnp.float32(0.0))

    def f(x):
        count.value = count.value + 1.0
        return jnp.sum(jnp.sin(x * w.value) + b.value ** 2)

    def pure(wv, bv):
        return jnp.sum(jnp.sin(X[0] * wv) + bv ** 2)

    for grad_states, unpack in (
        (w, lambda g: (g, None)),
        ([w, b], lambda g: (g[0], g[1])),
        ({"w": w, "b": b}, lambda g: (g["w"], g["b"])),
    ):
        g = st.grad(f, grad_states=grad_states, return_value=True)
        if wrap == "jax.jit":
            g = jax.jit(g)
            # jax.jit cannot carry the write out; only a brainstate transform can. Check the read-only way.
            count_before = count.value
            with pytest.raises(RuntimeError, match="tracer"):
                g(X[0])
            assert count.value == count_before and not isinstance(w.value, jax.core.Tracer)
            continue
        if wrap == "brainstate.jit":
            g = brainstate.transform.jit(g)
        before = float(count.value)
        grads, value = g(X[0])
        gw, gb = unpack(grads)
        ew, eb = jax.grad(pure, argnums=(0, 1))(w.value, b.value)
        np.testing.assert_allclose(gw, ew, rtol=1e-5)
        if gb is not None:
            np.testing.assert_allclose(gb, eb, rtol=1e-5)
        np.testing.assert_allclose(value, pure(w.value, b.value), rtol=1e-6)
        assert float(count.value) == before + 1.0
        assert not isinstance(w.value, jax.core.Tracer)


def test_read_only_under_jax_jit():
    net = _net()
    g = jax.jit(st.grad(lambda x: jnp.mean(jnp.tanh(net(x)) ** 2), grad_states=net.states(brainstate.ParamState)))
    got = list(g(X).values())[0]
    expected = jax.grad(_pure_loss)(dict(net.weight.value))
    np.testing.assert_allclose(got["weight"], expected["weight"], rtol=1e-5)


def test_jacfwd_and_hessian_match_jax():
    w = brainstate.ParamState(jnp.array([0.3, -0.2, 0.7]))

    def f(x):
        return jnp.sum(jnp.tanh(x * w.value) ** 2)

    def pure(wv):
        return jnp.sum(jnp.tanh(X[0] * wv) ** 2)

    np.testing.assert_allclose(st.hessian(f, grad_states=w)(X[0]), jax.hessian(pure)(w.value), rtol=1e-5)
    jac = st.jacfwd(lambda x: jnp.tanh(x * w.value), grad_states=w)(X[0])
    np.testing.assert_allclose(jac, jax.jacfwd(lambda wv: jnp.tanh(X[0] * wv))(w.value), rtol=1e-5)


def test_sofo_grad_module_matches_engine():
    net = _net()
    states = net.states(brainstate.ParamState)
    loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - Y) ** 2, -1))
    g = st.sofo_grad(lambda x: net(x), loss_fn, grad_states=states, tangent_size=4, key=3, return_value=True)
    direction, outputs = g(X)
    params = {k: s.value for k, s in states.items()}
    _, expected, _ = sofo.value_and_sofo_grad(
        lambda p: X @ list(p.values())[0]["weight"] + list(p.values())[0]["bias"], loss_fn, tangent_size=4
    )(3, params)
    for key in states:
        np.testing.assert_allclose(direction[key]["weight"], expected[key]["weight"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(outputs, net(X), rtol=1e-6)


def test_sofo_grad_scan_recurrent_cell():
    brainstate.random.seed(0)
    w_rec = brainstate.ParamState(0.3 * jax.random.normal(jax.random.key(4), (4, 4)))
    w_in = brainstate.ParamState(0.3 * jax.random.normal(jax.random.key(5), (2, 4)))
    xs = jax.random.normal(jax.random.key(6), (5, 3, 2))
    ys = jax.random.normal(jax.random.key(7), (5, 3, 4))
    z0 = jnp.zeros((3, 4))

    def cell(z, x):
        z = jnp.tanh(z @ w_rec.value + x @ w_in.value)
        return z, z

    def pure_cell(p, z, x):
        z = jnp.tanh(z @ p[0] + x @ p[1])
        return z, z

    loss_fn = lambda y, t: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
    g = st.sofo_grad_scan(cell, loss_fn, grad_states=[w_rec, w_in], tangent_size=6, key=1)
    got = g(z0, xs, ys)
    _, expected, _ = sofo.value_and_sofo_grad_scan(pure_cell, loss_fn, tangent_size=6)(
        1, [w_rec.value, w_in.value], z0, xs, ys
    )
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    jitted = brainstate.transform.jit(lambda: g(z0, xs, ys))()
    for a, b in zip(jitted, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_brainstate_cell_module():
    brainstate.random.seed(0)
    cell = brainstate.nn.ValinaRNNCell(2, 4)
    cell.init_state(3)
    readout = brainstate.nn.Linear(4, 1)
    params = cell.states(brainstate.ParamState)
    xs = jax.random.normal(jax.random.key(6), (5, 3, 2))
    ys = jax.random.normal(jax.random.key(7), (5, 3, 1))

    def run(xs):
        cell.reset_state(3)
        outs = brainstate.transform.for_loop(lambda x: readout(cell(x)), xs)
        return outs

    loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - ys) ** 2, -1))
    g = st.grad(lambda xs: loss_fn(run(xs)), grad_states=params)
    grads = g(xs)
    keys = list(params.keys())
    originals = [params[k].value for k in keys]

    def pure(values):
        # The same function written purely: the parameter values are swapped in by hand, then restored.
        # The cell writes its hidden state: a StateTraceStack lets it, and its originals undo it after.
        for k, v in zip(keys, values):
            params[k].restore_value(v)
        trace = brainstate.StateTraceStack()
        try:
            with trace:
                return loss_fn(run(xs))
        finally:
            trace.recovery_original_values()
            for k, v in zip(keys, originals):
                params[k].restore_value(v)

    expected = jax.grad(pure)(originals)
    for k, e in zip(keys, expected):
        for a, b in zip(jax.tree_util.tree_leaves(grads[k]), jax.tree_util.tree_leaves(e)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not any(isinstance(l, jax.core.Tracer) for l in jax.tree_util.tree_leaves(cell.states().to_dict_values()))


def test_threads_brainstate_state_never_keeps_a_tracer():
    w = brainstate.ParamState(jnp.ones((8, 16)) / 8)
    x = jax.random.normal(jax.random.key(0), (4, 8))
    g = st.grad(lambda x: jnp.mean(jnp.tanh(x @ w.value) ** 2), grad_states=w)
    expected = jax.grad(lambda wv: jnp.mean(jnp.tanh(x @ wv) ** 2))(w.value)
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda i: g(x), range(20)))
    for r in results:
        np.testing.assert_allclose(r, expected, rtol=1e-6)
    assert not isinstance(w.value, jax.core.Tracer)


def test_exception_restores_brainstate_states():
    w = brainstate.ParamState(jnp.ones(3))
    s = brainstate.ShortTermState(jnp.zeros(3))

    def f(x):
        s.value = s.value + w.value
        raise ZeroDivisionError("boom")

    with pytest.raises(ZeroDivisionError):
        st.grad(f, grad_states=w)(X[0])
    np.testing.assert_array_equal(s.value, jnp.zeros(3))
    np.testing.assert_array_equal(w.value, jnp.ones(3))


def test_sofo_grad_writes_under_brainstate_jit():
    net = _net()
    calls = brainstate.ShortTermState(jnp.zeros(()))
    loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - Y) ** 2, -1))

    def fun(x):
        calls.value = calls.value + 1.0
        return net(x)

    states = net.states(brainstate.ParamState)
    g = st.sofo_grad(fun, loss_fn, grad_states=states, tangent_size=4, key=1, return_value=True)
    params = {k: s.value for k, s in states.items()}
    _, expected, _ = sofo.value_and_sofo_grad(
        lambda p: X @ list(p.values())[0]["weight"] + list(p.values())[0]["bias"], loss_fn, tangent_size=4
    )(1, params)
    for call in (g, brainstate.transform.jit(g)):
        direction, outputs = call(X)
        for key in states:
            np.testing.assert_allclose(direction[key]["weight"], expected[key]["weight"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(outputs, X @ params[("weight",)]["weight"] + params[("weight",)]["bias"], rtol=1e-5)
    assert float(calls.value) == 2.0
