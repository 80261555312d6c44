"""What adaptive damping and memory cost per step, in units of one forward rollout.

    python -m benchmarks.adaptive_overhead [--quick] [--rounds 7]

On a vanilla RNN (the flip-flop cell), times one jitted step of: a forward rollout alone (the loss, no
tangents); plain SOFO (`sofo.scale_by_sofo`, fixed damping); SOFO with Levenberg-Marquardt damping (one extra
rollout at the candidate parameters); and `sofo.sofo` (LM plus one remembered direction). Each is compiled
first, then timed over `--rounds` rounds of `--steps` steps (`block_until_ready`), and the median round is
reported; the four are timed in rotation, round by round. The claim checked: LM adds at most about one forward rollout per step.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sofo  # noqa: E402
from benchmarks import tasks  # noqa: E402


def _compile(fn, args):
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    return compiled


def _round(compiled, args, steps):
    """Seconds per step over `steps` chained steps (a step's output is the next step's input)."""
    tic = time.perf_counter()
    out = args
    for _ in range(steps):
        out = compiled(*out) if isinstance(out, tuple) else compiled(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - tic) / steps


def _time_in_rotation(entries, steps, rounds):
    """Median ms/step of each (compiled, args), timed in rotation so machine noise hits all alike."""
    times = [[] for _ in entries]
    for _ in range(rounds):
        for i, (compiled, args) in enumerate(entries):
            times[i].append(_round(compiled, args, steps))
    return [1e3 * float(np.median(t)) for t in times]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.adaptive_overhead", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="the quick flip-flop sizes (N=64, T=100, B=32, K=32)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    options = parser.parse_args(argv)
    sizes = {} if options.quick else dict(hidden=128, batch=64, steps=100, tangent_sizes=(64,))
    problem = tasks.flipflop(seed=0, quick=True, **sizes)
    k = problem.tangent_sizes[0]
    model = dict(cell=problem.cell, loss_fn=problem.step_loss, z0=problem.z0, xs=problem.xs, ys=problem.ys)

    def stepper(optimizer):
        def step(params, state):
            updates, state = optimizer.update(None, state, params, **model)
            return optax.apply_updates(params, updates), state

        return step

    configs = [
        ("plain SOFO (fixed damping)", optax.chain(sofo.scale_by_sofo(tangent_size=k, damping=1e-2), optax.sgd(1.0))),
        (
            "SOFO + LM damping",
            optax.chain(sofo.scale_by_sofo(tangent_size=k, damping=1e-2, adaptive_damping=True), optax.sgd(1.0)),
        ),
        (f"sofo.sofo (LM, memory {min(4, k // 4)}, balanced)", sofo.sofo(tangent_size=k)),
    ]
    entries = [(_compile(problem.objective, (problem.params,)), (problem.params,))]
    for _, optimizer in configs:
        step_args = (problem.params, optimizer.init(problem.params))
        entries.append((_compile(stepper(optimizer), step_args), step_args))
    times = _time_in_rotation(entries, options.steps, options.rounds)
    forward_ms, plain_ms = times[0], times[1]
    names = ["forward rollout (loss only)"] + [name for name, _ in configs]
    print(
        f"flip-flop RNN N={problem.params['W'].shape[0]}, T={problem.xs.shape[0]}, B={problem.xs.shape[1]}, K={k}; "
        f"{jax.default_backend().upper()}, {os.cpu_count()} cores; median of {options.rounds} rounds of "
        f"{options.steps} steps, timed in rotation\n"
    )
    print("| step | ms/step | extra over plain SOFO | extra, in forward rollouts |")
    print("|---|---|---|---|")
    for index, (name, ms) in enumerate(zip(names, times)):
        extra = "-" if index < 2 else f"{ms - plain_ms:+.1f} ms"
        rollouts = "-" if index < 2 else f"{(ms - plain_ms) / forward_ms:+.2f}"
        print(f"| {name} | {ms:.1f} | {extra} | {rollouts} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
