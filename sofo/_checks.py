"""Argument checks shared by every front: each raises before any work, naming the argument and the fix."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LOSSES = ("mse", "ce", "exact")
SAMPLERS = ("normal", "layerwise", "balanced", "orthonormal", "rank1", "rank2", "rank4")


def check_config(*, tangent_size: Any, damping: Any, loss: Any, sampler: Any) -> None:
    """Validates the engine's hyperparameters."""
    if isinstance(tangent_size, bool) or not isinstance(tangent_size, numbers.Integral) or tangent_size < 1:
        raise ValueError(
            f"tangent_size must be a positive int (the number K of random tangents per step); "
            f"got {tangent_size!r}. Pass e.g. tangent_size=100."
        )
    check_damping(damping)
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(
            f"loss={loss!r} is not a known curvature; choose one of {', '.join(map(repr, LOSSES))} "
            f"('mse' for 0.5*mean squared error, 'ce' for softmax cross-entropy, 'exact' for any loss)."
        )
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(
            f"sampler={sampler!r} is not a known tangent sampler; choose one of "
            f"{', '.join(map(repr, SAMPLERS))}."
        )


def check_damping(damping: Any, name: str = "damping") -> None:
    """Validates a damping: a finite non-negative real, or a float jax scalar (checked when concrete).

    A traced scalar (under `jax.jit`, `optax.inject_hyperparams` or an adaptive schedule) cannot be
    inspected; its value is the caller's responsibility.
    """
    message = (
        f"{name} must be a finite non-negative float (relative to the top curvature eigenvalue); "
        f"got {damping!r}. Pass e.g. {name}=1e-5."
    )
    if isinstance(damping, (bool, np.bool_)):
        raise ValueError(message)
    if isinstance(damping, numbers.Real):
        if not math.isfinite(float(damping)) or float(damping) < 0:
            raise ValueError(message)
        return
    dtype = getattr(damping, "dtype", None)
    if dtype is None or jnp.shape(damping) != () or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(message)
    if isinstance(damping, jax.core.Tracer):
        return
    value = float(damping)
    if not math.isfinite(value) or value < 0:
        raise ValueError(message)


def check_memory_size(memory_size: Any, tangent_size: int, prefix: str = "") -> None:
    """Validates `memory_size`: an int between 0 and K (remembered directions replace random tangents)."""
    if isinstance(memory_size, bool) or not isinstance(memory_size, int) or not 0 <= memory_size <= tangent_size:
        raise ValueError(
            f"{prefix}memory_size must be an int between 0 and tangent_size={tangent_size} (past directions that "
            f"replace that many random tangents); got {memory_size!r}. Pass e.g. memory_size=1 (under "
            f"optax.inject_hyperparams, list it in static_args: it sets the state's shape)."
        )


def check_chunk_size(tangent_chunk_size: Any) -> None:
    """Validates `tangent_chunk_size` (None, or a positive int)."""
    if tangent_chunk_size is None:
        return
    if (
        isinstance(tangent_chunk_size, bool)
        or not isinstance(tangent_chunk_size, numbers.Integral)
        or tangent_chunk_size < 1
    ):
        raise ValueError(
            f"tangent_chunk_size must be None (all tangents at once) or a positive int; got "
            f"{tangent_chunk_size!r}. Pass e.g. tangent_chunk_size=32 to push 32 tangents at a time."
        )


def check_tangent_sharding(tangent_sharding: Any) -> None:
    """Validates `tangent_sharding` (None, or a NamedSharding whose spec names the tangent axis first)."""
    if tangent_sharding is None:
        return
    if not isinstance(tangent_sharding, jax.sharding.NamedSharding) or not tangent_sharding.spec:
        raise TypeError(
            f"tangent_sharding must be None or a jax.sharding.NamedSharding whose PartitionSpec names the "
            f"mesh axis for the K tangents first, e.g. NamedSharding(mesh, PartitionSpec('k')); got "
            f"{tangent_sharding!r}."
        )


def _check_seed(seed: int) -> int:
    """An int seed must fit the int type a key is seeded from, or distinct seeds would collide."""
    bits = 64 if jax.config.jax_enable_x64 else 32
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if not low <= seed <= high:
        raise ValueError(
            f"int seed {seed} is outside [{low}, {high}], the range a key holds with jax_enable_x64="
            f"{bits == 64} (outside it, distinct seeds collide or overflow). Pass a seed in that range, or "
            f"a key, e.g. jax.random.fold_in(jax.random.key(0), seed % 2**31)."
        )
    return seed


