"""Runs optimizers over learning-rate grids on the problems, times them, and summarises.

Timing: each (problem, optimizer) is compiled once ahead of time (`jit(...).lower(...).compile()`, the
compile time is reported on its own); the learning rate is a traced argument, so the same executable
runs every point of the grid. Training runs in chunks of `lax.scan`ned steps; each chunk is timed with
`block_until_ready`, so the wall-clock curves exclude compilation and Python overhead per step.
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
from benchmarks.tasks import TASKS, Problem


@dataclasses.dataclass
class Run:
    """One training run: `losses[i]` and `seconds[i]` after i steps (i = 0 .. iterations)."""

    task: str
    kind: str
    label: str
    tangent_size: int | None
    lr: float
    losses: np.ndarray
    seconds: np.ndarray
    chunk_ms: np.ndarray  # milliseconds per step, one value per timed chunk
    compile_s: float
    metrics: dict = dataclasses.field(default_factory=dict)

    @property
    def score(self) -> float:
        """Mean loss over the last 10% of the run (how the learning rate is chosen); inf if it diverged."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return float(np.mean(tail)) if np.all(np.isfinite(tail)) else math.inf

    @property
    def step_ms(self) -> float:
        return float(np.median(self.chunk_ms))


def _chunk_size(iterations: int) -> int:
    # At most 10 steps: the equal-wall-clock race (benchmarks/race.py) runs whole chunks, so a slow method
    # overshoots its time budget by at most one chunk.
    for size in (10, 5, 2):
        if iterations % size == 0 and iterations // size >= 4:
            return size
    return 1


def run_chunks(step, state, count, chunk, progress, description):
    """Runs `count` compiled chunks of `chunk` steps, each timed with `block_until_ready`; returns the
    final state, the loss before every step, the cumulative seconds after every step (starting at 0) and
    the milliseconds per step of each chunk."""
    losses, seconds, chunk_ms = [], [0.0], []
    for _ in range(count):
        tic = time.perf_counter()
        state, chunk_losses = step(state)
        chunk_losses = np.asarray(jax.block_until_ready(chunk_losses))
        elapsed = time.perf_counter() - tic
        losses.extend(chunk_losses.tolist())
        # Spread the chunk's time evenly over its steps for the loss-vs-time curve.
        seconds.extend((seconds[-1] + elapsed * np.arange(1, chunk + 1) / chunk).tolist())
        chunk_ms.append(1e3 * elapsed / chunk)
        if progress is not None:
            progress(chunk, f"{description} | loss={losses[-1]:.3g}")
    return state, losses, seconds, chunk_ms


def train(
    problem: Problem,
    optimizer: Optimizer,
    learning_rates: Iterable[float],
    *,
    iterations: int | None = None,
    progress: Callable[[int, str], None] | None = None,
) -> list[Run]:
    """Runs `optimizer` on `problem` once per learning rate (SOFO and FGD draw from the same seed)."""
    iterations = problem.iterations if iterations is None else iterations
    chunk = _chunk_size(iterations)

    def run_chunk(state, lr):
        return jax.lax.scan(lambda s, _: optimizer.step(s, lr), state, None, length=chunk)

    state0 = optimizer.init(problem.params)
    lr0 = jnp.float32(1.0)
    start = time.perf_counter()
    compiled = jax.jit(run_chunk).lower(state0, lr0).compile()
    objective = jax.jit(problem.objective).lower(problem.params).compile()
    compile_s = time.perf_counter() - start

    runs = []
    for lr in learning_rates:
        state, losses, seconds, chunk_ms = run_chunks(
            lambda s, lr=lr: compiled(s, jnp.float32(lr)), state0, iterations // chunk, chunk, progress,
            f"{problem.name} | {optimizer.label} | lr={lr:g}",
        )
        params = state[0]
        losses.append(float(objective(params)))
        metrics = problem.metrics(params) if problem.metrics is not None else {}
        runs.append(
            Run(
                task=problem.name,
                kind=optimizer.kind,
                label=optimizer.label,
                tangent_size=optimizer.tangent_size,
                lr=float(lr),
                losses=np.asarray(losses),
                seconds=np.asarray(seconds),
                chunk_ms=np.asarray(chunk_ms),
                compile_s=compile_s,
                metrics=metrics,
            )
        )
    return runs


