"""Small subspaces (issue 15, section 3): sofo.sofo at K=32 against tuned Adam, full batch, variants side by side.

    python -m benchmarks.small_k --seeds 3

Two tasks: a sequential-digits classifier (tanh RNN N=64 reading the 8 rows of sklearn's 8x8 digits,
cross-entropy at the last step) and an 8-64-64-1 tanh MLP regression on a noisy random teacher. Prints,
per task and variant, the final training loss and Adam's iterations to its own final loss divided by
the variant's (0 where it never got there), median [min, max] over seeds; for the slot variants also the
cosine of the slot's direction with the gradient at the step that uses it (median over steps, then
over seeds). A third task, `--tasks flipflop --iterations 150`, is the quick full-batch flip-flop RNN, the
control for what must not get worse.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sofo
from benchmarks.stochastic import _mlp, _mlp_apply
from benchmarks import tasks
from benchmarks.tasks import cross_entropy, mse

VARIANTS = {
    "default": {},
    "memory 8": dict(memory_size=8),
    "memory 16": dict(memory_size=16),
    "memory 0": dict(memory_size=0),
    "layerwise": dict(sampler="layerwise"),
    "normal": dict(sampler="normal"),
    # Experimental (issue 15 part B), done here rather than in the engine: the remembered directions
    # Gram-Schmidt'ed against each other (newest first) after every step, and K that grows.
    "orthogonal memory": dict(_orthogonal_memory=True),
    "orthogonal memory 8": dict(memory_size=8, _orthogonal_memory=True),
    "adaptive K": dict(_adaptive_k=True),
    # Experimental (issue 15 part C): one extra memory slot (slot 0) holds a direction other than a past
    # step, next to the 4 remembered steps (memory_size 5, so 27 random tangents instead of 28):
    # "grad EMA b": the EMA over steps of the subspace gradient V_t g_t (g_t = V_t^T grad, the K directional
    # derivatives the engine already has), an accumulated forward-gradient estimate of the full gradient;
    # "random" uses only the random tangents' part (the memory slots left out); "step EMA b": the EMA of
    # the applied updates (a momentum direction); "oracle grad": the exact backprop gradient at the current
    # parameters (an upper bound for what a gradient estimate in one slot can give, not forward-mode).
    "grad EMA 0": dict(memory_size=5, _slot=("grad", 0.0, False)),
    "grad EMA 0.9": dict(memory_size=5, _slot=("grad", 0.9, False)),
    "grad EMA 0.99": dict(memory_size=5, _slot=("grad", 0.99, False)),
    "grad EMA 0.9 random": dict(memory_size=5, _slot=("grad", 0.9, True)),
    "grad EMA 0.99 random": dict(memory_size=5, _slot=("grad", 0.99, True)),
    "step EMA 0.9": dict(memory_size=5, _slot=("step", 0.9, False)),
    "step EMA 0.99": dict(memory_size=5, _slot=("step", 0.99, False)),
    "oracle grad": dict(memory_size=5, _slot=("oracle", 0.0, False)),
    # "params": the current parameters theta_t themselves (forward-mode: no gradient needed). On separable
    # cross-entropy the negative gradient aligns with theta late in training (the margin grows with the
    # weights' scale), so theta is a free gradient proxy there.
    "params slot": dict(memory_size=5, _slot=("params", 0.0, False)),
    # Experimental: the K x K solve in Jacobi-scaled coordinates (each tangent rescaled to unit curvature,
    # diag(G~) = 1, before the relative damping), so one stiff tangent (the gradient of an RNN loss) does not
    # set the damping of all the others. Patched into sofo._solve for the run only.
    "jacobi": dict(_jacobi=True),
    "oracle grad + jacobi": dict(memory_size=5, _slot=("oracle", 0.0, False), _jacobi=True),
}
GROW_EVERY, MAX_TANGENTS = 10, 128


def _orthogonalise_memory(state):
    """The SofoState with its memory directions Gram-Schmidt'ed, newest first (a nearly dependent one is emptied).

    The span of the memory, and so of the K tangents, is unchanged; what changes is the coordinates the
    damping acts in (lambda |c|^2) and the conditioning of the K x K sketch."""
    memory = state.memory
    if memory is None:
        return state
    leaves, treedef = jax.tree_util.tree_flatten(memory)
    m = leaves[0].shape[0]
    flat = jnp.concatenate([leaf.reshape(m, -1) for leaf in leaves], axis=1)
    rows = []
    for i in range(m):
        v = flat[i]
        for q in rows:
            v = v - jnp.dot(v, q) * q
        norm, original = jnp.linalg.norm(v), jnp.linalg.norm(flat[i])
        keep = norm > 1e-3 * original
        rows.append(jnp.where(keep, v / jnp.where(keep, norm, 1.0), 0.0))
    flat = jnp.stack(rows)
    sizes = np.cumsum([0] + [int(np.prod(leaf.shape[1:])) for leaf in leaves])
    new = [flat[:, a:b].reshape(leaf.shape).astype(leaf.dtype) for leaf, a, b in zip(leaves, sizes[:-1], sizes[1:])]
    return state._replace(memory=jax.tree_util.tree_unflatten(treedef, new))


def _flat(tree, lead=0):
    """The leaves of `tree` as one flat vector (lead=0) or one row per entry of a leading axis (lead=1)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if lead:
        return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)
    return jnp.concatenate([leaf.reshape(-1) for leaf in leaves])


