"""Argument and shape checks shared by every front and both engines: each raises before any work, naming
the argument and the fix.

The options (tangent_size, damping, curvature, sampler, ...) are checked here and assembled once per front
by `sofo._options.make_options`; the call-time checks of a step (key, params, memory, the model's and the
loss's output shapes, a recurrent cell's latent) run on shapes only (`jax.eval_shape`), before any FLOPs.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CURVATURES = ("exact", "mse", "ce")
DEFAULT_CURVATURE = "exact"
SAMPLERS = ("normal", "layerwise", "balanced", "orthonormal", "rank1", "rank2", "rank4")
# Integer options set shapes, so they must be Python (or numpy) ints; optax.inject_hyperparams turns every
# numeric argument not in static_args into an array, so say where to list them.
_STATIC_HINT = " (under optax.inject_hyperparams, list {name} in static_args: it sets a shape)"


def is_int(value: Any) -> bool:
    """A Python or numpy integer (not a bool, not an array): what the shape-setting options take."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def resolve_curvature(curvature: Any, loss: Any, where: str, *, deprecated: bool = True) -> Any:
    """The curvature form from `curvature=` and the older `loss=`; "exact" when neither is given.

    `loss=` named the curvature form, not the loss (it sits beside `loss_fn`), so it is now `curvature=`.
    Where `deprecated`, passing `loss=` warns (DeprecationWarning) and still works. The brainstate- and
    braintools-style fronts keep `loss` as their own name for it (`deprecated=False`).
    """
    if loss is not None:
        if deprecated:
            warnings.warn(
                f"{where}: loss={loss!r} is deprecated and will be removed in a future release; the argument names "
                f"the curvature form, not the loss, so pass curvature={loss!r} instead (or leave it out: the "
                f"default, curvature='exact', is exact for any loss_fn).",
                DeprecationWarning,
                stacklevel=3,
            )
        if curvature is not None and curvature != loss:
            raise ValueError(
                f"{where}: curvature={curvature!r} and loss={loss!r} disagree; they are the same option (loss= is "
                f"its old name). Pass only curvature=."
            )
        curvature = loss
    return DEFAULT_CURVATURE if curvature is None else curvature


# The default learning rate of `scale_by_sofo` and `predicted_reduction`, compared by identity so that an
# explicit learning_rate (even 1.0) passed with the deprecated step_size is refused as ambiguous.
DEFAULT_LEARNING_RATE = float("1.0")


def resolve_learning_rate(learning_rate: Any, step_size: Any, where: str) -> Any:
    """The learning rate from `learning_rate=` and the older `step_size=` (deprecated: a DeprecationWarning).

    `step_size` was the optax layer's name for the learning rate; it is now `learning_rate` everywhere
    there (`sofo.sofo`, `sofo.scale_by_sofo`, `sofo.predicted_reduction`). Passing both is refused.
    """
    if step_size is None:
        return learning_rate
    if learning_rate is not DEFAULT_LEARNING_RATE:
        raise TypeError(
            f"{where}: got both learning_rate={learning_rate!r} and step_size={step_size!r}; they are the same "
            f"option (step_size= is its old name). Pass only learning_rate=."
        )
    warnings.warn(
        f"{where}: step_size={step_size!r} is deprecated and will be removed in a future release; pass "
        f"learning_rate={step_size!r} instead (the same quantity, under the name optax uses).",
        DeprecationWarning,
        stacklevel=3,
    )
    return step_size


def check_learning_rate(step_size: Any, name: str = "learning_rate") -> None:
    """A positive float, a float jax scalar (e.g. from optax.inject_hyperparams; checked when concrete) or
    a schedule; `name` is the argument the user passed it as."""
    if callable(step_size):
        return
    message = (
        f"{name} must be a positive float or an optax schedule (the learning rate applied after this "
        f"transform); got {step_size!r}. Pass the same value as the chain's learning rate."
    )
    if isinstance(step_size, (bool, np.bool_)):
        raise ValueError(message)
    if not isinstance(step_size, numbers.Real):
        dtype = getattr(step_size, "dtype", None)
        if dtype is None or jnp.shape(step_size) != () or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(message)
        if isinstance(step_size, jax.core.Tracer):
            return
    if not (math.isfinite(float(step_size)) and float(step_size) > 0):
        raise ValueError(message)


