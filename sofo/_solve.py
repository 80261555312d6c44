"""Steps 5-6 of SOFO: the damped eigen-solve in tangent space and the map back to parameter space."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def damped_solve(curvature: jax.Array, directional_derivatives: jax.Array, damping: float):
    """Solves (G + damping * max_eig(G) * I) c = g for a symmetric PSD-ish K x K sketch G.

    G = U S U^T by `eigh` (G is symmetric: no SVD). Negative eigenvalues (round-off, or true negative
    curvature from loss='exact') are clipped to zero before damping. When G has no positive eigenvalue,
    the damping is taken relative to 1 instead, so a zero sketch gives c = g / damping (finite). Eigenvalues
    that are still below float resolution (only possible with damping=0) are dropped, as a pseudo-inverse.

    Returns:
      (coefficients c, top eigenvalue of G).
    """
    dtype = curvature.dtype
    curvature = 0.5 * (curvature + curvature.T)
    eigenvalues, eigenvectors = jnp.linalg.eigh(curvature)
    top = eigenvalues[-1]
    scale = jnp.where(top > 0, top, jnp.ones((), dtype))
    damped = jnp.maximum(eigenvalues, 0) + damping * scale
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
