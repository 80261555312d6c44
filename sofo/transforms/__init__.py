"""brainstate-style transforms over `sofo.State`: grad, jacfwd, hessian, sofo_grad and sofo_grad_scan.

They follow the conventions of `brainstate.transform.{grad, jacfwd, hessian, sofo_grad}` and
`brainpy.math.grad`: differentiate with respect to States (`grad_states`) and/or positional arguments
(`argnums`) and return `arg_grads`, `var_grads` or `(var_grads, arg_grads)`, then the value
(`return_value=True`) and aux (`has_aux=True`). All of them share one implementation of the argument and
state handling (`_wrapper`); the SOFO fronts get their direction from the engine
(`sofo.value_and_sofo_grad`, `sofo.value_and_sofo_grad_scan`).

`sofo_grad(..., key=None)` draws a fresh key per call from sofo's own sequence, seeded with `seed(n)`.

States may be `sofo.State`s or brainstate's own (`brainstate.State`, `ParamState`, ..., or the collection
`module.states(...)` returns); brainstate is never imported here (see `_state`).
"""

from sofo.transforms._autodiff import grad, hessian, jacfwd
from sofo.transforms._keys import seed
from sofo.transforms._sofo import sofo_grad, sofo_grad_scan
from sofo.transforms._state import State

__all__ = [
    "State",
    "grad",
    "hessian",
    "jacfwd",
    "seed",
    "sofo_grad",
    "sofo_grad_scan",
]
