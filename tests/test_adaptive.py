"""Adaptive (Levenberg-Marquardt) damping, subspace memory and the `sofo.sofo` alias.

Every number is checked against an independent computation: dense Jacobians (`jax.jacfwd`), `jax.grad`,
`jnp.linalg.solve`, and the loss re-evaluated by hand at the candidate parameters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sofo


@pytest.fixture(autouse=True)
def x64():
    # jax.enable_x64 is the public name in current jax; the declared floor (0.4.31) has it in experimental
    enable_x64 = getattr(jax, "enable_x64", None)
    if enable_x64 is None:
        from jax.experimental import enable_x64
    with enable_x64(True):
        yield


def dense_quantities(fun, loss_fn, params):
    """grad and G = J^T H_L J as dense matrices in flat parameter space, plus the unravel function."""
    flat, unravel = ravel_pytree(params)
    out_flat, unravel_out = ravel_pytree(fun(params))
    jac = jax.jacfwd(lambda t: ravel_pytree(fun(unravel(t)))[0])(flat)
    hess = jax.hessian(lambda o: loss_fn(unravel_out(o)))(out_flat)
    grad = jax.grad(lambda t: loss_fn(fun(unravel(t))))(flat)
    return grad, jac.T @ hess @ jac, unravel


def least_squares(seed=0, rows=12, cols=5):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.standard_normal((rows, cols)))
    b = jnp.asarray(rng.standard_normal((rows, 1)))
    fun = lambda p: a @ p["w"]  # noqa: E731
    loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - b) ** 2, axis=-1))  # noqa: E731
    return fun, loss_fn, {"w": jnp.asarray(rng.standard_normal((cols, 1)))}


def small_mlp(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((16, 3)))
    t = jnp.asarray(rng.standard_normal((16, 2)))
    params = {"w1": jnp.asarray(rng.standard_normal((3, 5))), "w2": jnp.asarray(0.5 * rng.standard_normal((5, 2)))}
    fun = lambda p: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
    loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, axis=-1))  # noqa: E731
    return fun, loss_fn, params


def flat(tree):
    return ravel_pytree(tree)[0]


# --- the subspace model ---------------------------------------------------------------------------


@pytest.mark.parametrize("learning_rate", [1.0, 0.3])
def test_predicted_reduction_matches_dense_quadratic_model(learning_rate):
    """pred = eta g.h - eta^2/2 h^T G h with g and G dense, for the engine's own direction h (K < n)."""
    fun, loss_fn, params = small_mlp()
    value, direction, info = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=6, damping=1e-3)(3, params)
    grad, ggn, _ = dense_quantities(fun, loss_fn, params)
    h = flat(direction)
    expected = learning_rate * grad @ h - 0.5 * learning_rate**2 * h @ ggn @ h
    np.testing.assert_allclose(sofo.predicted_reduction(info, learning_rate=learning_rate), expected, rtol=1e-10)


def test_ratio_is_one_on_least_squares_and_matches_hand_computation():
    """On linear least squares the quadratic model is exact, so rho = 1; value and damping by hand."""
    fun, loss_fn, params = least_squares()
    tx = sofo.scale_by_sofo(tangent_size=3, damping=1e-2, key=1, adaptive_damping=True, learning_rate=1.0)
    state = tx.init(params)
    direction, new_state = tx.update(None, state, params, fun=fun, loss_fn=loss_fn)
    candidate = jax.tree_util.tree_map(lambda p, h: p - h, params, direction)
    grad, ggn, _ = dense_quantities(fun, loss_fn, params)
    h = flat(direction)
    predicted = grad @ h - 0.5 * h @ ggn @ h
    actual = loss_fn(fun(params)) - loss_fn(fun(candidate))
    np.testing.assert_allclose(actual / predicted, 1.0, rtol=1e-9)
    np.testing.assert_allclose(new_state.ratio, actual / predicted, rtol=1e-9)
    np.testing.assert_allclose(new_state.value, loss_fn(fun(params)), rtol=1e-12)
    assert bool(new_state.accepted)
    np.testing.assert_allclose(new_state.damping, 1e-2 / 3, rtol=1e-12)  # rho > 3/4: divided by 3


