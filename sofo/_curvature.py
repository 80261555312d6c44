"""Step 4 of SOFO: the K x K Generalised Gauss-Newton sketch (JV)^T H_L (JV).

Only the requested form is traced: no `lax.select` between branches. "exact" (the default) uses the
Hessian of the user's `loss_fn` with respect to the outputs, so it is right for any loss. "mse" and "ce"
are fast paths that assume a loss form; every step checks that assumption against `loss_fn` along one
probe direction (`fast_path_mismatch`) and warns (`CurvatureWarning`) when it does not hold.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

# A fast path is accepted when H_fast u and H_L u agree to this relative tolerance along the probe u:
# well above float32 round-off of either side (~1e-6), well below any real mismatch (a mask, a weight, a
# mean in place of a sum: factors of order 1).
MISMATCH_TOLERANCE = 1e-3


class CurvatureWarning(UserWarning):
    """A fast-path curvature ("mse" or "ce") does not match the Hessian of the loss_fn it is used with."""


def _pairs(outputs: Any, output_tangents: Any):
    return zip(jax.tree_util.tree_leaves(outputs), jax.tree_util.tree_leaves(output_tangents))


def _gram(a: jax.Array, b: jax.Array) -> jax.Array:
    """sum over all but the leading axis of a[k] * b[l], as a K x K matrix."""
    return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T


def _batch(y) -> int:
    """B in the "mse" form H_L = I / B: the leaf's leading-axis size (1 for a scalar)."""
    return y.shape[0] if y.ndim else 1


def _rows(y) -> int:
    """R in the "ce" form: the number of rows of logits (all axes but the last)."""
    return y.size // y.shape[-1]


def mse(outputs: Any, output_tangents: Any, dtype) -> jax.Array:
    """H_L = I / B, B the leading-axis size of each output leaf: exact for 0.5 * mean_batch(sum_rest (y-t)^2)."""
    total = 0.0
    for y, u in _pairs(outputs, output_tangents):
        if jnp.size(y) == 0:
            continue  # an empty leaf adds nothing (and its batch of 0 would divide by zero)
        batch = _batch(y)
        u = u.astype(dtype)
        total = total + _gram(u, u) / batch
    return total


def ce(outputs: Any, output_tangents: Any, dtype) -> jax.Array:
    """H_L = (diag(p) - p p^T) / R per row of logits (softmax over the last axis, R rows in all).

    Exact for mean softmax cross-entropy over all leading axes.
    """
    total = 0.0
    for y, u in _pairs(outputs, output_tangents):
        if y.ndim == 0:
            raise ValueError(
                "curvature='ce' needs logits with a class axis (the last axis); the model returned a scalar. "
                "Return logits shaped (..., classes) or use curvature='exact' (the default)."
            )
        if jnp.size(y) == 0:
            continue  # an empty leaf adds nothing (and 0 rows or 0 classes would divide by zero)
        rows = _rows(y)
        p = jax.nn.softmax(y.astype(dtype), axis=-1)
        u = u.astype(dtype)
        mean_u = jnp.sum(p * u, axis=-1)  # (K, rows...): p^T u per row
        total = total + (_gram(p * u, u) - _gram(mean_u, mean_u)) / rows
    return total


def exact(loss_fn: Callable, outputs: Any, output_tangents: Any, dtype) -> jax.Array:
    """H_L applied by forward-over-reverse on the loss alone (never the network): exact for any loss."""
    grad_loss = jax.grad(loss_fn)
    hessian_tangents = jax.vmap(lambda u: jax.jvp(grad_loss, (outputs,), (u,))[1])(output_tangents)
    total = 0.0
    for u, hu in zip(jax.tree_util.tree_leaves(output_tangents), jax.tree_util.tree_leaves(hessian_tangents)):
        total = total + _gram(u.astype(dtype), hu.astype(dtype))
    return 0.5 * (total + total.T)


def sketch(curvature: str, loss_fn: Callable, outputs: Any, output_tangents: Any, dtype) -> jax.Array:
    """The K x K curvature sketch of the chosen form, in `dtype`."""
    if curvature == "mse":
        return mse(outputs, output_tangents, dtype)
    if curvature == "ce":
        return ce(outputs, output_tangents, dtype)
    if curvature == "exact":
        return exact(loss_fn, outputs, output_tangents, dtype)
    raise ValueError(f"unknown curvature {curvature!r}")  # the fronts validate first; this guards direct use


