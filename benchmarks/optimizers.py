"""The optimizers compared, each as a pure `step(state, lr) -> (state, loss)` on a `Problem`.

- SOFO plain: `optax.chain(sofo.scale_by_sofo(...), optax.sgd(lr))` (K random tangents, Gauss-Newton in their
  span with the task's fixed damping, params -= lr * direction): the paper's algorithm.
- sofo.sofo: the recommended configuration, `sofo.sofo(tangent_size=K)` with its defaults (learning
  rate 1, Levenberg-Marquardt damping re-judged on the next batch, min(4, K // 4) remembered directions,
  balanced tangents, curvature "exact"), the same on every task.
- FGD (forward gradient descent): the SAME K tangents and the same forward pass, but no curvature:
  direction = (n / K) sum_k (v_k^T grad L) v_k, from the engine's `info.directional_derivatives`. The
  tangents have unit norm, so E[v v^T] = I / n and the n / K factor makes the direction an unbiased
  estimate of the gradient: FGD's learning rates then read like SGD's at any n and K. The gap between
  FGD and SOFO is what the K x K curvature solve buys.
- Adam and SGD with momentum 0.9 on `jax.grad` of the objective (for RNNs: backprop through time).
- GN: the exact damped Gauss-Newton step (G + damping * max_eig(G) I)^-1 g from a dense `jax.jacfwd`
  Jacobian, with the same damping rule as SOFO (the K = n limit of SOFO); only for small problems.
- L-BFGS: `optax.lbfgs()` at its defaults (memory 10, zoom linesearch satisfying the strong Wolfe
  conditions); every linesearch trial is one function-and-gradient evaluation, counted in the state.
- Hessian-free: truncated-Newton Gauss-Newton (Martens 2010), written here on `jax.linearize` and its
  transpose: each iteration linearizes the model once (value, gradient and the Jacobian's residuals),
  runs a fixed number of conjugate-gradient steps on (G + lambda I) x = g with G = J^T H_L J (one
  Jacobian-vector product, one loss-Hessian product and one transposed product per CG step), warm-started
  from 0.95 times the previous solution, then accepts the step only if the loss went down and adapts lambda
  with the Levenberg-Marquardt rule on the reduction ratio (3/2 up below 1/4, 2/3 down above 3/4).

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
      cost: what one iteration evaluates, in words (the tables' "evals/iter" column).
      evaluations: optional `evaluations(state) -> count`, the function-and-gradient evaluations made so
        far where their number varies per iteration (L-BFGS's linesearch).
    """

    kind: str
    label: str
    tangent_size: int | None
    init: Callable[[Any], Any]
    step: Callable[[Any, jax.Array], tuple[Any, jax.Array]]
    cost: str = ""
    evaluations: Callable[[Any], jax.Array] | None = None


def _model_args(problem: Problem) -> dict:
    """The keyword arguments `sofo.scale_by_sofo`'s update takes for this problem."""
    if problem.recurrent:
        return dict(cell=problem.cell, loss_fn=problem.step_loss, z0=problem.z0, xs=problem.xs, ys=problem.ys)
    return dict(fun=problem.fun, loss_fn=problem.loss_fn)