def test_ratio_on_a_nonlinear_model_matches_hand_computation():
    fun, loss_fn, params = small_mlp(1)
    eta = 0.7
    tx = sofo.scale_by_sofo(tangent_size=5, damping=1e-1, key=2, adaptive_damping=True, learning_rate=eta)
    direction, state = tx.update(None, tx.init(params), params, fun=fun, loss_fn=loss_fn)
    # The same engine call by hand: the transform's tangents come from split(key)[1].
    step_key = jax.random.split(jax.random.key(2))[1]
    _, reference, _ = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=5, damping=1e-1)(step_key, params)
    grad, ggn, unravel = dense_quantities(fun, loss_fn, params)
    h = flat(reference)
    predicted = eta * grad @ h - 0.5 * eta**2 * h @ ggn @ h
    actual = loss_fn(fun(params)) - loss_fn(fun(unravel(flat(params) - eta * h)))
    np.testing.assert_allclose(state.ratio, actual / predicted, rtol=1e-8)
    if actual > 0:
        np.testing.assert_allclose(flat(direction), h, rtol=1e-12)


def test_rejected_step_keeps_params_and_raises_damping():
    """A step size far too large makes the loss go up: zeros out, damping x3, memory unchanged."""
    fun, loss_fn, params = least_squares(2)
    opt = sofo.sofo(10.0, tangent_size=5, damping=1e-3, key=0, sampler="orthonormal", memory_size=1)
    state = opt.init(params)
    updates, state = opt.update(None, state, params, fun=fun, loss_fn=loss_fn)
    assert not bool(state[0].accepted)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree_util.tree_leaves(updates))
    new_params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new_params["w"], params["w"])
    np.testing.assert_allclose(state[0].damping, 3e-3, rtol=1e-12)
    assert np.all(np.asarray(state[0].memory["w"]) == 0)


def test_very_good_step_lowers_damping_and_is_applied_with_sign():
    fun, loss_fn, params = least_squares(3)
    opt = sofo.sofo(1.0, tangent_size=5, damping=1e-3, key=0, sampler="orthonormal", memory_size=0)
    updates, state = opt.update(None, opt.init(params), params, fun=fun, loss_fn=loss_fn)
    assert bool(state[0].accepted)
    np.testing.assert_allclose(state[0].damping, 1e-3 / 3, rtol=1e-12)
    # K = n orthonormal: the update is minus the damped Gauss-Newton step.
    grad, ggn, unravel = dense_quantities(fun, loss_fn, params)
    top = jnp.linalg.eigvalsh(ggn)[-1]
    step = jnp.linalg.solve(ggn + 1e-3 * top * jnp.eye(ggn.shape[0]), grad)
    np.testing.assert_allclose(flat(updates), -step, rtol=1e-9)


def test_damping_stays_within_bounds():
    fun, loss_fn, params = least_squares(4)
    schedule = sofo.AdaptiveDamping(min_damping=1e-3, max_damping=2e-3)
    tx = sofo.scale_by_sofo(tangent_size=5, damping=1e-3, sampler="orthonormal", adaptive_damping=schedule, learning_rate=50.0)
    _, state = tx.update(None, tx.init(params), params, fun=fun, loss_fn=loss_fn)
    np.testing.assert_allclose(state.damping, 2e-3)  # rejected: x3, clipped to the maximum


def arctan_problem():
    """A Rosenbrock-like least squares, r = arctan((w0 - 1, 10 (w1 - w0^2))), minimum 0 at (1, 1). From
    w0 = -2 the Gauss-Newton step (Newton on the residuals) overshoots arctan's flat tails and diverges."""
    fun = lambda p: jnp.arctan(jnp.stack([p[0] - 1.0, 10 * (p[1] - p[0] ** 2)]))[None]  # noqa: E731
    loss_fn = lambda y: 0.5 * jnp.sum(y**2)  # noqa: E731
    return fun, loss_fn, jnp.array([-2.0, 4.0])


