"""The optimizers compared, each as a pure `step(state, lr) -> (state, loss)` on a `Problem`.

- SOFO plain: `optax.chain(sofo.transform(...), optax.sgd(lr))` (K random tangents, Gauss-Newton in their
  span with the task's fixed damping, params -= lr * direction): the paper's algorithm.
- sofo.sofo: the recommended configuration, `sofo.sofo(tangent_size=K, loss=...)` with its defaults
  (learning rate 1, Levenberg-Marquardt damping, one remembered direction), the same on every task.
- FGD (forward gradient descent): the SAME K tangents and the same forward pass, but no curvature:
  direction = (n / K) sum_k (v_k^T grad L) v_k, from the engine's `info.directional_derivatives`. The
  tangents have unit norm, so E[v v^T] = I / n and the n / K factor makes the direction an unbiased
  estimate of the gradient: FGD's learning rates then read like SGD's at any n and K. The gap between
  FGD and SOFO is what the K x K curvature solve buys.
- Adam and SGD with momentum 0.9 on `jax.grad` of the objective (for RNNs: backprop through time).
- GN: the exact damped Gauss-Newton step (G + damping * max_eig(G) I)^-1 g from a dense `jax.jacfwd`
  Jacobian, with the same damping rule as SOFO (the K = n limit of SOFO); only for small problems.

The learning rate is an argument of `step`, not a constant, so one compiled step serves a whole grid.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

import sofo
from sofo import _solve, _tangents  # FGD needs the engine's own tangents (same key -> same draws)

from benchmarks.tasks import Problem


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optimizer bound to a problem.

    Attributes:
      kind: "sofo", "sofo_lm", "fgd", "adam", "sgd" or "gn" (also the key of the problem's learning-rate grid).
      label: what tables and plots call it, e.g. "SOFO K=64".
      tangent_size: K for SOFO and FGD, else None.
      init: `init(params) -> state`.
      step: `step(state, lr) -> (state, loss before the step)`; `state[0]` is the parameters.
    """

    kind: str
    label: str
    tangent_size: int | None
    init: Callable[[Any], Any]
    step: Callable[[Any, jax.Array], tuple[Any, jax.Array]]


def _model_args(problem: Problem) -> dict:
    """The keyword arguments `sofo.transform`'s update takes for this problem."""
    if problem.recurrent:
        return dict(cell=problem.cell, loss_fn=problem.step_loss, z0=problem.z0, xs=problem.xs, ys=problem.ys)
    return dict(fun=problem.fun, loss_fn=problem.loss_fn)


def sofo_engine(problem: Problem, tangent_size: int, sampler: str | None = None):
    """`f(key, params) -> (value, direction, info)`: the engine on the problem (the scan twin for RNNs)."""
    sampler = problem.sampler if sampler is None else sampler
    settings = dict(tangent_size=tangent_size, damping=problem.damping, loss=problem.curvature, sampler=sampler)
    if not problem.recurrent:
        return sofo.value_and_sofo_grad(problem.fun, problem.loss_fn, **settings)
    engine = sofo.value_and_sofo_grad_scan(problem.cell, problem.step_loss, **settings)
    return lambda key, params: engine(key, params, problem.z0, problem.xs, problem.ys)


def forward_gradient(key, params, directional_derivatives, tangent_size, sampler="normal"):
    """sum_k (v_k^T grad L) v_k with the tangents the engine drew from the same key."""
    tangents = _tangents.sample(key, params, tangent_size, sampler)
    return _solve.combine(tangents, directional_derivatives)


def _subtract(params, direction, lr):
    return jax.tree_util.tree_map(lambda p, d: p - lr * d, params, direction)


def make_sofo(problem: Problem, tangent_size: int, seed: int = 0) -> Optimizer:
    """`optax.chain(sofo.transform(...), optax.sgd(lr))`, exactly as a user would write it."""

    def build(lr):
        return optax.chain(
            sofo.transform(
                tangent_size=tangent_size,
                damping=problem.damping,
                loss=problem.curvature,
                sampler=problem.sampler,
                key=jax.random.key(seed),
            ),
            optax.sgd(lr),
        )

    def init(params):
        return params, build(jnp.float32(1.0)).init(params)

    def step(state, lr):
        params, opt_state = state
        updates, opt_state = build(lr).update(None, opt_state, params, **_model_args(problem))
        return (optax.apply_updates(params, updates), opt_state), opt_state[0].value

    return Optimizer("sofo", f"SOFO plain K={tangent_size}", tangent_size, init, step)


def make_sofo_recommended(problem: Problem, tangent_size: int, seed: int = 0) -> Optimizer:
    """`sofo.sofo(tangent_size=K, loss=..., key=seed)` with every other setting at its default. The
    learning rate passed to `step` is ignored: the alias's default (1.0) is the point."""
    optimizer = sofo.sofo(tangent_size=tangent_size, loss=problem.curvature, key=jax.random.key(seed))

    def init(params):
        return params, optimizer.init(params)

    def step(state, lr):
        del lr
        params, opt_state = state
        updates, opt_state = optimizer.update(None, opt_state, params, **_model_args(problem))
        return (optax.apply_updates(params, updates), opt_state), opt_state[0].value

    return Optimizer("sofo_lm", f"sofo.sofo K={tangent_size}", tangent_size, init, step)


