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
}


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


def _curve(params, fun, loss_fn, opt, iterations, sofo_opt):
    def body(carry, _):
        p, s = carry
        if sofo_opt:
            u, s = opt.update(None, s, p, fun=fun, loss_fn=loss_fn)
        else:
            u, s = opt.update(jax.grad(lambda q: loss_fn(fun(q)))(p), s, p)
        p = optax.apply_updates(p, u)
        return (p, s), loss_fn(fun(p))

    _, losses = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=iterations))(params, opt.init(params))
    return np.asarray(losses)


def _spread(values, fmt="{:.3g}"):
    values = sorted(values)
    return f"{fmt.format(statistics.median(values))} [{fmt.format(values[0])}, {fmt.format(values[-1])}]"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.small_k")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--tangent-size", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for name, make in TASKS.items():
        setups = [make(seed) for seed in range(args.seeds)]
        adam = {}
        for lr in (1e-3, 3e-3, 1e-2, 3e-2):
            adam[lr] = [_curve(p, f, l, optax.adam(lr), args.iterations, False) for p, f, l, _ in setups]
        best = min(adam, key=lambda lr: statistics.median(c[-1] for c in adam[lr]))
        targets = [c[-1] for c in adam[best]]
        adam_iters = [int(np.argmax(c <= t)) + 1 for c, t in zip(adam[best], targets)]
        rows = [f"| Adam (tuned, lr={best}) | {_spread(targets)} | - |"]
        for variant in variants:
            finals, speedups = [], []
            for seed, ((p, f, l, curvature), target, a_it) in enumerate(zip(setups, targets, adam_iters)):
                opt = sofo.sofo(tangent_size=args.tangent_size, curvature=curvature, key=seed, **VARIANTS[variant])
                c = _curve(p, f, l, opt, args.iterations, True)
                finals.append(float(c[-1]))
                reached = c <= target
                speedups.append(a_it / (int(np.argmax(reached)) + 1) if reached.any() else 0.0)
            rows.append(f"| sofo.sofo K={args.tangent_size} ({variant}) | {_spread(finals)} | "
                        f"{_spread(speedups, '{:.2f}x')} |")
            print(rows[-1], flush=True)
        print(f"\n### {name}: {args.seeds} seeds, {args.iterations} iterations, full batch\n")
        print("| method | final loss | fewer iters than Adam |\n|---|---|---|\n" + "\n".join(rows) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
