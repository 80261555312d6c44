"""sofo.scale_by_sofo inside optax's wrappers: MultiSteps, multi_transform, masked, apply_if_finite, inject_hyperparams.

Each pattern docs/guides/optax.md documents is checked against the engine called directly with the keys the
transform uses, against dense damped Gauss-Newton (`jnp.linalg.solve`) or against optax's own formula.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sofo


def problem(seed=0, batch=12):
    """A two-layer tanh network, params {"w": (3, 4), "v": (4, 2)} (n = 20), and a batch per seed."""
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((3, 4))), "v": jnp.asarray(0.5 * rng.standard_normal((4, 2)))}

    def batch_at(i):
        r = np.random.default_rng(100 + i)
        x = jnp.asarray(r.standard_normal((batch, 3)))
        return x, jnp.sin(x[:, :2])

    return params, batch_at


def model(p, x):
    return jnp.tanh(x @ p["w"]) @ p["v"]


def mse(targets):
    return lambda out: 0.5 * jnp.mean(jnp.sum((out - targets) ** 2, axis=-1))


def step_keys(key, steps):
    """sofo.scale_by_sofo's documented key discipline: step t splits key_t into (key_{t+1}, tangent key)."""
    keys = []
    for _ in range(steps):
        key, step_key = jax.random.split(key)
        keys.append(step_key)
    return keys


def engine_direction(key, params, x, y, **config):
    return jax.jit(sofo.value_and_sofo_grad(lambda p: model(p, x), mse(y), **config))(key, params)[1]


def assert_trees_close(actual, expected, **tolerances):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, e, **tolerances)


# --- sofo.unmask ----------------------------------------------------------------------------------


def test_unmask_fills_masked_nodes_from_the_full_params():
    full = {"a": jnp.ones(2), "b": {"c": jnp.zeros(3), "d": jnp.full(1, 5.0)}}
    masked = {"a": jnp.arange(2.0), "b": optax.MaskedNode()}  # a whole subtree masked
    filled = sofo.unmask(masked, full)
    assert jax.tree_util.tree_structure(filled) == jax.tree_util.tree_structure(full)
    np.testing.assert_array_equal(filled["a"], jnp.arange(2.0))  # own entries kept, not taken from full
    assert filled["b"] is full["b"]
    masked_leaf = {"a": optax.MaskedNode(), "b": {"c": jnp.ones(3), "d": optax.MaskedNode()}}
    filled = sofo.unmask(masked_leaf, full)
    assert filled["a"] is full["a"] and filled["b"]["d"] is full["b"]["d"]
    np.testing.assert_array_equal(filled["b"]["c"], jnp.ones(3))
    unchanged = sofo.unmask(full, full)  # nothing masked: the same arrays
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(unchanged), jax.tree_util.tree_leaves(full)))


# --- MultiSteps: accumulate SOFO directions after sofo.scale_by_sofo ---------------------------------


def test_multisteps_after_sofo_applies_the_mean_of_the_k_directions():
    params, batch_at = problem()
    config = dict(tangent_size=3, damping=1e-3)
    lr, k = 0.5, 2
    tx = optax.chain(sofo.scale_by_sofo(key=5, **config), optax.MultiSteps(optax.sgd(lr), every_k_schedule=k))

    @jax.jit
    def train_step(params, state, x, y):
        updates, state = tx.update(None, state, params, fun=lambda p: model(p, x), loss_fn=mse(y))
        return optax.apply_updates(params, updates), state

    state, trained = tx.init(params), params
    keys = step_keys(jax.random.key(5), 4)
    expected = params
    for group in range(2):
        start = expected
        directions = []
        for mini in range(k):
            t = group * k + mini
            x, y = batch_at(t)
            before = trained
            trained, state = train_step(trained, state, x, y)
            directions.append(engine_direction(keys[t], start, x, y, **config))  # fresh tangents every call
            if mini < k - 1:
                assert_trees_close(trained, before, rtol=0, atol=0)  # nothing applied between mini-steps
        mean = jax.tree_util.tree_map(lambda *d: sum(d) / k, *directions)
        expected = jax.tree_util.tree_map(lambda p, d: p - lr * d, start, mean)
        # MultiSteps accumulates in float32 by default (accumulator_dtype), hence the float32 tolerance.
        assert_trees_close(trained, expected, rtol=1e-6, atol=1e-7)


