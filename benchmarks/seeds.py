"""Several seeds per task: every optimizer's runs, its learning rate chosen once per task, and the
statistics the main job reports (medians, spread, blow-ups, iterations to reach Adam's target).

Adam's target, on each seed: its mean loss over the last 10% of its run (the score that chose its learning
rate), a figure that does not swing with the noise of its last step the way its final loss does.

Learning rates: Adam, FGD (and SGD) are tuned on their grid; the rate chosen is the one with the lowest
median score (mean loss over the last 10% of the run) across the seeds, the same rate for every seed.
SOFO is not tuned: plain SOFO runs the task's fixed learning rate and damping (the paper's algorithm),
and the recommended SOFO (`sofo.sofo`) runs its defaults on every task.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.optimizers import Optimizer, learning_rates, optimizers_for
from benchmarks.suite import Run, _chunk_size, first_reach, run_chunks
from benchmarks.tasks import TASKS, Problem

BLOW_UP = 10.0  # a run blows up when its loss ever exceeds this many times its initial loss (or is not finite)
COMPARED = ("sofo", "sofo_lm", "lbfgs", "hf")  # the kinds measured against Adam's target in the summary
MB = 1e6


@dataclasses.dataclass
class Compiled:
    """One optimizer's compiled chunk of steps and final objective, per seed (key "shared" when the task's
    seeds share one executable), with its compile time and compiled memory."""

    chunk: int
    executables: dict
    compile_s: float = 0.0
    memory: dict = dataclasses.field(default_factory=dict)

    def for_seed(self, seed: int, problem: Problem):
        return self.executables["shared" if problem.recurrent else seed]


@dataclasses.dataclass
class MethodRuns:
    """One optimizer on one task: its chosen learning rate and one run per seed at that rate."""

    task: str
    kind: str
    label: str
    lr: float
    grid: tuple[float, ...]
    runs: list[Run]
    cost: str = ""  # what one iteration evaluates, in words
    memory: dict = dataclasses.field(default_factory=dict)  # {"temp MB": ..., "state MB": ...}

    def evaluations_per_iteration(self) -> float | None:
        """Median over seeds of function-and-gradient evaluations per iteration, where counted (L-BFGS)."""
        counts = [run.metrics["evaluations"] / max(len(run.losses) - 1, 1) for run in self.runs if "evaluations" in run.metrics]
        return float(np.median(counts)) if counts else None

    def blow_ups(self) -> int:
        count = 0
        for run in self.runs:
            finite = np.all(np.isfinite(run.losses))
            if not finite or np.max(run.losses) > BLOW_UP * run.losses[0]:
                count += 1
        return count

    def finals(self) -> np.ndarray:
        return np.array([run.losses[-1] if np.isfinite(run.losses[-1]) else np.inf for run in self.runs])

    def step_ms(self) -> float:
        return float(np.median([run.step_ms for run in self.runs]))


def _data(problem: Problem):
    return (problem.z0, problem.xs, problem.ys) if problem.recurrent else None


def _with_data(problem: Problem, data) -> Problem:
    if data is None:
        return problem
    z0, xs, ys = data
    return dataclasses.replace(problem, z0=z0, xs=xs, ys=ys)


def _pick(problem: Problem, seed: int, label: str, options: dict | None = None) -> Optimizer:
    return next(o for o in optimizers_for(problem, seed=seed, **(options or {})) if o.label == label)


def compiled_memory(executable, state) -> dict:
    """The compiled chunk's temporary memory (XLA's `memory_analysis`, as in benchmarks/memory.py: a
    scanned chunk reuses one step's buffers, so this is the memory of a step) and the optimizer state's size."""
    state_mb = sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(state)
                   if not jax.dtypes.issubdtype(jnp.asarray(leaf).dtype, jax.dtypes.prng_key)) / MB
    try:
        stats = executable.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without the analysis: report the state only
        stats = None
    temp = None if stats is None else stats.temp_size_in_bytes / MB
    return {"temp MB": temp, "state MB": state_mb}


def train_seeds(
    problems: list[Problem],
    seeds: list[int],
    label: str,
    learning_rates: Iterable[float],
    *,
    iterations: int,
    progress: Callable[[int, str], None] | None = None,
    options: dict | None = None,
    cache: dict | None = None,
) -> dict[float, list[Run]]:
    """Runs optimizer `label` on each seed's problem for each learning rate; returns {lr: [run per seed]}.

    `options` go to `optimizers_for` (e.g. `cg_steps`); the compiled chunks are left in `cache[label]`
    (a `Compiled`) when a dict is given, for the equal-wall-clock race to reuse.

    For recurrent tasks the data (z0, xs, ys), the parameters and the optimizer state are arguments of
    one compiled chunk of steps, so the task compiles once for all its seeds and learning rates; the
    optimizer is rebuilt inside the trace on the seed's data (its seed enters through its initial state:
    the PRNG key lives there). Timing as in `suite.train`: chunks of `lax.scan`ned steps, each timed with
    `block_until_ready`, compile excluded.
    """
    chunk = _chunk_size(iterations)
    template = problems[0]
    kind = _pick(template, seeds[0], label, options).kind

    def run_chunk(state, lr, data):
        optimizer = _pick(_with_data(template, data), seeds[0], label, options)
        return jax.lax.scan(lambda s, _: optimizer.step(s, lr), state, None, length=chunk)

    def objective(params, data):
        return _with_data(template, data).objective(params)

    compiled, compile_s, memory = {}, 0.0, {}
    results: dict[float, list[Run]] = {}
    for seed, problem in zip(seeds, problems):
        optimizer = _pick(problem, seed, label, options)
        state0, data = optimizer.init(problem.params), _data(problem)
        shared = problem.recurrent
        cache_key = "shared" if shared else seed
        if cache_key not in compiled:
            tic = time.perf_counter()
            if shared:
                step = jax.jit(run_chunk).lower(state0, jnp.float32(1.0), data).compile()
                final = jax.jit(objective).lower(problem.params, data).compile()
            else:
                own = lambda s, lr, _d, o=optimizer: jax.lax.scan(  # noqa: E731
                    lambda c, _: o.step(c, lr), s, None, length=chunk
                )
                step = jax.jit(own).lower(state0, jnp.float32(1.0), data).compile()
                final = jax.jit(lambda p, _d, pb=problem: pb.objective(p)).lower(problem.params, data).compile()
            compiled[cache_key] = (step, final)
            compile_s += time.perf_counter() - tic
            memory = memory or compiled_memory(step, state0)
        step, final = compiled[cache_key]
        for lr in learning_rates:
            state, losses, seconds, chunk_ms = run_chunks(
                lambda s, lr=lr, step=step, data=data: step(s, jnp.float32(lr), data), state0, iterations // chunk, chunk, progress,
                f"{problem.name} | seed {seed} | {label} | lr={lr:g}",
            )
            losses.append(float(final(state[0], data)))
            metrics = {} if optimizer.evaluations is None else {"evaluations": int(optimizer.evaluations(state))}
            results.setdefault(float(lr), []).append(
                Run(
                    task=problem.name, kind=kind, label=label, tangent_size=optimizer.tangent_size, lr=float(lr),
                    losses=np.asarray(losses), seconds=np.asarray(seconds), chunk_ms=np.asarray(chunk_ms),
                    compile_s=compile_s, metrics=metrics,
                )
            )
    if cache is not None:
        cache[label] = Compiled(chunk, compiled, compile_s, memory)
    return results


def choose_rate(per_lr: dict[float, list[Run]], grid: tuple[float, ...]) -> float:
    """The learning rate whose runs have the lowest median score over the seeds (ties: first in grid)."""
    scores = {lr: float(np.median([run.score for run in runs])) for lr, runs in per_lr.items()}
    return min(per_lr, key=lambda rate: (scores[rate], grid.index(rate)))


def run_task_seeds(
    name: str,
    *,
    quick: bool,
    seeds: Iterable[int],
    iterations: int | None = None,
    kinds: Iterable[str] | None = None,
    progress: Callable[[int, str], None] | None = None,
    sizes: dict[str, Any] | None = None,
    options: dict | None = None,
    cache: dict | None = None,
) -> tuple[list[Problem], dict[str, MethodRuns]]:
    """Runs every optimizer of task `name` (or those of `kinds`) on each seed and its whole grid; returns
    the problems (one per seed) and, per optimizer label, the runs at the learning rate with the best
    median score over the seeds. `options` go to `optimizers_for`; `cache` collects the compiled chunks
    (see `train_seeds`)."""
    seeds = list(seeds)
    problems = [TASKS[name](seed=seed, quick=quick, **(sizes or {})) for seed in seeds]
    template = problems[0]
    iterations = template.iterations if iterations is None else iterations
    chosen = {}
    cache = {} if cache is None else cache
    for optimizer in optimizers_for(template, seed=seeds[0], **(options or {})):
        if kinds is not None and optimizer.kind not in kinds:
            continue
        grid = tuple(float(lr) for lr in learning_rates(template, optimizer.kind))
        per_lr = train_seeds(
            problems, seeds, optimizer.label, grid, iterations=iterations, progress=progress, options=options,
            cache=cache,
        )
        lr = choose_rate(per_lr, grid)
        chosen[optimizer.label] = MethodRuns(
            name, optimizer.kind, optimizer.label, lr, grid, per_lr[lr], optimizer.cost, cache[optimizer.label].memory
        )
    return problems, chosen


def _spread(values: np.ndarray) -> str:
    values = np.asarray(values, float)
    if not np.all(np.isfinite(values)):
        finite = values[np.isfinite(values)]
        if not finite.size:
            return "diverged on every seed"
    return f"{_number(np.median(values))} [{_number(np.min(values))}, {_number(np.max(values))}]"


def _number(value: float) -> str:
    if not math.isfinite(value):
        return "inf"
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.3g}"


@dataclasses.dataclass
class SeedComparison:
    """A method (SOFO or a peer) against Adam on one task, seed by seed."""

    task: str
    label: str
    adam_iterations: list[int]  # per seed: when Adam first reached its own target
    sofo_iterations: list[int | None]  # per seed: when the method first reached Adam's target (None: never)
    adam_seconds: list[float]
    sofo_seconds: list[float | None]
    time_ratio: float  # median ms/step method / Adam
    blow_ups: int
    adam_best_iterations: list[int] = dataclasses.field(default_factory=list)  # when Adam hit its best loss
    sofo_best_iterations: list[int | None] = dataclasses.field(default_factory=list)  # when the method got there
    kind: str = "sofo"

    @property
    def seeds(self) -> int:
        return len(self.adam_iterations)

    @property
    def misses(self) -> int:
        return sum(i is None for i in self.sofo_iterations)

    def speedups(self) -> list[float]:
        """Adam iterations / the method's iterations per seed; 0 where it did not reach Adam's target."""
        return [0.0 if s is None else a / max(s, 1) for a, s in zip(self.adam_iterations, self.sofo_iterations)]

    def best_speedups(self) -> list[float]:
        """The same against Adam's best loss over its run (stricter when Adam's loss oscillates)."""
        pairs = zip(self.adam_best_iterations, self.sofo_best_iterations)
        return [0.0 if s is None else a / max(s, 1) for a, s in pairs]

    @property
    def median_speedup(self) -> float:
        return float(np.median(self.speedups()))

    def speedup_spread(self) -> str:
        """'median [min, max]' of the per-seed ratios (a miss counts as 0)."""
        values = self.speedups()
        return f"{np.median(values):.1f}x [{min(values):.1f}, {max(values):.1f}]"


def adam_targets(adam: MethodRuns) -> list[float]:
    """Per seed, Adam's target: its mean loss over the last 10% of its run (inf if that diverged)."""
    return [run.score for run in adam.runs]