def sofo_engine(problem: Problem, tangent_size: int, sampler: str | None = None):
    """`f(key, params) -> (value, direction, info)`: the engine on the problem (the scan twin for RNNs)."""
    sampler = problem.sampler if sampler is None else sampler
    settings = dict(tangent_size=tangent_size, damping=problem.damping, curvature=problem.curvature, sampler=sampler)
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
    """`optax.chain(sofo.scale_by_sofo(...), optax.sgd(lr))`, exactly as a user would write it."""

    def build(lr):
        return optax.chain(
            sofo.scale_by_sofo(
                tangent_size=tangent_size,
                damping=problem.damping,
                curvature=problem.curvature,
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

    return Optimizer("sofo", f"SOFO plain K={tangent_size}", tangent_size, init, step, _sofo_cost(tangent_size))


def make_sofo_recommended(problem: Problem, tangent_size: int, seed: int = 0) -> Optimizer:
    """`sofo.sofo(tangent_size=K, key=seed)` with every other setting at its default (the curvature
    "exact" included). The learning rate passed to `step` is ignored: the alias's default (1.0) is the
    point."""
    optimizer = sofo.sofo(tangent_size=tangent_size, key=jax.random.key(seed))

    def init(params):
        return params, optimizer.init(params)

    def step(state, lr):
        del lr
        params, opt_state = state
        updates, opt_state = optimizer.update(None, opt_state, params, **_model_args(problem))
        return (optax.apply_updates(params, updates), opt_state), opt_state[0].value

    return Optimizer(
        "sofo_lm", f"sofo.sofo K={tangent_size}", tangent_size, init, step, _sofo_cost(tangent_size) + " + 1 f"
    )


def make_fgd(problem: Problem, tangent_size: int, seed: int = 0) -> Optimizer:
    """Forward gradient descent on SOFO's tangents: the key schedule of `sofo.scale_by_sofo` (step t draws
    from `split(key_t)[1]`), so with the same seed both see the same K tangents at every step."""
    engine = sofo_engine(problem, tangent_size)
    unbiased = problem.size / tangent_size  # E[sum_k v_k v_k^T] = (K / n) I for unit-norm tangents

    def step(state, lr):
        params, key = state
        key, step_key = jax.random.split(key)
        value, _, info = engine(step_key, params)
        direction = forward_gradient(step_key, params, info.directional_derivatives, tangent_size, problem.sampler)
        return (_subtract(params, direction, lr * unbiased), key), value

    return Optimizer(
        "fgd", f"FGD K={tangent_size}", tangent_size, lambda p: (p, jax.random.key(seed)), step,
        _sofo_cost(tangent_size),
    )


def _make_optax(problem: Problem, kind: str, label: str, build: Callable[[jax.Array], optax.GradientTransformation]):
    value_and_grad = jax.value_and_grad(problem.objective)

    def init(params):
        return params, build(jnp.float32(1.0)).init(params)  # the state's shape does not depend on lr

    def step(state, lr):
        params, opt_state = state
        value, grad = value_and_grad(params)
        updates, opt_state = build(lr).update(grad, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    return Optimizer(kind, label, None, init, step, "1 f+g")


def _sofo_cost(tangent_size: int) -> str:
    return f"1 fwd with {tangent_size} tangents"


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

    return Optimizer("gn", "Gauss-Newton (exact)", None, lambda p: (p,), step, "dense Jacobian + n x n solve")


def make_lbfgs(problem: Problem) -> Optimizer:
    """`optax.lbfgs()` at its defaults (memory 10, zoom linesearch). The learning rate passed to `step` is
    ignored: the linesearch sets the step size. The state counts function-and-gradient evaluations: one
    per linesearch trial, plus the first iteration's evaluation at the starting point (later iterations
    reuse the value and gradient the linesearch stored, through `optax.value_and_grad_from_state`)."""
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(problem.objective)

    def init(params):
        return params, solver.init(params), jnp.zeros((), jnp.int32)

    def step(state, lr):
        del lr
        params, opt_state, evaluations = state
        fresh = ~jnp.isfinite(optax.tree.get(opt_state, "value"))  # nothing stored yet: one evaluation
        value, grad = value_and_grad(params, state=opt_state)
        updates, opt_state = solver.update(
            grad, opt_state, params, value=value, grad=grad, value_fn=problem.objective
        )
        trials = optax.tree.get(opt_state, "num_linesearch_steps")
        evaluations = evaluations + trials.astype(jnp.int32) + fresh.astype(jnp.int32)
        return (optax.apply_updates(params, updates), opt_state, evaluations), value

    return Optimizer("lbfgs", "L-BFGS (optax)", None, init, step, "f+g per linesearch trial", lambda s: s[2])


def gauss_newton_products(problem: Problem, params):
    """The loss, its gradient and `v -> J^T H_L J v` (the Gauss-Newton-vector product), on flat vectors.

    One `jax.linearize` of the model's outputs gives the value, the gradient (the transposed Jacobian
    applied to dL/d outputs) and the residuals every product reuses: a product is one Jacobian-vector
    product, one Hessian-vector product of the loss in the outputs, and one transposed product.

    Returns:
      (value, grad, ggn, unravel): grad is flat; ggn maps a flat vector to a flat vector; unravel maps a
      flat vector back to the parameters' pytree.
    """
    theta, unravel = ravel_pytree(params)
    outputs, jvp = jax.linearize(lambda t: problem.outputs(unravel(t)), theta)
    transpose = jax.linear_transpose(jvp, theta)
    value, dloss = jax.value_and_grad(problem.output_loss)(outputs)
    (grad,) = transpose(dloss)
    loss_gradient = jax.grad(problem.output_loss)

    def ggn(v):
        hessian_u = jax.jvp(loss_gradient, (outputs,), (jvp(v),))[1]
        return transpose(hessian_u)[0]

    return value, grad, ggn, unravel


def conjugate_gradient(matvec: Callable, b: jax.Array, x0: jax.Array, steps: int):
    """`steps` conjugate-gradient iterations on matvec(x) = b from x0 (matvec symmetric positive definite).

    A fixed number of iterations (so the step compiles to one loop); an iteration whose search direction
    has no curvature left (p^T A p <= 0, e.g. once the residual is exactly 0) leaves x unchanged.

    Returns:
      (x, residual): the iterate and b - matvec(x), tracked by the recurrence.
    """
    r = b - matvec(x0)

    def body(_, carry):
        x, r, p, rr = carry
        ap = matvec(p)
        curvature = jnp.vdot(p, ap)
        alpha = jnp.where(curvature > 0, rr / jnp.where(curvature > 0, curvature, 1.0), 0.0)
        x, r = x + alpha * p, r - alpha * ap
        rr_new = jnp.vdot(r, r)
        beta = jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0)
        return x, r, r + beta * p, rr_new

    x, r, _, _ = jax.lax.fori_loop(0, steps, body, (x0, r, r, jnp.vdot(r, r)))
    return x, r


HF_CG_STEPS = 30  # conjugate-gradient steps per Hessian-free iteration (the --quick run uses fewer)
HF_INITIAL_DAMPING = 1.0
HF_WARM_START = 0.95  # Martens (2010): start CG from 0.95 x the previous solution
HF_DAMPING_RANGE = (1e-6, 1e8)


def make_hessian_free(problem: Problem, cg_steps: int = HF_CG_STEPS) -> Optimizer:
    """Truncated-Newton Gauss-Newton with Levenberg-Marquardt damping (Martens 2010), on `jax.linearize`.

    Each iteration: value, gradient g and the GGN product from one linearization; `cg_steps` CG steps on
    (G + lambda I) x = g, warm-started from 0.95 x the last accepted x; candidate theta - lr x, its loss
    evaluated once; the reduction ratio rho = (f(candidate) - f) / (-lr g.x + lr^2 x.Gx / 2) (the undamped
    quadratic model; x.Gx comes from CG's residual, no extra product); lambda x 3/2 if rho < 1/4 or the
    loss did not go down, x 2/3 if rho > 3/4; the step is taken only if the loss went down. No
    preconditioner and no CG backtracking (Martens uses both). lr is fixed at 1 by the tasks' grids.

    References:
      J. Martens, "Deep learning via Hessian-free optimization", ICML 2010.
    """
    low, high = HF_DAMPING_RANGE

    def init(params):
        flat, _ = ravel_pytree(params)
        return params, jnp.asarray(HF_INITIAL_DAMPING, flat.dtype), jnp.zeros_like(flat)

    def step(state, lr):
        params, damping, previous = state
        theta, _ = ravel_pytree(params)
        value, grad, ggn, unravel = gauss_newton_products(problem, params)
        x, residual = conjugate_gradient(lambda v: ggn(v) + damping * v, grad, HF_WARM_START * previous, cg_steps)
        curvature_x = grad - residual - damping * x  # G x, from (G + lambda I) x = g - residual
        lr = jnp.asarray(lr, theta.dtype)
        predicted = -lr * jnp.vdot(grad, x) + 0.5 * lr**2 * jnp.vdot(x, curvature_x)
        candidate = theta - lr * x
        new_value = problem.objective(unravel(candidate))
        accept = jnp.isfinite(new_value) & (new_value < value)
        rho = jnp.where(predicted < 0, (new_value - value) / jnp.where(predicted < 0, predicted, -1.0), 0.0)
        factor = jnp.where(~accept | (rho < 0.25), 1.5, jnp.where(rho > 0.75, 2.0 / 3.0, 1.0))
        damping = jnp.clip(damping * factor, low, high).astype(damping.dtype)
        theta = jnp.where(accept, candidate, theta)
        previous = jnp.where(accept, x, jnp.zeros_like(x))
        return (unravel(theta), damping, previous), value

    cost = f"1 f+g, {cg_steps} GGN-v, 1 f"
    return Optimizer("hf", "Hessian-free (CG)", None, init, step, cost)


# The tasks' learning-rate grids predate these two; both run at a fixed 1 (L-BFGS ignores it).
DEFAULT_GRIDS = {"lbfgs": (1.0,), "hf": (1.0,)}


def learning_rates(problem: Problem, kind: str) -> tuple[float, ...]:
    """The grid optimizer `kind` is run over on `problem` (the problem's own, else DEFAULT_GRIDS)."""
    if kind in problem.learning_rates:
        return tuple(problem.learning_rates[kind])
    if kind in DEFAULT_GRIDS:
        return DEFAULT_GRIDS[kind]
    raise KeyError(f"task {problem.name!r} has no learning-rate grid for {kind!r}; add one to its learning_rates.")


GAUSS_NEWTON_MAX_PARAMS = 4096  # the dense step forms an n x n matrix and a Jacobian of n columns


def optimizers_for(
    problem: Problem, *, seed: int = 0, gauss_newton: bool | None = None, cg_steps: int = HF_CG_STEPS
) -> list[Optimizer]:
    """Adam and SGD first (Adam is the baseline every summary refers to), then SOFO per K, FGD (on the
    first K's tangents), L-BFGS, Hessian-free (`cg_steps` CG steps per iteration), then GN where the
    problem allows it and has at most GAUSS_NEWTON_MAX_PARAMS."""
    result = [make_adam(problem), make_sgd(problem)]
    for k in problem.tangent_sizes:
        result.append(make_sofo(problem, k, seed))
        result.append(make_sofo_recommended(problem, k, seed))
    result.append(make_fgd(problem, problem.tangent_sizes[0], seed))
    result.append(make_lbfgs(problem))
    result.append(make_hessian_free(problem, cg_steps))
    if gauss_newton is None:
        gauss_newton = problem.gauss_newton and problem.size <= GAUSS_NEWTON_MAX_PARAMS
    if gauss_newton:
        result.append(make_gauss_newton(problem))
    return result
