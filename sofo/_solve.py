"""Steps 5-6 of SOFO: the damped eigen-solve in tangent space and the map back to parameter space."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sofo import _structured


def damped_solve(
    curvature: jax.Array, directional_derivatives: jax.Array, damping: float, extra_dampings: Any = None
):
    """Solves (G + damping * max_eig(G) * I) c = g for a symmetric PSD-ish K x K sketch G.

    G = U S U^T by `eigh` (G is symmetric: no SVD). Eigenvalues below a round-off tolerance relative to
    the sketch's size, tol = K * eps * max|eig|, count as zero, and negative ones (true negative curvature
    from loss='exact') are clipped to zero, before damping. When no eigenvalue is meaningfully positive
    (a zero, concave or round-off-only sketch), the damping is taken relative to 1 instead, so the step is
    c = g / damping on those directions: bounded by |g| / damping, whatever the sign of the round-off.
    With damping=0, eigenvalues that are still zero are dropped, as a pseudo-inverse. `damping` may be a
    traced scalar.

    Args:
      curvature: the K x K sketch G.
      directional_derivatives: the K numbers g.
      damping: the relative damping (a float or a traced scalar).
      extra_dampings: None, or a 1-D array of E more relative dampings solved with the same
        eigendecomposition (adaptive damping's held-out comparison of dampings).

    Returns:
      (coefficients c, top eigenvalue of G, as computed), and with `extra_dampings` also the (E, K)
      coefficients at those dampings.
    """
    dtype = curvature.dtype
    curvature = 0.5 * (curvature + curvature.T)
    eigenvalues, eigenvectors = jnp.linalg.eigh(curvature)
    top = eigenvalues[-1]
    size = jnp.max(jnp.abs(eigenvalues))
    tolerance = curvature.shape[0] * jnp.finfo(dtype).eps * size
    meaningful = eigenvalues > tolerance
    scale = jnp.where(top > tolerance, top, jnp.ones((), dtype))
    projected = eigenvectors.T @ directional_derivatives.astype(dtype)

    def solve(damping):
        damped = jnp.where(meaningful, eigenvalues, 0) + damping * scale
        keep = damped > jnp.finfo(dtype).eps * scale
        inverse = jnp.where(keep, 1 / jnp.where(keep, damped, 1), 0)
        return eigenvectors @ (inverse * projected)

    coefficients = solve(damping)
    if extra_dampings is None:
        return coefficients, top
    return coefficients, top, jax.vmap(solve)(jnp.asarray(extra_dampings, dtype))


def combine(tangents: Any, coefficients: jax.Array, cast: bool = True) -> Any:
    """h = sum_k c_k v_k, shaped like one tangent; typed like the parameters (or, with cast=False, like c).

    Structured tangents (`sofo._structured.LowRank` leaves, a `Split`) are combined from their factors.
    """
    if _structured.is_structured(tangents):
        total = _structured.combine(tangents, coefficients)
        if not cast:
            return total
        like = tangents.head if isinstance(tangents, _structured.Split) else tangents
        kinds = jax.tree_util.tree_leaves(like, is_leaf=lambda x: isinstance(x, _structured.LowRank))
        flat, treedef = jax.tree_util.tree_flatten(total)
        dtypes = [k.a.dtype if isinstance(k, _structured.LowRank) else k.dtype for k in kinds]
        return jax.tree_util.tree_unflatten(treedef, [h.astype(d) for h, d in zip(flat, dtypes)])

    def leaf(v):
        h = jnp.tensordot(coefficients, v.astype(coefficients.dtype), axes=1)
        return h.astype(v.dtype) if cast else h

    return jax.tree_util.tree_map(leaf, tangents)
