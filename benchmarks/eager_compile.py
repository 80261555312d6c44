"""Eager State-based transforms: compilations and wall time of the first call against later calls.

    python -m benchmarks.eager_compile [--calls N]

Each transform is built once over `sofo.State`s and called N times without `jax.jit`, as a brainstate
user calls it. Compilations are counted from jax's own log (`jax_log_compiles`), not inferred from
time: the first call compiles the step once; later calls with the same shapes should compile nothing.
"""

from __future__ import annotations

import argparse
import logging
import time

import jax
import jax.numpy as jnp

import sofo
import sofo.transforms as st


class _Counter(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        if record.getMessage().startswith("Compiling"):
            self.count += 1


def _cases():
    x = jax.random.normal(jax.random.key(0), (32, 5))
    t = jax.random.normal(jax.random.key(1), (32, 3))
    w = sofo.State(0.3 * jax.random.normal(jax.random.key(2), (5, 3)), name="w")
    mse = lambda y: 0.5 * jnp.mean(jnp.sum((y - t) ** 2, -1))
    rec = sofo.State(0.3 * jax.random.normal(jax.random.key(3), (3, 3)), name="rec")
    inp = sofo.State(0.3 * jax.random.normal(jax.random.key(4), (5, 3)), name="inp")

    def cell(z, x_t):
        z = jnp.tanh(z @ rec.value + x_t @ inp.value)
        return z, z

    xs, ys, z0 = jnp.ones((20, 32, 5)), jnp.zeros((20, 32, 3)), jnp.zeros((32, 3))
    sofo_step = st.sofo_grad(lambda x: jnp.tanh(x @ w.value), mse, grad_states=w, tangent_size=8)
    scan_step = st.sofo_grad_scan(
        cell, lambda y, t_: 0.5 * jnp.mean((y - t_) ** 2), grad_states=[rec, inp], tangent_size=8
    )
    grad_step = st.grad(lambda x: mse(jnp.tanh(x @ w.value)), grad_states=w)
    return [
        ("sofo_grad", lambda: sofo_step(x)),
        ("sofo_grad_scan", lambda: scan_step(z0, xs, ys)),
        ("grad", lambda: grad_step(x)),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5, help="calls per transform (default 5)")
    args = parser.parse_args(argv)
    counter = _Counter()
    logging.getLogger("jax").addHandler(counter)
    jax.config.update("jax_log_compiles", True)
    logging.getLogger("jax").propagate = False  # count, do not print, jax's compile log
    rows = []
    for name, call in _cases():
        per_call = []
        for _ in range(args.calls):
            before, start = counter.count, time.perf_counter()
            jax.block_until_ready(call())
            per_call.append((counter.count - before, time.perf_counter() - start))
        later = per_call[1:]
        rows.append((
            name, per_call[0][0], per_call[0][1] * 1e3,
            sum(c for c, _ in later), (sum(s for _, s in later) / max(len(later), 1)) * 1e3,
        ))
    jax.config.update("jax_log_compiles", False)
    print(f"jax {jax.__version__}, {jax.default_backend()}, {args.calls} eager calls per transform")
    print(f"{'transform':<16}{'1st: compiles':>14}{'1st: ms':>10}{'later: compiles':>17}{'later: ms/call':>16}")
    for name, c0, t0, c1, t1 in rows:
        print(f"{name:<16}{c0:>14d}{t0:>10.1f}{c1:>17d}{t1:>16.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
