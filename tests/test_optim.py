"""sofo.optim.SOFO / SOFOScan: braintools' call pattern over sofo's optax front."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofo

brainstate = pytest.importorskip("brainstate")
# Importing brainstate 0.5 switches jax_enable_x64 off (its default precision is 32; 0.6 leaves it as
# it is); the suite runs in float64 (conftest), so set it the brainstate way, which keeps its
# environment consistent on both lines.
brainstate.environ.set(precision=64)


def mse(y, t):
    return 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))


def _regression():
    x = jax.random.normal(jax.random.key(0), (64, 3))
    w_true = jax.random.normal(jax.random.key(1), (3, 2))
    return x, jnp.tanh(x @ w_true)


def test_sofo_trains_a_linear_module_and_writes_the_states():
    brainstate.random.seed(0)
    net = brainstate.nn.Linear(3, 2)
    x, y = _regression()
    opt = sofo.optim.SOFO(net, mse, lr=1.0, tangent_size=8, damping=1e-3, key=0)
    opt.register_trainable_weights(net.states(brainstate.ParamState))
    before = dict(net.weight.value)
    losses = [float(opt.step(x, y)) for _ in range(25)]
    # The returned loss is the loss before each step, computed independently here for the first one.
    np.testing.assert_allclose(losses[0], mse(x @ before["weight"] + before["bias"], y), rtol=1e-5)
    after = net.weight.value
    assert not np.allclose(after["weight"], before["weight"])
    assert not isinstance(after["weight"], jax.core.Tracer)
    final = float(mse(net(x), y))
    assert final < 0.2 * losses[0]


def test_sofo_step_is_the_optax_step():
    """One opt.step equals sofo.sofo (the default optimizer) applied to the pure function (same key)."""
    brainstate.random.seed(1)
    net = brainstate.nn.Linear(3, 2)
    x, y = _regression()
    params = dict(net.weight.value)
    opt = sofo.optim.SOFO(net, mse, lr=0.5, tangent_size=4, damping=1e-3, key=3)
    opt.register_trainable_weights({"w": net.weight})
    opt.step(x, y)
    ref = sofo.sofo(0.5, tangent_size=4, damping=1e-3, key=3)
    state = ref.init({"w": params})
    fun = lambda p: x @ p["w"]["weight"] + p["w"]["bias"]
    updates, _ = ref.update(None, state, {"w": params}, fun=fun, loss_fn=lambda o: mse(o, y))
    expected = optax.apply_updates({"w": params}, updates)["w"]
    np.testing.assert_allclose(net.weight.value["weight"], expected["weight"], rtol=1e-5, atol=1e-7)


def test_custom_optimizer_and_no_recompile():
    brainstate.random.seed(2)
    net = brainstate.nn.Linear(3, 2)
    x, y = _regression()
    custom = optax.chain(sofo.scale_by_sofo(tangent_size=6, damping=1e-2, key=1), optax.sgd(0.3, momentum=0.5))
    opt = sofo.optim.SOFO(net, mse, optimizer=custom)
    opt.register_trainable_weights(net.states(brainstate.ParamState))
    l0 = opt.step(x, y)
    size = len(opt._cache)
    for _ in range(10):
        loss = opt.step(x, y)
    assert len(opt._cache) == size == 1
    assert float(loss) < float(l0)


def test_sofo_scan_trains_a_recurrent_cell():
    key = jax.random.split(jax.random.key(5), 4)
    w_rec = brainstate.ParamState(0.2 * jax.random.normal(key[0], (4, 4)))
    w_in = brainstate.ParamState(0.5 * jax.random.normal(key[1], (2, 4)))
    w_out = brainstate.ParamState(0.5 * jax.random.normal(key[2], (4, 1)))

    def cell(z, x):
        z = jnp.tanh(z @ w_rec.value + x @ w_in.value)
        return z, z @ w_out.value

    xs = jax.random.normal(key[3], (10, 16, 2))
    ys = jnp.cumsum(xs[..., :1], axis=0) * 0.3  # a leaky integrator target
    z0 = jnp.zeros((16, 4))
    opt = sofo.optim.SOFOScan(cell, mse, lr=1.0, tangent_size=12, damping=1e-3)
    opt.register_trainable_weights({"rec": w_rec, "in": w_in, "out": w_out})
    # braintools' convention: loss_fn on the outputs of all steps stacked into (T * batch, out); for a
    # loss that is a mean over rows that is the mean over time of the per-step losses.
    first = float(mse(jax.lax.scan(cell, z0, xs)[1].reshape(-1, 1), ys.reshape(-1, 1)))  # before any step
    losses = [float(opt.step(z0, (xs, ys))) for _ in range(30)]
    np.testing.assert_allclose(losses[0], first, rtol=1e-5)

    def rollout(z, x):
        return cell(z, x)

    final = float(jnp.mean(jax.vmap(mse)(jax.lax.scan(rollout, z0, xs)[1], ys)))
    assert final < 0.5 * losses[0]


def test_errors():
    net = brainstate.nn.Linear(3, 2)
    opt = sofo.optim.SOFO(net, mse, tangent_size=4)
    with pytest.raises(RuntimeError, match="register_trainable_weights"):
        opt.step(jnp.ones((2, 3)), jnp.ones((2, 2)))
    opt.register_trainable_weights(net.states(brainstate.ParamState))
    with pytest.raises(RuntimeError, match="eagerly"):
        jax.jit(opt.step)(jnp.ones((2, 3)), jnp.ones((2, 2)))


def test_docs_migration_block_runs():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / "guides" / "migrating.md").read_text()
    section = text.split("## brainstate's States and modules\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace = {}
    exec(compile(block, "docs/guides/migrating.md (brainstate's States and modules)", "exec"), namespace)
    assert namespace["pred"].shape == (8, 2)
    assert float(namespace["loss"]) < float(namespace["loss_fn"](namespace["pred"]))


# -- issue 17, findings 1 and 3: nothing silent -------------------------------------------------------


class _Counting(brainstate.nn.Module):
    """A linear model that counts its calls and keeps its last output in States it writes."""

    def __init__(self):
        super().__init__()
        self.linear = brainstate.nn.Linear(3, 2)
        self.calls = brainstate.State(jnp.asarray(0))
        self.last = brainstate.State(jnp.zeros((64, 2)))

    def __call__(self, x):
        out = self.linear(x)
        self.calls.value = self.calls.value + 1
        self.last.value = out
        return out


def test_states_the_model_writes_are_kept_eagerly_and_under_brainstate_jit():
    brainstate.random.seed(3)
    model = _Counting()
    x, y = _regression()
    opt = sofo.optim.SOFO(model, mse, tangent_size=4, key=0)
    opt.register_trainable_weights(model.states(brainstate.ParamState))
    for _ in range(3):
        before = {k: v for k, v in model.linear.weight.value.items()}
        opt.step(x, y)
    assert int(model.calls.value) == 3  # once per step, as brainstate's transforms keep it
    # the value written is the model's output at the weights before the step, recomputed by hand
    np.testing.assert_allclose(model.last.value, x @ before["weight"] + before["bias"], rtol=1e-12)
    step = brainstate.transform.jit(lambda a, b: opt.step(a, b))
    step(x, y)
    brainstate.transform.for_loop(lambda i: opt.step(x, y), jnp.arange(2))
    assert int(model.calls.value) == 6 and int(opt.step_count.value) == 6


def test_scan_cell_that_writes_a_state_is_refused_and_nothing_moves():
    w = brainstate.ParamState(jnp.ones((2, 2)))
    seen = brainstate.State(jnp.asarray(0.0))

    def cell(z, x):
        seen.value = seen.value + 1.0
        z = jnp.tanh(z @ w.value + x)
        return z, z

    opt = sofo.optim.SOFOScan(cell, mse, tangent_size=2)
    opt.register_trainable_weights(w)
    with pytest.raises(ValueError, match="cannot write States"):
        opt.step(jnp.zeros((4, 2)), (jnp.ones((3, 4, 2)), jnp.zeros((3, 4, 2))))
    np.testing.assert_array_equal(w.value, jnp.ones((2, 2)))
    assert float(seen.value) == 0.0 and int(opt.step_count.value) == 0


def test_a_gradient_optimizer_gets_the_gradient():
    """optimizer=optax.adam(...) is fed jax.grad of the loss (it used to get zeros and never move)."""
    brainstate.random.seed(4)
    net = brainstate.nn.Linear(3, 2)
    x, y = _regression()
    params = {"w": dict(net.weight.value)}
    opt = sofo.optim.SOFO(net, mse, optimizer=optax.adam(1e-2))
    opt.register_trainable_weights({"w": net.weight})
    opt.step(x, y)
    # adam's first step on the gradient computed independently
    loss_of = lambda p: mse(x @ p["w"]["weight"] + p["w"]["bias"], y)
    ref = optax.adam(1e-2)
    updates, _ = ref.update(jax.grad(loss_of)(params), ref.init(params), params)
    expected = optax.apply_updates(params, updates)["w"]
    np.testing.assert_allclose(net.weight.value["weight"], expected["weight"], rtol=1e-10)
    losses = [float(opt.step(x, y)) for _ in range(20)]
    assert losses[-1] < 0.8 * losses[0]


def test_a_gradient_optimizer_in_sofoscan_gets_the_gradient():
    w = brainstate.ParamState(0.3 * jnp.eye(2))
    xs, ys = jnp.ones((3, 4, 2)), 0.5 * jnp.ones((3, 4, 2))
    z0 = jnp.zeros((4, 2))

    def cell(z, x):
        z = jnp.tanh(z @ w.value + x)
        return z, z

    def stacked_loss(m):  # braintools' convention, unrolled by hand
        z, outs = z0, []
        for t in range(3):
            z = jnp.tanh(z @ m + xs[t])
            outs.append(z)
        return mse(jnp.concatenate(outs), ys.reshape(-1, 2))

    opt = sofo.optim.SOFOScan(cell, mse, optimizer=optax.sgd(0.1))
    opt.register_trainable_weights(w)
    w0 = w.value
    loss = opt.step(z0, (xs, ys))
    np.testing.assert_allclose(loss, stacked_loss(w0), rtol=1e-12)
    np.testing.assert_allclose(w.value, w0 - 0.1 * jax.grad(stacked_loss)(w0), rtol=1e-10)


# -- issue 18: braintools 0.4's constructor and conventions ------------------------------------------


def test_braintools_positional_order_and_keywords():
    brainstate.random.seed(5)
    net = brainstate.nn.Linear(3, 2)
    x, y = _regression()
    opt = sofo.optim.SOFO(net, mse, 1.0, "mse", 6, 1e-3, 0.0, False, 0.0, None, None, 0)
    assert (opt.lr, opt.loss, opt.tangent_size, opt.damping, opt.key) == (1.0, "mse", 6, 1e-3, 0)
    with pytest.raises(TypeError, match="tangent_size=... by keyword"):
        sofo.optim.SOFO(net, mse, 1.0, 8)  # sofo's old order (lr, tangent_size)
    for bad in (dict(momentum=-0.1), dict(momentum=1.0), dict(weight_decay=-1.0), dict(grad_clip_norm=0.0),
                dict(lr=-1e-3), dict(loss="bad")):
        with pytest.raises(ValueError):
            sofo.optim.SOFO(net, mse, **bad)
    for key in (3, jax.random.key(3), jax.random.PRNGKey(3)):  # int, typed and legacy keys
        o = sofo.optim.SOFO(net, mse, tangent_size=4, key=key)
        o.register_trainable_weights(net.states(brainstate.ParamState))
        assert np.isfinite(float(o.step(x, y)))


def test_momentum_weight_decay_and_clipping_follow_braintools_order():
    """Two steps with the extras equal the optax chain written out by hand (fixed damping, no memory)."""
    brainstate.random.seed(6)
    net = brainstate.nn.Linear(3, 2)
    x, y = _regression()
    params = {"w": dict(net.weight.value)}
    options = dict(tangent_size=4, damping=1e-2, key=2, adaptive_damping=False, memory_size=0)
    opt = sofo.optim.SOFO(net, mse, lr=0.5, momentum=0.5, nesterov=True, weight_decay=0.1,
                          grad_clip_norm=0.3, grad_clip_value=0.05, **options)
    opt.register_trainable_weights({"w": net.weight})
    ref = optax.chain(
        sofo.scale_by_sofo(sampler="balanced", curvature="mse", learning_rate=0.5, **options),
        optax.clip_by_global_norm(0.3), optax.clip(0.05), optax.trace(0.5, nesterov=True),
        optax.add_decayed_weights(0.1), optax.scale(-0.5),
    )
    state = ref.init(params)
    fun = lambda p: x @ p["w"]["weight"] + p["w"]["bias"]
    for _ in range(2):
        opt.step(x, y)
        updates, state = ref.update(None, state, params, fun=fun, loss_fn=lambda o: mse(o, y))
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(net.weight.value["weight"], params["w"]["weight"], rtol=1e-10)


def test_lr_schedule_and_state_dict_round_trip():
    brainstate.random.seed(7)
    x, y = _regression()
    schedule = lambda count: 0.8 * 0.5 ** count  # an optax-style schedule of the step count
    nets = [brainstate.nn.Linear(3, 2) for _ in range(2)]
    nets[1].weight.value = dict(nets[0].weight.value)
    opt = sofo.optim.SOFO(nets[0], mse, lr=schedule, tangent_size=4, key=1, adaptive_damping=False)
    opt.register_trainable_weights(nets[0].states(brainstate.ParamState))
    ref = sofo.sofo(schedule, tangent_size=4, key=1, adaptive_damping=False)
    params = dict(nets[1].weight.value)
    state = ref.init(params)
    fun = lambda p: x @ p["weight"] + p["bias"]
    for _ in range(2):
        opt.step(x, y)
        updates, state = ref.update(None, state, params, fun=fun, loss_fn=lambda o: mse(o, y))
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(nets[0].weight.value["weight"], params["weight"], rtol=1e-10)
    assert int(opt.step_count.value) == 2 and float(opt.current_lr) == pytest.approx(0.2)
    # save, step on, restore, step again: the same trajectory
    saved, weights = opt.state_dict(), dict(nets[0].weight.value)
    after = [float(opt.step(x, y)) for _ in range(2)]
    nets[0].weight.value = weights
    opt.load_state_dict(saved)
    assert int(opt.step_count.value) == 2
    np.testing.assert_allclose([float(opt.step(x, y)) for _ in range(2)], after, rtol=1e-12)
    other = sofo.optim.SOFO(nets[1], mse, tangent_size=4, key=1, memory_size=0)  # another configuration
    other.register_trainable_weights(nets[1].states(brainstate.ParamState))
    with pytest.raises(ValueError, match="structure"):
        other.load_state_dict(saved)


def test_sofoscan_loss_conventions_share_one_direction():
    """time_loss "mean" (default) reports braintools' stacked loss, "sum" T times it, "stacked" runs
    braintools' unrolled form; one step moves the weights identically in all three (the common scale
    cancels, so the curvature scale matches braintools')."""
    key = jax.random.split(jax.random.key(8), 3)
    xs = jax.random.normal(key[0], (5, 4, 2))
    ys = jax.random.normal(key[1], (5, 4, 1))
    z0 = jnp.zeros((4, 3))
    w0 = {"rec": 0.3 * jax.random.normal(key[2], (3, 3)), "in": jnp.ones((2, 3)), "out": jnp.ones((3, 1))}
    stacked = lambda w: mse(jax.lax.scan(lambda z, x: (
        jnp.tanh(z @ w["rec"] + x @ w["in"]), jnp.tanh(z @ w["rec"] + x @ w["in"]) @ w["out"]), z0, xs)[1]
        .reshape(-1, 1), ys.reshape(-1, 1))
    results = {}
    for time_loss in ("mean", "sum", "stacked"):
        w = {k: brainstate.ParamState(v) for k, v in w0.items()}

        def cell(z, x, w=w):
            z = jnp.tanh(z @ w["rec"].value + x @ w["in"].value)
            return z, z @ w["out"].value

        opt = sofo.optim.SOFOScan(cell, mse, tangent_size=8, key=4, time_loss=time_loss)
        opt.register_trainable_weights(w)
        results[time_loss] = float(opt.step(z0, (xs, ys))), {k: v.value for k, v in w.items()}
    np.testing.assert_allclose(results["mean"][0], stacked(w0), rtol=1e-12)
    np.testing.assert_allclose(results["stacked"][0], stacked(w0), rtol=1e-12)
    np.testing.assert_allclose(results["sum"][0], 5 * stacked(w0), rtol=1e-12)
    for other in ("sum", "stacked"):
        for k in w0:
            np.testing.assert_allclose(results[other][1][k], results["mean"][1][k], rtol=1e-7, atol=1e-10)


def test_a_non_finite_learning_rate_leaves_the_states_exactly_unchanged():
    """A schedule that gives NaN at step 1: that step is rejected and the weights stay bit-identical, even with
    momentum carrying an earlier direction (issue 17, finding 2, for sofo.optim's own chain)."""
    brainstate.random.seed(7)
    net = brainstate.nn.Linear(3, 2)
    x, y = _regression()
    schedule = lambda count: jnp.where(count == 1, jnp.nan, 0.5)  # noqa: E731
    opt = sofo.optim.SOFO(net, mse, lr=schedule, tangent_size=4, momentum=0.5, key=3)
    opt.register_trainable_weights({"w": net.weight})
    values = [jax.tree_util.tree_map(np.asarray, dict(net.weight.value))]
    for _ in range(3):
        opt.step(x, y)
        values.append(jax.tree_util.tree_map(np.asarray, dict(net.weight.value)))
    moved = lambda a, b: any(not np.array_equal(a[k], b[k]) for k in a)  # noqa: E731
    assert moved(values[0], values[1]) and moved(values[2], values[3])
    for k in values[1]:
        np.testing.assert_array_equal(values[2][k], values[1][k])
        assert np.all(np.isfinite(values[3][k]))