def compare_seeds(methods: dict[str, MethodRuns]) -> list[SeedComparison]:
    """Every SOFO variant and peer (kinds in COMPARED) against Adam's target, seed by seed."""
    adam = next((m for m in methods.values() if m.kind == "adam"), None)
    if adam is None:
        return []
    targets = adam_targets(adam)
    adam_iterations = [first_reach(run.losses, target) or len(run.losses) - 1 for run, target in zip(adam.runs, targets)]
    bests = [float(np.nanmin(np.where(np.isfinite(run.losses), run.losses, np.nan))) for run in adam.runs]
    adam_best = [first_reach(run.losses, best) or len(run.losses) - 1 for run, best in zip(adam.runs, bests)]
    result = []
    for method in methods.values():
        if method.kind not in COMPARED:
            continue
        reached = [
            None if not np.isfinite(target) else first_reach(run.losses, target)
            for run, target in zip(method.runs, targets)
        ]
        result.append(
            SeedComparison(
                task=method.task,
                label=method.label,
                adam_iterations=adam_iterations,
                sofo_iterations=reached,
                adam_seconds=[float(run.seconds[i]) for run, i in zip(adam.runs, adam_iterations)],
                sofo_seconds=[None if i is None else float(run.seconds[i]) for run, i in zip(method.runs, reached)],
                time_ratio=method.step_ms() / adam.step_ms(),
                blow_ups=method.blow_ups(),
                adam_best_iterations=adam_best,
                sofo_best_iterations=[first_reach(run.losses, best) for run, best in zip(method.runs, bests)],
                kind=method.kind,
            )
        )
    return result