def test_multisteps_around_sofo_needs_zeros_and_steps_on_the_last_mini_batch_only():
    # MultiSteps averages the incoming gradients, which SOFO ignores: wrapping the whole chain runs one
    # SOFO step every k calls on the k-th batch (docs/guides/optax.md says to put MultiSteps after the SOFO transform).
    params, batch_at = problem()
    config = dict(tangent_size=3, damping=1e-3)
    tx = optax.MultiSteps(optax.chain(sofo.scale_by_sofo(key=2, **config), optax.sgd(1.0)), every_k_schedule=2)
    state = tx.init(params)
    x, y = batch_at(0)
    # optax tree-maps over `updates`: None is refused (a ValueError; optax 0.2.5 on jax 0.4.31, the floor,
    # fails later in its lax.cond with a TypeError)
    with pytest.raises((ValueError, TypeError)):
        tx.update(None, state, params, fun=lambda p: model(p, x), loss_fn=mse(y))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates = []
    for t in range(2):
        x, y = batch_at(t)
        u, state = tx.update(zeros, state, params, fun=lambda p: model(p, x), loss_fn=mse(y))
        updates.append(u)
    assert all(float(jnp.abs(leaf).max()) == 0 for leaf in jax.tree_util.tree_leaves(updates[0]))
    x, y = batch_at(1)
    last_only = engine_direction(step_keys(jax.random.key(2), 1)[0], params, x, y, **config)
    assert_trees_close(updates[1], jax.tree_util.tree_map(jnp.negative, last_only), rtol=1e-9, atol=1e-12)


# --- masked / multi_transform: SOFO on part of the parameters -----------------------------------


def dense_gauss_newton_on_w(params, x, y, damping):
    """(G_w + damping * max_eig(G_w) I)^-1 g_w for the sub-problem in w, v held fixed (jacfwd, hessian)."""
    flat, unravel = ravel_pytree(params["w"])
    out = lambda t: model({"w": unravel(t), "v": params["v"]}, x).ravel()  # noqa: E731
    jac = jax.jacfwd(out)(flat)
    hess = jax.hessian(lambda o: mse(y)(o.reshape(x.shape[0], -1)))(out(flat))
    ggn = jac.T @ hess @ jac
    grad = jax.grad(lambda t: mse(y)(out(t).reshape(x.shape[0], -1)))(flat)
    top = jnp.linalg.eigvalsh(ggn)[-1]
    return unravel(jnp.linalg.solve(ggn + damping * top * jnp.eye(flat.size), grad))


