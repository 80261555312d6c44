"""Issue 17 ("nothing silent"): each fuzz finding as a regression test.

A rejected step leaves the parameters exactly as they were; a configuration that cannot work, or a state
from another configuration, is refused with a message naming the fix; every optimizer state checkpoints
with the usual libraries and resumes bit-identically. Exact comparisons (`assert_array_equal`) are against
an uninterrupted run or the parameters before the step; directions against dense `jax.grad`/`jnp.linalg`.
"""

import pickle

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


def problem(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((8, 3)))
    t = jnp.asarray(rng.standard_normal((8, 2)))
    params = {"w1": jnp.asarray(rng.standard_normal((3, 4))), "w2": jnp.asarray(0.5 * rng.standard_normal((4, 2)))}
    fun = lambda p: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
    loss_fn = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, axis=-1))  # noqa: E731
    return fun, loss_fn, params


def flat(tree):
    return ravel_pytree(tree)[0]


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def rnn():
    rng = np.random.default_rng(3)
    w = jnp.asarray(0.5 * rng.standard_normal((2, 2)))
    cell = lambda p, z, x: (jnp.tanh(z @ p + x),) * 2  # noqa: E731
    return cell, w


# --- 2: a NaN or inf learning rate ------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [True, False])
def test_nan_learning_rate_from_a_schedule_leaves_params_exactly_unchanged(adaptive):
    """Step 1 of the schedule is NaN: that step is rejected and the params are bit-identical; steps 0 and 2
    move them (so the test can fail)."""
    fun, loss_fn, params = problem()
    schedule = lambda count: jnp.where(count == 1, jnp.nan, 0.5)  # noqa: E731
    opt = sofo.sofo(schedule, tangent_size=4, adaptive_damping=adaptive, memory_size=1)
    step = jax.jit(lambda s, p: opt.update(None, s, p, fun=fun, loss_fn=loss_fn))
    state, p = opt.init(params), params
    history = []
    for _ in range(3):
        updates, state = step(state, p)
        history.append((p, optax.apply_updates(p, updates), state))
        p = history[-1][1]
    (p0, p1, _), (q0, q1, s1), (r0, r1, s2) = history
    assert not np.array_equal(flat(p0), flat(p1))
    assert_trees_equal(q1, q0)
    assert not bool(s1[0].accepted)
    assert all(np.isfinite(flat(r1)))
    assert not np.array_equal(flat(r0), flat(r1))
    # The memory did not take the rejected step's direction: it still holds step 0's.
    assert_trees_equal(s1[0].memory, history[0][2][0].memory)


@pytest.fixture(scope="module")
def injected_step():
    fun, loss_fn, params = problem(1)
    opt = optax.inject_hyperparams(sofo.sofo, static_args=("tangent_size", "memory_size"))(
        learning_rate=1.0, tangent_size=4, memory_size=1
    )
    return opt, jax.jit(lambda s, p: opt.update(None, s, p, fun=fun, loss_fn=loss_fn)), params


@pytest.mark.parametrize("rate", [jnp.nan, jnp.inf])
def test_injected_non_finite_learning_rate_leaves_params_exactly_unchanged(rate, injected_step):
    opt, step, params = injected_step
    state = opt.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(rate)
    updates, new_state = step(state, params)
    assert_trees_equal(optax.apply_updates(params, updates), params)
    inner = new_state.inner_state[0]
    assert not bool(inner.accepted)
    # Refused for its step size, not for the model: the damping is left as it was.
    np.testing.assert_array_equal(inner.damping, state.inner_state[0].damping)


# --- 4: memory_size == tangent_size -------------------------------------------------------------------


def _memory_fronts(memory_size):
    w = sofo.State(jnp.ones((2, 2)))
    cell = lambda z, x: (jnp.tanh(z @ w.value + x),) * 2  # noqa: E731
    return {
        "transform": lambda: sofo.scale_by_sofo(tangent_size=4, memory_size=memory_size),
        "sofo": lambda: sofo.sofo(tangent_size=4, memory_size=memory_size),
        "sofo_grad": lambda: sofo.sofo_grad(lambda p: p, lambda y: jnp.sum(y**2), argnums=0, tangent_size=4,
                                            memory_size=memory_size),
        "sofo_grad_scan": lambda: sofo.transforms.sofo_grad_scan(
            cell, lambda y, t: jnp.sum((y - t) ** 2), grad_states=w, tangent_size=4, memory_size=memory_size
        ),
    }


