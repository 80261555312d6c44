"""Structured (low-rank) tangents: the factored push and direction against dense jax with the same tangents.

Every reference materialises the sampler's tangents (a[k] @ b[k].T) and uses `jax.jvp` of the model
and `jnp.linalg.solve`, independently of `sofo._structured`'s interpreter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sofo
from sofo import _structured, _tangents

DAMPING = 1e-3


def _dense(tangents):
    """The sampler's tangents as dense arrays, by hand (not with the module under test)."""
    if isinstance(tangents, _structured.Split):
        head, tail = _dense(tangents.head), _dense(tangents.tail)
        return jax.tree_util.tree_map(lambda h, t: jnp.concatenate([h, t]), head, tail)
    return jax.tree_util.tree_map(
        lambda v: jnp.einsum("kmr,knr->kmn", v.a, v.b) if isinstance(v, _structured.LowRank) else v,
        tangents,
        is_leaf=lambda v: isinstance(v, _structured.LowRank),
    )


def _dense_jvps(fn, primals, tangents):
    return jax.jit(jax.vmap(lambda *ts: jax.jvp(fn, primals, ts), out_axes=(None, 0)))(*tangents)


def _push(fn, primals, tangents):
    """The structured push under jit (eagerly, every primitive of the interpreter would compile alone)."""
    return jax.jit(lambda ts: _structured.push(fn, primals, ts))(tangents)


def _sample(*args, **kwargs):
    return jax.jit(lambda: _tangents.sample(*args, **kwargs))()


def _close(a, b, tol=1e-10):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _reference_direction(output_tangents, directional, dense_tangents, batch):
    """mse curvature G = U^T U / B, c = (G + damping * max_eig I)^-1 g, direction = sum_k c_k v_k."""
    flat = jnp.reshape(output_tangents, (output_tangents.shape[0], -1))
    curvature = flat @ flat.T / batch
    top = jnp.linalg.eigvalsh(curvature)[-1]
    c = jnp.linalg.solve(curvature + DAMPING * top * jnp.eye(curvature.shape[0]), directional)
    return jax.tree_util.tree_map(lambda v: jnp.tensordot(c, v, axes=1), dense_tangents), curvature


def _mlp():
    ks = jax.random.split(jax.random.key(0), 4)
    params = {
        "w1": jax.random.normal(ks[0], (5, 8)),
        "b1": jax.random.normal(ks[1], (8,)),
        "w2": jax.random.normal(ks[2], (8, 3)),
        "b2": jnp.zeros((3,)),
    }
    x = jax.random.normal(ks[3], (7, 5))
    targets = jnp.cos(jnp.arange(21.0)).reshape(7, 3)
    fun = lambda p: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]  # noqa: E731
    loss_fn = lambda y: 0.5 * jnp.sum((y - targets) ** 2) / y.shape[0]  # noqa: E731
    return params, fun, loss_fn


@pytest.mark.parametrize("sampler", ["rank1", "rank2"])
def test_mlp_output_tangents_and_direction_match_dense(sampler):
    params, fun, loss_fn = _mlp()
    key = jax.random.key(1)
    tangents = _sample(key, params, 6, sampler)
    assert isinstance(tangents["w1"], _structured.LowRank) and tangents["w1"].a.shape == (6, 5, int(sampler[-1]))
    assert not isinstance(tangents["b1"], _structured.LowRank)
    dense = _dense(tangents)
    outputs, output_tangents = _dense_jvps(fun, (params,), (dense,))
    got_outputs, got_tangents = _push(fun, (params,), (tangents,))
    _close(got_outputs, outputs)
    _close(got_tangents, output_tangents)

    value, direction, info = jax.jit(
        sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=6, sampler=sampler, damping=DAMPING)
    )(key, params)
    directional = jax.vmap(lambda u: jax.jvp(loss_fn, (outputs,), (u,))[1])(output_tangents)
    expected, curvature = _reference_direction(output_tangents, directional, dense, 7)
    np.testing.assert_allclose(float(value), float(loss_fn(fun(params))), rtol=1e-12)
    _close(info.curvature, curvature)
    _close(direction, expected)


def test_tangents_have_unit_norm_and_balanced_shares():
    params, _, _ = _mlp()
    dense = _dense(_sample(jax.random.key(2), params, 5, "rank1"))
    sizes = {name: leaf.size for name, leaf in params.items()}
    total = sum(np.sqrt(s) for s in sizes.values())
    for name, block in dense.items():
        norms = np.linalg.norm(np.reshape(np.asarray(block), (5, -1)), axis=1)
        np.testing.assert_allclose(norms**2, np.sqrt(sizes[name]) / total, rtol=1e-12)
    # rank 1 indeed: one non-zero singular value per matrix tangent
    singular = np.linalg.svd(np.asarray(dense["w1"]), compute_uv=False)
    assert np.all(singular[:, 1:] < 1e-12 * singular[:, :1])