def test_levenberg_marquardt_converges_where_fixed_damping_gauss_newton_diverges():
    fun, loss_fn, params = arctan_problem()

    def run(opt, steps=60):
        # One compiled step (eager steps cost a dispatch per operation).
        step = jax.jit(lambda s, p: opt.update(None, s, p, fun=fun, loss_fn=loss_fn))
        p, state = params, opt.init(params)
        for _ in range(steps):
            updates, state = step(state, p)
            p = optax.apply_updates(p, updates)
        return p

    fixed = optax.chain(sofo.scale_by_sofo(tangent_size=2, damping=1e-8, sampler="orthonormal"), optax.sgd(1.0))
    p_fixed = run(fixed)
    # The control diverges: the parameters run off to ~1e140 and the loss sits at arctan's ceiling.
    assert not np.all(np.abs(p_fixed) < 1e6), p_fixed
    assert loss_fn(fun(p_fixed)) > loss_fn(fun(params))
    adaptive = sofo.sofo(tangent_size=2, damping=1e-8, sampler="orthonormal", memory_size=0)
    p_lm = run(adaptive)
    np.testing.assert_allclose(p_lm, [1.0, 1.0], atol=1e-6)


def test_non_finite_loss_is_rejected():
    fun, loss_fn, params = least_squares(5)
    bad_loss = lambda y: loss_fn(y) + jnp.where(jnp.abs(y).max() > 0, jnp.nan, 0.0)  # noqa: E731
    opt = sofo.sofo(tangent_size=3)
    updates, state = opt.update(None, opt.init(params), params, fun=fun, loss_fn=bad_loss)
    assert not bool(state[0].accepted)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree_util.tree_leaves(updates))


# --- memory ---------------------------------------------------------------------------------------


def test_memory_with_full_orthonormal_tangents_still_gives_the_damped_gauss_newton_step():
    fun, loss_fn, params = small_mlp(2)
    n = flat(params).size
    memory = jax.tree_util.tree_map(lambda p: jnp.asarray(np.random.default_rng(0).standard_normal((1,) + p.shape)), params)
    _, direction, _ = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=n, damping=1e-3, sampler="orthonormal")(
        7, params, memory=memory
    )
    grad, ggn, _ = dense_quantities(fun, loss_fn, params)
    top = jnp.linalg.eigvalsh(ggn)[-1]
    np.testing.assert_allclose(flat(direction), jnp.linalg.solve(ggn + 1e-3 * top * jnp.eye(n), grad), rtol=1e-7)


@pytest.mark.parametrize("sampler", ["normal", "orthonormal"])
def test_memory_direction_is_in_the_subspace(sampler):
    """The first tangent is the (normalised) memory direction: its directional derivative is g.m/|m|,
    and with the orthonormal sampler the subspace holds m exactly."""
    fun, loss_fn, params = small_mlp(3)
    rng = np.random.default_rng(1)
    m = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal((1,) + p.shape)), params)
    _, _, info = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=4, sampler=sampler)(0, params, memory=m)
    grad, _, _ = dense_quantities(fun, loss_fn, params)
    unit = flat(jax.tree_util.tree_map(lambda a: a[0], m))
    unit = unit / jnp.linalg.norm(unit)
    if sampler == "normal":
        np.testing.assert_allclose(info.directional_derivatives[0], grad @ unit, rtol=1e-10)
    else:
        # g~ = V^T g; the component of g along unit is recovered from the subspace: |g~| >= |g.unit|, and
        # V^T unit has norm 1 when unit lies in span(V). Check through a second call whose loss is linear.
        lin_loss = lambda y: 0.0 * jnp.sum(y)  # noqa: E731
        probe = lambda p: jnp.sum(flat(p) * unit)[None]  # noqa: E731
        _, _, probe_info = sofo.value_and_sofo_grad(probe, lambda y: y[0] + lin_loss(y), tangent_size=4,
                                                    sampler=sampler)(0, params, memory=m)
        np.testing.assert_allclose(jnp.linalg.norm(probe_info.directional_derivatives), 1.0, rtol=1e-10)


def test_zero_memory_slot_falls_back_to_the_random_tangent():
    fun, loss_fn, params = small_mlp(4)
    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros((1,) + p.shape), params)
    plain = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=4)(5, params)
    remembered = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=4)(5, params, memory=zeros)
    np.testing.assert_allclose(flat(remembered[1]), flat(plain[1]), rtol=1e-12)