@pytest.mark.parametrize("front", ["transform", "sofo", "sofo_grad", "sofo_grad_scan"])
def test_memory_size_equal_to_tangent_size_is_refused(front):
    """m = K leaves no fresh tangent once the memory is full (training stalls); every front refuses it."""
    with pytest.raises(ValueError, match=r"memory_size < tangent_size=4.*no new direction"):
        _memory_fronts(4)[front]()
    _memory_fronts(3)[front]()  # the largest allowed


# --- 5: a state from another configuration ---------------------------------------------------------------


def test_state_from_another_memory_configuration_is_refused():
    fun, loss_fn, params = problem()
    with_two = sofo.sofo(tangent_size=4, memory_size=2)
    without = sofo.sofo(tangent_size=4, memory_size=0)
    with_one = sofo.sofo(tangent_size=4, memory_size=1)
    call = lambda opt, state, p=params: opt.update(None, state, p, fun=fun, loss_fn=loss_fn)  # noqa: E731
    with pytest.raises(ValueError, match=r"sofo.sofo: the optimizer state holds a memory of 2 directions, but this "
                                         r"optimizer has memory_size=0.*options it was saved with"):
        call(without, with_two.init(params))
    with pytest.raises(ValueError, match=r"holds no memory, but this optimizer has memory_size=2"):
        call(with_two, without.init(params))
    with pytest.raises(ValueError, match=r"holds a memory of 1 directions, but this optimizer has memory_size=2"):
        call(with_two, with_one.init(params))
    other = {"w1": params["w1"], "w2": params["w2"], "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match=r"memory does not match params"):
        call(with_two, with_two.init(params), other)
    with pytest.raises(ValueError, match=r"the optimizer state's key has shape \(4,\)"):
        call(sofo.sofo(tangent_size=4, memory_size=2), sofo.sofo(tangent_size=4, memory_size=2,
                                                                key=jax.random.key(0, impl="rbg")).init(params))
    jax.eval_shape(lambda s: call(with_two, s), with_two.init(params))  # its own state is fine (shapes only)


# --- 6: the damping bounds ----------------------------------------------------------------------------


def test_max_damping_below_the_round_off_floor_is_refused():
    """K * eps is the floor (4 * 1.19e-7 = 4.8e-7 in float32): a max_damping under it cannot hold, so say so."""
    _, _, params = problem()
    params32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    bounds = sofo.AdaptiveDamping(min_damping=1e-9, max_damping=1e-7)
    opt = sofo.scale_by_sofo(tangent_size=4, adaptive_damping=bounds)
    with pytest.raises(ValueError, match=r"max_damping=1e-07\) lies below the damping floor K \* eps = 4 \* 1.19e-07"):
        opt.init(params32)
    opt.init(params)  # in float64 the floor (8.9e-16) is below max_damping
    with pytest.raises(ValueError, match=r"lies below the damping floor"):
        sofo.sofo_grad(lambda p: p, lambda y: jnp.sum(y**2), argnums=0, tangent_size=4,
                       adaptive_damping=bounds)(jnp.ones(6, jnp.float32))


def test_initial_damping_is_clipped_to_the_bounds():
    fun, loss_fn, params = problem()
    bounds = sofo.AdaptiveDamping(min_damping=1e-3, max_damping=1.0)
    for given, clipped in [(1e6, 1.0), (1e-12, 1e-3), (0.1, 0.1)]:
        state = sofo.scale_by_sofo(tangent_size=4, damping=given, adaptive_damping=bounds).init(params)
        assert float(state.damping) == clipped
        assert float(sofo.sofo(tangent_size=4, damping=given, adaptive_damping=bounds).init(params)[0].damping) == clipped
    # The brainstate-style front starts from the same clipped value (what its first call passes in), and
    # keeps later values within the bounds.
    g = sofo.sofo_grad(fun, loss_fn, argnums=0, tangent_size=4, key=5, damping=1e6, adaptive_damping=bounds)
    first = g.adaptive.inputs(params, params)[0]
    assert float(first) == 1.0
    g(params)
    assert bounds.min_damping <= g.adaptive.damping <= bounds.max_damping


# --- 7: checkpoints --------------------------------------------------------------------------------------


def _save_restore(fmt, state, target, tmp_path):
    if fmt == "flax":
        from flax import serialization

        return serialization.from_bytes(target, serialization.to_bytes(state))
    if fmt == "orbax":
        import orbax.checkpoint as ocp

        checkpointer = ocp.PyTreeCheckpointer()
        checkpointer.save(tmp_path / "ckpt", state)
        restored = checkpointer.restore(tmp_path / "ckpt", item=target)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), jax.tree_util.tree_leaves(restored))
    if fmt == "equinox":
        import equinox as eqx

        eqx.tree_serialise_leaves(tmp_path / "state.eqx", state)
        return eqx.tree_deserialise_leaves(tmp_path / "state.eqx", target)
    if fmt == "savez":
        np.savez(tmp_path / "state.npz", *jax.tree_util.tree_leaves(state))
        with np.load(tmp_path / "state.npz") as data:
            leaves = [data[f"arr_{i}"] for i in range(len(data.files))]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)
    assert fmt == "pickle"
    return pickle.loads(pickle.dumps(state))


