"""The engine's layout (issue 19): the scan engine's own module, memory handed to the sampler as a basis,
the memory policy apart from the sampler, and streamed tangents through the one push."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sofo
from sofo import _adaptive, _engine, _memory, _scan, _tangents
from sofo._structured import LowRank


def params():
    rng = np.random.default_rng(1)
    return {"w": jnp.asarray(rng.standard_normal((3, 4))), "b": jnp.asarray(rng.standard_normal(4))}


def test_public_engines_live_in_their_modules():
    assert sofo.value_and_sofo_grad is _engine.value_and_sofo_grad
    assert sofo.value_and_sofo_grad_scan is _scan.value_and_sofo_grad_scan
    assert _adaptive.init_memory is _memory.init_memory and _adaptive.push_memory is _memory.push_memory


@pytest.mark.parametrize("sampler", ["normal", "balanced", "orthonormal", "rank1"])
def test_the_sampler_takes_the_memory_as_a_basis(sampler):
    p = params()
    rng = np.random.default_rng(2)
    basis = jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal((2,) + a.shape)), p)
    key = jax.random.key(3)
    as_basis = _tangents.sample(key, p, 5, sampler, basis=basis)
    as_memory = _tangents.sample(key, p, 5, sampler, memory=basis)
    for x, y in zip(jax.tree_util.tree_leaves(as_basis), jax.tree_util.tree_leaves(as_memory)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    if sampler == "normal":
        # tangent k < m is basis direction k at unit norm (by hand)
        flat = jax.vmap(lambda t: ravel_pytree(t)[0])(as_basis)
        wanted = jax.vmap(lambda t: ravel_pytree(t)[0])(basis)
        wanted = wanted / jnp.linalg.norm(wanted, axis=1, keepdims=True)
        np.testing.assert_allclose(flat[:2], wanted, rtol=1e-12)
    with pytest.raises(TypeError, match="not both"):
        _tangents.sample(key, p, 5, sampler, memory=basis, basis=basis)


def test_push_memory_keeps_unit_directions_newest_first():
    p = params()
    memory = _memory.init_memory(p, 2)
    first = jax.tree_util.tree_map(lambda a: 2.0 * a, p)
    second = jax.tree_util.tree_map(lambda a: -jnp.ones_like(a), p)
    memory = _memory.push_memory(_memory.push_memory(memory, first), second)
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(memory)
    np.testing.assert_allclose(flat[0], -np.ones(16) / 4.0, rtol=1e-12)  # ||ones(16)|| = 4
    f = ravel_pytree(p)[0]
    np.testing.assert_allclose(flat[1], f / jnp.linalg.norm(f), rtol=1e-12)
    assert _memory.init_memory(p, 0) is None and _memory.push_memory(None, first) is None


@pytest.mark.parametrize("sampler", ["normal", "rank1"])
def test_streamed_tangents_go_through_the_push_and_give_the_dense_direction(sampler):
    """The chunked (streamed) direction equals V (G + damping max_eig I)^-1 V^T g from dense jacfwd."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((6, 3)))
    y = jnp.asarray(rng.standard_normal((6, 4)))
    fun = lambda q: jnp.tanh(x @ q["w"] + q["b"])  # noqa: E731
    loss_fn = lambda out: 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))  # noqa: E731
    p, k, damping = params(), 5, 1e-3
    key = jax.random.key(7)
    _, direction, _ = sofo.value_and_sofo_grad(
        fun, loss_fn, tangent_size=k, damping=damping, sampler=sampler, tangent_chunk_size=2
    )(key, p)
    tangents = _tangents.sample(key, p, k, sampler, jnp.arange(k))  # the same draws
    tangents = jax.tree_util.tree_map(  # materialised: a rank-1 tangent a b^T as a dense matrix
        lambda t: jnp.einsum("kmr,knr->kmn", t.a, t.b) if isinstance(t, LowRank) else t,
        tangents, is_leaf=lambda t: isinstance(t, LowRank),
    )
    v = jax.vmap(lambda t: ravel_pytree(t)[0])(tangents)
    flat, unravel = ravel_pytree(p)
    jac = jax.jacfwd(lambda f: fun(unravel(f)).ravel())(flat)
    hess = jax.hessian(lambda o: loss_fn(o.reshape(6, 4)))(fun(p).ravel())
    grad = jax.grad(lambda f: loss_fn(fun(unravel(f))))(flat)
    g, curvature = v @ grad, (jac @ v.T).T @ hess @ (jac @ v.T)
    top = jnp.linalg.eigvalsh(curvature)[-1]
    expected = v.T @ jnp.linalg.solve(curvature + damping * top * jnp.eye(k), g)
    np.testing.assert_allclose(ravel_pytree(direction)[0], expected, rtol=1e-7, atol=1e-10)
