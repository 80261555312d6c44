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
    custom = optax.chain(sofo.transform(tangent_size=6, damping=1e-2, key=1), optax.sgd(0.3, momentum=0.5))
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


def test_readme_migration_block_runs():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = text.split("## Migrating from brainstate\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace = {}
    exec(compile(block, "README.md (Migrating from brainstate)", "exec"), namespace)
    assert namespace["pred"].shape == (8, 2)
    assert float(namespace["loss"]) < float(namespace["loss_fn"](namespace["pred"]))