OPTIMIZERS = {
    # a legacy PRNGKey, adaptive damping and memory: the state that failed to serialise
    "sofo": lambda: sofo.sofo(optax.linear_schedule(1.0, 0.5, 6), tangent_size=4, key=jax.random.PRNGKey(3),
                              memory_size=1),
    "transform": lambda: optax.chain(sofo.scale_by_sofo(tangent_size=4, key=jax.random.key(1), memory_size=2),
                                     optax.sgd(0.3)),
}


@pytest.fixture(scope="module")
def uninterrupted():
    """Per optimizer: the jitted step and the states and params of a 6-step run (computed once)."""
    fun, loss_fn, params = problem(4)
    runs = {}
    for name, make in OPTIMIZERS.items():
        opt = make()
        step = jax.jit(lambda s, p, opt=opt: opt.update(None, s, p, fun=fun, loss_fn=loss_fn))
        state, p, trace = opt.init(params), params, []
        for _ in range(6):
            updates, state = step(state, p)
            p = optax.apply_updates(p, updates)
            trace.append((state, p))
        runs[name] = (opt, step, params, trace)
    return runs


# orbax (which handled the typed key already) is slow to save, seconds per checkpoint: in the slow set.
CHECKPOINT_CASES = [(name, fmt) for name in OPTIMIZERS for fmt in ("flax", "equinox", "savez", "pickle")] + [
    pytest.param(name, "orbax", marks=pytest.mark.slow) for name in OPTIMIZERS
]


@pytest.mark.parametrize("name, fmt", CHECKPOINT_CASES)
def test_state_checkpoints_and_resumes_bit_identically(name, fmt, uninterrupted, tmp_path):
    pytest.importorskip({"flax": "flax", "orbax": "orbax.checkpoint", "equinox": "equinox"}.get(fmt, "numpy"))
    opt, step, params, trace = uninterrupted[name]
    saved_state, p = trace[2]
    restored = _save_restore(fmt, saved_state, opt.init(params), tmp_path)
    assert_trees_equal(restored, saved_state)
    state = restored
    for _ in range(3):
        updates, state = step(state, p)
        p = optax.apply_updates(p, updates)
    final_state, final_p = trace[-1]
    assert_trees_equal(p, final_p)
    assert_trees_equal(state, final_state)
    assert not np.array_equal(flat(final_p), flat(trace[2][1]))


# --- 8: an empty batch ----------------------------------------------------------------------------------


