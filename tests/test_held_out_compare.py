"""The held-out comparison of dampings (`sofo.AdaptiveDamping(held_out_compare=w)`, issue 15) and the
engine's `extra_dampings`.

Checked against independent computations: the directions against `jnp.linalg.solve` of the dense
Gauss-Newton matrix (`jax.jacfwd`, `jax.grad`), the damping against the comparison and the safety net
applied by hand to losses recomputed by hand.
"""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import sofo

# The small problem of the next-batch damping tests (a 3-4-2 tanh network on float64 batches of 8).
from test_stochastic_damping import BATCH, _batch, _flat, _model, _mse, _params  # noqa: E402


def _loss(p, batch):
    x, t = batch
    return _mse(_model(p, x), t)


def _dense(params, batch):
    """The dense Gauss-Newton matrix (jax.jacfwd of the model; H_L = I / B) and the gradient (jax.grad)."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    x, _ = batch
    jac = jax.jacfwd(lambda v: _model(unravel(v), x).ravel())(flat)
    gradient = jax.grad(lambda v: _loss(unravel(v), batch))(flat)
    return jac.T @ jac / BATCH, gradient


def _damped_direction(gauss_newton, gradient, damping):
    """(G + damping * max_eig(G) I)^-1 g by jnp.linalg.solve: the full-space SOFO direction (K = n)."""
    top = jnp.linalg.eigvalsh(gauss_newton)[-1]
    return jnp.linalg.solve(gauss_newton + damping * top * jnp.eye(gauss_newton.shape[0]), gradient)


def test_extra_dampings_give_the_dense_solves():
    params, batch = _params(), _batch(0)
    n = _flat(params).size
    x, t = batch
    engine = jax.jit(sofo.value_and_sofo_grad(
        lambda p: _model(p, x), lambda y: _mse(y, t), tangent_size=n, sampler="orthonormal"
    ))
    extra = jnp.array([1e-3, 0.3, 3.0])
    value, direction, info = engine(0, params, damping=0.1, extra_dampings=extra)
    gauss_newton, gradient = _dense(params, batch)
    np.testing.assert_allclose(value, _loss(params, batch), rtol=1e-12)
    np.testing.assert_allclose(_flat(direction), _damped_direction(gauss_newton, gradient, 0.1), rtol=1e-8, atol=1e-12)
    assert info.extra_coefficients.shape == (3, n)
    for e, damping in enumerate(extra):
        alternative = jax.tree_util.tree_map(lambda h: h[e], info.extra_directions)
        expected = _damped_direction(gauss_newton, gradient, float(damping))
        np.testing.assert_allclose(_flat(alternative), expected, rtol=1e-8, atol=1e-12)
    # Without extra dampings: the same direction, and nothing extra in the info.
    _, plain, plain_info = engine(0, params, damping=0.1)
    np.testing.assert_allclose(_flat(plain), _flat(direction), rtol=1e-12)
    assert plain_info.extra_coefficients is None and plain_info.extra_directions is None


@pytest.mark.parametrize("chunk", [None, 2])
def test_extra_dampings_in_the_recurrent_engine_and_streamed_tangents(chunk):
    """The scan engine (and streamed tangents): the direction at an extra damping is the engine's own
    direction at that damping, and matches the dense solve on the unrolled loss."""
    params = _params()
    n = _flat(params).size
    x, t = _batch(0)
    xs, ys = jnp.stack([x, -x]), jnp.stack([t, 0.5 * t])
    cell = lambda p, z, u: (z, jnp.tanh(u @ p["a"]) @ p["b"])  # noqa: E731
    scan = jax.jit(sofo.value_and_sofo_grad_scan(cell, _mse, tangent_size=n, sampler="orthonormal"))
    _, direction, info = scan(1, params, jnp.zeros((BATCH, 1)), xs, ys, damping=0.2, extra_dampings=jnp.array([0.05]))
    _, at_extra, _ = scan(1, params, jnp.zeros((BATCH, 1)), xs, ys, damping=0.05)
    np.testing.assert_allclose(_flat(jax.tree_util.tree_map(lambda h: h[0], info.extra_directions)), _flat(at_extra),
                               rtol=1e-10, atol=1e-13)
    # The unrolled loss is a sum of the two steps' losses: its GGN and gradient are the sums.
    gn0, g0 = _dense(params, (x, t))
    gn1, g1 = _dense(params, (-x, 0.5 * t))
    np.testing.assert_allclose(_flat(at_extra), _damped_direction(gn0 + gn1, g0 + g1, 0.05), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(_flat(direction), _damped_direction(gn0 + gn1, g0 + g1, 0.2), rtol=1e-8, atol=1e-12)
    # Streamed (chunked) Gaussian tangents: the extra direction is again the direction at that damping.
    ff = jax.jit(sofo.value_and_sofo_grad(
        lambda p: _model(p, x), lambda y: _mse(y, t), tangent_size=5, tangent_chunk_size=chunk
    ))
    _, _, info = ff(2, params, damping=0.2, extra_dampings=jnp.array([0.05]))
    _, at_extra, _ = ff(2, params, damping=0.05)
    np.testing.assert_allclose(_flat(jax.tree_util.tree_map(lambda h: h[0], info.extra_directions)), _flat(at_extra),
                               rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("bad", [0.1, [[0.1]], [], [-1.0], [float("nan")], "0.1"])
def test_extra_dampings_are_validated(bad):
    x, t = _batch(0)
    engine = sofo.value_and_sofo_grad(lambda p: _model(p, x), lambda y: _mse(y, t), tangent_size=4)
    with pytest.raises(ValueError, match="extra_dampings must be None or a 1-D sequence"):
        engine(0, _params(), extra_dampings=bad)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_update(opt, state, params, batch):
    x, t = batch
    return opt.update(None, state, params, fun=lambda q: _model(q, x), loss_fn=lambda y: _mse(y, t))


def _update(opt, state, params, batch):
    return _jitted_update(opt, state, params, batch)


def _compare_by_hand(batches, learning_rate, w=3.0, events=None, lower_ratio=0.25):
    """Runs scale_by_sofo(held_out_compare=w) with K = n orthonormal tangents over `batches` and checks
    every direction, alternative direction and damping against the rule applied by hand; returns the
    verdicts (True: the alternative damping won) of the steps compared. `events`, a dict, counts the
    safety net's raises ("poor") and the rejected steps ("rejected")."""
    config = sofo.AdaptiveDamping(held_out_compare=w, lower_ratio=lower_ratio, upper_ratio=max(0.75, lower_ratio))
    params = _params()
    n = _flat(params).size
    opt = sofo.scale_by_sofo(
        tangent_size=n, sampler="orthonormal", curvature="mse", damping=0.1, adaptive_damping=config, key=3,
        learning_rate=learning_rate,
    )
    state = opt.init(params)
    unravel = jax.flatten_util.ravel_pytree(params)[1]
    damping, factor = 0.1, w  # the first step compares with damping * w, then the factors alternate
    previous = None  # (params before the step, the alternative direction, its factor) of an accepted step
    verdicts = []
    for batch in batches:
        gauss_newton, gradient = _dense(params, batch)
        h, state = _update(opt, state, params, batch)
        value = float(_loss(params, batch))
        # This step uses the damping the last call left; the comparison moves the next one (a step late).
        expected = _damped_direction(gauss_newton, gradient, damping)
        alternative = _damped_direction(gauss_newton, gradient, damping * factor)
        if previous is not None:
            before, previous_alternative, previous_factor, q = previous
            alternative_value = float(_loss(unravel(_flat(before) - learning_rate * previous_alternative), batch))
            won = alternative_value < value  # both on this batch, which neither step was fitted to
            np.testing.assert_allclose(state.held_out_ratio, (value - alternative_value) / q, rtol=1e-7, atol=1e-12)
            verdicts.append(won)
            if won:
                damping *= previous_factor
        after = _flat(params) - learning_rate * expected
        new_value = float(_loss(unravel(after), batch))
        accepted = new_value <= value
        predicted = learning_rate * expected @ gradient - 0.5 * learning_rate**2 * expected @ gauss_newton @ expected
        rho = (value - new_value) / float(predicted)
        assert bool(state.accepted) == accepted
        np.testing.assert_allclose(_flat(h), expected if accepted else 0 * expected, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(state.ratio, rho, rtol=1e-7)
        if not accepted or rho < config.lower_ratio:  # the same-batch safety net
            damping *= config.increase
            if events is not None:
                events["poor"] = events.get("poor", 0) + 1
                events["rejected"] = events.get("rejected", 0) + (not accepted)
        np.testing.assert_allclose(state.damping, damping, rtol=1e-10)
        q = 0.5 * learning_rate**2 * expected @ gauss_newton @ expected
        previous = (params, alternative, factor, float(q)) if accepted else None
        if accepted:
            params = unravel(after)
        factor = 1 / factor
    return verdicts


def test_held_out_compare_matches_a_hand_computation():
    """Fresh batches (and learning rates 1 and 0.5), and the same batch every step (full batch: the
    comparison is then K-FAC's greedy one on the training batch itself)."""
    verdicts = []
    for first in (0, 5):
        verdicts += _compare_by_hand([_batch(first + i) for i in range(5)], 1.0)
    verdicts += _compare_by_hand([_batch(9 + i) for i in range(4)], 0.5, w=3.0**0.5)
    verdicts += _compare_by_hand([_batch(20)] * 5, 1.0)
    # The streams must exercise both outcomes, or the test could not tell the rule from a constant.
    assert any(verdicts) and not all(verdicts)


def test_held_out_compare_safety_net_and_rejections_match_a_hand_computation():
    """Long steps (learning rates up to 2, where the quadratic model still predicts a decrease): the
    same-batch safety net raises the damping (lower_ratio 0.9 in one stream, so it fires there) and some steps
    are rejected (then not compared), as the hand computation says. The streams must contain both events,
    or this test could not see them go wrong; rejections depend on the batches drawn, so the streams
    include inputs scaled by 3 (a more saturated tanh), which give them under both of jax's random bit
    streams (before and after jax_threefry_partitionable became the default)."""
    events = {}
    verdicts = []
    streams = ((40, 1.9, 1.0, 0.9), (50, 1.99, 1.0, 0.25), (40, 1.9, 3.0, 0.25), (40, 1.5, 3.0, 0.25))
    for first, learning_rate, scale, lower_ratio in streams:
        batches = [(scale * _batch(first + i)[0], _batch(first + i)[1]) for i in range(6)]
        verdicts += _compare_by_hand(batches, learning_rate, events=events, lower_ratio=lower_ratio)
    assert events.get("poor", 0) > events.get("rejected", 0) > 0, events
    assert verdicts


@pytest.mark.parametrize(
    "config, match",
    [
        (sofo.AdaptiveDamping(held_out_compare=1.0), "must be 0 \\(off\\) or the factor w > 1"),
        (sofo.AdaptiveDamping(held_out_compare=0.5), "must be 0 \\(off\\) or the factor w > 1"),
        (sofo.AdaptiveDamping(held_out_compare=-3.0), "must be 0 \\(off\\) or the factor w > 1"),
        (sofo.AdaptiveDamping(held_out_compare=3.0, next_batch=False), "needs next_batch=True"),
        (sofo.AdaptiveDamping(held_out_compare=3.0, held_out_average=0.9), "pass only one of them"),
        (sofo.AdaptiveDamping(held_out_compare=float("inf")), "finite float"),
    ],
)
def test_held_out_compare_is_validated(config, match):
    with pytest.raises(ValueError, match=match):
        sofo.sofo(adaptive_damping=config)


def test_brainstate_front_and_recurrent_transform_compare_too():
    """sofo.transforms.sofo_grad and a cell through sofo.sofo run the comparison: the damping is the one
    scale_by_sofo reaches on the same batches."""
    import sofo.transforms as st

    config = sofo.AdaptiveDamping(held_out_compare=3.0)
    params0 = _params()
    n = _flat(params0).size
    f = st.sofo_grad(
        lambda p, xx, tt: _model(p, xx) - tt, lambda r: 0.5 * jnp.sum(r**2) / r.shape[0], argnums=0,
        tangent_size=n, sampler="orthonormal", key=3, curvature="mse", adaptive_damping=config, damping=0.1,
    )
    opt = sofo.scale_by_sofo(
        tangent_size=n, sampler="orthonormal", curvature="mse", damping=0.1, adaptive_damping=config, key=3
    )
    state = opt.init(params0)
    p_front, p_opt = params0, params0
    for i in range(4):
        batch = _batch(30 + i)
        h = f(p_front, *batch)
        p_front = jax.tree_util.tree_map(lambda p, d: p - d, p_front, h)
        h, state = _update(opt, state, p_opt, batch)
        p_opt = jax.tree_util.tree_map(lambda p, d: p - d, p_opt, h)
        np.testing.assert_allclose(f.adaptive.damping, state.damping, rtol=1e-8)
    np.testing.assert_allclose(_flat(p_front), _flat(p_opt), rtol=1e-8)
    # A cell: runs under jit with the comparison's buffers in the state.
    cell = lambda p, z, u: (jnp.tanh(u @ p["a"]), jnp.tanh(u @ p["a"]) @ p["b"])  # noqa: E731
    rnn = sofo.sofo(tangent_size=6, curvature="mse", key=2, adaptive_damping=config)
    rnn_state = rnn.init(params0)
    x, t = _batch(0)
    step = jax.jit(lambda s, p: rnn.update(
        None, s, p, cell=cell, loss_fn=_mse, z0=jnp.zeros((BATCH, 4)), xs=jnp.stack([x, -x]), ys=jnp.stack([t, t])
    ))
    for _ in range(3):
        updates, rnn_state = step(rnn_state, params0)
        params0 = jax.tree_util.tree_map(jnp.add, params0, updates)
    # One parameter-sized buffer, as without the comparison: the alternative offset in place of the step.
    assert rnn_state[0].previous.alternative is not None and rnn_state[0].previous.step is None
    assert np.isfinite(float(rnn_state[0].damping))


def test_a_state_without_the_comparison_is_refused():
    """A state built without held_out_compare (no alternative step) given to an optimizer with it: a clear
    error naming the fix, not a pytree failure inside the step (and the other way round)."""
    params, batch = _params(), _batch(0)
    plain = sofo.scale_by_sofo(tangent_size=4, adaptive_damping=True)
    comparing = sofo.scale_by_sofo(tangent_size=4, adaptive_damping=sofo.AdaptiveDamping(held_out_compare=3.0))
    with pytest.raises(ValueError, match="holds no alternative step, but this optimizer has AdaptiveDamping"):
        _update(comparing, plain.init(params), params, batch)
    with pytest.raises(ValueError, match="holds an alternative step to compare, but this optimizer has no held-out"):
        _update(plain, comparing.init(params), params, batch)


def test_an_alternative_below_the_floor_that_wins_leaves_the_damping_at_the_floor():
    """At min_damping the alternative lambda / w lies below the bounds; when it wins (full batch, where the
    less damped step is better), the kept damping is clipped back to min_damping, never below."""
    floor = 0.05
    config = sofo.AdaptiveDamping(held_out_compare=3.0, min_damping=floor)
    params, batch = _params(), _batch(20)
    opt = sofo.scale_by_sofo(
        tangent_size=_flat(params).size, sampler="orthonormal", damping=floor, adaptive_damping=config, key=3
    )
    state = opt.init(params)
    wins_below = 0
    for _ in range(8):
        compared_factor = float(state.previous.alternative_factor)  # the factor of the step now judged
        h, state = _update(opt, state, params, batch)
        params = jax.tree_util.tree_map(lambda p, d: p - d, params, h)
        assert floor * (1 - 1e-12) <= float(state.damping) <= config.max_damping
        wins_below += compared_factor < 1 and float(state.held_out_ratio) > 0
    assert wins_below > 0  # the clip was exercised: an alternative below the floor won at least once


def test_a_state_saved_with_another_factor_goes_on_with_this_configurations_factor():
    """A state from held_out_compare=3 continued by an optimizer with held_out_compare=sqrt(3) (e.g. a
    checkpoint restored into a retuned optimizer): the step judged first keeps the factor it was taken with,
    and the new step's alternative is the dense solve at damping * sqrt(3)^(+-1), not at damping * 3^(+-1)."""
    params = _params()
    n = _flat(params).size
    unravel = jax.flatten_util.ravel_pytree(params)[1]

    def make(w):
        config = sofo.AdaptiveDamping(held_out_compare=w)
        return sofo.scale_by_sofo(
            tangent_size=n, sampler="orthonormal", damping=0.1, adaptive_damping=config, key=3
        )

    old, new = make(3.0), make(3.0**0.5)
    state = old.init(params)
    for i in range(2):
        h, state = _update(old, state, params, _batch(i))
        params = jax.tree_util.tree_map(lambda p, d: p - d, params, h)
    saved_factor = float(state.previous.alternative_factor)
    assert np.isclose(saved_factor, 3.0) or np.isclose(saved_factor, 1 / 3.0)
    saved_offset = _flat(state.previous.alternative)
    batch = _batch(3)  # a batch on which the saved (lower) alternative wins, under both jax bit streams
    before = float(state.damping)
    alternative_value = float(_loss(unravel(_flat(params) + saved_offset), batch))
    value = float(_loss(params, batch))
    gauss_newton, gradient = _dense(params, batch)
    h, state = _update(new, state, params, batch)
    expected_factor = 3.0**-0.5 if saved_factor > 1 else 3.0**0.5
    np.testing.assert_allclose(float(state.previous.alternative_factor), expected_factor, rtol=1e-12)
    assert bool(state.accepted), "the stream must give an accepted step, or the offset is not checked"
    # This step uses the damping the last call left (the comparison moves the next one).
    direction = _damped_direction(gauss_newton, gradient, before)
    alternative = _damped_direction(gauss_newton, gradient, before * expected_factor)
    np.testing.assert_allclose(_flat(h), direction, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(_flat(state.previous.alternative), direction - alternative, rtol=1e-7, atol=1e-12)
    # The step judged first was taken with the old factor, and its win moves the damping by that factor.
    assert alternative_value < value, "the stream must make the old alternative win, or its factor is not checked"
    moved = before * saved_factor
    # The same-batch safety net, from rho recomputed by hand (dense direction, loss, quadratic model).
    new_value = float(_loss(unravel(_flat(params) - direction), batch))
    predicted = float(direction @ gradient - 0.5 * direction @ gauss_newton @ direction)
    rho = (value - new_value) / predicted
    np.testing.assert_allclose(float(state.ratio), rho, rtol=1e-7)
    safety = 3.0 if rho < 0.25 else 1.0
    np.testing.assert_allclose(float(state.damping), moved * safety, rtol=1e-10)
