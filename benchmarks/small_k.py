"""Small subspaces (issue 15, section 3): sofo.sofo at K=32 against tuned Adam, full batch, variants side by side.

    python -m benchmarks.small_k --seeds 3

Two tasks: a sequential-digits classifier (tanh RNN N=64 reading the 8 rows of sklearn's 8x8 digits,
cross-entropy at the last step) and an 8-64-64-1 tanh MLP regression on a noisy random teacher. Prints,
per task and variant, the final training loss and Adam's iterations to its own final loss divided by
the variant's (0 where it never got there), median [min, max] over seeds.
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


TASKS = {"seq_digits": sequential_digits, "mlp_regression": mlp_regression}


def _curve(params, fun, loss_fn, opt, iterations, sofo_opt, orthogonal_memory=False):
    def body(carry, _):
        p, s = carry
        if sofo_opt:
            u, s = opt.update(None, s, p, fun=fun, loss_fn=loss_fn)
            if orthogonal_memory:
                s = (_orthogonalise_memory(s[0]),) + tuple(s[1:])
        else:
            u, s = opt.update(jax.grad(lambda q: loss_fn(fun(q)))(p), s, p)
        p = optax.apply_updates(p, u)
        return (p, s), loss_fn(fun(p))

    _, losses = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=iterations))(params, opt.init(params))
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
    parser.add_argument("--tasks", default=",".join(TASKS))
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
        rows = [f"| Adam (tuned, lr={best}) | {_spread(targets)} | - | - |"]
        for variant in variants:
            finals, speedups, mean_ks = [], [], []
            for seed, ((p, f, l, curvature), target, a_it) in enumerate(zip(setups, targets, adam_iters)):
                options = dict(VARIANTS[variant])
                orthogonal = options.pop("_orthogonal_memory", False)
                if options.pop("_adaptive_k", False):
                    make = lambda k, curvature=curvature, seed=seed, options=options: sofo.sofo(  # noqa: E731
                        tangent_size=k, curvature=curvature, key=seed, **options
                    )
                    c, ks = _adaptive_k_curve(p, f, l, make, args.tangent_size, args.iterations)
                else:
                    opt = sofo.sofo(tangent_size=args.tangent_size, curvature=curvature, key=seed, **options)
                    c = _curve(p, f, l, opt, args.iterations, True, orthogonal)
                    ks = np.full(len(c), args.tangent_size)
                finals.append(float(c[-1]))
                mean_ks.append(float(np.mean(ks)))
                reached = c <= target
                speedups.append(a_it / (int(np.argmax(reached)) + 1) if reached.any() else 0.0)
            rows.append(f"| sofo.sofo K={args.tangent_size} ({variant}) | {_spread(finals)} | "
                        f"{_spread(speedups, '{:.2f}x')} | {_spread(mean_ks)} |")
            print(rows[-1], flush=True)
        print(f"\n### {name}: {args.seeds} seeds, {args.iterations} iterations, full batch\n")
        print("| method | final loss | fewer iters than Adam | mean K |\n|---|---|---|---|\n" + "\n".join(rows) + "\n",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