def test_empty_output_batch_is_refused_early():
    _, _, params = problem()
    empty = lambda p: jnp.zeros((0, 3)) @ p["w1"]  # noqa: E731
    opt = sofo.sofo(tangent_size=4)
    with pytest.raises(ValueError, match=r"fun returned no numbers \(output \(0, 4\)\): an empty batch"):
        opt.update(None, opt.init(params), params, fun=empty, loss_fn=jnp.sum)
    cell, w = rnn()
    empty_cell = lambda p, z, x: (jnp.tanh(z @ p + x), jnp.zeros((0, 3)) * p[0, 0])  # noqa: E731
    engine = sofo.value_and_sofo_grad_scan(empty_cell, lambda y, t: jnp.sum(y), tangent_size=2)
    with pytest.raises(ValueError, match=r"cell \(its y output\) returned no numbers"):
        engine(0, w, jnp.zeros(2), jnp.zeros((3, 2)), None)


# --- 9 and 10: inject_hyperparams and integer arguments ----------------------------------------------------


def test_inject_hyperparams_with_the_usual_static_args():
    fun, loss_fn, params = problem(2)
    injected = optax.inject_hyperparams(sofo.scale_by_sofo, static_args=("tangent_size", "loss", "sampler", "key"))(
        tangent_size=4, key=7
    )
    plain = sofo.scale_by_sofo(tangent_size=4, key=7)
    state = injected.init(params)
    assert_trees_equal(state.inner_state, plain.init(params))
    assert set(state.hyperparams) == {"damping", "learning_rate"}
    u_injected, _ = jax.jit(lambda s: injected.update(None, s, params, fun=fun, loss_fn=loss_fn))(state)
    # a descent direction: positive inner product with the gradient (from jax.grad)
    grad = jax.grad(lambda p: loss_fn(fun(p)))(params)
    assert float(jnp.dot(flat(u_injected), flat(grad))) > 0


def test_inject_hyperparams_without_static_args_names_static_args_for_tangent_size():
    with pytest.raises(ValueError, match=r"tangent_size must be a positive int.*list tangent_size in static_args"):
        optax.inject_hyperparams(sofo.sofo)(tangent_size=4).init(problem()[2])


@pytest.mark.parametrize("integer", [np.int64, np.int32])
def test_numpy_integers_are_accepted_alike(integer):
    """tangent_size and memory_size take numpy ints as Python ints, in every front, with the same result."""
    fun, loss_fn, params = problem(3)
    k, m = integer(4), integer(1)
    for make in (sofo.scale_by_sofo, sofo.sofo):
        state = make(tangent_size=k, memory_size=m).init(params)
        memory = (state if make is sofo.scale_by_sofo else state[0]).memory
        assert jax.tree_util.tree_leaves(memory)[0].shape[0] == 1
    assert sofo.sofo(tangent_size=integer(8)).init(params)[0].memory["w1"].shape[0] == 2  # the default, K // 4
    assert sofo.sofo_grad(fun, loss_fn, argnums=0, tangent_size=k, memory_size=m).adaptive.memory_size == 1
    numpy_opt, int_opt = sofo.scale_by_sofo(tangent_size=k, memory_size=m), sofo.scale_by_sofo(tangent_size=4, memory_size=1)
    assert_trees_equal(numpy_opt.init(params), int_opt.init(params))
    shapes = lambda opt: jax.eval_shape(  # noqa: E731
        lambda s: opt.update(None, s, params, fun=fun, loss_fn=loss_fn), opt.init(params)
    )
    assert shapes(numpy_opt) == shapes(int_opt)


# --- 11: errors from sofo, not from jax or the user's code ---------------------------------------------------


def test_unmask_errors_name_unmask_and_the_fix():
    own = {"a": optax.MaskedNode(), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"sofo.unmask\(params, full_params\).*must be a prefix.*sofo.unmask\(p, params\)"):
        sofo.unmask(own, {"c": jnp.ones(1), "b": jnp.ones(2)})
    with pytest.raises(TypeError, match=r"sofo.unmask\(params, full_params\) got full_params=None"):
        sofo.unmask(own, None)
    filled = sofo.unmask(own, {"a": jnp.zeros(3), "b": jnp.ones(2)})
    np.testing.assert_array_equal(filled["a"], jnp.zeros(3))


