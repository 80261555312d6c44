"""`python -m benchmarks`: SOFO against Adam (BPTT), SGD with momentum, forward gradient descent (FGD, the
same tangents without curvature) and the exact damped Gauss-Newton step, on five problems.

    pip install -e ".[bench]"
    python -m benchmarks --quick              # about 2 minutes on a 2-core CPU, JIT included
    python -m benchmarks                      # full sizes and a K sweep: meant for a GPU
    python -m benchmarks --tasks lorenz,kalman --out results/ --seed 1

Every optimizer runs a small fixed grid of learning rates (the grids are in benchmarks/tasks.py); the
best one (lowest mean loss over the last 10% of iterations) is reported. Prints one table per task and a
summary (per-step time SOFO/Adam; iterations for SOFO to reach Adam's best loss), and writes
`<task>.png`, `summary.png`, `results.md` and `results.json` into `--out`.
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
_EXTRAS = ("memory", "engine_overhead")


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
        "--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)} (default: all)"
    )
    parser.add_argument("--out", default="results", help="folder for the figures and tables (default: results)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, initial weights and tangents")
    parser.add_argument("--iterations", type=int, default=None, help="override every task's iteration count")
    parser.add_argument("--no-plots", action="store_true", help="print the tables only")
    parser.add_argument(
        "--extras",
        default="",
        help=f"also run these sibling benchmarks if present: {','.join(_EXTRAS)} (comma-separated)",
    )
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
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

    from tqdm.auto import tqdm

    from benchmarks import report, suite
    from benchmarks.optimizers import optimizers_for
    from benchmarks.tasks import TASKS

    start = time.perf_counter()
    mode = "quick" if args.quick else "full"
    header = f"sofo benchmarks ({mode}, seed {args.seed}) on {machine_description()}"
    print(header, flush=True)
    problems = {name: TASKS[name](seed=args.seed, quick=args.quick) for name in args.tasks}
    total = 0
    for problem in problems.values():
        steps = problem.iterations if args.iterations is None else args.iterations
        total += steps * sum(len(problem.learning_rates[o.kind]) for o in optimizers_for(problem))

    all_runs, per_task_md, comparisons = {}, [], []
    with tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr) as bar:

        def progress(steps: int, description: str) -> None:
            bar.set_description(description, refresh=False)
            bar.update(steps)

        for name, problem in problems.items():
            _, runs = suite.run_task(
                name, quick=args.quick, seed=args.seed, iterations=args.iterations, progress=progress,
                problem=problem,
            )
            all_runs[name] = runs
            rows, task_comparisons = suite.summary_rows(problem, runs)
            comparisons.extend(task_comparisons)
            text = f"### {problem.title}\n\n{problem.notes}.\n\n{report.markdown_table(rows[:], None)}"
            per_task_md.append(text)
            bar.write("\n" + text + "\n")

    summary = report.markdown_table(report.comparison_rows(problems, comparisons))
    elapsed = time.perf_counter() - start
    print("\n### Summary: SOFO against Adam's best loss\n")
    print(summary)
    print(
        "\nstep time: median ms/step (compile excluded); Adam iters: when Adam first reached its best loss; "
        "SOFO iters: when SOFO first got at or below it; 'Adam s'/'SOFO s': wall-clock seconds to get there."
    )

    os.makedirs(args.out, exist_ok=True)
    written = []
    if not args.no_plots:
        for name, problem in problems.items():
            path = os.path.join(args.out, f"{name}.png")
            report.plot_task(problem, all_runs[name], path)
            written.append(path)
        path = os.path.join(args.out, "summary.png")
        report.plot_summary(comparisons, path, subtitle=f"{mode}, {machine_description().split(', jax')[0]}")
        written.append(path)
    markdown = "\n\n".join([f"# {header}", *per_task_md, "### Summary\n\n" + summary])
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(
            {
                "header": header,
                "runs": [
                    {
                        "task": r.task, "optimizer": r.label, "kind": r.kind, "tangent_size": r.tangent_size,
                        "lr": r.lr, "losses": [float(x) for x in r.losses], "seconds": [float(x) for x in r.seconds],
                        "ms_per_step": r.step_ms, "compile_s": r.compile_s, "metrics": r.metrics,
                    }
                    for runs in all_runs.values() for r in runs
                ],
            },
            f,
        )
    written += [os.path.join(args.out, "results.md"), os.path.join(args.out, "results.json")]
    run_extras(args.extras, quick=args.quick, out=args.out)
    print(f"\nwrote {', '.join(written)}")
    print(f"total wall time {time.perf_counter() - start:.1f} s (benchmarks {elapsed:.1f} s)")
    return 0
