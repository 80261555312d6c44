"""sofo.scale_by_sofo against independent computations: lstsq, dense damped Gauss-Newton, hand-written optax chains."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sofo


def dense_damped_gauss_newton(fun, loss_fn, params, damping):
    """(G + damping * max_eig(G) I)^-1 g with G = J^T H J from jax.jacfwd and jax.hessian; also max_eig(G)."""
    flat, unravel = ravel_pytree(params)
    out_flat, unravel_out = ravel_pytree(fun(params))

    @jax.jit  # one compile instead of many eager op compiles
    def reference(flat):
        jac = jax.jacfwd(lambda t: ravel_pytree(fun(unravel(t)))[0])(flat)
        hess = jax.hessian(lambda o: loss_fn(unravel_out(o)))(out_flat)
        ggn = jac.T @ hess @ jac
        top = jnp.linalg.eigvalsh(0.5 * (ggn + ggn.T))[-1]
        grad = jax.grad(lambda t: loss_fn(fun(unravel(t))))(flat)
        return jnp.linalg.solve(ggn + damping * top * jnp.eye(flat.size), grad), top

    step, top = reference(flat)
    return unravel(step), top


def assert_trees_close(actual, expected, **tolerances):
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        assert a.shape == e.shape and a.dtype == e.dtype
        np.testing.assert_allclose(a, e, **tolerances)


def normal(rng, *shape, scale=1.0):
    # numpy draws: no per-shape XLA compiles for test data
    return jnp.asarray(scale * rng.standard_normal(shape))


def mlp_problem(seed=0, batch=10, inputs=3, hidden=4, outputs=2):
    """A tanh MLP on nested dict/list/tuple params (n = 24), with a 0.5 * mean squared error."""
    rng = np.random.default_rng(seed)
    params = {
        "layers": [
            {"w": normal(rng, inputs, hidden), "b": normal(rng, hidden, scale=0.1)},
            (normal(rng, hidden, outputs),),
        ]
    }
    x = normal(rng, batch, inputs)
    targets = normal(rng, batch, outputs)

    def fun(p):
        first, (w2,) = p["layers"]
        return jnp.tanh(x @ first["w"] + first["b"]) @ w2

    def loss_fn(y):
        return 0.5 * jnp.mean(jnp.sum((y - targets) ** 2, axis=-1))

    return params, fun, loss_fn


def rnn_problem(seed=0, steps=6, batch=3, inputs=2, hidden=3, outputs=2):
    rng = np.random.default_rng(seed)
    params = {
        "rec": (normal(rng, hidden, hidden, scale=0.5), normal(rng, inputs, hidden)),
        "bias": [normal(rng, hidden, scale=0.1)],
        "readout": normal(rng, hidden, outputs),
    }
    xs = normal(rng, steps, batch, inputs)
    ys = normal(rng, steps, batch, outputs)
    z0 = jnp.zeros((batch, hidden))

    def cell(p, z, x):
        w_rec, w_in = p["rec"]
        z = jnp.tanh(z @ w_rec + x @ w_in + p["bias"][0])
        return z, z @ p["readout"]

    def loss_fn(y, target):
        return 0.5 * jnp.mean(jnp.sum((y - target) ** 2, axis=-1))

    return params, cell, loss_fn, z0, xs, ys


def step_keys(key, steps):
    """The documented key discipline, written out: step t splits key_t into (key_{t+1}, tangent key)."""
    keys = []
    for _ in range(steps):
        key, step_key = jax.random.split(key)
        keys.append(step_key)
    return key, keys


# --- training -----------------------------------------------------------------------------------


def load_digits_split():
    load_digits = pytest.importorskip("sklearn.datasets").load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int32)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def train_digits_mlp(widths, tangent_size, optimizer, steps, batch, seed=0):
    """Trains an MLP with optax.chain(sofo.scale_by_sofo(curvature='ce'), ...) under one jit; returns test accuracy."""
    (x_train, y_train), (x_test, y_test) = load_digits_split()
    sizes = [64, *widths, 10]
    rng = np.random.default_rng(seed)
    # One leaf per layer, the bias as the last row: fewer leaves, fewer tangent blocks to compile.
    params = [
        jnp.asarray(np.vstack([rng.standard_normal((m, n)) / np.sqrt(m), np.zeros((1, n))]), jnp.float32)
        for m, n in zip(sizes[:-1], sizes[1:])
    ]

    def net(p, x):
        for w in p[:-1]:
            x = jnp.tanh(x @ w[:-1] + w[-1])
        return x @ p[-1][:-1] + p[-1][-1]

    tx = optax.chain(sofo.scale_by_sofo(tangent_size=tangent_size, damping=1e-2, curvature="ce", key=seed), optimizer)
    batches = np.random.default_rng(seed).integers(0, len(x_train), (steps, batch))

    @jax.jit
    def train(params, xb, yb):
        def step(carry, data):
            params, state = carry
            x, labels = data

            def loss_fn(logits):
                return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

            updates, state = tx.update(None, state, params, fun=lambda p: net(p, x), loss_fn=loss_fn)
            return (optax.apply_updates(params, updates), state), state[0].value

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), (xb, yb))
        return params, losses

    params, losses = train(params, jnp.asarray(x_train[batches]), jnp.asarray(y_train[batches]))
    accuracy = float(jnp.mean(jnp.argmax(net(params, jnp.asarray(x_test)), -1) == jnp.asarray(y_test)))
    return accuracy, np.asarray(losses)


def test_digits_mlp_reaches_90_percent():
    accuracy, losses = train_digits_mlp([32], tangent_size=50, optimizer=optax.sgd(0.3), steps=200, batch=256)
    assert losses[0] > 2.0 and losses[-10:].mean() < 0.3  # from chance (log 10) to fitted
    assert accuracy >= 0.9, accuracy


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_digits_deeper_mlp_with_momentum_and_schedule(seed):
    schedule = optax.cosine_decay_schedule(0.2, 500, alpha=0.1)
    accuracy, _ = train_digits_mlp(
        [64, 32], tangent_size=100, optimizer=optax.sgd(schedule, momentum=0.5), steps=500, batch=256, seed=seed
    )
    assert accuracy >= 0.95, accuracy


def test_linear_least_squares_full_rank_gauss_newton_reaches_lstsq():
    """With K = n orthonormal tangents, lr = 1 and tiny damping, a step is the exact Gauss-Newton step."""
    rng = np.random.default_rng(3)
    design = rng.standard_normal((20, 7))
    targets = rng.standard_normal(20)
    params = {"w": [jnp.zeros(3), (jnp.zeros((2, 2)),)], "b": jnp.zeros(())}

    def fun(p):
        w1, (w2,) = p["w"]
        return design @ jnp.concatenate([w1, w2.ravel()]) + p["b"]

    def loss_fn(y):
        return 0.5 * jnp.mean((y - targets) ** 2)

    solution = jnp.linalg.lstsq(jnp.column_stack([design, np.ones(20)]), targets)[0]
    tx = optax.chain(sofo.scale_by_sofo(tangent_size=8, damping=1e-12, sampler="orthonormal", key=5), optax.sgd(1.0))
    step = jax.jit(lambda p, s: tx.update(None, s, p, fun=fun, loss_fn=loss_fn))
    state = tx.init(params)
    for t in range(3):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        w1, (w2,) = params["w"]
        flat = jnp.concatenate([w1, w2.ravel(), params["b"][None]])
        np.testing.assert_allclose(flat, solution, rtol=1e-6 if t == 0 else 1e-10, atol=1e-6 if t == 0 else 1e-12)
    assert params["b"].dtype == jnp.float64
    optimum = loss_fn(jnp.column_stack([design, np.ones(20)]) @ solution)
    np.testing.assert_allclose(state[0].value, optimum, rtol=1e-10)  # the loss before the last (converged) step


# --- state ----------------------------------------------------------------------------------------


def test_full_rank_step_equals_dense_gauss_newton_and_state_holds_value_and_top_eigenvalue():
    params, fun, loss_fn = mlp_problem()
    tx = sofo.scale_by_sofo(tangent_size=4 * 3 + 4 + 4 * 2, damping=1e-3, sampler="orthonormal", key=2)
    update = jax.jit(lambda s, p: tx.update(None, s, p, fun=fun, loss_fn=loss_fn))
    direction, state = update(tx.init(params), params)
    expected, top = dense_damped_gauss_newton(fun, loss_fn, params, 1e-3)
    assert_trees_close(direction, expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(state.top_eigenvalue, top, rtol=1e-10)
    np.testing.assert_allclose(state.value, loss_fn(fun(params)), rtol=1e-12)


def test_state_advances_key_and_count_and_matches_engine():
    params, fun, loss_fn = mlp_problem()
    config = dict(tangent_size=5, damping=1e-3, curvature="exact", sampler="normal")
    engine = jax.jit(sofo.value_and_sofo_grad(fun, loss_fn, **config))
    tx = sofo.scale_by_sofo(key=7, **config)
    update = jax.jit(lambda s, p: tx.update(None, s, p, fun=fun, loss_fn=loss_fn))
    state = tx.init(params)
    assert isinstance(state, sofo.SofoState)
    assert state.count.dtype == jnp.int32 and int(state.count) == 0
    assert state.value.dtype == state.top_eigenvalue.dtype == jnp.float64
    np.testing.assert_array_equal(jax.random.key_data(state.key), jax.random.key_data(jax.random.key(7)))

    next_key, keys = step_keys(jax.random.key(7), 2)
    directions = []
    for t in range(2):
        direction, state = update(state, params)  # the same params each time
        value, expected, info = engine(keys[t], params)
        assert int(state.count) == t + 1
        assert_trees_close(direction, expected, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(state.value, value, rtol=1e-12)
        np.testing.assert_allclose(state.value, loss_fn(fun(params)), rtol=1e-12)
        np.testing.assert_allclose(state.top_eigenvalue, info.top_eigenvalue, rtol=1e-12)
        directions.append(ravel_pytree(direction)[0])
    np.testing.assert_array_equal(jax.random.key_data(state.key), jax.random.key_data(next_key))
    # Fresh tangents: at the same params, two steps give two different directions (K=5 < n=24).
    assert not np.allclose(directions[0], directions[1], rtol=1e-3)


def test_tangent_chunks_reach_the_engine_and_keep_the_direction():
    params, fun, loss_fn = mlp_problem()
    config = dict(tangent_size=7, damping=1e-3, curvature="exact", key=3)
    whole, _ = sofo.scale_by_sofo(**config).update(None, sofo.scale_by_sofo(**config).init(params), params, fun=fun,
                                               loss_fn=loss_fn)
    chunked_tx = sofo.scale_by_sofo(tangent_chunk_size=2, **config)
    chunked, _ = chunked_tx.update(None, chunked_tx.init(params), params, fun=fun, loss_fn=loss_fn)
    assert_trees_close(chunked, whole, rtol=1e-10, atol=1e-13)


def test_updates_are_ignored_and_extra_args_for_other_transforms_pass_through():
    params, fun, loss_fn = mlp_problem()
    tx = sofo.scale_by_sofo(tangent_size=6, sampler="orthonormal", key=1)
    state = tx.init(params)
    from_none, _ = jax.jit(lambda s, p: tx.update(None, s, p, fun=fun, loss_fn=loss_fn))(state, params)
    gradients = jax.tree_util.tree_map(jnp.ones_like, params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, fun=fun, loss_fn=loss_fn, value=1.0, other=None))
    from_grads, _ = update(gradients, state, params)
    assert_trees_close(from_grads, from_none, rtol=0, atol=0)


def run_trajectory(key, steps=5, dtype=jnp.float32):
    """A jitted lax.scan training loop; fresh data each step. Returns the stacked params and losses."""
    params, _, _ = mlp_problem()
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    data = normal(np.random.default_rng(11), steps, 10, 3).astype(dtype)
    tx = optax.chain(sofo.scale_by_sofo(tangent_size=4, damping=1e-3, sampler="orthonormal", key=key), optax.sgd(0.5))

    def step(carry, x):
        params, state = carry
        fun = lambda p: jnp.tanh(x @ p["layers"][0]["w"] + p["layers"][0]["b"]) @ p["layers"][1][0]  # noqa: E731
        loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - jnp.sin(x[:, :2])) ** 2, -1))  # noqa: E731
        updates, state = tx.update(None, state, params, fun=fun, loss_fn=loss_fn)
        params = optax.apply_updates(params, updates)
        return (params, state), (params, state[0].value)

    _, (trajectory, losses) = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), data))(params)
    return trajectory, losses


def test_same_seed_same_trajectory_different_seed_different():
    first, losses = run_trajectory(3)
    # float32 params under x64: the state keeps float32 value/eigenvalue, so the scan carry is stable.
    assert losses.dtype == jnp.float32 and jax.tree_util.tree_leaves(first)[0].dtype == jnp.float32
    again, _ = run_trajectory(jax.random.key(3))
    assert_trees_close(again, first, rtol=0, atol=0)
    other, _ = run_trajectory(4)
    for a, b in zip(jax.tree_util.tree_leaves(other), jax.tree_util.tree_leaves(first)):
        assert not np.allclose(a[-1], b[-1])
    # Every key form seeds the same state, hence the same trajectory.
    params = mlp_problem()[0]
    for key in (3, np.int64(3), jax.random.key(3), jax.random.PRNGKey(3)):
        state = sofo.scale_by_sofo(key=key).init(params)
        np.testing.assert_array_equal(jax.random.key_data(state.key), jax.random.key_data(jax.random.key(3)))


# --- chains -------------------------------------------------------------------------------------


def test_chain_with_decay_clipping_momentum_and_schedule_matches_hand_computation():
    params, fun, loss_fn = mlp_problem(seed=1)
    config = dict(tangent_size=6, damping=1e-3, sampler="orthonormal")
    weight_decay, max_norm, momentum = 1e-2, 0.05, 0.9
    schedule = optax.exponential_decay(0.5, transition_steps=1, decay_rate=0.8)
    tx = optax.chain(
        sofo.scale_by_sofo(key=9, **config),
        optax.add_decayed_weights(weight_decay),
        optax.clip_by_global_norm(max_norm),
        optax.sgd(schedule, momentum=momentum),
    )
    step = jax.jit(lambda p, s: tx.update(None, s, p, fun=fun, loss_fn=loss_fn))
    state, trained = tx.init(params), params
    for _ in range(4):
        updates, state = step(trained, state)
        trained = optax.apply_updates(trained, updates)

    # The same four steps written out by hand on flat vectors.
    engine = jax.jit(sofo.value_and_sofo_grad(fun, loss_fn, **config))
    flat, unravel = ravel_pytree(params)
    velocity, clipped = jnp.zeros_like(flat), []
    for t, key in enumerate(step_keys(jax.random.key(9), 4)[1]):
        update = ravel_pytree(engine(key, unravel(flat))[1])[0] + weight_decay * flat
        norm = jnp.linalg.norm(update)
        clipped.append(bool(norm > max_norm))
        update = update * jnp.minimum(1.0, max_norm / norm)
        velocity = update + momentum * velocity
        flat = flat - 0.5 * 0.8**t * velocity
    assert any(clipped)
    assert_trees_close(trained, unravel(flat), rtol=1e-6, atol=1e-8)  # jit vs eager round-off, amplified by the solve


@pytest.fixture(scope="module")
def mlp_direction():
    """The engine's direction on mlp_problem() for the first step of key 4 (K=3, orthonormal)."""
    params, fun, loss_fn = mlp_problem()
    engine = jax.jit(sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=3, sampler="orthonormal"))
    return engine(step_keys(jax.random.key(4), 1)[1][0], params)[1]