def _loss_needing_targets(y, t):
    return jnp.sum((y - t) ** 2)  # fails on t=None: never called with T=0


def test_scan_with_no_steps_and_no_targets_is_the_empty_sum():
    cell, w = rnn()
    z0, xs = jnp.zeros(2), jnp.zeros((0, 2))
    value, direction, _ = sofo.value_and_sofo_grad_scan(cell, _loss_needing_targets, tangent_size=2)(0, w, z0, xs, None)
    assert float(value) == 0.0
    np.testing.assert_array_equal(direction, jnp.zeros_like(w))
    opt = sofo.sofo(tangent_size=2, memory_size=0)  # with adaptive damping: its rollout is empty too
    updates, state = jax.jit(
        lambda s: opt.update(None, s, w, cell=cell, loss_fn=_loss_needing_targets, z0=z0, xs=xs, ys=None)
    )(opt.init(w))
    np.testing.assert_array_equal(updates, jnp.zeros_like(w))
    assert float(state[0].value) == 0.0


def test_sofo_grad_scan_with_no_steps_gives_the_engines_zero_direction():
    w = sofo.State(rnn()[1])
    cell = lambda z, x: (jnp.tanh(z @ w.value + x),) * 2  # noqa: E731
    g = sofo.transforms.sofo_grad_scan(cell, _loss_needing_targets, grad_states=w, tangent_size=2, key=0,
                                       return_value=True)
    direction, outputs = g(jnp.zeros(2), jnp.zeros((0, 2)), None)
    np.testing.assert_array_equal(direction, jnp.zeros((2, 2)))
    assert outputs.shape == (0, 2)


# --- 12: a loss of the wrong form; errors that name the function called --------------------------------------


def test_two_argument_loss_gets_an_error_naming_each_front_s_form():
    fun, _, params = problem()
    two = lambda y, t: jnp.mean((y - t) ** 2)  # noqa: E731
    for name, opt in (("sofo.sofo", sofo.sofo(tangent_size=4)), ("sofo.scale_by_sofo", sofo.scale_by_sofo(tangent_size=4))):
        with pytest.raises(TypeError, match=rf"{name} with fun= calls loss_fn\(outputs\).*loss_fn\(y_t, ys_t\).*"
                                            rf"loss_fn\(outputs, targets\) -> scalar for sofo.optim.SOFO"):
            opt.update(None, opt.init(params), params, fun=fun, loss_fn=two)
    cell, w = rnn()
    opt = sofo.sofo(tangent_size=2)
    with pytest.raises(TypeError, match=r"sofo.sofo with cell= calls loss_fn\(y_t, ys_t\)"):
        opt.update(None, opt.init(w), w, cell=cell, loss_fn=lambda y: jnp.sum(y), z0=jnp.zeros(2), xs=jnp.zeros((3, 2)))
    with pytest.raises(TypeError, match=r"sofo.transforms.sofo_grad with its model fun calls loss_fn\(outputs\)"):
        sofo.sofo_grad(fun, two, argnums=0)
    with pytest.raises(TypeError, match=r"sofo.value_and_sofo_grad with fun calls loss_fn\(outputs\)"):
        sofo.value_and_sofo_grad(fun, two)


def test_errors_for_sofo_sofo_name_sofo_sofo():
    with pytest.raises(TypeError, match=r"sofo.sofo's init needs the parameters"):
        sofo.sofo(tangent_size=4).init(None)
    with pytest.raises(ValueError, match=r"learning_rate must be a positive float"):
        sofo.sofo(-1.0, tangent_size=4)
    fun, loss_fn, params = problem()
    opt = sofo.sofo(tangent_size=4)
    with pytest.raises(TypeError, match=r"sofo.sofo's update needs loss_fn="):
        opt.update(None, opt.init(params), params, fun=fun)