def as_key(key: Any) -> jax.Array:
    """Returns a typed PRNG key from a typed key, a legacy uint32[2] key or an int seed."""
    if isinstance(key, bool) or isinstance(key, np.bool_):
        raise TypeError(f"key must be a jax.random.key, a legacy PRNGKey or an int seed; got the bool {key!r}.")
    if isinstance(key, numbers.Integral):
        return jax.random.key(_check_seed(int(key)))
    dtype = getattr(key, "dtype", None)
    shape = getattr(key, "shape", None)
    if dtype is None or shape is None:
        raise TypeError(
            f"key must be a jax.random.key, a legacy PRNGKey or an int seed; got {type(key).__name__}. "
            f"Pass e.g. key=jax.random.key(0)."
        )
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(
                f"key must be a single PRNG key; got a key array of shape {shape}. To run several keys, "
                f"jax.vmap the returned function over them."
            )
        return key
    if jnp.issubdtype(dtype, jnp.integer) and shape == ():
        return jax.random.key(key)
    if dtype == jnp.uint32 and shape == (2,):
        return jax.random.wrap_key_data(key)
    raise ValueError(
        f"key must be a jax.random.key, a legacy uint32[2] PRNGKey or an int seed; got an array of "
        f"dtype {dtype} and shape {shape}. Pass e.g. key=jax.random.key(0)."
    )


def check_params(params: Any, name: str = "params") -> int:
    """Checks that `params` is a non-empty pytree of floating arrays; returns the number of parameters."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError(f"{name} has no array leaves (got {params!r}); SOFO needs at least one float parameter.")
    total = 0
    for path, leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None and isinstance(leaf, float):
            dtype = jnp.result_type(leaf)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            where = jax.tree_util.keystr(path)
            raise TypeError(
                f"{name}{where} has dtype {dtype if dtype is not None else type(leaf).__name__}; every leaf of "
                f"{name} must be a floating array. Cast it (e.g. jnp.asarray(x, jnp.float32)) or close over it "
                f"in the model function instead of passing it as a parameter."
            )
        total += int(np.prod(jnp.shape(leaf)))
    if total == 0:
        raise ValueError(f"{name} holds no numbers (every leaf is empty); SOFO needs at least one parameter.")
    return total


def check_tangent_count(tangent_size: int, sampler: str, num_params: int) -> None:
    """Orthonormal tangents need K <= n: there are only n orthogonal directions."""
    if sampler == "orthonormal" and tangent_size > num_params:
        raise ValueError(
            f"sampler='orthonormal' needs tangent_size <= the number of parameters; got tangent_size="
            f"{tangent_size} for {num_params} parameters. Lower tangent_size to at most {num_params} or use "
            f"sampler='normal'."
        )


def check_memory(memory: Any, params: Any, tangent_size: int) -> None:
    """Checks a memory of stored directions: params' structure, a leading axis m <= K on every leaf."""
    if memory is None:
        return
    params_def = jax.tree_util.tree_structure(params)
    memory_def = jax.tree_util.tree_structure(memory)
    if params_def != memory_def:
        raise ValueError(
            f"memory must have the same pytree structure as params (each leaf with a leading axis of stored "
            f"directions); params is {params_def} but memory is {memory_def}."
        )
    counts = set()
    for (path, leaf), param in zip(jax.tree_util.tree_flatten_with_path(memory)[0], jax.tree_util.tree_leaves(params)):
        shape, expected = jnp.shape(leaf), jnp.shape(param)
        if len(shape) != len(expected) + 1 or shape[1:] != expected:
            raise ValueError(
                f"memory{jax.tree_util.keystr(path)} has shape {shape}; expected (m,) + {expected}, i.e. m "
                f"stored directions shaped like the parameter."
            )
        counts.add(shape[0])
    if len(counts) > 1:
        raise ValueError(f"the leaves of memory disagree on the number of stored directions: {sorted(counts)}.")
    count = counts.pop()
    if not 1 <= count <= tangent_size:
        raise ValueError(
            f"memory holds {count} directions; it must hold between 1 and tangent_size={tangent_size} (they "
            f"replace that many of the K random tangents). Pass memory=None for none."
        )


def check_outputs(outputs: Any, name: str) -> None:
    """Checks (on shapes only) that a model returned a pytree of floating arrays."""
    leaves = jax.tree_util.tree_flatten_with_path(outputs)[0]
    if not leaves:
        raise TypeError(f"{name} returned {outputs!r}, which holds no arrays; it must return the model outputs.")
    for path, leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            where = jax.tree_util.keystr(path)
            raise TypeError(
                f"{name} must return floating arrays (or a pytree of them); output{where} is "
                f"{dtype if dtype is not None else type(leaf).__name__}."
            )


def check_scalar_loss(value: Any, name: str = "loss_fn") -> None:
    """Checks (on shapes only) that a loss returned one floating scalar."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        got = f"shape {shape} and dtype {dtype}" if shape is not None else type(value).__name__
        raise TypeError(
            f"{name} must return a floating scalar (the loss to minimise); got {got}. Reduce it, "
            f"e.g. with jnp.mean or jnp.sum."
        )
