"""Structured (low-rank) tangents against dense ones: cost per step, and loss per iteration.

    python -m benchmarks.structured [--rounds 15] [--quality] [--seeds 3] [--iterations 60]

Step time: one `value_and_sofo_grad_scan` step at K=32 on the flip-flop (N=64, T=100), Lorenz
(N=128, T=50) and Kalman (N=32, T=500) RNNs of `benchmarks.tasks` (quick sizes, float32), with the dense "balanced" sampler and
the structured "rank1" / "rank2" / "rank4" ones; all steps timed round-robin in one process (one call
of each per round), median over rounds. FLOPs are the matmul FLOPs (2 * the multiply-adds of every
`dot_general`) counted on the step's jaxpr, scan bodies times their length; the elementwise work is
not counted. The fraction of the matmul peak is (counted FLOPs / step time) / the FLOP rate of a
large float32 `jnp.dot` timed in the same process.

Quality (--quality): `sofo.sofo` (its defaults: LM damping, memory, learning rate 1) with the dense
"balanced" sampler and the structured ones, loss per iteration over seeds (each seed: another data
set, initialisation and key), at equal K (32) and at equal cost per step (the structured sampler with
the K whose step costs about as much as the dense K=32 step, from the timing above).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see benchmarks/engine_overhead.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import sofo  # noqa: E402
from benchmarks import tasks  # noqa: E402

SAMPLERS = ("balanced", "rank1", "rank2", "rank4")
TASKS = {"flipflop": tasks.flipflop, "lorenz": tasks.lorenz, "kalman": tasks.kalman}
K = 32


def matmul_flops(jaxpr) -> float:
    """2 * multiply-adds of every dot_general in a jaxpr; scan bodies count `length` times."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2.0 * np.prod(out) * np.prod([lhs[d] for d in contract])
            continue
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += times * matmul_flops(sub)
    return total