def make_fgd(problem: Problem, tangent_size: int, seed: int = 0) -> Optimizer:
    """Forward gradient descent on SOFO's tangents: the key schedule of `sofo.transform` (step t draws
    from `split(key_t)[1]`), so with the same seed both see the same K tangents at every step."""
    engine = sofo_engine(problem, tangent_size)
    unbiased = problem.size / tangent_size  # E[sum_k v_k v_k^T] = (K / n) I for unit-norm tangents

    def step(state, lr):
        params, key = state
        key, step_key = jax.random.split(key)
        value, _, info = engine(step_key, params)
        direction = forward_gradient(step_key, params, info.directional_derivatives, tangent_size, problem.sampler)
        return (_subtract(params, direction, lr * unbiased), key), value

    return Optimizer("fgd", f"FGD K={tangent_size}", tangent_size, lambda p: (p, jax.random.key(seed)), step)


def _make_optax(problem: Problem, kind: str, label: str, build: Callable[[jax.Array], optax.GradientTransformation]):
    value_and_grad = jax.value_and_grad(problem.objective)

    def init(params):
        return params, build(jnp.float32(1.0)).init(params)  # the state's shape does not depend on lr

    def step(state, lr):
        params, opt_state = state
        value, grad = value_and_grad(params)
        updates, opt_state = build(lr).update(grad, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    return Optimizer(kind, label, None, init, step)


def make_adam(problem: Problem) -> Optimizer:
    label = "Adam (BPTT)" if problem.recurrent else "Adam"
    return _make_optax(problem, "adam", label, lambda lr: optax.adam(lr))


def make_sgd(problem: Problem) -> Optimizer:
    label = "SGD+momentum (BPTT)" if problem.recurrent else "SGD+momentum"
    return _make_optax(problem, "sgd", label, lambda lr: optax.sgd(lr, momentum=0.9))


def gauss_newton_direction(problem: Problem, params):
    """(G + damping * max_eig(G) I)^-1 g with G = J^T H_L J: J by dense `jax.jacfwd`, H_L J by
    forward-over-reverse on the loss of the outputs. Independent of the engine (no tangents, no sketch)."""
    flat, unravel = ravel_pytree(params)
    outputs = problem.outputs(params)
    out_flat, unravel_out = ravel_pytree(outputs)
    jacobian = jax.jacfwd(lambda theta: ravel_pytree(problem.outputs(unravel(theta)))[0])(flat)  # (m, n)
    loss_of_outputs = lambda o: problem.output_loss(unravel_out(o))  # noqa: E731
    value, grad_outputs = jax.value_and_grad(loss_of_outputs)(out_flat)
    hessian_jacobian = jax.vmap(
        lambda u: jax.jvp(jax.grad(loss_of_outputs), (out_flat,), (u,))[1], in_axes=1, out_axes=1
    )(jacobian)
    curvature = jacobian.T @ hessian_jacobian
    curvature = 0.5 * (curvature + curvature.T)
    top = jnp.linalg.eigvalsh(curvature)[-1]
    damped = curvature + problem.damping * top * jnp.eye(flat.size, dtype=flat.dtype)
    direction = jnp.linalg.solve(damped, jacobian.T @ grad_outputs)
    return value, unravel(direction)


def make_gauss_newton(problem: Problem) -> Optimizer:
    def step(state, lr):
        (params,) = state
        value, direction = gauss_newton_direction(problem, params)
        return (_subtract(params, direction, lr),), value

    return Optimizer("gn", "Gauss-Newton (exact)", None, lambda p: (p,), step)


GAUSS_NEWTON_MAX_PARAMS = 4096  # the dense step forms an n x n matrix and a Jacobian of n columns


def optimizers_for(problem: Problem, *, seed: int = 0, gauss_newton: bool | None = None) -> list[Optimizer]:
    """Adam and SGD first (Adam is the baseline every summary refers to), then SOFO per K, FGD (on the
    first K's tangents), then GN where the problem allows it and has at most GAUSS_NEWTON_MAX_PARAMS."""
    result = [make_adam(problem), make_sgd(problem)]
    for k in problem.tangent_sizes:
        result.append(make_sofo(problem, k, seed))
        result.append(make_sofo_recommended(problem, k, seed))
    result.append(make_fgd(problem, problem.tangent_sizes[0], seed))
    if gauss_newton is None:
        gauss_newton = problem.gauss_newton and problem.size <= GAUSS_NEWTON_MAX_PARAMS
    if gauss_newton:
        result.append(make_gauss_newton(problem))
    return result