def check_config(
    *, tangent_size: Any, damping: Any, curvature: Any, sampler: Any, curvature_name: str = "curvature"
) -> None:
    """Validates the engine's hyperparameters (`curvature_name`: the front's name for the curvature form)."""
    if not is_int(tangent_size) or tangent_size < 1:
        raise ValueError(
            f"tangent_size must be a positive int (the number K of random tangents per step); "
            f"got {tangent_size!r}. Pass e.g. tangent_size=100{_STATIC_HINT.format(name='tangent_size')}."
        )
    check_damping(damping)
    if not isinstance(curvature, str) or curvature not in CURVATURES:
        raise ValueError(
            f"{curvature_name}={curvature!r} is not a known curvature form; choose one of "
            f"{', '.join(map(repr, CURVATURES))} ('exact', the default, is the Hessian of loss_fn itself and is "
            f"right for any loss; 'mse' assumes 0.5*mean-over-batch squared error, 'ce' mean softmax "
            f"cross-entropy: fast paths, checked against loss_fn every step)."
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


def check_memory_size(memory_size: Any, tangent_size: int, prefix: str = "") -> int:
    """Validates `memory_size` and returns it as an int: 0 <= m < K (remembered directions replace random
    tangents, and at least one tangent per step must stay random, or no new direction is ever explored).
    None means 0."""
    if memory_size is None:
        return 0
    if not is_int(memory_size) or not 0 <= memory_size < tangent_size:
        raise ValueError(
            f"{prefix}memory_size must be an int with 0 <= memory_size < tangent_size={tangent_size} (past "
            f"directions that replace that many random tangents; at least one tangent per step must stay random, "
            f"or once the memory is full no new direction is explored and training stalls); got "
            f"{memory_size!r}. Pass e.g. memory_size={min(4, max(tangent_size // 4, 0))} (under "
            f"optax.inject_hyperparams, list it in static_args: it sets the state's shape)."
        )
    return int(memory_size)


def check_chunk_size(tangent_chunk_size: Any) -> None:
    """Validates `tangent_chunk_size` (None, or a positive int)."""
    if tangent_chunk_size is None:
        return
    if not is_int(tangent_chunk_size) or tangent_chunk_size < 1:
        raise ValueError(
            f"tangent_chunk_size must be None (all tangents at once) or a positive int; got "
            f"{tangent_chunk_size!r}. Pass e.g. tangent_chunk_size=32 to push 32 tangents at a time"
            f"{_STATIC_HINT.format(name='tangent_chunk_size')}."
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


_LOSS_SIGNATURES = (
    "loss_fn(outputs) -> scalar for sofo.sofo / sofo.scale_by_sofo / sofo.value_and_sofo_grad / "
    "sofo.transforms.sofo_grad with a model fun (close over the targets: loss_fn=lambda y: my_loss(y, targets)); "
    "loss_fn(y_t, ys_t) -> scalar, summed over time, with a recurrent cell (cell=, value_and_sofo_grad_scan, "
    "sofo_grad_scan); loss_fn(outputs, targets) -> scalar for sofo.optim.SOFO"
)


def check_loss_signature(loss_fn: Any, count: int, front: str, form: str) -> None:
    """Checks, without calling it, that `loss_fn` accepts `count` positional arguments; names each front's form.

    A loss whose signature cannot be read (a builtin, some C callables) is let through.
    """
    try:
        signature = inspect.signature(loss_fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*([None] * count))
    except TypeError:
        name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
        expected = "loss_fn(outputs)" if count == 1 else "loss_fn(y_t, ys_t)"
        raise TypeError(
            f"{front} with {form} calls {expected}, with {count} argument{'s' if count > 1 else ''}, but "
            f"loss_fn {name}{signature} cannot take {count}. The forms: {_LOSS_SIGNATURES}."
        ) from None


def check_nonempty_outputs(outputs: Any, name: str) -> None:
    """Refuses (on shapes) model outputs with no numbers, e.g. an empty batch of shape (0, 3)."""
    leaves = jax.tree_util.tree_flatten_with_path(outputs)[0]
    if leaves and all(int(np.prod(jnp.shape(leaf))) == 0 for _, leaf in leaves):
        shapes = ", ".join(f"output{jax.tree_util.keystr(path)} {tuple(jnp.shape(leaf))}" for path, leaf in leaves)
        raise ValueError(
            f"{name} returned no numbers ({shapes}): an empty batch has no loss or curvature to fit. Check the "
            f"batch passed in (e.g. the last batch of a data loader, or a filter that kept nothing) and skip "
            f"empty ones."
        )


# --- the engine's call checks (shapes only, before any FLOPs) ------------------------------------------


def prepare_call(key, params, tangent_size, sampler, damping, default_damping, memory):
    """Checks a step's call-time arguments (key, params, damping, memory); returns the typed key and damping."""
    key = as_key(key)
    check_tangent_count(tangent_size, sampler, check_params(params))
    if damping is None:
        damping = default_damping
    else:
        check_damping(damping)
    check_memory(memory, params, tangent_size)
    return key, damping


def check_extra_dampings(extra_dampings):
    """None, or a 1-D float array of E >= 1 dampings (each checked like `damping` where concrete)."""
    if extra_dampings is None:
        return None
    message = (
        f"extra_dampings must be None or a 1-D sequence of finite non-negative dampings (e.g. "
        f"extra_dampings=jnp.array([3e-3, 3e-2])); got {extra_dampings!r}."
    )
    if isinstance(extra_dampings, (bool, np.bool_, numbers.Number)):
        raise ValueError(message)
    try:
        values = jnp.asarray(extra_dampings)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    real = jnp.issubdtype(values.dtype, jnp.floating) or jnp.issubdtype(values.dtype, jnp.integer)
    if values.ndim != 1 or values.shape[0] == 0 or not real:
        raise ValueError(message)
    if not isinstance(values, jax.core.Tracer):
        concrete = np.asarray(values, np.float64)
        if not np.all(np.isfinite(concrete)) or np.any(concrete < 0):
            raise ValueError(message)
    return values


def check_callable(f, name, call):
    """Rejects a non-callable model or loss when the step is built, not when it is first called."""
    if not callable(f):
        raise TypeError(f"{name} must be callable; got {type(f).__name__} ({f!r}). Pass it as {call}.")


def abstract_outputs(probe, args, name):
    """`jax.eval_shape(probe, *args)` (no FLOPs), rejecting Python numbers among the outputs.

    A Python number is constant (no tangent) and has no shape to sketch; jax would only fail later, inside
    the curvature, with "'float' object has no attribute 'ndim'".
    """
    constants = []

    def traced(*inner):
        outputs = probe(*inner)
        for path, leaf in jax.tree_util.tree_flatten_with_path(outputs)[0]:
            if isinstance(leaf, (bool, int, float, complex)):
                constants.append(f"output{jax.tree_util.keystr(path)} is the Python {type(leaf).__name__} {leaf!r}")
        return outputs

    shapes = jax.eval_shape(traced, *args)
    if constants:
        raise TypeError(
            f"{name} must return jax arrays computed from the parameters; {'; '.join(constants)}. Return "
            f"e.g. jnp.asarray(...) of an expression in params (a constant has no derivative)."
        )
    return shapes


def check_ce_outputs(outputs, curvature, name):
    """curvature='ce' needs logits with a class axis on every output leaf; checked on shapes, before any FLOPs."""
    if curvature != "ce":
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(outputs)[0]:
        if not leaf.shape:
            raise ValueError(
                f"curvature='ce' needs logits with a class axis (the last axis), but {name}'s "
                f"output{jax.tree_util.keystr(path)} is a scalar. Return logits shaped (..., classes) or use "
                f"curvature='exact' (the default)."
            )


def check_axis_name(axis_name):
    """`axis_name` only means something inside `shard_map`/`pmap`; say so before the model runs."""
    if axis_name is None:
        return
    try:
        jax.lax.psum(1, axis_name)
    except NameError as error:
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here: the step was called outside jax.shard_map / "
            f"jax.pmap over that axis. Call it inside shard_map(..., mesh, in_specs, out_specs) with a mesh "
            f"axis named {axis_name!r}, or pass axis_name=None under plain jax.jit."
        ) from error


def leading_length(tree, name):
    """The common leading (time) length of a pytree's leaves; None when it holds no array."""
    lengths = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree_util.tree_leaves(tree)}
    if None in lengths:
        raise ValueError(f"every leaf of {name} must have a leading time axis; found a scalar leaf.")
    if len(lengths) > 1:
        raise ValueError(f"the leaves of {name} disagree on the time length: {sorted(lengths)}.")
    return lengths.pop() if lengths else None


