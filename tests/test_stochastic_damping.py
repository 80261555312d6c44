"""The next-batch re-judging of Levenberg-Marquardt damping (`sofo.AdaptiveDamping.next_batch`, issue 15).

Checked against hand computations: the held-out ratio from losses recomputed by hand and the dense
Gauss-Newton matrix (`jax.jacfwd`), the damping from the schedule applied by hand; full-batch training
unchanged; a minibatch convergence check.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofo

N_IN, N_OUT, BATCH = 3, 2, 8


def _model(w, x):
    return jnp.tanh(x @ w["a"]) @ w["b"]


def _mse(y, t):
    return 0.5 * jnp.sum((y - t) ** 2) / y.shape[0]


def _params(seed=0):
    ka, kb = jax.random.split(jax.random.key(seed))
    return {
        "a": jax.random.normal(ka, (N_IN, 4), jnp.float64) / np.sqrt(N_IN),
        "b": jax.random.normal(kb, (4, N_OUT), jnp.float64) / 2.0,
    }


def _batch(seed):
    kx, ky = jax.random.split(jax.random.key(100 + seed))
    return jax.random.normal(kx, (BATCH, N_IN), jnp.float64), jax.random.normal(ky, (BATCH, N_OUT), jnp.float64)


def _flat(tree):
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])


def _update(opt, state, params, batch):
    return jax.jit(_update_traced, static_argnums=0)(opt, state, params, batch)


def _update_traced(opt, state, params, batch):
    x, t = batch
    return opt.update(None, state, params, fun=lambda p: _model(p, x), loss_fn=lambda y: _mse(y, t))


def _factor(ratio, config=sofo.AdaptiveDamping()):
    """The schedule's multiplier for an accepted step with this ratio, written out by hand."""
    if ratio < config.lower_ratio:
        return config.increase
    if ratio > config.upper_ratio:
        return 1 / config.decrease
    return 1.0


def test_held_out_ratio_and_damping_match_a_hand_computation():
    params0 = _params()
    n = _flat(params0).size
    # K = n orthonormal tangents: the subspace model is the full Gauss-Newton model.
    opt = sofo.scale_by_sofo(
        tangent_size=n, sampler="orthonormal", curvature="mse", damping=1.0, adaptive_damping=True, key=3
    )
    state0 = opt.init(params0)
    batch_a, batch_b = _batch(0), _batch(1)
    h1, state1 = _update(opt, state0, params0, batch_a)
    assert bool(state1.accepted)
    params1 = jax.tree_util.tree_map(lambda p, h: p - h, params0, h1)
    h2, state2 = _update(opt, state1, params1, batch_b)

    def loss(p, batch):
        x, t = batch
        return _mse(_model(p, x), t)

    unravel = jax.flatten_util.ravel_pytree(params0)[1]
    flat0, step1 = _flat(params0), _flat(h1)
    x_a, _ = batch_a
    jac = jax.jacfwd(lambda v: _model(unravel(v), x_a).ravel())(flat0)
    gauss_newton = jac.T @ jac / BATCH  # the GGN of 0.5 * mean squared error
    curvature_term = 0.5 * step1 @ gauss_newton @ step1
    predicted = step1 @ jax.grad(lambda v: loss(unravel(v), batch_a))(flat0) - curvature_term
    ratio1 = (loss(params0, batch_a) - loss(params1, batch_a)) / predicted
    held_out = (loss(params0, batch_b) - loss(params1, batch_b)) / curvature_term
    np.testing.assert_allclose(state1.ratio, ratio1, rtol=1e-8)
    np.testing.assert_allclose(state2.held_out_ratio, held_out, rtol=1e-8)

    # The damping: the first step's update redone with min(rho, held-out rho), then the second's own.
    params2 = jax.tree_util.tree_map(lambda p, h: p - h, params1, h2)
    ratio2 = (loss(params1, batch_b) - loss(params2, batch_b)) / float(
        _flat(h2) @ jax.grad(lambda v: loss(unravel(v), batch_b))(_flat(params1))
        - 0.5 * _flat(h2) @ _gn(params1, batch_b, unravel) @ _flat(h2)
    )
    assert bool(state2.accepted)
    expected = 1.0 * _factor(min(float(ratio1), float(held_out))) * _factor(float(ratio2))
    np.testing.assert_allclose(state2.damping, expected, rtol=1e-10)