def matmul_peak(size: int = 1024, rounds: int = 7) -> float:
    """FLOP/s of a float32 size x size matmul (the best of `rounds`), this machine's matmul peak."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    dot = jax.jit(lambda x: x @ x)
    dot(a).block_until_ready()
    best = min(_timed(dot, a) for _ in range(rounds))
    return 2.0 * size**3 / best


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def problems():
    return {name: build(seed=0) for name, build in TASKS.items()}


def step_fns(problem, tangent_size):
    fns = {}
    for sampler in SAMPLERS:
        engine = sofo.value_and_sofo_grad_scan(
            problem.cell, problem.step_loss, tangent_size=tangent_size, damping=problem.damping,
            curvature=problem.curvature, sampler=sampler,
        )
        fns[sampler] = jax.jit(
            lambda key, params, engine=engine: engine(key, params, problem.z0, problem.xs, problem.ys)
        )
    return fns


def step_table(rounds: int, sizes=(K,)):
    peak = matmul_peak()
    print("| task | sampler | K | matmul GFLOP/step | step (ms) | x dense K=32 | % of matmul peak |")
    print("|---|---|---|---|---|---|---|")
    costs = {}
    for name, problem in problems().items():
        key = jax.random.key(0)
        entries = {}
        for size in sizes:
            for sampler, fn in step_fns(problem, size).items():
                if size != K and sampler == "balanced":
                    continue
                flops = matmul_flops(jax.make_jaxpr(fn)(key, problem.params).jaxpr)
                jax.block_until_ready(fn(key, problem.params))
                entries[(sampler, size)] = (fn, flops, [])
        for _ in range(rounds):
            for fn, _, times in entries.values():
                times.append(_timed(fn, key, problem.params))
            peak = max(peak, matmul_peak(rounds=1))  # the best rate seen, while the steps ran
        dense = statistics.median(entries[("balanced", K)][2])
        for (sampler, size), (_, flops, times) in entries.items():
            median = statistics.median(times)
            costs[(name, sampler, size)] = median / dense
            print(
                f"| {name} | {sampler} | {size} | {flops / 1e9:.3f} | {1e3 * median:.1f} | {median / dense:.2f} | "
                f"{100 * flops / median / peak:.0f}% |"
            )
    print(f"# matmul peak (float32 1024^3 jnp.dot, best over the runs): {peak / 1e9:.1f} GFLOP/s")
    return costs


def run_sofo(problem, sampler, tangent_size, seed, iterations):
    """Losses per iteration of `sofo.sofo` (defaults) on a recurrent problem; jitted scan over iterations."""
    opt = sofo.sofo(tangent_size=tangent_size, curvature=problem.curvature, sampler=sampler, key=seed)

    def one(carry, _):
        params, state = carry
        updates, state = opt.update(
            None, state, params, cell=problem.cell, loss_fn=problem.step_loss, z0=problem.z0, xs=problem.xs,
            ys=problem.ys,
        )
        params = optax.apply_updates(params, updates)
        return (params, state), problem.objective(params)

    run = jax.jit(lambda params: jax.lax.scan(one, (params, opt.init(params)), None, length=iterations)[1])
    compiled = run.lower(problem.params).compile()  # the run time below excludes compilation
    start = time.perf_counter()
    losses = np.asarray(compiled(problem.params))
    return losses, time.perf_counter() - start


def quality_table(seeds: int, iterations: int, configs):
    print(f"\n# sofo.sofo loss after {iterations} iterations, median [min, max] over {seeds} seeds")
    print(f"| task | sampler | K | loss at it. {iterations // 3} | loss at it. {iterations} | "
          "run time (s, median, no compile) |")
    print("|---|---|---|---|---|---|")
    for name, build in TASKS.items():
        results = {config: [] for config in configs}
        for seed in range(seeds):
            problem = build(seed=seed)
            for sampler, size in configs:  # interleaved: every configuration on one seed, then the next
                results[(sampler, size)].append(run_sofo(problem, sampler, size, seed, iterations))
        for (sampler, size), runs in results.items():
            third = [losses[iterations // 3 - 1] for losses, _ in runs]
            last = [losses[-1] for losses, _ in runs]
            secs = [s for _, s in runs]
            fmt = lambda v: f"{np.median(v):.3g} [{np.min(v):.3g}, {np.max(v):.3g}]"  # noqa: E731
            print(f"| {name} | {sampler} | {size} | {fmt(third)} | {fmt(last)} | {np.median(secs):.1f} |")


def equal_time_table(seeds: int, runs, names):
    """Final loss and run time of (sampler, K, iterations) runs chosen to take about the same wall-clock."""
    print(f"\n# sofo.sofo at about equal wall-clock: final loss, median [min, max] over {seeds} seeds")
    print("| task | sampler | K | iterations | final loss | run time (s, median, no compile) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        results = {run: [] for run in runs}
        for seed in range(seeds):
            problem = TASKS[name](seed=seed)
            for sampler, size, iterations in runs:
                results[(sampler, size, iterations)].append(run_sofo(problem, sampler, size, seed, iterations))
        for (sampler, size, iterations), out in results.items():
            last = [losses[-1] for losses, _ in out]
            fmt = f"{np.median(last):.3g} [{np.min(last):.3g}, {np.max(last):.3g}]"
            print(f"| {name} | {sampler} | {size} | {iterations} | {fmt} | {np.median([t for _, t in out]):.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--sizes", type=int, nargs="*", default=[K])
    parser.add_argument("--equal-cost", type=int, nargs="*", default=[], help="K for rank1 at equal cost")
    parser.add_argument("--equal-time", action="store_true",
                        help="only the equal wall-clock table: balanced K=32 for 60 iterations against rank1 "
                             "K=32 for 150 and rank1 K=64 for 90 (from the measured step times)")
    args = parser.parse_args()
    print(
        f"# {platform.machine()} CPU, {os.cpu_count()} cores, jax {jax.__version__}, "
        f"{jax.devices()[0].platform}; float32"
    )
    if args.equal_time:
        runs = [("balanced", K, 60), ("rank1", K, 150), ("rank1", 2 * K, 90)]
        equal_time_table(args.seeds, runs, ("flipflop", "lorenz"))
        return
    step_table(args.rounds, tuple(args.sizes))
    if args.quality:
        configs = [("balanced", K), ("rank1", K), ("rank2", K)] + [("rank1", k) for k in args.equal_cost]
        quality_table(args.seeds, args.iterations, configs)


if __name__ == "__main__":
    main()