def test_same_key_same_tangents_and_any_subset_drawn_alone():
    params, _, _ = _mlp()
    key = jax.random.key(3)
    first = _dense(_sample(key, params, 6, "rank2"))
    again = _dense(_sample(key, params, 6, "rank2"))
    subset = _dense(_sample(key, params, 6, "rank2", indices=jnp.array([4, 1])))
    other = _dense(_sample(jax.random.key(4), params, 6, "rank2"))
    _close(again, first, tol=0)
    _close(subset, jax.tree_util.tree_map(lambda v: v[jnp.array([4, 1])], first), tol=0)
    assert not np.allclose(np.asarray(other["w1"]), np.asarray(first["w1"]))


def test_chunking_and_memory_give_the_dense_direction():
    params, fun, loss_fn = _mlp()
    key = jax.random.key(5)
    memory = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.key(6), (2,) + p.shape), params)
    memory = jax.tree_util.tree_map(lambda m: m.at[1].set(0.0), memory)  # an empty slot: random tangent kept
    tangents = _sample(key, params, 7, "rank1", memory=memory)
    assert isinstance(tangents, _structured.Split)
    dense = _dense(tangents)
    flat_memory = np.concatenate([np.reshape(np.asarray(memory[n]), (2, -1)) for n in sorted(params)], axis=1)
    flat_first = np.concatenate([np.reshape(np.asarray(dense[n][0]), (-1,)) for n in sorted(params)])
    np.testing.assert_allclose(flat_first, flat_memory[0] / np.linalg.norm(flat_memory[0]), rtol=1e-12)
    random = _dense(_sample(key, params, 7, "rank1"))
    _close(jax.tree_util.tree_map(lambda v: v[1:], dense), jax.tree_util.tree_map(lambda v: v[1:], random), tol=0)

    outputs, output_tangents = _dense_jvps(fun, (params,), (dense,))
    directional = jax.vmap(lambda u: jax.jvp(loss_fn, (outputs,), (u,))[1])(output_tangents)
    expected, _ = _reference_direction(output_tangents, directional, dense, 7)
    for chunk in (None, 3):
        step = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=7, sampler="rank1", damping=DAMPING,
                                        tangent_chunk_size=chunk)
        _, direction, _ = jax.jit(step)(key, params, memory=memory)
        _close(direction, expected, tol=1e-9)


def _rnn():
    ks = jax.random.split(jax.random.key(7), 6)
    n, i, o, b, t = 6, 2, 2, 4, 5
    params = {
        "W": jax.random.normal(ks[0], (n, n)) / 3,
        "U": jax.random.normal(ks[1], (n, i)),
        "b": jax.random.normal(ks[2], (n,)) / 5,
        "C": jax.random.normal(ks[3], (o, n)),
    }

    def cell(p, z, x):
        z_new = 0.5 * z + 0.5 * (jnp.tanh(z) @ p["W"].T + x @ p["U"].T + p["b"])
        return z_new, jnp.tanh(z_new) @ p["C"].T

    z0 = jnp.zeros((b, n))
    xs, ys = jax.random.normal(ks[4], (t, b, i)), jax.random.normal(ks[5], (t, b, o))
    mse = lambda y, target: 0.5 * jnp.sum((y - target) ** 2) / y.shape[0]  # noqa: E731
    return params, cell, mse, z0, xs, ys


@pytest.mark.parametrize("memory_size, chunk", [(0, None), (2, 3)])
def test_rnn_scan_direction_matches_dense_unrolled(memory_size, chunk):
    params, cell, mse, z0, xs, ys = _rnn()
    key, k = jax.random.key(8), 7
    memory = None
    if memory_size:
        memory = jax.tree_util.tree_map(lambda p: jax.random.normal(jax.random.key(9), (memory_size,) + p.shape), params)
    step = sofo.value_and_sofo_grad_scan(cell, mse, tangent_size=k, sampler="rank2", damping=DAMPING,
                                         tangent_chunk_size=chunk)
    value, direction, info = jax.jit(step)(key, params, z0, xs, ys, memory=memory)

    dense = _dense(_sample(key, params, k, "rank2", memory=memory))
    rollout = lambda p: jax.lax.scan(lambda z, x: cell(p, z, x), z0, xs)[1]  # noqa: E731
    outputs, output_tangents = _dense_jvps(rollout, (params,), (dense,))
    total = lambda y: jnp.sum(jax.vmap(mse)(y, ys))  # noqa: E731
    directional = jax.vmap(lambda u: jax.jvp(total, (outputs,), (u,))[1])(output_tangents)
    flat = jnp.reshape(jnp.swapaxes(output_tangents, 1, 2), (k, -1))  # (K, B*T*O); mse divides by B
    curvature = flat @ flat.T / z0.shape[0]
    c = jnp.linalg.solve(curvature + DAMPING * jnp.linalg.eigvalsh(curvature)[-1] * jnp.eye(k), directional)
    np.testing.assert_allclose(float(value), float(total(outputs)), rtol=1e-12)
    _close(info.curvature, curvature)
    _close(direction, jax.tree_util.tree_map(lambda v: jnp.tensordot(c, v, axes=1), dense), tol=1e-9)


