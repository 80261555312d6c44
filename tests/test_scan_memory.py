"""The scan engine's compiled temp memory is flat in T; backprop through time's is not (the control).

Only compiles, from shapes alone (nothing runs): XLA's `memory_analysis()` of the jitted step is
deterministic. The sizes are small for speed, but a buffer linear in T would stand out: at T=1600 the
latent tangents over time alone would take T*K*B*N*4 = 52 MB against a step of well under 1 MB.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import sofo

HIDDEN, BATCH, TANGENTS, FEATURES = 32, 16, 16, 4
SHORT, LONG = 100, 1600


def cell(params, z, x):
    z_new = jnp.tanh(z @ params["W"].T + x @ params["U"].T + params["b"])
    return z_new, z_new @ params["C"].T


def mse(y, target):
    return 0.5 * jnp.sum((y - target) ** 2) / y.shape[0]


def rollout(params, z0, xs):
    return jax.lax.scan(lambda z, x: cell(params, z, x), z0, xs)[1]


def param_shapes():
    return {
        "W": jax.ShapeDtypeStruct((HIDDEN, HIDDEN), jnp.float32),
        "U": jax.ShapeDtypeStruct((HIDDEN, FEATURES), jnp.float32),
        "b": jax.ShapeDtypeStruct((HIDDEN,), jnp.float32),
        "C": jax.ShapeDtypeStruct((FEATURES, HIDDEN), jnp.float32),
    }


def data_shapes(time_steps):
    """z0, xs, ys."""
    z0 = jax.ShapeDtypeStruct((BATCH, HIDDEN), jnp.float32)
    xs = jax.ShapeDtypeStruct((time_steps, BATCH, FEATURES), jnp.float32)
    return z0, xs, xs


# Buffer assignment (hence memory_analysis) is done on the optimised HLO, before LLVM: skipping the
# backend's code optimisation leaves the numbers unchanged and cuts each compile several-fold on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def temp_bytes(step, *args):
    """Compiled peak temporary bytes of `jax.jit(step)` for `args`; skips where the backend has none."""
    stats = jax.jit(step).lower(*args).compile(compiler_options=FAST_COMPILE).memory_analysis()
    if stats is None:
        pytest.skip(f"memory_analysis() returns None on the {jax.default_backend()} backend: no memory numbers.")
    return stats.temp_size_in_bytes


def sofo_temp(time_steps):
    step = sofo.value_and_sofo_grad_scan(cell, mse, tangent_size=TANGENTS, curvature="mse")
    key = jax.eval_shape(jax.random.key, 0)
    return temp_bytes(step, key, param_shapes(), *data_shapes(time_steps))


def bptt_temp(time_steps):
    optimizer = optax.adam(1e-3)

    def step(params, opt_state, z0, xs, ys):
        loss = lambda p: jnp.sum(jax.vmap(mse)(rollout(p, z0, xs), ys))  # noqa: E731  (sum over time)
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return value, optax.apply_updates(params, updates), opt_state

    params = param_shapes()
    return temp_bytes(step, params, jax.eval_shape(optimizer.init, params), *data_shapes(time_steps))


def test_scan_engine_temp_memory_is_flat_in_time():
    short, long = sofo_temp(SHORT), sofo_temp(LONG)
    assert short > 0
    assert abs(long - short) <= 0.1 * short, (
        f"scan engine temp memory grew with T: {short} bytes at T={SHORT}, {long} bytes at T={LONG}"
    )


def test_bptt_temp_memory_grows_with_time():
    # The control: the same measurement sees reverse mode storing every step's activations.
    short, long = bptt_temp(SHORT), bptt_temp(LONG)
    assert long > 5 * short, f"BPTT temp memory: {short} bytes at T={SHORT}, {long} bytes at T={LONG}"


def adaptive_temp(time_steps):
    """The recommended optimiser (LM damping: one extra rollout; memory: one stored direction) per step."""
    optimizer = sofo.sofo(tangent_size=TANGENTS, memory_size=1)

    def step(params, opt_state, z0, xs, ys):
        updates, opt_state = optimizer.update(None, opt_state, params, cell=cell, loss_fn=mse, z0=z0, xs=xs, ys=ys)
        return optax.apply_updates(params, updates), opt_state

    params = param_shapes()
    return temp_bytes(step, params, jax.eval_shape(optimizer.init, params), *data_shapes(time_steps))


def test_adaptive_optimizer_temp_memory_is_flat_in_time():
    short, long = adaptive_temp(SHORT), adaptive_temp(LONG)
    assert short > 0
    assert abs(long - short) <= 0.1 * short, (
        f"sofo.sofo temp memory grew with T: {short} bytes at T={SHORT}, {long} bytes at T={LONG}"
    )