def _unflat(flat, like):
    """A flat vector back into the shape of `like` (a pytree of arrays)."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    sizes = np.cumsum([0] + [int(np.prod(leaf.shape)) for leaf in leaves])
    parts = [flat[a:b].reshape(leaf.shape).astype(leaf.dtype) for leaf, a, b in zip(leaves, sizes[:-1], sizes[1:])]
    return jax.tree_util.tree_unflatten(treedef, parts)


def subspace_gradient(state, params, grad, tangent_size, sampler, random_only=False):
    """V g with V the K tangents the step from `state` draws (its key and memory) and g = V^T grad.

    g is the engine's `directional_derivatives` for that step (computed here from `grad` so the benchmark
    needs no engine change; the numbers are the same up to round-off). V g is the step's forward-gradient
    estimate of `grad`. With `random_only` the memory tangents (the first m) are left out."""
    step_key = jax.random.split(jax.random.wrap_key_data(jnp.asarray(state.key)))[1]
    tangents = sofo._tangents.sample(step_key, params, tangent_size, sampler, basis=state.memory)
    dtype = sofo._tangents.compute_dtype(params)
    v = _flat(tangents, lead=1).astype(dtype)
    g = v @ _flat(grad).astype(dtype)
    if random_only and state.memory is not None:
        g = g.at[: sofo._tangents.memory_count(state.memory)].set(0.0)
    return g @ v


def _with_slot(state, before, direction):
    """The SofoState whose memory is [direction, the remembered steps]: slot 0 holds `direction`.

    `before` is the memory the step used ([slot, h_{t-1}, ...]); after an accepted step `state.memory` is
    [h_t, slot, h_{t-1}, ...] (pushed), after a rejected one it is `before`."""
    memory = state.memory
    leaves, treedef = jax.tree_util.tree_flatten(memory)
    slot = _unflat(direction, jax.tree_util.tree_map(lambda leaf: leaf[0], memory))
    new = []
    for leaf, extra in zip(leaves, jax.tree_util.tree_leaves(slot)):
        steps = jnp.where(state.accepted, jnp.concatenate([leaf[:1], leaf[2:]]), leaf[1:])
        new.append(jnp.concatenate([extra[None].astype(leaf.dtype), steps]))
    return state._replace(memory=jax.tree_util.tree_unflatten(treedef, new))


def _jacobi_damped_solve(curvature, directional_derivatives, damping):
    """`sofo._solve.damped_solve` in the coordinates where every tangent has unit curvature: with
    D = sqrt(diag G) (floored at K * eps of its largest entry), c = D^-1 solve(D^-1 G D^-1, D^-1 g)."""
    diagonal = jnp.clip(jnp.diagonal(curvature), 0, None)
    floor = curvature.shape[0] * jnp.finfo(curvature.dtype).eps * jnp.max(diagonal)
    scale = jnp.sqrt(jnp.where(diagonal > floor, diagonal, jnp.where(floor > 0, floor, 1)))
    scaled = curvature / scale[:, None] / scale[None, :]
    coefficients, _ = _ORIGINAL_SOLVE(scaled, directional_derivatives / scale, damping)
    return coefficients / scale, jnp.linalg.eigvalsh(0.5 * (curvature + curvature.T))[-1]


_ORIGINAL_SOLVE = sofo._solve.damped_solve


def sequential_digits(seed):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = jnp.asarray(data.images / 16.0, jnp.float32).transpose(1, 0, 2)  # (T=8 rows, B, 8 pixels)
    y = jnp.asarray(data.target)
    hidden = 64
    kw, ku, kc = jax.random.split(jax.random.key(seed + 11), 3)
    params = {
        "W": 0.9 * jax.random.normal(kw, (hidden, hidden), jnp.float32) / np.sqrt(hidden),
        "U": jax.random.normal(ku, (8, hidden), jnp.float32) / np.sqrt(8),
        "b": jnp.zeros((hidden,), jnp.float32),
        "C": jax.random.normal(kc, (hidden, 10), jnp.float32) / np.sqrt(hidden),
        "d": jnp.zeros((10,), jnp.float32),
    }

    def fun(p):
        def step(h, row):
            return jnp.tanh(h @ p["W"] + row @ p["U"] + p["b"]), None

        h, _ = jax.lax.scan(step, jnp.zeros((x.shape[1], hidden), jnp.float32), x)
        return h @ p["C"] + p["d"]

    return params, fun, lambda logits: cross_entropy(logits, y), "ce"


def mlp_regression(seed):
    key_teacher, key_x, key_noise, key_init = jax.random.split(jax.random.key(seed + 7), 4)
    teacher = _mlp((8, 32, 1), key_teacher)
    x = jax.random.normal(key_x, (2000, 8), jnp.float32)
    y = _mlp_apply(teacher, x) + 0.1 * jax.random.normal(key_noise, (2000, 1), jnp.float32)
    return _mlp((8, 64, 64, 1), key_init), lambda p: _mlp_apply(p, x), lambda out: mse(out, y), "mse"


def flipflop(seed):
    """The quick 3-bit flip-flop task (`benchmarks.tasks.flipflop`, RNN N=64, T=100, B=32), full batch, as
    one feed-forward model: fun(params) is the whole rollout and loss_fn sums the per-step losses, as the
    scan engine does (same derivatives; the exact curvature, sofo.sofo's default). Run it with
    --iterations 150, as the suite does."""
    problem = tasks.flipflop(seed=seed, quick=True)

    def fun(p):
        return jax.lax.scan(lambda z, x: problem.cell(p, z, x), problem.z0, problem.xs)[1]

    def loss_fn(outputs):
        return jnp.sum(jax.vmap(problem.step_loss)(outputs, problem.ys))

    return problem.params, fun, loss_fn, "exact"


TASKS = {"seq_digits": sequential_digits, "mlp_regression": mlp_regression, "flipflop": flipflop}
DEFAULT_TASKS = "seq_digits,mlp_regression"


def _curve(params, fun, loss_fn, opt, iterations, sofo_opt, orthogonal_memory=False, slot=None,
           tangent_size=32, sampler="balanced", cosines=None):
    """The loss after each of `iterations` steps (and, with `slot`, the cosine of slot 0 with the gradient
    at the step that uses it, appended to `cosines`)."""
    total = lambda q: loss_fn(fun(q))  # noqa: E731

    def body(carry, _):
        p, s, acc = carry
        cosine = jnp.zeros([], jnp.float32)
        if sofo_opt:
            state = s[0]
            if slot is not None:
                kind, beta, random_only = slot
                grad = _flat(jax.grad(total)(p)).astype(jnp.float32)
                if kind in ("oracle", "params"):
                    fill = grad if kind == "oracle" else _flat(p).astype(jnp.float32)
                    state = _with_slot(state._replace(accepted=jnp.asarray(False)), state.memory, fill)
                    state = state._replace(accepted=s[0].accepted)
                    s = (state,) + tuple(s[1:])
                used = _flat(state.memory, lead=1)[0].astype(jnp.float32)
                cosine = jnp.dot(used, grad) / (jnp.linalg.norm(used) * jnp.linalg.norm(grad) + 1e-30)
            u, s = opt.update(None, s, p, fun=fun, loss_fn=loss_fn)
            if orthogonal_memory:
                s = (_orthogonalise_memory(s[0]),) + tuple(s[1:])
            if slot is not None:
                if kind == "grad":
                    grad_tree = _unflat(grad, p)
                    acc = beta * acc + (1 - beta) * subspace_gradient(
                        state, p, grad_tree, tangent_size, sampler, random_only
                    )
                elif kind == "step":
                    acc = jnp.where(s[0].accepted, beta * acc + (1 - beta) * _flat(u).astype(jnp.float32), acc)
                else:  # the oracle's (or the params') slot is refilled before the next step
                    acc = fill
                s = (_with_slot(s[0], state.memory, acc),) + tuple(s[1:])
        else:
            u, s = opt.update(jax.grad(total)(p), s, p)
        p = optax.apply_updates(p, u)
        return (p, s, acc), (total(p), cosine)

    acc0 = jnp.zeros(_flat(params).shape, jnp.float32)
    _, (losses, cos) = jax.jit(lambda p, s: jax.lax.scan(body, (p, s, acc0), None, length=iterations))(
        params, opt.init(params)
    )
    if cosines is not None:
        cosines.append(np.asarray(cos))
    return np.asarray(losses)


def _adaptive_k_curve(params, fun, loss_fn, make_opt, tangent_size, iterations):
    """sofo.sofo whose K doubles (up to MAX_TANGENTS) after GROW_EVERY steps all accepted with the damping
    at its floor K * eps (the subspace, not the trust region, is then the limit). The state carries over:
    nothing in it depends on K. Returns the loss curve and the K of every step."""
    cache = {}

    def chunk(k):
        if k not in cache:
            opt = make_opt(k)

            def body(carry, _):
                p, s = carry
                u, s = opt.update(None, s, p, fun=fun, loss_fn=loss_fn)
                p = optax.apply_updates(p, u)
                return (p, s), (loss_fn(fun(p)), s[0].accepted, s[0].damping)

            cache[k] = (opt, jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=GROW_EVERY)))
        return cache[k]

    k = tangent_size
    opt, _ = chunk(k)
    p, s = params, opt.init(params)
    losses, ks = [], []
    for _ in range(0, iterations, GROW_EVERY):
        (p, s), (loss, accepted, damping) = chunk(k)[1](p, s)
        losses.extend(np.asarray(loss).tolist())
        ks.extend([k] * GROW_EVERY)
        floor = k * float(jnp.finfo(jnp.float32).eps)
        if bool(np.all(accepted)) and float(damping[-1]) <= 1.01 * floor and k < MAX_TANGENTS:
            k = min(2 * k, MAX_TANGENTS)
    return np.asarray(losses[:iterations]), np.asarray(ks[:iterations])


def _spread(values, fmt="{:.3g}"):
    values = sorted(values)
    return f"{fmt.format(statistics.median(values))} [{fmt.format(values[0])}, {fmt.format(values[-1])}]"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.small_k")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--tangent-size", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS] + [t for t in args.tasks.split(",") if t not in TASKS]
    if bad:
        parser.error(f"unknown variant(s) or task(s): {', '.join(bad)}")
    for name in args.tasks.split(","):
        make = TASKS[name]
        setups = [make(seed) for seed in range(args.seeds)]
        adam = {}
        for lr in (1e-3, 3e-3, 1e-2, 3e-2):
            adam[lr] = [_curve(p, f, l, optax.adam(lr), args.iterations, False) for p, f, l, _ in setups]
        best = min(adam, key=lambda lr: statistics.median(c[-1] for c in adam[lr]))
        targets = [c[-1] for c in adam[best]]
        adam_iters = [int(np.argmax(c <= t)) + 1 for c, t in zip(adam[best], targets)]
        rows = [f"| Adam (tuned, lr={best}) | {_spread(targets)} | - | - | - |"]
        for variant in variants:
            finals, speedups, mean_ks, cosines = [], [], [], []
            for seed, ((p, f, l, curvature), target, a_it) in enumerate(zip(setups, targets, adam_iters)):
                options = dict(VARIANTS[variant])
                orthogonal = options.pop("_orthogonal_memory", False)
                slot = options.pop("_slot", None)
                sofo._solve.damped_solve = _jacobi_damped_solve if options.pop("_jacobi", False) else _ORIGINAL_SOLVE
                if options.pop("_adaptive_k", False):
                    make = lambda k, curvature=curvature, seed=seed, options=options: sofo.sofo(  # noqa: E731
                        tangent_size=k, curvature=curvature, key=seed, **options
                    )
                    c, ks = _adaptive_k_curve(p, f, l, make, args.tangent_size, args.iterations)
                else:
                    opt = sofo.sofo(tangent_size=args.tangent_size, curvature=curvature, key=seed, **options)
                    c = _curve(p, f, l, opt, args.iterations, True, orthogonal, slot, args.tangent_size,
                               options.get("sampler", "balanced"), cosines if slot else None)
                    ks = np.full(len(c), args.tangent_size)
                finals.append(float(c[-1]))
                mean_ks.append(float(np.mean(ks)))
                reached = c <= target
                speedups.append(a_it / (int(np.argmax(reached)) + 1) if reached.any() else 0.0)
            cos = _spread([float(np.median(c[1:])) for c in cosines], "{:.3f}") if cosines else "-"
            rows.append(f"| sofo.sofo K={args.tangent_size} ({variant}) | {_spread(finals)} | "
                        f"{_spread(speedups, '{:.2f}x')} | {_spread(mean_ks)} | {cos} |")
            print(rows[-1], flush=True)
        print(f"\n### {name}: {args.seeds} seeds, {args.iterations} iterations, full batch\n")
        print("| method | final loss | fewer iters than Adam | mean K | slot cosine |\n|---|---|---|---|---|\n"
              + "\n".join(rows) + "\n",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