def _gn(params, batch, unravel):
    x, _ = batch
    jac = jax.jacfwd(lambda v: _model(unravel(v), x).ravel())(_flat(params))
    return jac.T @ jac / BATCH


def test_held_out_over_a_batch_that_disagrees_raises_the_damping():
    """A step fitted to one batch, judged on targets mirrored about the outputs (the gradient reversed)."""
    params0 = _params()
    opt = sofo.sofo(tangent_size=12, curvature="mse", damping=1e-2, key=1)
    state = opt.init(params0)
    x, t = _batch(0)
    updates, state = _update(opt, state, params0, (x, t))
    params1 = optax.apply_updates(params0, updates)
    same_damping = float(state[0].damping)
    mirrored = 2 * _model(params0, x) - t  # at params0 its loss gradient is minus batch (x, t)'s
    _, state = _update(opt, state, params1, (x, mirrored))
    assert float(state[0].held_out_ratio) < 0  # the step made the other batch's loss worse
    assert float(state[0].damping) > same_damping


@pytest.mark.parametrize("front", ["transform", "scan"])
def test_full_batch_training_is_unchanged(front):
    """With the same batch every step, the held-out verdict is the same-batch one: identical runs."""
    x, t = _batch(0)
    runs = []
    for config in (sofo.AdaptiveDamping(), sofo.AdaptiveDamping(next_batch=False)):
        opt = sofo.sofo(tangent_size=6, curvature="mse", key=2, adaptive_damping=config)
        params = _params()
        state = opt.init(params)
        dampings = []
        cell = lambda p, z, u: (jnp.tanh(u @ p["a"]), jnp.tanh(u @ p["a"]) @ p["b"])  # noqa: E731

        @jax.jit
        def step(params, state):
            if front == "transform":
                updates, state = _update_traced(opt, state, params, (x, t))
            else:
                updates, state = opt.update(
                    None, state, params, cell=cell, loss_fn=_mse, z0=jnp.zeros((BATCH, 4)),
                    xs=jnp.stack([x, -x]), ys=jnp.stack([t, t]),
                )
            return optax.apply_updates(params, updates), state

        for _ in range(15):
            params, state = step(params, state)
            dampings.append(float(state[0].damping))
        runs.append((dampings, _flat(params)))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-9)
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-9)
    assert len(set(runs[0][0])) > 1  # the damping did adapt


def test_brainstate_front_rejudges_too():
    """sofo.transforms.sofo_grad carries the previous step between eager calls: same held-out ratio."""
    import sofo.transforms as st

    params0 = _params()
    n = _flat(params0).size
    f = st.sofo_grad(
        lambda p, xx, tt: _model(p, xx) - tt, lambda r: 0.5 * jnp.sum(r**2) / r.shape[0], argnums=0,
        tangent_size=n, sampler="orthonormal", key=0, curvature="mse", adaptive_damping=True, damping=1.0,
    )
    batch_a, batch_b = _batch(0), _batch(1)
    h1 = f(params0, *batch_a)
    assert f.adaptive.accepted
    params1 = jax.tree_util.tree_map(lambda p, d: p - d, params0, h1)
    f(params1, *batch_b)

    def loss(p, batch):
        x, t = batch
        return _mse(_model(p, x), t)

    unravel = jax.flatten_util.ravel_pytree(params0)[1]
    step1 = _flat(h1)
    curvature_term = 0.5 * step1 @ _gn(params0, batch_a, unravel) @ step1
    held_out = (loss(params0, batch_b) - loss(params1, batch_b)) / curvature_term
    np.testing.assert_allclose(f.adaptive.held_out_ratio, held_out, rtol=1e-8)


def test_next_batch_must_be_a_bool():
    with pytest.raises(ValueError, match="next_batch must be True or False"):
        sofo.sofo(adaptive_damping=sofo.AdaptiveDamping(next_batch=1))