def _fast_hessian_product(curvature: str, y: jax.Array, u: jax.Array, dtype) -> jax.Array:
    """H_fast u for one output leaf: u / B ("mse") or (diag(p) - p p^T) u / R per row ("ce")."""
    u = u.astype(dtype)
    if curvature == "mse":
        return u / _batch(y)
    p = jax.nn.softmax(y.astype(dtype), axis=-1)
    return (p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)) / _rows(y)


def fast_path_mismatch(curvature: str, loss_fn: Callable, outputs: Any, output_tangents: Any, dtype) -> jax.Array:
    """How far the fast-path Hessian is from loss_fn's own along one probe: a relative gap, 0 when exact.

    The probe is u = sum_k J v_k, a random combination of this step's output tangents, so the check looks
    where the sketch looks. It returns ||H_L u - H_fast u|| / max(||H_L u||, ||H_fast u||), with H_L u by
    forward-over-reverse on `loss_fn` alone (one Hessian-vector product of the loss: the network is not
    run again). 0 for "exact", or when every output tangent is zero.

    The denominator is floored at eps^(1/3) ||u|| / n (n the fast path's normaliser, B or the rows; eps the
    dtype's): both products are computed from terms of size ||u|| / n, so their round-off is about
    eps ||u|| / n. Without the floor a confident classifier (softmax probabilities below eps, where
    (diag(p) - p p^T) u cancels to nearly zero) reads as a mismatch from round-off alone (0.18 in float32
    at a logit margin of 20); with it round-off stays near eps^(2/3) (2e-5 in float32, far under the 1e-3
    tolerance), while a real mismatch that large against the identity's scale is still reported.
    """
    if curvature == "exact":
        return jnp.zeros((), dtype)
    probe = jax.tree_util.tree_map(lambda u: jnp.sum(u, axis=0), output_tangents)
    exact_product = jax.jvp(jax.grad(loss_fn), (outputs,), (probe,))[1]
    gap = scale = jnp.zeros((), dtype)
    for y, u, hu in zip(
        jax.tree_util.tree_leaves(outputs), jax.tree_util.tree_leaves(probe), jax.tree_util.tree_leaves(exact_product)
    ):
        if jnp.size(y) == 0:
            continue
        fast_product = _fast_hessian_product(curvature, y, u, dtype)
        hu = hu.astype(dtype)
        gap = gap + jnp.sum(jnp.square(hu - fast_product))
        normaliser = _batch(y) if curvature == "mse" else _rows(y)
        floor = jnp.sum(jnp.square(u.astype(dtype))) * (jnp.finfo(dtype).eps ** (2 / 3) / normaliser**2)
        scale = jnp.maximum(scale, jnp.maximum(jnp.sum(jnp.square(hu)), jnp.sum(jnp.square(fast_product))))
        scale = jnp.maximum(scale, floor)
    return jnp.where(scale > 0, jnp.sqrt(gap / jnp.where(scale > 0, scale, 1)), 0.0).astype(dtype)


_EXPECTED_FORM = {
    "mse": "0.5 * mean over the leading (batch) axis of the sum of squared errors over the other axes",
    "ce": "the mean softmax cross-entropy of the logits (last axis) over all other axes",
}


def warn_on_mismatch(curvature: str, mismatch: jax.Array, where: str) -> None:
    """Warns (`CurvatureWarning`, from a host callback, so also under jit) when the fast path is not exact.

    The callback runs only when the probe found a mismatch; the host checks the threshold again, since
    under `vmap` a cond can become a select that runs both branches.
    """
    if curvature == "exact":
        return

    def emit(value):
        value = float(np.max(np.asarray(value)))
        if value > MISMATCH_TOLERANCE:
            warnings.warn(
                f"{where}: curvature={curvature!r} assumes the loss is {_EXPECTED_FORM[curvature]}, but the Hessian "
                f"of loss_fn differs from it by {value:.3g} (relative) along a probe direction, so the curvature "
                f"and the step are wrong (a mask or weights in the targets, another loss, or a sum in place of a "
                f"mean do this). Leave curvature out (the default 'exact' is right for any loss_fn), or pass "
                f"curvature='exact'.",
                CurvatureWarning,
                stacklevel=2,
            )

    # The host round trip costs about as much as a small model's whole step, so it is only made when the
    # probe found a mismatch (under vmap the cond may become a select; `emit` checks the value again).
    jax.lax.cond(
        mismatch > MISMATCH_TOLERANCE, lambda m: jax.debug.callback(emit, m), lambda m: None, mismatch
    )
