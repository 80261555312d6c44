"""sofo.transforms.sofo_grad_scan: g(*cell_args, z0, xs, ys) against sofo.value_and_sofo_grad_scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sofo
from sofo import transforms as T
from sofo.transforms import State

REC0 = jnp.array([[0.5, -0.3], [0.2, 0.4]])
IN0 = jnp.array([[1.0, 0.2], [-0.4, 0.7]])
Z0 = jnp.array([0.1, -0.2])
XS = jnp.array([[0.3, -0.1], [0.5, 0.2], [-0.2, 0.4]])  # T = 3
YS = jnp.array([[0.1, 0.0], [0.2, -0.1], [0.0, 0.3]])
KEY = jax.random.key(2)
K = 3


def step(rec, inp, scale, z, x):
    z_new = jnp.tanh(rec @ z + inp @ x)
    return z_new, scale * z_new


def loss_fn(y, target):
    return 0.5 * jnp.mean((y - target) ** 2)


def engine(params, cell):
    return sofo.value_and_sofo_grad_scan(cell, loss_fn, tangent_size=K)(KEY, params, Z0, XS, YS)


def assert_tree_close(actual, expected, rtol=1e-9, atol=1e-12):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def test_states_only_gives_var_grads():
    rec, inp = State(REC0, name="rec"), State(IN0, name="inp")

    def cell(z, x):
        return step(rec.value, inp.value, 1.0, z, x)

    g = T.sofo_grad_scan(cell, loss_fn, grad_states={"rec": rec, "inp": inp}, tangent_size=K, key=KEY)
    _, ref, _ = engine({"rec": REC0, "inp": IN0}, lambda p, z, x: step(p["rec"], p["inp"], 1.0, z, x))
    assert_tree_close(g(Z0, XS, YS), ref)
    assert rec.value is REC0 and inp.value is IN0


def test_params_as_argument_default_argnums():
    params = {"rec": REC0, "inp": IN0}
    _, ref, _ = engine(params, lambda p, z, x: step(p["rec"], p["inp"], 1.0, z, x))
    direction, returned_value = T.sofo_grad_scan(
        lambda p, z, x: step(p["rec"], p["inp"], 1.0, z, x), loss_fn, tangent_size=K, key=KEY, return_value=True
    )(params, Z0, XS, YS)
    assert_tree_close(direction, ref)
    # The value is the cell's outputs stacked over time, from a plain rollout.
    z, outputs = Z0, []
    for t in range(XS.shape[0]):
        z, y = step(REC0, IN0, 1.0, z, XS[t])
        outputs.append(y)
    np.testing.assert_allclose(returned_value, jnp.stack(outputs), rtol=1e-12)


def test_states_and_argnums_with_value_and_stacked_aux():
    rec, inp = State(REC0, name="rec"), State(IN0, name="inp")

    def cell(scale, z, x):
        z_new, y = step(rec.value, inp.value, scale, z, x)
        return (z_new, y), {"norm": jnp.sum(z_new**2)}

    g = T.sofo_grad_scan(
        cell, loss_fn, grad_states=[rec, inp], argnums=0, has_aux=True, return_value=True, tangent_size=K, key=KEY
    )
    (var_grads, arg_grads), value, aux = g(jnp.array(1.5), Z0, XS, YS)
    _, ref, _ = engine(([REC0, IN0], jnp.array(1.5)), lambda p, z, x: step(*p[0], p[1], z, x))
    assert_tree_close((var_grads, arg_grads), ref)

    def rollout(z, x):
        z_new, y = step(REC0, IN0, 1.5, z, x)
        return z_new, (y, {"norm": jnp.sum(z_new**2)})

    outputs, expected_aux = jax.lax.scan(rollout, Z0, XS)[1]
    np.testing.assert_allclose(value, outputs, rtol=1e-12)  # the stacked outputs y_t
    assert_tree_close(aux, expected_aux)


def test_check_states_both_ways():
    rec, inp, unused = State(REC0, name="rec"), State(IN0, name="inp"), State(jnp.ones(2), name="unused")

    def cell(z, x):
        return step(rec.value, inp.value, 1.0, z, x)

    with pytest.raises(ValueError, match=r"grad_states\[2\].*'unused'"):
        T.sofo_grad_scan(cell, loss_fn, grad_states=[rec, inp, unused], tangent_size=K, key=KEY)(Z0, XS, YS)
    direction = T.sofo_grad_scan(
        cell, loss_fn, grad_states=[rec, inp, unused], check_states=False, tangent_size=K, key=KEY
    )(Z0, XS, YS)
    _, ref, _ = engine([REC0, IN0], lambda p, z, x: step(p[0], p[1], 1.0, z, x))
    assert_tree_close(direction[:2], ref)
    np.testing.assert_array_equal(direction[2], jnp.zeros(2))


def test_keys_fresh_by_default_and_required_under_jit():
    rec = State(REC0)

    def cell(z, x):
        return step(rec.value, IN0, 1.0, z, x)

    g = T.sofo_grad_scan(cell, loss_fn, grad_states=rec, tangent_size=K)
    assert not np.allclose(g(Z0, XS, YS), g(Z0, XS, YS))
    with pytest.raises(RuntimeError, match="key="):
        jax.jit(g)(Z0, XS, YS)
    # With an explicit key it runs under jit.
    jitted = jax.jit(T.sofo_grad_scan(cell, loss_fn, grad_states=rec, tangent_size=K, key=KEY))(Z0, XS, YS)
    _, ref, _ = engine(REC0, lambda p, z, x: step(p, IN0, 1.0, z, x))
    np.testing.assert_allclose(jitted, ref, rtol=1e-8, atol=1e-10)


def test_bad_calls():
    rec = State(REC0, name="rec")
    counter = State(jnp.zeros(()), name="counter")

    def writing_cell(z, x):
        counter.value = counter.value + 1
        return step(rec.value, IN0, 1.0, z, x)

    with pytest.raises(ValueError, match=r"writes State 'counter'.*Carry that value in the latent z"):
        T.sofo_grad_scan(writing_cell, loss_fn, grad_states=rec, key=KEY, tangent_size=K)(Z0, XS, YS)
    np.testing.assert_array_equal(counter.value, 0.0)
    assert rec.value is REC0

    def cell(p, z, x):
        return step(p, IN0, 1.0, z, x)

    with pytest.raises(TypeError, match=r"takes \(\*cell_args, z0, xs, ys\).*called with 2"):
        T.sofo_grad_scan(cell, loss_fn, key=KEY)(Z0, XS)
    with pytest.raises(ValueError, match=r"argnums=1 selects positional argument 1.*before the trailing z0, xs, ys"):
        T.sofo_grad_scan(cell, loss_fn, argnums=1, key=KEY)(REC0, Z0, XS, YS)
    def triple_cell(p, z, x):
        return (*cell(p, z, x), 0.0)

    with pytest.raises(TypeError, match=r"has_aux=True\) expects triple_cell to return a pair.*has_aux=False"):
        T.sofo_grad_scan(triple_cell, loss_fn, has_aux=True, key=KEY)(REC0, Z0, XS, YS)
    with pytest.raises(ValueError, match=r"xs is a scalar"):
        T.sofo_grad_scan(cell, loss_fn, key=KEY)(REC0, Z0, jnp.array(1.0), YS)
    with pytest.raises(TypeError, match=r"grad_states\[0\] is a ArrayImpl"):
        T.sofo_grad_scan(cell, loss_fn, grad_states=[REC0])
