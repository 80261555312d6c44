"""Step 4 of SOFO: the K x K Generalised Gauss-Newton sketch (JV)^T H_L (JV).

Only the requested form is traced: no `lax.select` between branches.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def _pairs(outputs: Any, output_tangents: Any):
    return zip(jax.tree_util.tree_leaves(outputs), jax.tree_util.tree_leaves(output_tangents))


def _gram(a: jax.Array, b: jax.Array) -> jax.Array:
    """sum over all but the leading axis of a[k] * b[l], as a K x K matrix."""
    return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T


def mse(outputs: Any, output_tangents: Any, dtype) -> jax.Array:
    """H_L = I / B, B the leading-axis size of each output leaf: exact for 0.5 * mean_batch(sum_rest (y-t)^2)."""
    total = 0.0
    for y, u in _pairs(outputs, output_tangents):
        if jnp.size(y) == 0:
            continue  # an empty leaf adds nothing (and its batch of 0 would divide by zero)
        batch = y.shape[0] if y.ndim else 1
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
                "loss='ce' needs logits with a class axis (the last axis); the model returned a scalar. "
                "Return logits shaped (..., classes) or use loss='exact'."
            )
        if jnp.size(y) == 0:
            continue  # an empty leaf adds nothing (and 0 rows or 0 classes would divide by zero)
        rows = y.size // y.shape[-1]
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


def sketch(loss: str, loss_fn: Callable, outputs: Any, output_tangents: Any, dtype) -> jax.Array:
    """The K x K curvature sketch of the chosen form, in `dtype`."""
    if loss == "mse":
        return mse(outputs, output_tangents, dtype)
    if loss == "ce":
        return ce(outputs, output_tangents, dtype)
    if loss == "exact":
        return exact(loss_fn, outputs, output_tangents, dtype)
    raise ValueError(f"unknown loss {loss!r}")  # the fronts validate first; this guards direct use