def test_memory_is_the_last_accepted_directions_normalised():
    fun, loss_fn, params = small_mlp(5)
    opt = sofo.sofo(tangent_size=4, memory_size=2, key=3)
    state = opt.init(params)
    directions = []
    p = params
    for _ in range(3):
        updates, state = opt.update(None, state, p, fun=fun, loss_fn=loss_fn)
        if bool(state[0].accepted):
            directions.append(flat(updates))
        p = optax.apply_updates(p, updates)
    assert len(directions) >= 2
    memory = state[0].memory
    for slot, expected in enumerate(reversed(directions[-2:])):
        stored = flat(jax.tree_util.tree_map(lambda a: a[slot], memory))
        np.testing.assert_allclose(stored, -expected / jnp.linalg.norm(expected), rtol=1e-9, atol=1e-12)


def test_same_key_same_trajectory_and_jit_round_trip():
    fun, loss_fn, params = small_mlp(6)
    opt = sofo.sofo(tangent_size=4, memory_size=2, key=11)

    def run(jit):
        update = jax.jit(lambda s, p: opt.update(None, s, p, fun=fun, loss_fn=loss_fn)) if jit else (
            lambda s, p: opt.update(None, s, p, fun=fun, loss_fn=loss_fn)
        )
        p, state = params, opt.init(params)
        for _ in range(4):
            updates, state = update(state, p)
            p = optax.apply_updates(p, updates)
        return p, state

    p_eager, s_eager = run(False)
    p_jit, s_jit = run(True)
    p_again, _ = run(True)
    np.testing.assert_allclose(flat(p_jit), flat(p_eager), rtol=1e-10)
    np.testing.assert_array_equal(flat(p_again), flat(p_jit))
    for a, b in zip(jax.tree_util.tree_leaves(s_jit), jax.tree_util.tree_leaves(s_eager)):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_damping_may_be_a_traced_scalar():
    fun, loss_fn, params = small_mlp(7)
    engine = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=4, damping=1e-5)
    _, eager, _ = engine(1, params, damping=0.3)
    _, traced, _ = jax.jit(lambda d: engine(1, params, damping=d))(jnp.asarray(0.3))
    _, built, _ = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=4, damping=0.3)(1, params)
    np.testing.assert_allclose(flat(traced), flat(built), rtol=1e-10)
    np.testing.assert_allclose(flat(eager), flat(built), rtol=1e-12)


# --- recurrent --------------------------------------------------------------------------------------


def rnn_problem(seed=0, steps=6, batch=4, hidden=5):
    rng = np.random.default_rng(seed)
    params = {
        "W": jnp.asarray(rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)),
        "U": jnp.asarray(rng.standard_normal((hidden, 2))),
        "C": jnp.asarray(rng.standard_normal((1, hidden))),
    }
    xs = jnp.asarray(rng.standard_normal((steps, batch, 2)))
    ys = jnp.asarray(rng.standard_normal((steps, batch, 1)))
    z0 = jnp.zeros((batch, hidden))

    def cell(p, z, x):
        z = jnp.tanh(z @ p["W"].T + x @ p["U"].T)
        return z, z @ p["C"].T

    step_loss = lambda y, t: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))  # noqa: E731
    return cell, step_loss, params, z0, xs, ys


def test_recurrent_ratio_matches_a_hand_rollout():
    cell, step_loss, params, z0, xs, ys = rnn_problem()

    def total_loss(p):  # a plain python loop: independent of the engine's scan
        z, total = z0, 0.0
        for t in range(xs.shape[0]):
            z, y = cell(p, z, xs[t])
            total = total + step_loss(y, ys[t])
        return total

    opt = sofo.sofo(0.5, tangent_size=6, memory_size=1, key=4)
    updates, state = opt.update(None, opt.init(params), params, cell=cell, loss_fn=step_loss, z0=z0, xs=xs, ys=ys)
    step_key = jax.random.split(jax.random.key(4))[1]
    engine = sofo.value_and_sofo_grad_scan(cell, step_loss, tangent_size=6, damping=1e-2, sampler="balanced")
    _, direction, info = engine(step_key, params, z0, xs, ys)
    candidate = jax.tree_util.tree_map(lambda p, h: p - 0.5 * h, params, direction)
    grad = flat(jax.grad(total_loss)(params))
    actual = total_loss(params) - total_loss(candidate)
    predicted = sofo.predicted_reduction(info, 0.5)
    np.testing.assert_allclose(predicted, 0.5 * grad @ flat(direction) - 0.125 * info.coefficients @ info.curvature @ info.coefficients, rtol=1e-9)
    np.testing.assert_allclose(state[0].ratio, actual / predicted, rtol=1e-8)
    np.testing.assert_allclose(state[0].value, total_loss(params), rtol=1e-12)
    assert bool(state[0].accepted) == bool(actual >= 0)


