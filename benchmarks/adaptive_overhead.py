"""What adaptive damping and memory cost per step, in units of one forward rollout.

    python -m benchmarks.adaptive_overhead [--quick] [--rounds 7]

On a vanilla RNN (the flip-flop cell), times one jitted step of: a forward rollout alone (the loss, no
tangents); plain SOFO (`sofo.transform`, fixed damping); SOFO with Levenberg-Marquardt damping (one extra
rollout at the candidate parameters); and `sofo.sofo` (LM plus one remembered direction). Each is compiled
first, then timed over `--rounds` rounds of `--steps` steps (`block_until_ready`), and the median round is
reported. The claim checked: LM adds at most about one forward rollout per step.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sofo  # noqa: E402
from benchmarks import tasks  # noqa: E402


def _timed(fn, args, steps, rounds):
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(rounds):
        tic = time.perf_counter()
        out = args
        for _ in range(steps):
            out = compiled(*out) if isinstance(out, tuple) else compiled(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - tic) / steps)
    return 1e3 * float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adaptive_overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick flip-flop sizes (N=64, T=100, B=32, K=32)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    sizes = {} if args.quick else dict(hidden=128, batch=64, steps=100, tangent_sizes=(64,))
    problem = tasks.flipflop(seed=0, quick=True, **sizes)
    k = problem.tangent_sizes[0]
    model = dict(cell=problem.cell, loss_fn=problem.step_loss, z0=problem.z0, xs=problem.xs, ys=problem.ys)

    def stepper(optimizer):
        def step(params, state):
            updates, state = optimizer.update(None, state, params, **model)
            return optax.apply_updates(params, updates), state

        return step

    configs = [
        ("plain SOFO (fixed damping)", optax.chain(sofo.transform(tangent_size=k, damping=1e-2), optax.sgd(1.0))),
        (
            "SOFO + LM damping",
            optax.chain(sofo.transform(tangent_size=k, damping=1e-2, adaptive_damping=True), optax.sgd(1.0)),
        ),
        ("sofo.sofo (LM + memory 1)", sofo.sofo(tangent_size=k)),
    ]
    forward_ms = _timed(lambda p: problem.objective(p), (problem.params,), args.steps, args.rounds)
    rows = [("forward rollout (loss only)", forward_ms)]
    for name, optimizer in configs:
        state = optimizer.init(problem.params)
        rows.append((name, _timed(stepper(optimizer), (problem.params, state), args.steps, args.rounds)))
    plain = rows[1][1]
    print(
        f"flip-flop RNN N={problem.params['W'].shape[0]}, T={problem.xs.shape[0]}, B={problem.xs.shape[1]}, K={k}; "
        f"{jax.default_backend().upper()}, {os.cpu_count()} cores; median of {args.rounds} rounds of {args.steps} steps\n"
    )
    print("| step | ms/step | extra over plain SOFO | extra in forward rollouts |")
    print("|---|---|---|---|")
    for name, ms in rows:
        extra = "-" if name.startswith("forward") or name.startswith("plain") else f"{ms - plain:+.1f} ms"
        rollouts = "-" if extra == "-" else f"{(ms - plain) / forward_ms:+.2f}"
        print(f"| {name} | {ms:.1f} | {extra} | {rollouts} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
