"""`python -m benchmarks`: SOFO against Adam (backprop through time) on recurrent networks, several seeds.

    pip install -e ".[bench]"
    python -m benchmarks --quick              # the three RNN tasks, 3 seeds, a few minutes on a 2-core CPU
    python -m benchmarks                      # more iterations and seeds, a K sweep: meant for a GPU
    python -m benchmarks --tasks flipflop --seeds 5 --out results/
    python -m benchmarks --tasks linreg,digits --methods adam,sgd,sofo,sofo_lm,fgd,gn

Compared on each task and seed: Adam (BPTT) with its learning rate tuned on a grid; plain SOFO (the
paper's algorithm: fixed learning rate and damping); `sofo.sofo`, the recommended configuration
(adaptive damping and subspace memory, never tuned); forward gradient descent (FGD: the same tangents
without curvature, tuned on a grid); and two second-order peers, L-BFGS (`optax.lbfgs`, zoom linesearch)
and Hessian-free (truncated-Newton Gauss-Newton, CG on Gauss-Newton-vector products, Levenberg-Marquardt
damping; 10 CG steps per iteration with --quick, 30 without). A tuned method gets one learning rate per
task: the one with the best median score over the seeds. Per task it prints the per-iteration table
(with each method's evaluations per iteration and compiled memory per step), an equal-wall-clock table
(the methods raced in rotation in this process for the same time budget, see benchmarks/race.py) and a
verdict line; then a summary. Writes `<task>.png`, `summary.png`, `results.md` and `results.json` into
`--out`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
import time

# jax's CPU eigh/qr/solve call LAPACK through scipy's OpenBLAS, whose threads fight XLA's own thread pool
# on a small CPU: on the 2-core test machine a 64 x 64 eigh took 8 ms with the default threads and 0.6 ms
# with one. Set before numpy loads; an explicit setting by the user wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

_NEEDED = {"tqdm": "tqdm", "matplotlib": "matplotlib", "sklearn": "scikit-learn"}
_EXTRAS = ("memory", "engine_overhead", "adaptive_overhead")
DEFAULT_TASKS = ("flipflop", "lorenz", "kalman")
METHODS = ("adam", "sgd", "sofo", "sofo_lm", "fgd", "lbfgs", "hf", "gn")
DEFAULT_METHODS = "adam,sofo,sofo_lm,fgd,lbfgs,hf"
QUICK_CG_STEPS = 10  # Hessian-free CG steps per iteration with --quick (30 without: optimizers.HF_CG_STEPS)
# The race's default budget per method and seed: this many times Adam's median time for its per-iteration
# run, so Adam runs about that many times its iterations and a method as fast per second as Adam has the
# time to reach Adam's target.
RACE_FACTOR = {"quick": 2.0, "full": 4.0}


def missing_dependencies() -> list[str]:
    return [package for module, package in _NEEDED.items() if importlib.util.find_spec(module) is None]


def machine_description() -> str:
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__} on {jax.default_backend().upper()} ({len(devices)} x {', '.join(kinds)})"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.tasks import TASKS

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0].replace("`", "")
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: minutes on a laptop CPU")
    parser.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated subset of {','.join(TASKS)} (default: {','.join(DEFAULT_TASKS)})",
    )
    parser.add_argument("--out", default="results", help="folder for the figures and tables (default: results)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (data, initial weights and tangents)")
    parser.add_argument(
        "--seeds", type=int, default=None, help="how many seeds per task (default: 3 with --quick, 5 without)"
    )
    parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated subset of {','.join(METHODS)} (default: {DEFAULT_METHODS})",
    )
    parser.add_argument(
        "--cg-steps", type=int, default=None,
        help=f"Hessian-free CG steps per iteration (default: {QUICK_CG_STEPS} with --quick, 30 without)",
    )
    parser.add_argument(
        "--race-seconds", type=float, default=None,
        help="equal-wall-clock budget per method and seed, in seconds (default: "
        f"{RACE_FACTOR['quick']:g}x Adam's per-iteration run time with --quick, {RACE_FACTOR['full']:g}x without)",
    )
    parser.add_argument("--no-race", action="store_true", help="skip the equal-wall-clock comparison")
    parser.add_argument("--iterations", type=int, default=None, help="override every task's iteration count")
    parser.add_argument(
        "--tangent-size", type=int, default=None, help="override every task's K (SOFO's and FGD's tangents)"
    )
    parser.add_argument("--no-plots", action="store_true", help="print the tables only")
    parser.add_argument(
        "--extras",
        default="",
        help=f"also run these sibling benchmarks if present: {','.join(_EXTRAS)} (comma-separated)",
    )
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    from benchmarks.stochastic import TASKS as STOCHASTIC  # minibatch / fresh-trial tasks (issue 15)

    unknown = [t for t in args.tasks if t not in TASKS and t not in STOCHASTIC]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join([*TASKS, *STOCHASTIC])}")
    args.stochastic = [t for t in args.tasks if t in STOCHASTIC]
    args.tasks = [t for t in args.tasks if t not in STOCHASTIC]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad_methods = [m for m in args.methods if m not in METHODS]
    if bad_methods:
        parser.error(f"unknown method(s) {', '.join(bad_methods)}; choose from {', '.join(METHODS)}")
    if args.seeds is None:
        args.seeds = 3 if args.quick else 5
    if args.tangent_size is not None and args.tangent_size < 1:
        parser.error(f"--tangent-size must be at least 1; got {args.tangent_size}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1; got {args.seeds}")
    if args.cg_steps is None:
        from benchmarks.optimizers import HF_CG_STEPS

        args.cg_steps = QUICK_CG_STEPS if args.quick else HF_CG_STEPS
    if args.cg_steps < 1:
        parser.error(f"--cg-steps must be at least 1; got {args.cg_steps}")
    if args.race_seconds is not None and not args.race_seconds > 0:
        parser.error(f"--race-seconds must be positive; got {args.race_seconds}")
    args.extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    bad = [e for e in args.extras if e not in _EXTRAS]
    if bad:
        parser.error(f"unknown extra(s) {', '.join(bad)}; choose from {', '.join(_EXTRAS)}")
    return args


def run_extras(extras: list[str], *, quick: bool, out: str) -> None:
    for name in extras:
        if importlib.util.find_spec(f"benchmarks.{name}") is None:
            print(f"\n(skipping --extras {name}: benchmarks/{name}.py is not in this checkout)")
            continue
        print(f"\n## benchmarks.{name}\n", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        argv = (["--quick"] if quick else []) + (["--out", out] if name == "memory" else [])
        try:
            module.main(argv)
        except SystemExit as exit_:  # an argparse error in the sibling must not lose our results
            print(f"(benchmarks.{name} exited with {exit_.code})")


def race_budget(methods: dict, args: argparse.Namespace) -> float | None:
    """The race's seconds per method and seed: --race-seconds, else RACE_FACTOR x Adam's median time for
    its per-iteration run (None without an Adam run to measure)."""
    if args.race_seconds is not None:
        return args.race_seconds
    adam = next((m for m in methods.values() if m.kind == "adam"), None)
    if adam is None:
        return None
    import numpy as np

    factor = RACE_FACTOR["quick" if args.quick else "full"]
    return factor * float(np.median([run.seconds[-1] for run in adam.runs]))


def target_line(clocks: list, results: dict) -> str:
    """Issue 16's target, checked on the recurrent tasks: sofo.sofo at K=32 reaches Adam's target in no more
    wall-clock than Adam (median over seeds, in the race) on at least half of them."""
    import numpy as np

    rnn = [c for c in clocks if results[c.task][0].recurrent and c.label.endswith("K=32")]
    if not rnn:
        return ""
    met = [c for c in rnn if c.met]
    ratios = ", ".join(
        f"{c.task} {c.median_ratio:.1f}x" if np.isfinite(c.median_ratio) else f"{c.task} not reached in the race"
        for c in rnn
    )
    verdict = "met" if 2 * len(met) >= len(rnn) else "not met"
    return (
        f"Target (issue 16): sofo.sofo K=32 reaches Adam's target in no more wall-clock than Adam on at least "
        f"half the RNN tasks: {verdict} ({len(met)} of {len(rnn)}; seconds vs Adam, median over seeds: {ratios})."
    )


def main(argv: list[str] | None = None) -> int:
    missing = missing_dependencies()
    if missing:
        print(
            f"python -m benchmarks needs {', '.join(missing)}, which come with the 'bench' extra: "
            f'run  pip install -e ".[bench]"  (from the repository root) and try again.',
            file=sys.stderr,
        )
        return 2
    args = parse_args(argv)
    if args.stochastic:  # a fresh batch every step: their own runner and table (benchmarks/stochastic.py)
        from benchmarks import stochastic

        seed_list = list(range(args.seed, args.seed + args.seeds))
        print(f"sofo minibatch benchmarks (seeds {seed_list[0]}-{seed_list[-1]}) on {machine_description()}")
        text = stochastic.run(args.stochastic, seed_list, quick=args.quick, iterations=args.iterations)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "stochastic.md"), "w") as f:
            f.write(text + "\n")
        if not args.tasks:
            return 0

    from tqdm.auto import tqdm

    from benchmarks import race, report, seeds
    from benchmarks.optimizers import learning_rates, optimizers_for
    from benchmarks.tasks import TASKS

    start = time.perf_counter()
    mode = "quick" if args.quick else "full"
    seed_list = list(range(args.seed, args.seed + args.seeds))
    machine = machine_description()
    header = f"sofo benchmarks ({mode}, seeds {seed_list[0]}-{seed_list[-1]}) on {machine}"
    sizes = {} if args.tangent_size is None else {"tangent_sizes": (args.tangent_size,)}
    options = {"cg_steps": args.cg_steps}
    if "hf" in args.methods:
        header += f"; Hessian-free runs {args.cg_steps} CG steps per iteration" + (
            " (fewer than the full run's 30, to keep --quick short)" if args.quick and args.cg_steps < 30 else ""
        )
    print(header, flush=True)
    sizes = {} if args.tangent_size is None else {"tangent_sizes": (args.tangent_size,)}
    first = {name: TASKS[name](seed=args.seed, quick=args.quick, **sizes) for name in args.tasks}
    total = 0
    for problem in first.values():
        steps = problem.iterations if args.iterations is None else args.iterations
        grids = [
            len(learning_rates(problem, o.kind)) for o in optimizers_for(problem, **options) if o.kind in args.methods
        ]
        total += steps * sum(grids) * len(seed_list)

    results, per_task_md, comparisons, verdicts, clocks = {}, [], [], [], []
    with tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr) as bar:

        def progress(steps: int, description: str) -> None:
            bar.set_description(description, refresh=False)
            bar.update(steps)

        for name in args.tasks:
            cache: dict = {}
            problems, methods = seeds.run_task_seeds(
                name, quick=args.quick, seeds=seed_list, iterations=args.iterations, kinds=args.methods,
                progress=progress, sizes=sizes, options=options, cache=cache,
            )
            problem = problems[0]
            iterations = problem.iterations if args.iterations is None else args.iterations
            raced, budget = {}, None
            if not args.no_race:
                budget = race_budget(methods, args)
            if budget is not None:
                labels = [label for label, m in methods.items() if m.kind in race.RACED]
                with tqdm(total=budget * len(labels) * len(seed_list), unit="s", leave=False, dynamic_ncols=True,
                          file=sys.stderr, bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s") as race_bar:

                    def race_progress(seconds: float, description: str) -> None:
                        race_bar.set_description(description, refresh=False)
                        race_bar.update(seconds)

                    raced = race.race_seeds(
                        problems, seed_list, methods, cache, budget=budget, iterations=iterations, labels=labels,
                        options=options, progress=race_progress,
                    )
                clocks.extend(race.wall_clock(raced, methods))
            results[name] = (problem, methods, raced, budget)
            comparisons.extend(seeds.compare_seeds(methods))
            verdict = race.verdict(methods, raced, budget, iterations)
            verdicts.append(f"{name}: {verdict.removeprefix('Verdict: ')}")
            text = (
                f"### {problem.title}\n\n{problem.notes}; {len(seed_list)} seeds, {iterations} iterations, "
                f"K={problem.tangent_sizes[0]}.\n\nPer iteration:\n\n{report.markdown_table(seeds.task_rows(methods))}"
            )
            if raced:
                text += (
                    f"\n\nEqual wall-clock ({budget:.2f} s per method and seed, raced in rotation in this process, "
                    f"compile excluded):\n\n{report.markdown_table(race.race_rows(raced, methods, budget))}"
                )
            text += f"\n\n{verdict}"
            per_task_md.append(text)
            bar.write("\n" + text + "\n")

    problems = {name: entry[0] for name, entry in results.items()}
    summary = report.markdown_table(seeds.summary_rows(comparisons, problems))
    legend = (
        "Adam's target, per seed: Adam's mean loss over the last 10% of its run (robust to the noise of its "
        "last step). fewer iters than Adam: Adam's iterations to reach its target divided by the method's "
        "iterations to reach it, per seed (a miss, where the method never got there, counts as 0x); median "
        "[min, max] over seeds. An L-BFGS iteration makes one f+g evaluation per linesearch trial (evals/iter), "
        "a Hessian-free iteration one f+g, its CG steps' Gauss-Newton-vector products and one f. blow-ups: "
        "runs whose loss ever exceeded 10x its initial value. step time: median ms/step, compile excluded. "
        "temp MB/step: XLA's compiled temporary memory of a chunk of steps (memory_analysis; a scan reuses "
        "one step's buffers); state MB: the optimizer state with the parameters. Adam and FGD learning rates "
        "are tuned on a grid (one rate per task, best median over the seeds); plain SOFO, sofo.sofo, L-BFGS "
        "and Hessian-free are not tuned. vs Adam's best loss: the same ratio against the lowest loss Adam "
        "reached in its run (stricter where Adam's loss oscillates). Equal wall-clock: see benchmarks/race.py."
    )
    elapsed = time.perf_counter() - start
    print("\n### Summary: SOFO and its peers against tuned Adam\n")
    print(summary)
    print("\n" + legend)
    verdict_text = "\n".join(f"- {line}" for line in verdicts)
    print("\n### Verdicts\n\n" + verdict_text)
    target_text = target_line(clocks, results)
    if target_text:
        print("\n" + target_text)

    os.makedirs(args.out, exist_ok=True)
    written = []
    subtitle = f"{mode}, {len(seed_list)} seeds, {machine.split(', jax')[0]}"
    if not args.no_plots:
        for name, (problem, methods, _, _) in results.items():
            path = os.path.join(args.out, f"{name}.png")
            report.plot_task_seeds(problem, methods, path, subtitle=f"{len(seed_list)} seeds")
            written.append(path)
        if comparisons:
            path = os.path.join(args.out, "summary.png")
            report.plot_summary_seeds(comparisons, path, subtitle=subtitle)
            written.append(path)
    markdown = "\n\n".join(
        [f"# {header}", *per_task_md, "### Summary\n\n" + summary, legend, "### Verdicts\n\n" + verdict_text]
        + ([target_text] if target_text else [])
    )
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            {
                "header": header,
                "runs": [
                    {
                        "task": name, "optimizer": m.label, "kind": m.kind, "tangent_size": r.tangent_size,
                        "lr": m.lr, "seed": seed, "losses": [float(x) for x in r.losses],
                        "seconds": [float(x) for x in r.seconds], "ms_per_step": r.step_ms,
                        "compile_s": r.compile_s,
                    }
                    for name, (_, methods, _, _) in results.items() for m in methods.values()
                    for seed, r in zip(seed_list, m.runs)
                ],
                "race": [
                    {"task": name, "optimizer": r.label, "kind": r.kind, "seed": r.seed, "budget_s": budget,
                     "losses": [float(x) for x in r.losses], "seconds": [float(x) for x in r.seconds]}
                    for name, (_, _, raced, budget) in results.items() for runs in raced.values() for r in runs
                ],
            },
            f,
        )
    written += [os.path.join(args.out, "results.md"), os.path.join(args.out, "results.json")]
    run_extras(args.extras, quick=args.quick, out=args.out)
    print(f"\nwrote {', '.join(written)}")
    print(f"total wall time {time.perf_counter() - start:.1f} s (benchmarks {elapsed:.1f} s)")
    return 0
