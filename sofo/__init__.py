"""sofo: second-order forward-mode optimisation (SOFO) in JAX.

Gauss-Newton steps in a random K-dimensional subspace, computed with forward-mode derivatives only
(Yu, Xia, Ma, Lengyel & Hennequin, NeurIPS 2024).
"""

from sofo._curvature import CurvatureWarning
from sofo._engine import SofoInfo, value_and_sofo_grad
from sofo._scan import value_and_sofo_grad_scan
from sofo import transforms
from sofo.transforms import State, sofo_grad
from sofo._optax import SofoState, scale_by_sofo, transform, unmask
from sofo._adaptive import AdaptiveDamping, predicted_reduction
from sofo._alias import sofo
from sofo import optim

__version__ = "0.1.0.dev0"

__all__ = [
    "AdaptiveDamping",
    "CurvatureWarning",
    "predicted_reduction",
    "scale_by_sofo",
    "sofo",
    "SofoInfo",
    "State",
    "SofoState",
    "transform",
    "sofo_grad",
    "optim",
    "transforms",
    "unmask",
    "value_and_sofo_grad",
    "value_and_sofo_grad_scan",
]