def test_recurrent_training_goes_down():
    cell, step_loss, params, z0, xs, ys = rnn_problem(1)
    opt = sofo.sofo(tangent_size=12, key=0)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        updates, s = opt.update(None, s, p, cell=cell, loss_fn=step_loss, z0=z0, xs=xs, ys=ys)
        return optax.apply_updates(p, updates), s

    p = params
    for _ in range(30):
        p, state = step(p, state)
    first = sofo.value_and_sofo_grad_scan(cell, step_loss, tangent_size=1)(0, params, z0, xs, ys)[0]
    last = sofo.value_and_sofo_grad_scan(cell, step_loss, tangent_size=1)(0, p, z0, xs, ys)[0]
    assert last < 0.5 * first


# --- bad configurations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(adaptive_damping="yes"), TypeError, "adaptive_damping must be True, False or a sofo.AdaptiveDamping"),
        (dict(adaptive_damping=sofo.AdaptiveDamping(increase=1.0)), ValueError, "increase > 1"),
        (dict(adaptive_damping=sofo.AdaptiveDamping(min_damping=0.0)), ValueError, "0 < min_damping"),
        (dict(adaptive_damping=sofo.AdaptiveDamping(lower_ratio=0.9, upper_ratio=0.1)), ValueError, "lower_ratio"),
        (dict(memory_size=-1), ValueError, "memory_size must be an int with 0 <= memory_size < tangent_size"),
        (dict(memory_size=9, tangent_size=8), ValueError, "memory_size must be an int with 0 <= memory_size < tangent_size"),
        (dict(memory_size=8, tangent_size=8), ValueError, "memory_size < tangent_size=8"),
        (dict(learning_rate=0.0), ValueError, "learning_rate must be a positive float"),
    ],
)
def test_bad_configuration_is_refused_when_built(kwargs, error, match):
    kwargs = {"tangent_size": 8, **kwargs}
    with pytest.raises(error, match=match):
        sofo.scale_by_sofo(**kwargs)


def test_bad_memory_is_refused_before_any_work():
    fun, loss_fn, params = small_mlp()
    engine = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=3)
    with pytest.raises(ValueError, match="same pytree structure as params"):
        engine(0, params, memory=[jnp.zeros((1, 3, 5))])
    bad = jax.tree_util.tree_map(lambda p: jnp.zeros((4,) + p.shape), params)
    with pytest.raises(ValueError, match="between 1 and tangent_size=3"):
        engine(0, params, memory=bad)
    wrong = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape), params)
    with pytest.raises(ValueError, match=r"expected \(m,\) \+"):
        engine(0, params, memory=wrong)
    with pytest.raises(ValueError, match="damping must be a finite non-negative"):
        engine(0, params, damping=-1.0)


# --- layerwise tangents ---------------------------------------------------------------------------


def test_layerwise_tangents_give_every_leaf_an_equal_share_of_the_norm():
    from sofo import _tangents

    params = {"big": jnp.ones((40, 30)), "small": jnp.ones((3,)), "mid": jnp.ones((7, 2))}
    tangents = _tangents.sample(jax.random.key(0), params, 5, "layerwise")
    for name in ("big", "small", "mid"):
        norms = jnp.sqrt(jnp.sum(tangents[name].reshape(5, -1) ** 2, axis=1))
        np.testing.assert_allclose(norms, 1 / np.sqrt(3), rtol=1e-6)
    # The directions within a leaf are the normal sampler's (same key), rescaled.
    normal = _tangents.sample(jax.random.key(0), params, 5, "normal")
    ratio = tangents["big"] / normal["big"]
    np.testing.assert_allclose(ratio, ratio[:, :1, :1] * jnp.ones_like(ratio), rtol=1e-5)
    # "balanced": squared-norm shares proportional to sqrt(size), summing to 1.
    balanced = _tangents.sample(jax.random.key(0), params, 5, "balanced")
    weights = {name: np.sqrt(leaf.size) for name, leaf in params.items()}
    total = sum(weights.values())
    for name in params:
        shares = jnp.sum(balanced[name].reshape(5, -1) ** 2, axis=1)
        np.testing.assert_allclose(shares, weights[name] / total, rtol=1e-5)


