"""The SOFO engine, feedforward: a pure function (key, params, ...) -> (value, direction, info).

Every front (optax, brainstate-style transforms, braintools-style optimizers, benchmarks) builds its step
here (`build`, from validated `sofo._options.Options`) or in `sofo._scan` (the recurrent engine, which
reuses the steps below); nothing else samples tangents, builds a curvature sketch or solves. Read top to
bottom, one step of the paper's Algorithm 1 after the other:

  1. sample K tangents V (`sofo._tangents.sample`; drawn chunk by chunk as `Streamed` tangents when
     `tangent_chunk_size` bounds memory; remembered directions enter as the sampler's `basis`);
  2. push them through the model, JV (`_push`: one batched forward-mode pass, chunked, streamed or
     structured);
  3. the loss and its K directional derivatives V^T grad (`_loss_directions`);
  4. the K x K Gauss-Newton sketch (JV)^T H_L (JV) (`sofo._curvature.sketch`);
  5. the damped solve c = (G + damping * max_eig(G) I)^-1 g (`_finish`, `sofo._solve`);
  6. the direction V c (`_project`).

The argument and shape checks live in `sofo._checks`; the options are validated once in `sofo._options`.

References:
  Yu, Xia, Ma, Lengyel & Hennequin, "Second-order forward-mode optimization of recurrent neural networks
  for neuroscience", NeurIPS 2024.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from sofo import _checks, _curvature, _options, _solve, _structured, _tangents


class SofoInfo(NamedTuple):
    """Diagnostics of one SOFO step.

    Attributes:
      top_eigenvalue: the largest eigenvalue of the K x K curvature sketch (before clipping).
      directional_derivatives: the K numbers v_k^T grad L.
      curvature: the K x K sketch (JV)^T H_L (JV).
      coefficients: the K solve coefficients c = (G + damping * max_eig(G) I)^-1 g (direction = V c).
        With `directional_derivatives` and `curvature` they give the subspace quadratic model's predicted
        reduction (`sofo.predicted_reduction`), which adaptive damping compares with the actual one.
      extra_coefficients: with the call-time `extra_dampings` (E of them), the (E, K) coefficients at
        those dampings, from the same sketch and eigendecomposition; None otherwise.
      extra_directions: with `extra_dampings`, the directions V c_e, shaped like `params` with a leading
        axis of E (as a memory); None otherwise.
    """

    top_eigenvalue: jax.Array
    directional_derivatives: jax.Array
    curvature: jax.Array
    coefficients: jax.Array
    extra_coefficients: Any = None
    extra_directions: Any = None


@dataclasses.dataclass(frozen=True)
class Streamed:
    """Step 1 deferred: K tangents that are drawn chunk by chunk, `draw(indices)`, and never held at once.

    Attributes:
      draw: `draw(indices) -> tangents` for a 1-D array of tangent indices (each tangent depends only on
        its index, so a chunk is drawn again, identically, when the direction is formed).
      indices: the chunks, an int array (chunks, chunk size) covering 0..K-1 (the last chunk padded).
      size: K.
    """

    draw: Callable[[jax.Array], Any]
    indices: jax.Array
    size: int


def _chunk_indices(tangent_size, tangent_chunk_size):
    """The tangent indices 0..K-1 in chunks of `tangent_chunk_size` (the last one padded past K)."""
    count = -(-tangent_size // tangent_chunk_size)
    return jnp.arange(count * tangent_chunk_size).reshape(count, tangent_chunk_size)


def _shard_tangents(tree, tangent_sharding):
    """Pins the leading K axis of every leaf to the tangent mesh axis (tangent parallelism)."""
    if tangent_sharding is None:
        return tree
    return jax.tree_util.tree_map(lambda a: jax.lax.with_sharding_constraint(a, tangent_sharding), tree)


def _push(fn, primals, tangents, tangent_chunk_size, tangent_sharding):
    """Step 2: fn's outputs (computed once) and its K output tangents, by one batched forward pass.

    With `tangent_chunk_size`, the tangents go through `lax.map` in chunks of that size, so the forward
    pass holds intermediates for one chunk only (the primal is then recomputed per chunk: cheap next to
    the chunk's tangents). `Streamed` tangents (`primals` = (params,)) are drawn inside the map, chunk by
    chunk, so the K tangents are never held either. Structured tangents (the "rank<r>" samplers) go
    through `sofo._structured.push`, which keeps each matrix's factored tangent factored through its
    matmuls.
    """
    if isinstance(tangents[0], Streamed):
        (params,), streamed = primals, tangents[0]
        outputs = fn(params)
        output_tangents = jax.lax.map(
            lambda ix: _chunk_output_tangents(fn, params, streamed.draw(ix)), streamed.indices
        )
        output_tangents = jax.tree_util.tree_map(
            lambda a: a.reshape((-1,) + a.shape[2:])[: streamed.size], output_tangents
        )
        return outputs, output_tangents
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


def _chunk_output_tangents(fun, params, tangents):
    """Step 2 for one chunk of `Streamed` tangents: the chunk's output tangents (on the leading axis).

    The chunk's tangents may be structured or dense.
    """
    if _structured.is_structured(tangents):
        return _structured.jvp(fun, (params,), (tangents,))[1]
    return jax.vmap(lambda v: jax.jvp(fun, (params,), (v,))[1])(tangents)


def _rescale_for_overflow(output_tangents, dtype, axis_name):
    """Between steps 2 and 4: a power of two s such that the sketch of output_tangents / s cannot overflow `dtype`.

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


def _loss_directions(loss_fn, outputs, output_tangents):
    """Step 3: the loss value (once) and its K directional derivatives, by forward mode."""
    return jax.vmap(lambda u: jax.jvp(loss_fn, (outputs,), (u,)), out_axes=(None, 0))(output_tangents)


def _finish(value, directional, curvature, project, damping, axis_name, extra_dampings=None):
    """Steps 5-6: damped solve and projection back to parameter space (`project`, e.g. `_project`).

    With `axis_name` (data parallelism under `shard_map`/`pmap`), each device holds a shard of the batch:
    the loss, directional derivatives and curvature are averaged over the devices first, which is exact
    for losses that average over equal-sized shards. Every device then solves the same K x K system.
    `project` maps the K coefficients to the parameter-space direction. With `extra_dampings` (a 1-D
    array of E dampings) the same eigendecomposition also gives the coefficients and directions at those
    dampings, returned in the info (`SofoInfo.extra_coefficients`, `extra_directions`).
    """
    if axis_name is not None:
        value, directional, curvature = jax.lax.pmean((value, directional, curvature), axis_name)
    if extra_dampings is None:
        coefficients, top = _solve.damped_solve(curvature, directional, damping)
        return value, project(coefficients), SofoInfo(top, directional, curvature, coefficients)
    coefficients, top, extra = _solve.damped_solve(curvature, directional, damping, extra_dampings)
    # One batched projection of the E + 1 coefficient vectors: what does not depend on them (the tangents,
    # drawn again chunk by chunk when streamed) is computed once under vmap, not once per damping.
    projected = jax.vmap(project)(jnp.concatenate([coefficients[None], extra.astype(coefficients.dtype)]))
    direction = jax.tree_util.tree_map(lambda h: h[0], projected)
    stacked = jax.tree_util.tree_map(lambda h: h[1:], projected)
    return value, direction, SofoInfo(top, directional, curvature, coefficients, extra, stacked)


def _project(tangents, coefficients, params):
    """Step 6: the direction h = V c = sum_k c_k v_k, shaped and typed like `params`."""
    if isinstance(tangents, Streamed):
        return _streamed_direction(tangents.draw, tangents.indices, coefficients, params)
    return _solve.combine(tangents, coefficients)


def _streamed_direction(draw, indices, coefficients, params):
    """Step 6 for `Streamed` tangents: h = sum_k c_k v_k, the tangents redrawn chunk by chunk (never all K)."""
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
      `f(key, params, *, damping=None, memory=None, extra_dampings=None) -> (value, direction, info)`:
      `value = loss_fn(fun(params))`; `direction`, shaped and typed like `params`, is
      V (G + damping * max_eig(G) I)^-1 V^T grad — a descent direction to subtract
      (`params - lr * direction`); `info` is a `SofoInfo`. `key` is a `jax.random.key`, a legacy
      `PRNGKey` or an int seed. `f` is pure: it jit-compiles and vmaps over keys.
      The call-time `damping` (a float or a traced scalar, e.g. an adaptive damping carried in an
      optimiser state) overrides the one given here for that call. `memory`, a pytree like `params` whose
      leaves have a leading axis of m <= K stored directions, replaces the first m random tangents
      (see `sofo._tangents.sample`); the same key and memory give the same step. `extra_dampings`, a
      1-D array of E more dampings, also returns the directions the same sketch gives at those dampings
      (`info.extra_directions`, leading axis E, and `info.extra_coefficients`), at the cost of E more
      K x K back-substitutions and one batched projection V [c, c_1, ..., c_E] (no more passes through the
      model, and streamed tangents are drawn once for all of them).
      Like `damping`, a traced `extra_dampings` is not checked for finite, non-negative values.

    Non-finite numbers: a NaN or inf in `params`, in the data `fun` closes over, in the model's outputs or
    in the loss is not caught (checking it would need a host round-trip inside `jit`); it propagates, so
    `value`, `direction` and `info` come back non-finite. To find its source run with
    `jax.config.update("jax_debug_nans", True)` (or `jax.debug_nans(True)` as a context), which raises at
    the first primitive that makes a NaN; in an optax loop, wrap the chain in
    `optax.apply_if_finite(..., max_consecutive_errors)` to skip non-finite updates. Output tangents so
    large that the sketch would overflow (the norm of JV near the square root of the largest float) are
    rescaled by a power of two first, which leaves the direction unchanged; `info` then holds the sketch
    and the directional derivatives of the rescaled tangents.

    References:
      Yu et al., NeurIPS 2024, Algorithm 1.
    """
    front = "sofo.value_and_sofo_grad"
    curvature = _checks.resolve_curvature(curvature, loss, front)
    options = _options.make_options(
        front, tangent_size=tangent_size, damping=damping, curvature=curvature, sampler=sampler,
        tangent_chunk_size=tangent_chunk_size, tangent_sharding=tangent_sharding,
    )
    return build(fun, loss_fn, options, front=front, axis_name=axis_name)


def build(
    fun: Callable[[Any], Any], loss_fn: Callable[[Any], jax.Array], options: _options.Options, *, front: str,
    axis_name: Any = None,
) -> Callable[..., tuple[jax.Array, Any, SofoInfo]]:
    """`value_and_sofo_grad` from validated `Options` (what every front calls); errors name `front`."""
    tangent_size, sampler, curvature = options.tangent_size, options.sampler, options.curvature
    tangent_chunk_size, tangent_sharding = options.tangent_chunk_size, options.tangent_sharding
    default_damping = options.damping
    _checks.check_callable(fun, "fun", "fun(params) -> outputs")
    _checks.check_callable(loss_fn, "loss_fn", "loss_fn(outputs) -> scalar")
    _checks.check_loss_signature(loss_fn, 1, front, "fun")

    streamed = sampler != "orthonormal" and tangent_chunk_size is not None and tangent_chunk_size < tangent_size

    def value_and_direction(key, params, *, damping=None, memory=None, extra_dampings=None):
        key, damping = _checks.prepare_call(key, params, tangent_size, sampler, damping, default_damping, memory)
        extra_dampings = _checks.check_extra_dampings(extra_dampings)
        dtype = _tangents.compute_dtype(params)
        _checks.check_axis_name(axis_name)
        out_shapes = _checks.abstract_outputs(fun, (params,), "fun")
        _checks.check_outputs(out_shapes, "fun")
        _checks.check_nonempty_outputs(out_shapes, "fun")
        _checks.check_ce_outputs(out_shapes, curvature, "fun")
        _checks.check_scalar_loss(jax.eval_shape(loss_fn, out_shapes))
        # Step 1: the K tangents, with the remembered directions (memory) as the sampler's basis. Streamed
        # (bounded memory): tangent k depends only on fold_in(key, k), so each chunk is drawn, pushed and
        # dropped inside the push, and drawn again for the direction; only K output tangents are kept.
        if streamed:
            draw = lambda ix: _tangents.sample(key, params, tangent_size, sampler, ix, basis=memory)  # noqa: E731
            tangents = Streamed(draw, _chunk_indices(tangent_size, tangent_chunk_size), tangent_size)
        else:
            tangents = _tangents.sample(key, params, tangent_size, sampler, basis=memory)
        # Step 2: the output tangents JV, by one batched forward pass.
        outputs, output_tangents = _push(fun, (params,), (tangents,), tangent_chunk_size, tangent_sharding)
        output_tangents, scale = _rescale_for_overflow(output_tangents, dtype, axis_name)
        # Steps 3-4: the loss, its K directional derivatives and the K x K curvature sketch.
        value, directional = _loss_directions(loss_fn, outputs, output_tangents)
        sketch = _curvature.sketch(curvature, loss_fn, outputs, output_tangents, dtype)
        _curvature.warn_on_mismatch(
            curvature, _curvature.fast_path_mismatch(curvature, loss_fn, outputs, output_tangents, dtype), "sofo"
        )
        # Steps 5-6: the damped solve and the direction V c.
        return _finish(
            value, directional, sketch, lambda c: _project(tangents, c / scale, params), damping, axis_name,
            extra_dampings,
        )

    return value_and_direction