def test_masked_sofo_moves_only_its_own_params_by_the_sub_problem_gauss_newton_step():
    params, batch_at = problem(seed=1)
    x, y = batch_at(0)
    # Full rank on the 12 parameters of w: the step is the dense damped Gauss-Newton step of the sub-problem.
    config = dict(tangent_size=12, damping=1e-3, sampler="orthonormal")
    tx = optax.masked(optax.chain(sofo.scale_by_sofo(key=3, **config), optax.sgd(1.0)), {"w": True, "v": False})
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)  # masked passes the others' updates through
    update = jax.jit(
        lambda s, p: tx.update(zeros, s, p, fun=lambda q: model(sofo.unmask(q, p), x), loss_fn=mse(y))
    )
    updates, state = update(tx.init(params), params)
    np.testing.assert_array_equal(updates["v"], 0.0)
    np.testing.assert_allclose(updates["w"], -dense_gauss_newton_on_w(params, x, y, 1e-3), rtol=1e-8, atol=1e-10)
    # The same step as the engine on the sub-problem {"w"} with the transform's tangent key.
    sub = jax.jit(sofo.value_and_sofo_grad(lambda p: model({**p, "v": params["v"]}, x), mse(y), **config))
    value, direction, _ = sub(step_keys(jax.random.key(3), 1)[0], {"w": params["w"]})
    np.testing.assert_allclose(updates["w"], -direction["w"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.inner_state[0].value, value, rtol=1e-12)


def test_multi_transform_sofo_on_some_params_adam_or_frozen_on_the_rest():
    params, batch_at = problem(seed=2)
    config = dict(tangent_size=4, damping=1e-3)
    lr_sofo, lr_adam = 0.5, 0.01
    labels = {"w": "sofo", "v": "other"}
    sofo_tx = optax.chain(sofo.scale_by_sofo(key=8, **config), optax.sgd(lr_sofo))
    keys = step_keys(jax.random.key(8), 2)
    def sub_direction(key, p, x, y):
        f = sofo.value_and_sofo_grad(lambda q: model({**q, "v": p["v"]}, x), mse(y), **config)
        return jax.jit(f)(key, {"w": p["w"]})[1]["w"]

    for other in ("adam", "frozen"):
        other_tx = optax.adam(lr_adam) if other == "adam" else optax.set_to_zero()
        tx = optax.multi_transform({"sofo": sofo_tx, "other": other_tx}, labels)

        @jax.jit
        def train_step(params, state, x, y):
            loss_fn = mse(y)
            # Adam needs the gradient of its own parameters; SOFO ignores its part of `updates`.
            grads = jax.grad(lambda p: loss_fn(model(p, x)))(params)
            fun = lambda p: model(sofo.unmask(p, params), x)  # noqa: E731
            updates, state = tx.update(grads, state, params, fun=fun, loss_fn=loss_fn)
            return optax.apply_updates(params, updates), state

        state, trained, expected = tx.init(params), params, params
        adam_m = adam_v = jnp.zeros_like(params["v"])
        for t in range(2):
            x, y = batch_at(t)
            trained, state = train_step(trained, state, x, y)
            w = expected["w"] - lr_sofo * sub_direction(keys[t], expected, x, y)
            v = expected["v"]
            if other == "adam":  # optax.adam's formula, written out
                g = jax.grad(lambda v_: mse(y)(model({"w": expected["w"], "v": v_}, x)))(v)
                adam_m = 0.9 * adam_m + 0.1 * g
                adam_v = 0.999 * adam_v + 0.001 * g**2
                m_hat, v_hat = adam_m / (1 - 0.9 ** (t + 1)), adam_v / (1 - 0.999 ** (t + 1))
                v = v - lr_adam * m_hat / (jnp.sqrt(v_hat) + 1e-8)
            expected = {"w": w, "v": v}
            assert_trees_close(trained, expected, rtol=1e-9, atol=1e-12)
        if other == "frozen":
            np.testing.assert_array_equal(trained["v"], params["v"])


def test_masked_params_reaching_a_model_that_reads_them_raise_with_the_fix():
    params, batch_at = problem()
    x, y = batch_at(0)
    tx = optax.masked(sofo.scale_by_sofo(tangent_size=3, key=0), {"w": True, "v": False})
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    with pytest.raises(TypeError, match=r"optax\.MaskedNode.*sofo\.unmask\(p, params\)"):
        tx.update(zeros, tx.init(params), params, fun=lambda p: model(p, x), loss_fn=mse(y))


# --- apply_if_finite: after sofo.scale_by_sofo, where SOFO's direction is the checked update -----------


def test_apply_if_finite_after_sofo_skips_non_finite_directions():
    params, batch_at = problem(seed=3)
    config = dict(tangent_size=3, damping=1e-3)
    tx = optax.chain(sofo.scale_by_sofo(key=4, **config), optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=3))
    keys = step_keys(jax.random.key(4), 2)

    @jax.jit
    def update(state, params, x, y, scale):
        return tx.update(None, state, params, fun=lambda p: scale * model(p, x), loss_fn=mse(y))

    state = tx.init(params)
    x, y = batch_at(0)
    updates, state = update(state, params, x, y, jnp.nan)  # a NaN model output: NaN direction, skipped
    np.testing.assert_array_equal(ravel_pytree(updates)[0], 0.0)
    assert int(state[1].notfinite_count) == 1 and not bool(state[1].last_finite)
    x, y = batch_at(1)
    updates, state = update(state, params, x, y, 1.0)  # sofo's key moved on: the next tangents are fresh
    expected = engine_direction(keys[1], params, x, y, **config)
    assert_trees_close(updates, jax.tree_util.tree_map(jnp.negative, expected), rtol=1e-9, atol=1e-12)
    assert int(state[1].notfinite_count) == 0


def test_apply_if_finite_around_sofo_does_not_see_its_direction():
    # apply_if_finite checks the incoming updates, which SOFO ignores: a NaN direction passes through.
    params, batch_at = problem()
    x, y = batch_at(0)
    tx = optax.apply_if_finite(optax.chain(sofo.scale_by_sofo(tangent_size=3, key=0), optax.sgd(1.0)), 3)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, state = tx.update(zeros, tx.init(params), params, fun=lambda p: jnp.nan * model(p, x), loss_fn=mse(y))
    assert np.isnan(ravel_pytree(updates)[0]).all() and bool(state.last_finite)