def test_unsupported_uses_fall_back_to_dense():
    """W contracted over both axes, inside a custom_jvp (relu), a batched dot, elementwise and a cumsum."""
    ks = jax.random.split(jax.random.key(10), 3)
    params = {"w": jax.random.normal(ks[0], (4, 5)), "v": jax.random.normal(ks[1], (4, 5))}
    x = jax.random.normal(ks[2], (3, 4))

    def fun(p):
        full = jnp.tensordot(p["w"], p["v"], axes=2)  # both axes contracted
        batched = jnp.einsum("ij,ij->i", p["w"], p["v"])  # a dot_general with batch axes
        relu = jax.nn.relu(x @ p["w"])
        return jnp.concatenate([
            (relu + full).ravel(), batched, jnp.sin(p["w"]).ravel(), jnp.cumsum(p["v"], axis=0).ravel(),
        ])

    tangents = _sample(jax.random.key(11), params, 5, "rank1")
    outputs, output_tangents = _dense_jvps(fun, (params,), (_dense(tangents),))
    got_outputs, got_tangents = _push(fun, (params,), (tangents,))
    _close(got_outputs, outputs)
    _close(got_tangents, output_tangents)


def test_a_parameter_used_twice():
    """Tied weights (x W W^T: a dot of two factored tangents), W also elementwise, and a jitted sub-call."""
    ks = jax.random.split(jax.random.key(12), 2)
    params = {"w": jax.random.normal(ks[0], (4, 6))}
    x = jax.random.normal(ks[1], (3, 4))
    encode = jax.jit(lambda w, h: jnp.tanh(h @ w))

    def fun(p):
        hidden = encode(p["w"], x)
        return hidden @ p["w"].T + x * jnp.sum(p["w"] ** 2, axis=1) + (p["w"] @ p["w"].T)[0]

    tangents = _sample(jax.random.key(13), params, 5, "rank1")
    outputs, output_tangents = _dense_jvps(fun, (params,), (_dense(tangents),))
    got_outputs, got_tangents = _push(fun, (params,), (tangents,))
    _close(got_outputs, outputs)
    _close(got_tangents, output_tangents)


def test_factored_matmul_path_is_taken():
    """The push of x @ W contains no (K, m, n) tangent: W's factors enter dot_generals directly."""
    params = {"w": jnp.ones((64, 48))}
    x = jnp.ones((8, 64))
    tangents = _sample(jax.random.key(14), params, 4, "rank1")
    jaxpr = jax.make_jaxpr(lambda t: _structured.push(lambda p: x @ p["w"], (params,), (t,)))(tangents)
    shapes = [v.aval.shape for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars]
    assert (4, 64, 48) not in shapes


def test_unknown_sampler_is_rejected():
    params, fun, loss_fn = _mlp()
    with pytest.raises(ValueError, match="rank1"):
        sofo.value_and_sofo_grad(fun, loss_fn, sampler="rank3")


def test_sofo_optimiser_with_rank1_tangents_never_raises_the_loss():
    """sofo.sofo (LM damping, memory of 2 directions, a Split of dense and factored tangents) with rank1."""
    import optax

    params, fun, loss_fn = _mlp()
    opt = sofo.sofo(tangent_size=8, sampler="rank1", memory_size=2, key=0)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(None, state, params, fun=fun, loss_fn=loss_fn)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    losses = [float(loss_fn(fun(params)))]
    for _ in range(6):
        params, state = step(params, state)
        losses.append(float(loss_fn(fun(params))))
    assert np.all(np.isfinite(losses))
    assert np.all(np.diff(losses) <= 1e-12 * losses[0])  # a rejected step leaves the parameters put
    assert losses[-1] < 0.9 * losses[0]