@pytest.mark.slow
def test_cli_runs_a_minibatch_task(tmp_path, capsys):
    """`python -m benchmarks --tasks mb_regression` reaches the stochastic runner and writes its table."""
    from benchmarks import cli

    code = cli.main(["--tasks", "mb_regression", "--seeds", "1", "--iterations", "10", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "Adam (tuned" in out and "sofo.sofo (default)" in out and "sofo.sofo (same_batch)" in out
    assert (tmp_path / "stochastic.md").read_text().startswith("### Regression")


def _loss(p, batch):
    x, t = batch
    return _mse(_model(p, x), t)


def _ratio_and_curvature_term(params, step, batch, unravel):
    """rho on the step's own batch and its curvature term q, from the dense Gauss-Newton matrix by hand."""
    flat, s = _flat(params), _flat(step)
    q = 0.5 * s @ _gn(params, batch, unravel) @ s
    predicted = s @ jax.grad(lambda v: _loss(unravel(v), batch))(flat) - q
    after = jax.tree_util.tree_map(lambda p, h: p - h, params, step)
    return float((_loss(params, batch) - _loss(after, batch)) / predicted), float(q), after


def test_held_out_average_matches_a_hand_computation():
    """AdaptiveDamping(held_out_average=beta): the verdict from running averages recomputed by hand."""
    # Several batch streams: every one is checked against the hand computation, and on at least one the
    # averaged verdict must decide differently from the per-step one (so the test can fail). Which stream
    # shows the difference depends on the random data, which differs between jax versions.
    differed = [_held_out_average_by_hand(first) for first in (0, 4, 8, 12)]
    assert any(differed)


def _held_out_average_by_hand(first):
    beta = 0.5
    config = sofo.AdaptiveDamping(held_out_average=beta)
    params = _params()
    n = _flat(params).size
    opt = sofo.scale_by_sofo(
        tangent_size=n, sampler="orthonormal", curvature="mse", damping=1.0, adaptive_damping=config, key=3
    )
    state = opt.init(params)
    unravel = jax.flatten_util.ravel_pytree(params)[1]
    batches = [_batch(first + i) for i in range(4)]
    base = damping = 1.0  # the damping before each step's own update, and after it
    mean_reduction = mean_q = 0.0
    previous = None  # (params before, params after, rho, q) of the last step
    per_step_factors, averaged_factors = [], []
    for batch in batches:
        h, state = _update(opt, state, params, batch)
        assert bool(state.accepted)
        if previous is not None:
            before, after, rho_prev, q_prev = previous
            reduction = float(_loss(before, batch) - _loss(after, batch))
            np.testing.assert_allclose(state.held_out_ratio, reduction / q_prev, rtol=1e-8)  # still per step
            mean_reduction = beta * mean_reduction + (1 - beta) * reduction
            mean_q = beta * mean_q + (1 - beta) * q_prev
            averaged = mean_reduction / mean_q + config.lower_ratio
            base = base * _factor(min(rho_prev, averaged), config)
            averaged_factors.append(_factor(min(rho_prev, averaged), config))
            per_step_factors.append(_factor(min(rho_prev, reduction / q_prev), config))
        rho, q, after = _ratio_and_curvature_term(params, h, batch, unravel)
        np.testing.assert_allclose(state.ratio, rho, rtol=1e-8)
        damping = base * _factor(rho, config)
        np.testing.assert_allclose(state.damping, damping, rtol=1e-10)
        np.testing.assert_allclose(state.previous.held_out_mean, mean_reduction, rtol=1e-8, atol=1e-14)
        previous, params = (params, after, rho, q), after
    # whether the averaged verdict decided differently from the per-step one at least once
    return averaged_factors != per_step_factors


@pytest.mark.parametrize(
    "config, match",
    [
        (sofo.AdaptiveDamping(held_out_average=1.0), "must lie in"),
        (sofo.AdaptiveDamping(held_out_average=-0.1), "must lie in"),
        (sofo.AdaptiveDamping(held_out_average=0.9, next_batch=False), "needs next_batch=True"),
        (sofo.AdaptiveDamping(held_out_average=float("nan")), "finite float"),
    ],
)
def test_held_out_average_is_validated(config, match):
    with pytest.raises(ValueError, match=match):
        sofo.sofo(adaptive_damping=config)