def test_layerwise_directional_derivatives_and_full_rank_limit():
    """g~ = V^T grad (V from the sampler, grad from jax.grad); with K = n layerwise tangents (a basis) and
    vanishing damping the direction is the Gauss-Newton step G^-1 g (jnp.linalg.solve)."""
    from sofo import _tangents

    fun, loss_fn, params = small_mlp(8)
    n = flat(params).size
    engine = sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=n, damping=1e-13, sampler="layerwise")
    _, direction, info = engine(4, params)
    tangents = _tangents.sample(jax.random.key(4), params, n, "layerwise")
    basis = jnp.stack([flat(jax.tree_util.tree_map(lambda a, i=i: a[i], tangents)) for i in range(n)])
    grad, ggn, _ = dense_quantities(fun, loss_fn, params)
    np.testing.assert_allclose(info.directional_derivatives, basis @ grad, rtol=1e-9, atol=1e-12)
    if np.linalg.cond(np.asarray(ggn)) < 1e8:
        np.testing.assert_allclose(flat(direction), jnp.linalg.solve(ggn, grad), rtol=1e-4)
    else:  # rank-deficient G: compare the predicted decrease instead (the minimum of the quadratic model)
        expected = 0.5 * grad @ jnp.linalg.lstsq(ggn, grad)[0]
        np.testing.assert_allclose(sofo.predicted_reduction(info, 1.0), expected, rtol=1e-4)


# --- the brainstate-style front ---------------------------------------------------------------------


def test_sofo_grad_adaptive_matches_dense_and_updates_damping_by_hand():
    fun, loss_fn, params = least_squares(6, rows=10, cols=4)
    w = sofo.State(params["w"])
    model = lambda: fun({"w": w.value})  # noqa: E731
    n = params["w"].size
    grad_fn = sofo.sofo_grad(
        model, loss_fn, grad_states=w, tangent_size=n, damping=1e-3, sampler="orthonormal", key=2,
        adaptive_damping=True, learning_rate=0.5,
    )
    direction = grad_fn()
    grad, ggn, unravel = dense_quantities(fun, loss_fn, params)
    top = jnp.linalg.eigvalsh(ggn)[-1]
    expected = jnp.linalg.solve(ggn + 1e-3 * top * jnp.eye(n), grad)
    np.testing.assert_allclose(direction.ravel(), expected, rtol=1e-8)
    # rho by hand: linear least squares, so the quadratic model is exact: rho = 1 > 3/4, damping / 3.
    before, after = loss_fn(fun(params)), loss_fn(fun({"w": params["w"] - 0.5 * direction}))
    predicted = 0.5 * grad @ expected - 0.125 * expected @ ggn @ expected
    np.testing.assert_allclose(grad_fn.adaptive.ratio, (before - after) / predicted, rtol=1e-8)
    assert grad_fn.adaptive.accepted
    np.testing.assert_allclose(grad_fn.adaptive.damping, 1e-3 / 3, rtol=1e-12)
    np.testing.assert_array_equal(w.value, params["w"])  # the transform returns a direction; it moves nothing


def test_sofo_grad_adaptive_rejects_a_step_that_raises_the_loss():
    fun, loss_fn, params = least_squares(7, rows=10, cols=4)
    w = sofo.State(params["w"])
    grad_fn = sofo.sofo_grad(
        lambda: fun({"w": w.value}), loss_fn, grad_states=w, tangent_size=4, sampler="orthonormal", key=1,
        damping=1e-3, adaptive_damping=True, learning_rate=25.0,
    )
    direction = grad_fn()
    assert not grad_fn.adaptive.accepted
    assert np.all(np.asarray(direction) == 0)
    np.testing.assert_allclose(grad_fn.adaptive.damping, 3e-3, rtol=1e-12)


def test_sofo_grad_adaptive_refuses_jit_and_bad_options():
    fun, loss_fn, params = least_squares(8)
    grad_fn = sofo.sofo_grad(lambda p: fun({"w": p}), loss_fn, argnums=0, tangent_size=3, key=0,
                             adaptive_damping=True)
    with pytest.raises(TypeError, match="must be called eagerly"):
        jax.jit(grad_fn)(params["w"])
    with pytest.raises(ValueError, match="memory_size must be an int"):
        sofo.sofo_grad(lambda p: p, loss_fn, argnums=0, tangent_size=3, memory_size=5)
    with pytest.raises(ValueError, match="learning_rate must be a positive float"):
        sofo.sofo_grad(lambda p: p, loss_fn, argnums=0, tangent_size=3, adaptive_damping=True, learning_rate=-1.0)


