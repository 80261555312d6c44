"""value_and_sofo_grad_scan against the unrolled engine and a dense Gauss-Newton reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sofo

T, B, N, D = 6, 3, 4, 2


def rnn_problem(seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    params = {
        "rec": 0.5 * jax.random.normal(keys[0], (N, N)),
        "inp": jax.random.normal(keys[1], (N, D)),
        "out": (jax.random.normal(keys[2], (D, N)), jnp.zeros(D)),
    }
    xs = jax.random.normal(keys[3], (T, B, D))
    ys = jax.random.normal(keys[4], (T, B, D))
    z0 = jnp.zeros((B, N))

    def cell(p, z, x):
        z = jnp.tanh(z @ p["rec"].T + x @ p["inp"].T)
        w, b = p["out"]
        return z, z @ w.T + b

    return params, cell, z0, xs, ys


def log_cosh(y, target):
    return jnp.sum(jnp.log(jnp.cosh(y - target))) / B


def unrolled(cell, params_z0_xs):
    z0, xs = params_z0_xs

    def fun(p):
        return jax.lax.scan(lambda z, x: cell(p, z, x), z0, xs)[1]

    return fun


# The heavier twin of each pair runs in the slow set (`pytest -m slow`, also run by CI).
@pytest.mark.parametrize("sampler", ["normal", pytest.param("orthonormal", marks=pytest.mark.slow)])
def test_scan_equals_unrolled_engine_on_summed_loss(sampler):
    params, cell, z0, xs, ys = rnn_problem()
    fun = unrolled(cell, (z0, xs))
    summed = lambda outputs: jnp.sum(jax.vmap(log_cosh)(outputs, ys))  # noqa: E731
    kwargs = dict(tangent_size=9, damping=1e-4, curvature="exact", sampler=sampler)
    v_scan, d_scan, i_scan = jax.jit(sofo.value_and_sofo_grad_scan(cell, log_cosh, **kwargs))(7, params, z0, xs, ys)
    v_unr, d_unr, i_unr = jax.jit(sofo.value_and_sofo_grad(fun, summed, **kwargs))(7, params)
    np.testing.assert_allclose(v_scan, v_unr, rtol=1e-12)
    np.testing.assert_allclose(i_scan.curvature, i_unr.curvature, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ravel_pytree(d_scan)[0], ravel_pytree(d_unr)[0], rtol=1e-6, atol=1e-12)
    # And both against jax.grad: the directional derivatives are V^T grad.
    grad = ravel_pytree(jax.grad(lambda p: summed(fun(p)))(params))[0]
    assert float(ravel_pytree(d_scan)[0] @ grad) > 0


@pytest.mark.parametrize("loss", [pytest.param("mse", marks=pytest.mark.slow), "exact"])
def test_full_rank_scan_equals_dense_gauss_newton(loss):
    params, cell, z0, xs, ys = rnn_problem(seed=1)
    fun = unrolled(cell, (z0, xs))
    if loss == "mse":
        step_loss = lambda y, t: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, axis=-1))  # noqa: E731
    else:
        step_loss = log_cosh
    flat, unravel = ravel_pytree(params)
    n = flat.size
    summed = lambda p: jnp.sum(jax.vmap(step_loss)(fun(unravel(p)), ys))  # noqa: E731
    jac = jax.jacfwd(lambda p: fun(unravel(p)).reshape(T, -1))(flat)  # (T, B*D, n)
    hess = [jax.hessian(lambda o, t=t: step_loss(o.reshape(B, D), ys[t]))(fun(params)[t].ravel()) for t in range(T)]
    ggn = sum(jac[t].T @ hess[t] @ jac[t] for t in range(T))
    top = jnp.linalg.eigvalsh(ggn)[-1]
    reference = jnp.linalg.solve(ggn + 1e-4 * top * jnp.eye(n), jax.grad(summed)(flat))
    _, direction, info = sofo.value_and_sofo_grad_scan(
        cell, step_loss, tangent_size=n, damping=1e-4, curvature=loss, sampler="orthonormal"
    )(0, params, z0, xs, ys)
    np.testing.assert_allclose(ravel_pytree(direction)[0], reference, rtol=1e-6)
    np.testing.assert_allclose(info.top_eigenvalue, top, rtol=1e-8)


def test_pytree_latent_and_inputs():
    """An LSTM-like cell with a (h, c) latent and dict inputs/targets, against the unrolled engine."""
    keys = jax.random.split(jax.random.key(2), 4)
    params = {"w": 0.3 * jax.random.normal(keys[0], (4 * N, N + D)), "out": jax.random.normal(keys[1], (D, N))}
    xs = {"u": jax.random.normal(keys[2], (T, B, D))}
    ys = {"target": jax.random.normal(keys[3], (T, B, D)), "mask": jnp.ones((T, 1)).at[:2].set(0.0)}
    z0 = (jnp.zeros((B, N)), jnp.zeros((B, N)))

    def cell(p, z, x):
        h, c = z
        gates = jnp.concatenate([h, x["u"]], -1) @ p["w"].T
        i, f, o, g = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h @ p["out"].T

    def step_loss(y, target):
        return 0.5 * target["mask"][0] * jnp.mean(jnp.sum((y - target["target"]) ** 2, -1))

    def fun(p):
        return jax.lax.scan(lambda z, x: cell(p, z, x), z0, xs)[1]

    summed = lambda out: jnp.sum(jax.vmap(step_loss)(out, ys))  # noqa: E731
    kwargs = dict(tangent_size=8, damping=1e-3, curvature="exact")
    _, d_scan, _ = sofo.value_and_sofo_grad_scan(cell, step_loss, **kwargs)(1, params, z0, xs, ys)
    _, d_unr, _ = sofo.value_and_sofo_grad(fun, summed, **kwargs)(1, params)
    np.testing.assert_allclose(ravel_pytree(d_scan)[0], ravel_pytree(d_unr)[0], rtol=1e-6, atol=1e-12)


def test_scan_bad_inputs():
    params, cell, z0, xs, ys = rnn_problem()
    step = sofo.value_and_sofo_grad_scan(cell, log_cosh, tangent_size=3)
    with pytest.raises(ValueError, match="same leading \\(time\\) length.*6 for xs and 5 for ys"):
        step(0, params, z0, xs, ys[:5])
    with pytest.raises(TypeError, match="cell must return a pair"):
        sofo.value_and_sofo_grad_scan(lambda p, z, x: z, log_cosh, tangent_size=3)(0, params, z0, xs, ys)
    with pytest.raises(ValueError, match="same structure, shapes and dtypes"):
        sofo.value_and_sofo_grad_scan(lambda p, z, x: ((z, z), cell(p, z, x)[1]), log_cosh, tangent_size=3)(
            0, params, z0, xs, ys
        )
    with pytest.raises(ValueError, match="same structure, shapes and dtypes"):
        sofo.value_and_sofo_grad_scan(lambda p, z, x: (z[:1], cell(p, z, x)[1]), log_cosh, tangent_size=3)(
            0, params, z0, xs, ys
        )
    with pytest.raises(TypeError, match="loss_fn must return a floating scalar"):
        sofo.value_and_sofo_grad_scan(cell, lambda y, t: y - t, tangent_size=3)(0, params, z0, xs, ys)
    with pytest.raises(TypeError, match=r"params\['n'\] has dtype int"):
        step(0, {**params, "n": jnp.arange(2)}, z0, xs, ys)


def test_scan_tangent_chunks_give_the_same_direction():
    params, cell, z0, xs, ys = rnn_problem(seed=3)
    kwargs = dict(tangent_size=10, damping=1e-4, curvature="mse")
    step_loss = lambda y, t: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, axis=-1))  # noqa: E731
    _, whole, _ = jax.jit(sofo.value_and_sofo_grad_scan(cell, step_loss, **kwargs))(0, params, z0, xs, ys)
    _, chunked, _ = jax.jit(sofo.value_and_sofo_grad_scan(cell, step_loss, tangent_chunk_size=3, **kwargs))(
        0, params, z0, xs, ys
    )
    np.testing.assert_allclose(ravel_pytree(chunked)[0], ravel_pytree(whole)[0], rtol=1e-9, atol=1e-14)
