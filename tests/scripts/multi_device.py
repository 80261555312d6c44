"""Run in a subprocess with 4 forced host devices; prints one JSON line of max relative differences."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import sofo  # noqa: E402

jax.config.update("jax_enable_x64", True)
assert jax.device_count() == 4, jax.devices()
mesh = Mesh(jax.devices(), ("data",))
keys = jax.random.split(jax.random.key(0), 4)
params = {"w1": jax.random.normal(keys[0], (5, 16)) / 2, "w2": jax.random.normal(keys[1], (16, 3)) / 4}
x = jax.random.normal(keys[2], (32, 5))
labels = jax.random.randint(keys[3], (32,), 0, 3)
K = 24


def model(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


def ce(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))


def rel(a, b):
    a, b = ravel_pytree(a)[0], ravel_pytree(b)[0]
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def step(x, labels, **kw):
    return sofo.value_and_sofo_grad(lambda p: model(p, x), lambda y: ce(y, labels), tangent_size=K, curvature="ce", **kw)


single = jax.jit(lambda key, p: step(x, labels)(key, p))(7, params)
results = {}

# 1. Data parallel under jit: the batch is sharded, XLA inserts the reductions.
xs = jax.device_put(x, NamedSharding(mesh, P("data")))
ls = jax.device_put(labels, NamedSharding(mesh, P("data")))
jitted = jax.jit(lambda key, p, x, l: step(x, l)(key, p))
out = jitted(7, params, xs, ls)
hlo = jitted.lower(7, params, xs, ls).compile().as_text()
results["jit_data"] = rel(out[1], single[1])
results["jit_data_collective"] = ("all-reduce" in hlo) or ("reduce-scatter" in hlo)


# 2. Data parallel under shard_map with axis_name: explicit pmean of value, curvature, derivatives.
def local(key, p, x, l):
    value, direction, info = step(x, l, axis_name="data")(key, p)
    return value, direction, info.top_eigenvalue


# jax.shard_map is the public name in current jax; the declared floor (0.4.31) has it under experimental,
# and there its replication check knows no rule for the pmax the overflow guard takes: check_rep=False.
shard_map = getattr(jax, "shard_map", None)
if shard_map is None:
    import functools

    from jax.experimental.shard_map import shard_map as _old_shard_map

    shard_map = functools.partial(_old_shard_map, check_rep=False)
mapped = jax.jit(
    shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P(), P()))
)
value, direction, top = mapped(jax.random.key(7), params, xs, ls)
results["shard_map_data"] = rel(direction, single[1])
results["shard_map_value"] = float(abs(value - single[0]) / abs(single[0]))

# 3. Tangent parallel: the K tangents split over the devices.
kmesh = Mesh(jax.devices(), ("k",))
tangent_parallel = jax.jit(step(x, labels, tangent_sharding=NamedSharding(kmesh, P("k"))))
out = tangent_parallel(7, params)
hlo = tangent_parallel.lower(7, params).compile().as_text()
results["tangent_parallel"] = rel(out[1], single[1])
results["tangent_collective"] = any(op in hlo for op in ("all-gather", "all-reduce", "all-to-all"))


# 4. Recurrent engine, data parallel under jit.
def cell(p, z, x):
    z = jnp.tanh(z @ p["rec"] + x @ p["inp"])
    return z, z @ p["out"]


rnn = {"rec": jax.random.normal(keys[0], (8, 8)) / 3, "inp": jax.random.normal(keys[1], (2, 8)), "out": jnp.ones((8, 2)) / 8}
seq_x = jax.random.normal(keys[2], (10, 16, 2))
seq_y = jax.random.normal(keys[3], (10, 16, 2))
scan_step = sofo.value_and_sofo_grad_scan(cell, lambda y, t: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1)), tangent_size=16)
single_scan = jax.jit(scan_step)(3, rnn, jnp.zeros((16, 8)), seq_x, seq_y)
shard = NamedSharding(mesh, P(None, "data"))
sharded_scan = jax.jit(scan_step)(
    3,
    rnn,
    jax.device_put(jnp.zeros((16, 8)), NamedSharding(mesh, P("data"))),
    jax.device_put(seq_x, shard),
    jax.device_put(seq_y, shard),
)
results["scan_jit_data"] = rel(sharded_scan[1], single_scan[1])

print(json.dumps(results))
sys.exit(0)