def best_runs(runs: list[Run]) -> dict[str, Run]:
    """The best learning rate per optimizer label (lowest score), in first-seen order."""
    best: dict[str, Run] = {}
    for run in runs:
        if run.label not in best or run.score < best[run.label].score:
            best[run.label] = run
    return best


def first_reach(losses: np.ndarray, target: float) -> int | None:
    """The first iteration whose loss is at or below `target`, or None."""
    hits = np.nonzero(losses <= target)[0]
    return int(hits[0]) if hits.size else None


@dataclasses.dataclass
class Comparison:
    """SOFO (one K) against the best Adam run on one task."""

    task: str
    label: str
    time_ratio: float  # SOFO ms/step / Adam ms/step
    target: float  # Adam's best loss over its run
    adam_iterations: int  # when Adam first reached it
    sofo_iterations: int | None  # when SOFO first reached it (None: not within the run)
    adam_seconds: float
    sofo_seconds: float | None

    @property
    def speedup(self) -> float | None:
        return None if self.sofo_iterations is None else self.adam_iterations / max(self.sofo_iterations, 1)


def _adam_target(best: dict[str, Run]) -> tuple[Run | None, float]:
    """The best Adam run and its lowest loss (nan when there is no Adam run or it never had a finite loss)."""
    adam = next((run for run in best.values() if run.kind == "adam"), None)
    finite = np.array([]) if adam is None else adam.losses[np.isfinite(adam.losses)]
    return adam, float(finite.min()) if finite.size else math.nan


def compare(best: dict[str, Run]) -> list[Comparison]:
    """Each SOFO run against Adam's best loss (empty without a usable Adam run)."""
    adam, target = _adam_target(best)
    if adam is None or math.isnan(target):
        return []
    adam_iterations = first_reach(adam.losses, target)
    result = []
    for run in best.values():
        if run.kind not in ("sofo", "sofo_lm"):
            continue
        reached = first_reach(run.losses, target)
        result.append(
            Comparison(
                task=run.task,
                label=run.label,
                time_ratio=run.step_ms / adam.step_ms,
                target=target,
                adam_iterations=adam_iterations,
                sofo_iterations=reached,
                adam_seconds=float(adam.seconds[adam_iterations]),
                sofo_seconds=None if reached is None else float(run.seconds[reached]),
            )
        )
    return result


def run_task(
    name: str,
    *,
    quick: bool,
    seed: int = 0,
    iterations: int | None = None,
    kinds: Iterable[str] | None = None,
    progress: Callable[[int, str], None] | None = None,
    problem: Problem | None = None,
) -> tuple[Problem, list[Run]]:
    """Builds task `name` and runs every optimizer (or those of `kinds`) over its learning-rate grid."""
    problem = TASKS[name](seed=seed, quick=quick) if problem is None else problem
    runs = []
    for optimizer in optimizers_for(problem, seed=seed):
        if kinds is not None and optimizer.kind not in kinds:
            continue
        grid = learning_rates(problem, optimizer.kind)
        runs.extend(train(problem, optimizer, grid, iterations=iterations, progress=progress))
    return problem, runs


def summary_rows(problem: Problem, runs: list[Run]) -> tuple[list[dict[str, Any]], list[Comparison]]:
    """One table row per optimizer (its best learning rate) and the SOFO-vs-Adam comparisons."""
    best = best_runs(runs)
    comparisons = compare(best)
    _, target = _adam_target(best)
    rows = []
    for run in best.values():
        grid = sorted({r.lr for r in runs if r.label == run.label})
        reached = first_reach(run.losses, target)
        row = {
            "task": problem.name,
            "optimizer": run.label,
            "lr": f"{run.lr:g}" + ("" if len(grid) > 1 else " (fixed)"),
            "final loss": run.losses[-1],
            "best loss": float(np.min(run.losses, initial=np.inf, where=np.isfinite(run.losses))),
            "ms/step": run.step_ms,
            "compile s": run.compile_s,
            "iters to Adam's best": "-" if reached is None else str(reached),
        }
        row.update(run.metrics)
        rows.append(row)
    return rows, comparisons