def _per_seed(values: list) -> str:
    return "/".join("-" if v is None else (str(v) if isinstance(v, int) else f"{v:.1f}") for v in values)


def _megabytes(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _evaluations(method: MethodRuns) -> str:
    counted = method.evaluations_per_iteration()
    if counted is not None:
        return f"{counted:.1f} f+g (linesearch)"
    return method.cost or "-"


def task_rows(methods: dict[str, MethodRuns]) -> list[dict[str, Any]]:
    """One row per optimizer: chosen lr, final loss median [min, max], blow-ups, iterations to reach
    Adam's target (median and per seed), the same as a ratio to Adam's (median [min, max] over seeds),
    what an iteration evaluates, time per step and compiled memory."""
    comparisons = {c.label: c for c in compare_seeds(methods)}
    adam = next((m for m in methods.values() if m.kind == "adam"), None)
    targets = [] if adam is None else adam_targets(adam)
    rows = []
    for method in methods.values():
        tuned = len(method.grid) > 1
        reached = [
            None if not np.isfinite(t) else first_reach(run.losses, t) for run, t in zip(method.runs, targets)
        ]
        hits = [r for r in reached if r is not None]
        if method.kind == "adam" or not targets:
            reach = "-"
        elif len(hits) * 2 > len(reached):
            reach = f"{int(np.median([r if r is not None else 10**9 for r in reached]))} ({_per_seed(reached)})"
        else:
            reach = f"not reached ({_per_seed(reached)})"
        row = {
            "optimizer": method.label,
            "lr": f"{method.lr:g}" + (" (tuned)" if tuned else " (fixed)"),
            "final loss: median [min, max]": _spread(method.finals()),
            "blow-ups": f"{method.blow_ups()}/{len(method.runs)}",
            "iters to Adam's target": reach,
            "fewer iters than Adam: median [min, max]": (
                comparisons[method.label].speedup_spread() if method.label in comparisons else "-"
            ),
            "evals/iter": _evaluations(method),
            "ms/step": f"{method.step_ms():.1f}",
            "temp MB/step": _megabytes(method.memory.get("temp MB")),
            "state MB": _megabytes(method.memory.get("state MB")),
        }
        rows.append(row)
    return rows


def summary_rows(comparisons: list[SeedComparison], problems: dict[str, Problem]) -> list[dict[str, Any]]:
    """The cross-task summary: for each SOFO variant (and peer) and task, the iteration ratio to Adam's
    target (median [min, max] over seeds, per seed) and the misses."""
    rows = []
    for c in comparisons:
        rows.append(
            {
                "task": c.task,
                "n params": problems[c.task].size,
                "method": c.label,
                "fewer iters than Adam: median [min, max]": c.speedup_spread(),
                "per seed": "/".join("miss" if s == 0 else f"{s:.1f}x" for s in c.speedups()),
                "vs Adam's best loss (median; per seed)": (
                    f"{np.median(c.best_speedups()):.1f}x ("
                    + "/".join("miss" if s == 0 else f"{s:.1f}x" for s in c.best_speedups()) + ")"
                ),
                "blow-ups": f"{c.blow_ups}/{c.seeds}",
                "step time vs Adam": f"{c.time_ratio:.1f}x",
                "seconds vs Adam (median, reached seeds)": _seconds_ratio(c),
            }
        )
    return rows


def _seconds_ratio(c: SeedComparison) -> str:
    ratios = [s / a for s, a in zip(c.sofo_seconds, c.adam_seconds) if s is not None and a > 0]
    return "-" if not ratios else f"{np.median(ratios):.1f}x"