def test_sofo_grad_scan_adaptive_with_memory_trains_a_cell_eagerly():
    cell, step_loss, params, z0, xs, ys = rnn_problem(2)
    states = {name: sofo.State(value) for name, value in params.items()}

    def state_cell(z, x):
        return cell({name: s.value for name, s in states.items()}, z, x)

    grad_fn = sofo.transforms.sofo_grad_scan(
        state_cell, step_loss, grad_states=states, tangent_size=10, damping=1e-2, key=None,
        adaptive_damping=True, memory_size=2,
    )

    def total_loss():  # an independent python-loop rollout at the States' current values
        p = {name: s.value for name, s in states.items()}
        z, total = z0, 0.0
        for t in range(xs.shape[0]):
            z, y = cell(p, z, xs[t])
            total = total + float(step_loss(y, ys[t]))
        return total

    losses = [total_loss()]
    for _ in range(12):
        direction = grad_fn(z0, xs, ys)
        for name, s in states.items():
            s.value = s.value - direction[name]
        losses.append(total_loss())
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))  # rejected steps never raise the loss
    assert losses[-1] < 0.7 * losses[0]
    assert grad_fn.adaptive.memory is not None


# --- sofo.sofo inside optax wrappers ----------------------------------------------------------------


def test_sofo_alias_under_masked_moves_only_its_params_and_never_raises_the_loss():
    fun, loss_fn, params = small_mlp(9)
    mask = {"w1": False, "w2": True}
    opt = optax.masked(sofo.sofo(tangent_size=6, key=3), mask)
    state = opt.init(params)
    p = params
    losses = [loss_fn(fun(p))]
    for _ in range(5):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, p)
        full = p
        updates, state = opt.update(zeros, state, p, fun=lambda q: fun(sofo.unmask(q, full)), loss_fn=loss_fn)
        p = optax.apply_updates(p, updates)
        losses.append(loss_fn(fun(p)))
    np.testing.assert_array_equal(p["w1"], params["w1"])
    assert not np.allclose(p["w2"], params["w2"])
    assert all(b <= a for a, b in zip(losses, losses[1:]))


def test_sofo_alias_with_injected_learning_rate_matches_the_fixed_one():
    fun, loss_fn, params = small_mlp(10)
    static = ("tangent_size", "loss", "key", "sampler", "adaptive_damping", "memory_size", "tangent_chunk_size")
    injected = optax.inject_hyperparams(sofo.sofo, static_args=static)(learning_rate=0.5, tangent_size=5, key=2)
    fixed = sofo.sofo(0.5, tangent_size=5, key=2)
    u_inj, _ = injected.update(None, injected.init(params), params, fun=fun, loss_fn=loss_fn)
    u_fix, _ = fixed.update(None, fixed.init(params), params, fun=fun, loss_fn=loss_fn)
    np.testing.assert_allclose(flat(u_inj), flat(u_fix), rtol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_damping_floor_is_the_sketch_resolution(dtype):
    """On least squares every step is very good (rho = 1), so the damping falls to its floor: the larger of
    min_damping and K * eps of the dtype (below it the K x K solve is round-off)."""
    fun, loss_fn, params = least_squares(9)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    k = 4
    opt = sofo.sofo(tangent_size=k, damping=1e-3, key=1, memory_size=0)
    state, p = opt.init(params), params
    cast_fun = lambda q: fun(q).astype(dtype)  # noqa: E731
    step = jax.jit(lambda s, q: opt.update(None, s, q, fun=cast_fun, loss_fn=loss_fn))  # one compiled step
    dampings = []
    for _ in range(30):
        updates, state = step(state, p)
        p = optax.apply_updates(p, updates)
        dampings.append(float(state[0].damping))
    # (Once converged to round-off, steps stop paying off and the damping rises again: only its minimum
    # is pinned here.)
    floor = max(1e-8, k * float(jnp.finfo(dtype).eps))
    np.testing.assert_allclose(min(dampings), floor, rtol=1e-5)