@pytest.mark.parametrize(
    "make_chain",
    [
        lambda sofo_tx: optax.chain(optax.chain(sofo_tx), optax.sgd(0.1)),
        lambda sofo_tx: optax.chain(sofo_tx, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)),
        lambda sofo_tx: optax.named_chain(("sofo", sofo_tx), ("sgd", optax.sgd(0.1))),
    ],
    ids=["nested-chain", "inject-hyperparams", "named-chain"],
)
def test_extra_args_reach_sofo_through_other_combinators(make_chain, mlp_direction):
    params, fun, loss_fn = mlp_problem()
    tx = make_chain(sofo.scale_by_sofo(tangent_size=3, sampler="orthonormal", key=4))
    updates, _ = jax.jit(lambda p, s: tx.update(None, s, p, fun=fun, loss_fn=loss_fn))(params, tx.init(params))
    assert_trees_close(updates, jax.tree_util.tree_map(lambda d: -0.1 * d, mlp_direction), rtol=1e-12, atol=1e-14)


# --- the recurrent engine through optax ---------------------------------------------------------


def test_scan_path_gives_the_scan_engine_direction():
    params, cell, loss_fn, z0, xs, ys = rnn_problem()
    config = dict(tangent_size=5, damping=1e-3, sampler="orthonormal")
    tx = optax.chain(sofo.scale_by_sofo(key=6, **config), optax.sgd(1.0))
    run = jax.jit(lambda p, s: tx.update(None, s, p, cell=cell, loss_fn=loss_fn, z0=z0, xs=xs, ys=ys))
    updates, state = run(params, tx.init(params))
    value, direction, info = jax.jit(sofo.value_and_sofo_grad_scan(cell, loss_fn, **config))(
        step_keys(jax.random.key(6), 1)[1][0], params, z0, xs, ys
    )
    assert_trees_close(updates, jax.tree_util.tree_map(jnp.negative, direction), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(state[0].value, value, rtol=1e-12)
    np.testing.assert_allclose(state[0].top_eigenvalue, info.top_eigenvalue, rtol=1e-12)
    assert int(state[0].count) == 1


def test_scan_path_full_rank_equals_dense_gauss_newton_on_the_unrolled_loss():
    params, cell, loss_fn, z0, xs, ys = rnn_problem(seed=2)
    n = ravel_pytree(params)[0].size

    def rollout(p):
        z, outputs = z0, []
        for t in range(xs.shape[0]):
            z, y = cell(p, z, xs[t])
            outputs.append(y)
        return jnp.stack(outputs)

    def total_loss(outputs):
        return sum(loss_fn(outputs[t], ys[t]) for t in range(xs.shape[0]))

    tx = sofo.scale_by_sofo(tangent_size=n, damping=1e-4, sampler="orthonormal", key=0)
    update = jax.jit(lambda s, p: tx.update(None, s, p, cell=cell, loss_fn=loss_fn, z0=z0, xs=xs, ys=ys))
    direction, state = update(tx.init(params), params)
    expected, top = dense_damped_gauss_newton(rollout, total_loss, params, 1e-4)
    assert_trees_close(direction, expected, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(state.top_eigenvalue, top, rtol=1e-10)
    np.testing.assert_allclose(state.value, total_loss(rollout(params)), rtol=1e-12)


def test_scan_path_without_targets_passes_none_to_the_loss():
    params, cell, _, z0, xs, _ = rnn_problem()
    loss_fn = lambda y, target: 0.5 * jnp.mean(jnp.sum(y**2, -1)) + (0.0 if target is None else jnp.nan)  # noqa: E731
    tx = sofo.scale_by_sofo(tangent_size=4, sampler="orthonormal", key=1)
    direction, state = jax.jit(lambda s, p: tx.update(None, s, p, cell=cell, loss_fn=loss_fn, z0=z0, xs=xs))(
        tx.init(params), params
    )
    engine = sofo.value_and_sofo_grad_scan(cell, loss_fn, tangent_size=4, sampler="orthonormal")
    expected = jax.jit(engine, static_argnums=4)(
        step_keys(jax.random.key(1), 1)[1][0], params, z0, xs, None
    )[1]
    assert np.isfinite(state.value)
    assert_trees_close(direction, expected, rtol=1e-12, atol=1e-14)


# --- ecosystem ----------------------------------------------------------------------------------


def test_flax_linen_params():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jnp.tanh(nn.Dense(4, param_dtype=jnp.float64)(x))
            return nn.Dense(2, param_dtype=jnp.float64)(x)

    model = MLP()
    x = jax.random.normal(jax.random.key(0), (8, 3))
    targets = jax.random.normal(jax.random.key(1), (8, 2))
    params = model.init(jax.random.key(2), x)["params"]
    fun = lambda p: model.apply({"params": p}, x)  # noqa: E731
    loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - targets) ** 2, -1))  # noqa: E731
    n = ravel_pytree(params)[0].size
    tx = optax.chain(sofo.scale_by_sofo(tangent_size=n, damping=1e-3, sampler="orthonormal"), optax.sgd(1.0))
    updates, _ = jax.jit(lambda p, s: tx.update(None, s, p, fun=fun, loss_fn=loss_fn))(params, tx.init(params))
    expected, _ = dense_damped_gauss_newton(fun, loss_fn, params, 1e-3)
    assert_trees_close(updates, jax.tree_util.tree_map(jnp.negative, expected), rtol=1e-8, atol=1e-10)
    small_step = jax.tree_util.tree_map(lambda u: 1e-3 * u, updates)  # a descent direction: a small step helps
    assert loss_fn(fun(optax.apply_updates(params, small_step))) < loss_fn(fun(params))


