"""The SOFO engine: pure functions (key, params, ...) -> (value, direction, info).

Every front (optax, brainstate-style transforms, benchmarks) calls these two functions; nothing else
samples tangents, builds a curvature sketch or solves.

References:
  Yu, Xia, Ma, Lengyel & Hennequin, "Second-order forward-mode optimization of recurrent neural networks
  for neuroscience", NeurIPS 2024.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from sofo import _checks, _curvature, _solve, _structured, _tangents


class SofoInfo(NamedTuple):
    """Diagnostics of one SOFO step.

    Attributes:
      top_eigenvalue: the largest eigenvalue of the K x K curvature sketch (before clipping).
      directional_derivatives: the K numbers v_k^T grad L.
      curvature: the K x K sketch (JV)^T H_L (JV).
      coefficients: the K solve coefficients c = (G + damping * max_eig(G) I)^-1 g (direction = V c).
        With `directional_derivatives` and `curvature` they give the subspace quadratic model's predicted
        reduction (`sofo.predicted_reduction`), which adaptive damping compares with the actual one.
    """

    top_eigenvalue: jax.Array
    directional_derivatives: jax.Array
    curvature: jax.Array
    coefficients: jax.Array


def _prepare(key, params, tangent_size, sampler, damping, default_damping, memory):
    """Checks the call's arguments; returns the typed key, the damping and the small linear algebra's dtype."""
    key = _checks.as_key(key)
    _checks.check_tangent_count(tangent_size, sampler, _checks.check_params(params))
    if damping is None:
        damping = default_damping
    else:
        _checks.check_damping(damping)
    _checks.check_memory(memory, params, tangent_size)
    return key, damping, _tangents.compute_dtype(params)


def _check_options(tangent_size, damping, curvature, sampler, tangent_chunk_size, tangent_sharding):
    _checks.check_config(tangent_size=tangent_size, damping=damping, curvature=curvature, sampler=sampler)
    _checks.check_chunk_size(tangent_chunk_size)
    _checks.check_tangent_sharding(tangent_sharding)


def _check_callable(f, name, call):
    """Rejects a non-callable model or loss when the step is built, not when it is first called."""
    if not callable(f):
        raise TypeError(f"{name} must be callable; got {type(f).__name__} ({f!r}). Pass it as {call}.")


def _abstract_outputs(probe, args, name):
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


def _check_ce_outputs(outputs, curvature, name):
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


def _check_axis_name(axis_name):
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


def _rescale_for_overflow(output_tangents, dtype, axis_name):
    """A power of two s such that the sketch of output_tangents / s cannot overflow `dtype`.

    The sketch squares the output tangents: at |u| ~ 1e20 float32 overflows to inf (then NaN) although
    the loss is finite. With relative damping the direction is unchanged by scaling the tangents, V -> V/s
    (Vc = (V/s)(sc)), so the engine sketches u/s and maps the coefficients back. s = 1 (bit-identical)
    unless the squares would come within a factor 2**16 of the largest float.
    """
    leaves = [u.astype(dtype) for u in jax.tree_util.tree_leaves(output_tangents) if u.size]
    if not leaves:
        return output_tangents, jnp.ones((), dtype)
    count = sum(u[0].size for u in leaves)
    largest = jax.lax.stop_gradient(jnp.max(jnp.stack([jnp.max(jnp.abs(u)) for u in leaves])))
    if axis_name is not None:
        largest = jax.lax.pmax(largest, axis_name)
    limit = jnp.sqrt(jnp.asarray(jnp.finfo(dtype).max, dtype) / (count * 2.0**16))
    risky = jnp.isfinite(largest) & (largest > limit)
    scale = jnp.where(risky, jnp.exp2(jnp.ceil(jnp.log2(jnp.where(risky, largest, 1)))), 1).astype(dtype)
    rescaled = jax.tree_util.tree_map(lambda u: u / scale.astype(u.dtype) if u.size else u, output_tangents)
    return rescaled, scale


def _shard_tangents(tree, tangent_sharding):
    """Pins the leading K axis of every leaf to the tangent mesh axis (tangent parallelism)."""
    if tangent_sharding is None:
        return tree
    return jax.tree_util.tree_map(lambda a: jax.lax.with_sharding_constraint(a, tangent_sharding), tree)


def _push(fn, primals, tangents, tangent_chunk_size, tangent_sharding):
    """Step 2: fn's outputs (computed once) and its K output tangents, by one batched forward pass.

    With `tangent_chunk_size`, the tangents go through `lax.map` in chunks of that size, so the forward
    pass holds intermediates for one chunk only (the primal is then recomputed per chunk: cheap next to
    the chunk's tangents). Structured tangents (the "rank<r>" samplers) go through
    `sofo._structured.push`, which keeps each matrix's factored tangent factored through its matmuls.
    """
    tangents = _shard_tangents(tangents, tangent_sharding)
    if _structured.is_structured(tangents[0]):
        outputs, output_tangents = _structured.push(fn, primals, tangents, tangent_chunk_size)
        return outputs, _shard_tangents(output_tangents, tangent_sharding)
    size = jax.tree_util.tree_leaves(tangents)[0].shape[0]
    if tangent_chunk_size is None or tangent_chunk_size >= size:
        outputs, output_tangents = jax.vmap(
            lambda *ts: jax.jvp(fn, primals, ts), out_axes=(None, 0)
        )(*tangents)
    else:
        outputs = fn(*primals)
        output_tangents = jax.lax.map(
            lambda ts: jax.jvp(fn, primals, ts)[1], tangents, batch_size=tangent_chunk_size
        )
    return outputs, _shard_tangents(output_tangents, tangent_sharding)


def _loss_directions(loss_fn, outputs, output_tangents):
    """Step 3: the loss value (once) and its K directional derivatives, by forward mode."""
    return jax.vmap(lambda u: jax.jvp(loss_fn, (outputs,), (u,)), out_axes=(None, 0))(output_tangents)


def _finish(value, directional, curvature, project, damping, axis_name):
    """Steps 5-6: damped solve and projection back to parameter space.

    With `axis_name` (data parallelism under `shard_map`/`pmap`), each device holds a shard of the batch:
    the loss, directional derivatives and curvature are averaged over the devices first, which is exact
    for losses that average over equal-sized shards. Every device then solves the same K x K system.
    `project` maps the K coefficients to the parameter-space direction.
    """
    if axis_name is not None:
        value, directional, curvature = jax.lax.pmean((value, directional, curvature), axis_name)
    coefficients, top = _solve.damped_solve(curvature, directional, damping)
    return value, project(coefficients), SofoInfo(top, directional, curvature, coefficients)


def _chunk_output_tangents(fun, params, tangents):
    """One chunk's output tangents (the chunk's tangents on the leading axis), structured or dense."""
    if _structured.is_structured(tangents):
        return _structured.jvp(fun, (params,), (tangents,))[1]
    return jax.vmap(lambda v: jax.jvp(fun, (params,), (v,))[1])(tangents)


def _streamed_direction(draw, indices, coefficients, params):
    """h = sum_k c_k v_k with the tangents redrawn chunk by chunk (never all K at once)."""
    dtype = coefficients.dtype
    padded = jnp.zeros(indices.size, dtype).at[: coefficients.size].set(coefficients).reshape(indices.shape)

    def accumulate(total, chunk):
        part = _solve.combine(draw(chunk[0]), chunk[1], cast=False)
        return jax.tree_util.tree_map(jnp.add, total, part), None

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)
    total, _ = jax.lax.scan(accumulate, zeros, (indices, padded))
    return jax.tree_util.tree_map(lambda h, p: h.astype(jnp.result_type(p)), total, params)


def value_and_sofo_grad(
    fun: Callable[[Any], Any],
    loss_fn: Callable[[Any], jax.Array],
    *,
    tangent_size: int = 100,
    damping: float = 1e-5,
    curvature: str | None = None,
    sampler: str = "normal",
    tangent_chunk_size: int | None = None,
    axis_name: Any = None,
    tangent_sharding: jax.sharding.NamedSharding | None = None,
    loss: str | None = None,
) -> Callable[[Any, Any], tuple[jax.Array, Any, SofoInfo]]:
    """Builds the SOFO step for `loss_fn(fun(params))`.

    Args:
      fun: the model, `fun(params) -> outputs` (an array of any shape or a pytree of arrays).
      loss_fn: `loss_fn(outputs) -> scalar`.
      tangent_size: K, the number of random tangent directions per step.
      damping: relative damping; the curvature sketch is damped by `damping * max_eig`.
      curvature: the curvature form H_L in the Gauss-Newton sketch (JV)^T H_L (JV). "exact" (the default,
        also for None): the Hessian of `loss_fn` itself with respect to the outputs, by forward-over-reverse
        on the loss only (K Hessian-vector products of the loss; the network is not run again), right for
        any loss: masks or weights in the targets, sums, Huber, Poisson, ...; negative curvature is
        clipped. "mse": H_L = I/B, B the outputs' leading-axis size, right only for
        0.5 * mean_batch(sum_rest (y - t)^2). "ce": softmax cross-entropy over the last axis, averaged over
        all other axes. The two fast paths are checked every step against `loss_fn` along one probe
        direction (one Hessian-vector product of the loss), and a mismatch raises a `CurvatureWarning`
        naming the fix.
      sampler: "normal" (unit-norm Gaussian tangents), "layerwise" (Gaussian tangents whose every leaf
        holds an equal share of the unit norm, so small leaves such as readouts and biases are explored as
        much as large ones), "balanced" (each leaf's share of the squared norm proportional to the square
        root of its size; between the two), "orthonormal" (K orthonormal vectors, K <= n), or the
        structured "rank1", "rank2", "rank4": each matrix parameter's tangent is a rank-r product a b^T
        kept factored through the model's matmuls (dW.h = a (b^T h)), so a step costs about half the
        dense one's FLOPs on an RNN (see `sofo._structured`); other leaves get dense Gaussian tangents.
      tangent_chunk_size: push the tangents through the model this many at a time to bound peak memory;
        the result is the same. With the Gaussian samplers the tangents themselves are drawn chunk by
        chunk (and drawn again to form the direction), so neither the K tangents nor the forward pass's
        K-fold intermediates are held at once; "orthonormal" tangents come from one QR and are held
        whole. None (default) pushes all K at once.
      axis_name: for data parallelism inside `jax.shard_map` / `jax.pmap` with the batch split over this
        mapped axis: the loss, directional derivatives and curvature are averaged across it (pass the
        same key on every device). Not needed under plain `jax.jit` with sharded inputs, where XLA
        inserts the reductions itself.
      tangent_sharding: a `NamedSharding` whose spec names a mesh axis first, e.g.
        `NamedSharding(mesh, PartitionSpec("k"))`: the K tangents (and their output tangents) are split
        over that axis under `jax.jit`, for large K.
      loss: the old name of `curvature` (deprecated: a DeprecationWarning; it still works).

    Returns:
      `f(key, params, *, damping=None, memory=None) -> (value, direction, info)`:
      `value = loss_fn(fun(params))`; `direction`, shaped and typed like `params`, is
      V (G + damping * max_eig(G) I)^-1 V^T grad — a descent direction to subtract
      (`params - lr * direction`); `info` is a `SofoInfo`. `key` is a `jax.random.key`, a legacy
      `PRNGKey` or an int seed. `f` is pure: it jit-compiles and vmaps over keys.
      The call-time `damping` (a float or a traced scalar, e.g. an adaptive damping carried in an
      optimiser state) overrides the one given here for that call. `memory`, a pytree like `params` whose
      leaves have a leading axis of m <= K stored directions, replaces the first m random tangents
      (see `sofo._tangents.sample`); the same key and memory give the same step.

    Non-finite numbers: a NaN or inf in `params`, in the data `fun` closes over, in the model's outputs or
    in the loss is not caught (checking it would need a host round-trip inside `jit`); it propagates, so
    `value`, `direction` and `info` come back non-finite. To find its source run with
    `jax.config.update("jax_debug_nans", True)` (or `jax.debug_nans(True)` as a context), which raises at
    the first primitive that makes a NaN; in an optax loop, wrap the chain in
    `optax.apply_if_finite(..., max_consecutive_errors)` to skip non-finite updates. Output tangents so
    large that the sketch would overflow (|JV| near sqrt of the largest float) are rescaled by a power of
    two first, which leaves the direction unchanged; `info` then holds the sketch and the directional
    derivatives of the rescaled tangents.

    References:
      Yu et al., NeurIPS 2024, Algorithm 1.
    """
    curvature = _checks.resolve_curvature(curvature, loss, "sofo.value_and_sofo_grad")
    _check_options(tangent_size, damping, curvature, sampler, tangent_chunk_size, tangent_sharding)
    default_damping = damping
    _check_callable(fun, "fun", "fun(params) -> outputs")
    _check_callable(loss_fn, "loss_fn", "loss_fn(outputs) -> scalar")
    _checks.check_loss_signature(loss_fn, 1, "sofo.value_and_sofo_grad", "fun")

    streamed = sampler != "orthonormal" and tangent_chunk_size is not None and tangent_chunk_size < tangent_size

    def value_and_direction(key, params, *, damping=None, memory=None):
        key, damping, dtype = _prepare(key, params, tangent_size, sampler, damping, default_damping, memory)
        _check_axis_name(axis_name)
        out_shapes = _abstract_outputs(fun, (params,), "fun")
        _checks.check_outputs(out_shapes, "fun")
        _checks.check_nonempty_outputs(out_shapes, "fun")
        _check_ce_outputs(out_shapes, curvature, "fun")
        _checks.check_scalar_loss(jax.eval_shape(loss_fn, out_shapes))
        if streamed:
            # Bounded memory: tangent k depends only on fold_in(key, k), so each chunk is drawn, pushed and
            # dropped, and drawn again for the direction; only K output tangents are kept.
            count = -(-tangent_size // tangent_chunk_size)
            indices = jnp.arange(count * tangent_chunk_size).reshape(count, tangent_chunk_size)
            draw = lambda ix: _tangents.sample(key, params, tangent_size, sampler, ix, memory)  # noqa: E731
            outputs = fun(params)
            output_tangents = jax.lax.map(lambda ix: _chunk_output_tangents(fun, params, draw(ix)), indices)
            output_tangents = jax.tree_util.tree_map(
                lambda a: a.reshape((-1,) + a.shape[2:])[:tangent_size], output_tangents
            )
            project = lambda c: _streamed_direction(draw, indices, c, params)  # noqa: E731
        else:
            tangents = _tangents.sample(key, params, tangent_size, sampler, memory=memory)
            outputs, output_tangents = _push(
                fun, (params,), (tangents,), tangent_chunk_size, tangent_sharding
            )
            project = lambda c: _solve.combine(tangents, c)  # noqa: E731
        output_tangents, scale = _rescale_for_overflow(output_tangents, dtype, axis_name)
        value, directional = _loss_directions(loss_fn, outputs, output_tangents)
        sketch = _curvature.sketch(curvature, loss_fn, outputs, output_tangents, dtype)
        _curvature.warn_on_mismatch(
            curvature, _curvature.fast_path_mismatch(curvature, loss_fn, outputs, output_tangents, dtype), "sofo"
        )
        return _finish(value, directional, sketch, lambda c: project(c / scale), damping, axis_name)

    return value_and_direction


def _leading_length(tree, name):
    lengths = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree_util.tree_leaves(tree)}
    if None in lengths:
        raise ValueError(f"every leaf of {name} must have a leading time axis; found a scalar leaf.")
    if len(lengths) > 1:
        raise ValueError(f"the leaves of {name} disagree on the time length: {sorted(lengths)}.")
    return lengths.pop() if lengths else None


def value_and_sofo_grad_scan(
    cell: Callable[[Any, Any, Any], tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], jax.Array],
    *,
    tangent_size: int = 100,
    damping: float = 1e-5,
    curvature: str | None = None,
    sampler: str = "normal",
    tangent_chunk_size: int | None = None,
    axis_name: Any = None,
    tangent_sharding: jax.sharding.NamedSharding | None = None,
    loss: str | None = None,
) -> Callable[[Any, Any, Any, Any, Any], tuple[jax.Array, Any, SofoInfo]]:
    """Builds the recurrent SOFO step for sum_t loss_fn(y_t, ys[t]) with memory constant in T.

    The K tangents' effect on the latent state is carried through `lax.scan`; the directional derivatives
    and the K x K curvature are accumulated step by step, so no output tangent is kept for all T.

    Args:
      cell: `cell(params, z, x) -> (z_new, y)`; the latent `z` may be any pytree, but its structure,
        shapes and dtypes must not change between steps.
      loss_fn: `loss_fn(y_t, ys_t) -> scalar`; the total loss is its SUM over time. Masks or per-step
        weights may go in `ys`: the default curvature ("exact") takes them into account.
      tangent_size, damping, curvature, sampler, tangent_chunk_size, axis_name, tangent_sharding, loss: as
        in `value_and_sofo_grad`; the curvature form applies to each step's loss (so "mse" uses B = the
        leading-axis size of y_t, and its check runs on every step), and chunking applies to each step's
        forward pass.

    Returns:
      `f(key, params, z0, xs, ys, *, damping=None, memory=None) -> (value, direction, info)` with `xs`,
      `ys` time-major pytrees of equal leading length T; `damping` and `memory` as in
      `value_and_sofo_grad`. The initial latent `z0` is not differentiated (make it a parameter of `cell` to
      learn it). With the same key it draws the same tangents as `value_and_sofo_grad`, so on the unrolled
      rollout with the summed loss both give the same direction. Non-float leaves of the latent (an int
      step counter, a bool mask) are carried through without tangents. With T = 0 steps the loss is the
      empty sum, 0, and the direction is zero. NaN/inf behave as in `value_and_sofo_grad`; the overflow
      rescaling there is not applied per time step here.

    References:
      Yu et al., NeurIPS 2024, Section 3 (recurrent networks).
    """
    curvature = _checks.resolve_curvature(curvature, loss, "sofo.value_and_sofo_grad_scan")
    _check_options(tangent_size, damping, curvature, sampler, tangent_chunk_size, tangent_sharding)
    default_damping = damping
    _check_callable(cell, "cell", "cell(params, z, x) -> (z_new, y)")
    _check_callable(loss_fn, "loss_fn", "loss_fn(y_t, ys_t) -> scalar")
    _checks.check_loss_signature(loss_fn, 2, "sofo.value_and_sofo_grad_scan", "cell")

    def check_cell(params, z0, xs, ys):
        t_xs, t_ys = _leading_length(xs, "xs"), _leading_length(ys, "ys")
        if t_xs is None:
            raise ValueError("xs holds no arrays; pass time-major inputs (use e.g. jnp.zeros((T, 0)) for none).")
        if t_ys is not None and t_xs != t_ys:
            raise ValueError(
                f"xs and ys must have the same leading (time) length; got {t_xs} for xs and {t_ys} for ys."
            )
        # One time step's shapes, without indexing (T may be 0).
        x0 = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), xs)
        y0 = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), ys)
        result = _abstract_outputs(cell, (params, z0, x0), "cell")
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
        _checks.check_outputs(y, "cell (its y output)")
        _checks.check_nonempty_outputs(y, "cell (its y output)")
        _check_ce_outputs(y, curvature, "cell (its y output)")
        if t_xs == 0:
            # No step, so nothing calls loss_fn (it may not accept what an empty ys gives it, e.g. None).
            return 0
        _checks.check_scalar_loss(jax.eval_shape(loss_fn, y, y0))
        return t_xs

    def value_and_direction(key, params, z0, xs, ys, *, damping=None, memory=None):
        key, damping, dtype = _prepare(key, params, tangent_size, sampler, damping, default_damping, memory)
        _check_axis_name(axis_name)
        steps = check_cell(params, z0, xs, ys)
        tangents = _tangents.sample(key, params, tangent_size, sampler, memory=memory)
        project = lambda c: _solve.combine(tangents, c)  # noqa: E731
        if steps == 0:
            # The empty sum: loss 0, no directional derivative, no curvature, so a zero direction.
            zeros = jnp.zeros((), dtype), jnp.zeros((tangent_size,), dtype), jnp.zeros((tangent_size,) * 2, dtype)
            return _finish(*zeros, project, damping, axis_name)
        # Non-float latent leaves (counters, masks) are carried without tangents: only the float ones are
        # differentiated, the others are closed over and passed through.
        z_leaves, z_def = jax.tree_util.tree_flatten(z0)
        is_float = [jnp.issubdtype(jnp.result_type(a), jnp.inexact) for a in z_leaves]
        latent_tangents = [
            jnp.zeros((tangent_size,) + jnp.shape(a), jnp.result_type(a)) for a, f in zip(z_leaves, is_float) if f
        ]

        def merge(floats, others):
            floats, others = iter(floats), iter(others)
            return [next(floats) if f else next(others) for f in is_float]

        def split(leaves):
            return [a for a, f in zip(leaves, is_float) if f], [a for a, f in zip(leaves, is_float) if not f]

        def step(carry, inputs):
            z, z_tangents, value, directional, sketch, mismatch = carry
            x, target = inputs
            z_floats, z_others = split(jax.tree_util.tree_leaves(z))

            def float_cell(p, floats):
                z_new, y = cell(p, jax.tree_util.tree_unflatten(z_def, merge(floats, z_others)), x)
                new_floats, new_others = split(jax.tree_util.tree_leaves(z_new))
                return new_floats, new_others, y

            (new_floats, new_others, y), (z_tangents, _, y_tangents) = _push(
                float_cell, (params, z_floats), (tangents, z_tangents), tangent_chunk_size, tangent_sharding,
            )
            z_new = jax.tree_util.tree_unflatten(z_def, merge(new_floats, new_others))
            step_loss = lambda out: loss_fn(out, target)  # noqa: E731
            step_value, step_directional = _loss_directions(step_loss, y, y_tangents)
            step_sketch = _curvature.sketch(curvature, step_loss, y, y_tangents, dtype)
            step_mismatch = _curvature.fast_path_mismatch(curvature, step_loss, y, y_tangents, dtype)
            return (
                z_new,
                z_tangents,
                value + step_value,
                directional + step_directional.astype(dtype),
                sketch + step_sketch,
                jnp.maximum(mismatch, step_mismatch),
            ), None

        init = (
            z0,
            latent_tangents,
            jnp.zeros((), dtype),
            jnp.zeros((tangent_size,), dtype),
            jnp.zeros((tangent_size, tangent_size), dtype),
            jnp.zeros((), dtype),
        )
        (_, _, value, directional, sketch, mismatch), _ = jax.lax.scan(step, init, (xs, ys))
        _curvature.warn_on_mismatch(curvature, mismatch, "sofo (recurrent)")
        return _finish(value, directional, sketch, project, damping, axis_name)

    return value_and_direction
