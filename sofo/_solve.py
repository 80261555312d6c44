"""Steps 5-6 of SOFO: the damped eigen-solve in tangent space and the map back to parameter space."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def damped_solve(curvature: jax.Array, directional_derivatives: jax.Array, damping: float):
    """Solves (G + damping * max_eig(G) * I) c = g for a symmetric PSD-ish K x K sketch G.

    G = U S U^T by `eigh` (G is symmetric: no SVD). Eigenvalues at or below a round-off tolerance,
    eps * K * max|S| (the sketch's own size), count as zero: negative ones (round-off, or true negative
    curvature from loss='exact') and positive ones that are only round-off. When no eigenvalue is above
    the tolerance, the damping is taken relative to 1 instead, so the step is bounded by |g| / damping
    whatever the sign of the round-off (a zero sketch gives c = g / damping). Eigenvalues that are still
    below float resolution (only possible with damping=0) are dropped, as a pseudo-inverse. `damping` may
    be a Python float or a traced scalar.

    Returns:
      (coefficients c, top eigenvalue of G).
    """
    dtype = curvature.dtype
    curvature = 0.5 * (curvature + curvature.T)
    eigenvalues, eigenvectors = jnp.linalg.eigh(curvature)
    top = eigenvalues[-1]
    size = jnp.maximum(jnp.abs(eigenvalues[0]), jnp.abs(top))
    tolerance = jnp.finfo(dtype).eps * eigenvalues.shape[0] * size
    meaningful = eigenvalues > tolerance
    scale = jnp.where(top > tolerance, top, jnp.ones((), dtype))
    damped = jnp.where(meaningful, eigenvalues, 0) + damping * scale
    keep = damped > jnp.finfo(dtype).eps * scale
    inverse = jnp.where(keep, 1 / jnp.where(keep, damped, 1), 0)
    coefficients = eigenvectors @ (inverse * (eigenvectors.T @ directional_derivatives.astype(dtype)))
    return coefficients, top


def combine(tangents: Any, coefficients: jax.Array, cast: bool = True) -> Any:
    """h = sum_k c_k v_k, shaped like one tangent; typed like the parameters (or, with cast=False, like c)."""

    def leaf(v):
        h = jnp.tensordot(coefficients, v.astype(coefficients.dtype), axes=1)
        return h.astype(v.dtype) if cast else h

    return jax.tree_util.tree_map(leaf, tangents)