def test_equinox_partitioned_module():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(3, 2, width_size=4, depth=1, activation=jnp.tanh, key=jax.random.key(0), dtype=jnp.float64)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x = jax.random.normal(jax.random.key(1), (8, 3))
    targets = jax.random.normal(jax.random.key(2), (8, 2))
    fun = lambda p: jax.vmap(eqx.combine(p, static))(x)  # noqa: E731
    loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - targets) ** 2, -1))  # noqa: E731
    n = ravel_pytree(params)[0].size
    tx = optax.chain(sofo.scale_by_sofo(tangent_size=n, damping=1e-3, sampler="orthonormal"), optax.sgd(1.0))
    updates, _ = eqx.filter_jit(lambda p, s: tx.update(None, s, p, fun=fun, loss_fn=loss_fn))(params, tx.init(params))
    expected, _ = dense_damped_gauss_newton(fun, loss_fn, params, 1e-3)
    assert_trees_close(updates, jax.tree_util.tree_map(jnp.negative, expected), rtol=1e-8, atol=1e-10)
    small_step = jax.tree_util.tree_map(lambda u: 1e-3 * u, updates)  # a descent direction: a small step helps
    model = eqx.combine(optax.apply_updates(params, small_step), static)
    assert loss_fn(jax.vmap(model)(x)) < loss_fn(fun(params))


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(tangent_size=0), ValueError, "tangent_size must be a positive int"),
        (dict(tangent_size=2.5), ValueError, "tangent_size must be a positive int"),
        (dict(damping=-1.0), ValueError, "damping must be a finite non-negative"),
        (dict(damping=float("nan")), ValueError, "damping must be a finite non-negative"),
        (dict(curvature="hinge"), ValueError, "curvature='hinge' is not a known curvature"),
        (dict(sampler="sobol"), ValueError, "sampler='sobol' is not a known tangent sampler"),
        (dict(key="seed"), TypeError, "key must be a jax.random.key"),
        (dict(key=True), TypeError, "key must be a jax.random.key"),
        (dict(key=jax.random.split(jax.random.key(0))), ValueError, "single PRNG key"),
        (dict(tangent_chunk_size=0), ValueError, "tangent_chunk_size must be None"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        sofo.scale_by_sofo(**kwargs)


def test_init_checks_params():
    with pytest.raises(TypeError, match=r"optimizer\.init\(params\)"):
        sofo.scale_by_sofo().init(None)
    with pytest.raises(TypeError, match="must be a floating array"):
        sofo.scale_by_sofo().init({"w": jnp.arange(3)})
    with pytest.raises(ValueError, match="tangent_size <= the number of parameters"):
        sofo.scale_by_sofo(tangent_size=5, sampler="orthonormal").init({"w": jnp.zeros(4)})


FEEDFORWARD_CALL = r"optimizer\.update\(None, opt_state, params, fun=fun, loss_fn=loss_fn\)"
SCAN_CALL = r"cell=cell, loss_fn=loss_fn, z0=z0, xs=xs, ys=ys"


def test_bad_update_calls_show_the_correct_call():
    params, fun, loss_fn = mlp_problem()
    _, cell, rnn_loss, z0, xs, ys = rnn_problem()
    tx = sofo.scale_by_sofo(tangent_size=3)
    state = tx.init(params)
    cases = [
        (dict(), FEEDFORWARD_CALL),  # no model, no loss
        (dict(fun=fun), r"needs loss_fn=: .*" + FEEDFORWARD_CALL),
        (dict(loss_fn=loss_fn), FEEDFORWARD_CALL),
        (dict(fun=fun, loss_fn=loss_fn, params=None), r"needs the current params.*" + FEEDFORWARD_CALL),
        (dict(fun=fun, loss_fn=loss_fn, state=None), r"SofoState returned by init"),
        (dict(fun="model", loss_fn=loss_fn), r"fun must be callable; got str"),
        (dict(fun=fun, cell=cell, loss_fn=loss_fn), r"either fun= \(feedforward\) or cell= \(recurrent\)"),
        (dict(fun=fun, loss_fn=loss_fn, xs=xs, ys=ys), r"xs, ys only apply to a recurrent cell.*" + SCAN_CALL),
        (dict(cell=cell, loss_fn=rnn_loss, ys=ys), r"needs z0= and xs=: .*" + SCAN_CALL),
        (dict(cell=cell, loss_fn=rnn_loss, z0=z0, params=None), r"needs the current params.*" + SCAN_CALL),
    ]
    for kwargs, match in cases:
        call = dict(state=state, params=params) | kwargs
        with pytest.raises(TypeError, match=match):
            tx.update(None, call.pop("state"), call.pop("params"), **call)


def test_missing_extra_args_through_a_chain_raise_the_same_error():
    params, fun, _ = mlp_problem()
    tx = optax.chain(sofo.scale_by_sofo(tangent_size=3), optax.sgd(0.1))
    gradients = jax.tree_util.tree_map(jnp.ones_like, params)
    with pytest.raises(TypeError, match=FEEDFORWARD_CALL):
        tx.update(gradients, tx.init(params), params)  # the plain optax call, without fun/loss_fn
    with pytest.raises(TypeError, match="needs loss_fn="):
        jax.jit(lambda p, s: tx.update(None, s, p, fun=fun))(params, tx.init(params))