def check_cell(cell, loss_fn, curvature, params, z0, xs, ys):
    """Checks (on shapes, no FLOPs) a recurrent call: time-major xs/ys of one length, a cell returning
    (z_new, y) with z_new shaped like z, float outputs, a scalar loss. Returns T, the number of steps."""
    t_xs, t_ys = leading_length(xs, "xs"), leading_length(ys, "ys")
    if t_xs is None:
        raise ValueError("xs holds no arrays; pass time-major inputs (use e.g. jnp.zeros((T, 0)) for none).")
    if t_ys is not None and t_xs != t_ys:
        raise ValueError(
            f"xs and ys must have the same leading (time) length; got {t_xs} for xs and {t_ys} for ys."
        )
    # One time step's shapes, without indexing (T may be 0).
    x0 = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), xs)
    y0 = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), ys)
    result = abstract_outputs(cell, (params, z0, x0), "cell")
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise TypeError(
            f"cell must return a pair (z_new, y); got {type(result).__name__}. Write the cell as "
            f"`def cell(params, z, x): ...; return z_new, y`."
        )
    z_new, y = result
    z_spec = jax.tree_util.tree_map(lambda a: (jnp.shape(a), jnp.result_type(a)), z0)
    z_new_spec = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), z_new)
    if z_spec != z_new_spec:
        raise ValueError(
            f"cell must return a latent with the same structure, shapes and dtypes as it receives; "
            f"z0 is {z_spec} but cell returned {z_new_spec}."
        )
    check_outputs(y, "cell (its y output)")
    check_nonempty_outputs(y, "cell (its y output)")
    check_ce_outputs(y, curvature, "cell (its y output)")
    if t_xs == 0:
        # No step, so nothing calls loss_fn (it may not accept what an empty ys gives it, e.g. None).
        return 0
    check_scalar_loss(jax.eval_shape(loss_fn, y, y0))
    return t_xs