# --- inject_hyperparams -------------------------------------------------------------------------


def test_inject_hyperparams_learning_rate_of_a_sofo_chain():
    params, batch_at = problem(seed=4)
    config = dict(tangent_size=3, damping=1e-3)

    def sofo_sgd(learning_rate):
        return optax.chain(sofo.scale_by_sofo(key=6, **config), optax.sgd(learning_rate))

    tx = optax.inject_hyperparams(sofo_sgd)(learning_rate=0.5)
    keys = step_keys(jax.random.key(6), 2)

    @jax.jit
    def update(state, params, x, y):
        return tx.update(None, state, params, fun=lambda p: model(p, x), loss_fn=mse(y))

    state = tx.init(params)
    for t, lr in enumerate((0.5, 0.1)):
        state.hyperparams["learning_rate"] = jnp.asarray(lr)
        x, y = batch_at(t)
        updates, state = update(state, params, x, y)  # the sofo state inside keeps advancing its key
        expected = engine_direction(keys[t], params, x, y, **config)
        assert_trees_close(updates, jax.tree_util.tree_map(lambda d: -lr * d, expected), rtol=1e-9, atol=1e-12)


def test_inject_hyperparams_damping():
    params, batch_at = problem(seed=5)
    x, y = batch_at(0)
    static = ("tangent_size", "loss", "sampler", "key", "tangent_chunk_size", "adaptive_damping", "memory_size")
    tx = optax.inject_hyperparams(sofo.scale_by_sofo, static_args=static)(tangent_size=3, damping=1e-3, key=1)
    state = tx.init(params)
    state.hyperparams["damping"] = jnp.asarray(1e-1)
    direction, state = jax.jit(lambda s, p: tx.update(None, s, p, fun=lambda q: model(q, x), loss_fn=mse(y)))(
        state, params
    )
    expected = engine_direction(step_keys(jax.random.key(1), 1)[0], params, x, y, tangent_size=3, damping=1e-1)
    assert_trees_close(direction, expected, rtol=1e-9, atol=1e-12)


def test_masked_recurrent_cell_trains_its_own_params_by_the_scan_engine_sub_problem_step():
    rng = np.random.default_rng(7)
    params = {
        "rec": jnp.asarray(0.5 * rng.standard_normal((3, 3))),
        "inp": jnp.asarray(rng.standard_normal((2, 3))),
        "out": jnp.asarray(rng.standard_normal((3, 2))),
    }
    xs, ys = jnp.asarray(rng.standard_normal((5, 4, 2))), jnp.asarray(rng.standard_normal((5, 4, 2)))
    z0 = jnp.zeros((4, 3))

    def cell(p, z, x):
        z = jnp.tanh(z @ p["rec"] + x @ p["inp"])
        return z, z @ p["out"]

    def loss_fn(y, target):
        return 0.5 * jnp.mean(jnp.sum((y - target) ** 2, -1))

    config = dict(tangent_size=4, damping=1e-3)
    mask = {"rec": True, "inp": False, "out": True}
    tx = optax.masked(sofo.scale_by_sofo(key=9, **config), mask)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    with pytest.raises(TypeError, match="cell failed on params holding optax.MaskedNode"):
        tx.update(zeros, tx.init(params), params, cell=cell, loss_fn=loss_fn, z0=z0, xs=xs, ys=ys)
    direction, _ = jax.jit(
        lambda s, p: tx.update(
            zeros, s, p, cell=lambda q, z, x: cell(sofo.unmask(q, p), z, x), loss_fn=loss_fn, z0=z0, xs=xs, ys=ys
        )
    )(tx.init(params), params)
    np.testing.assert_array_equal(direction["inp"], 0.0)
    sub_engine = sofo.value_and_sofo_grad_scan(
        lambda q, z, x: cell({**q, "inp": params["inp"]}, z, x), loss_fn, **config
    )
    own = {"rec": params["rec"], "out": params["out"]}
    expected = jax.jit(sub_engine)(step_keys(jax.random.key(9), 1)[0], own, z0, xs, ys)[1]
    for name in own:
        np.testing.assert_allclose(direction[name], expected[name], rtol=1e-10, atol=1e-12)
