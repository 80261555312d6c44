"""Equal wall-clock: every method's loss at the same time budgets, measured in one process, interleaved.

After the per-iteration runs have chosen each method's learning rate, each seed runs a race: every raced
method starts from the seed's initial parameters at its chosen rate, and the method that has used the
least time so far runs its next compiled chunk of steps (timed with `block_until_ready`, compile
excluded, the executables of the per-iteration runs reused), until each has used the budget (or a step
cap, or its loss stopped being finite). Methods thus run in rotation through the same stretch of the
machine's load. A method's loss at budget b is its loss after the last step that ended by b (the chunk's
time spread evenly over its steps). Also measured: when, in seconds, each reached Adam's target (its mean
loss over the last 10% of its per-iteration run). If Adam needs longer than the budget to reach its
target (a loaded machine), every method runs on until Adam's time to its target, so "no more wall-clock
than Adam" is always decided within the race.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.seeds import Compiled, MethodRuns, _data, _number, _pick, _spread, adam_targets
from benchmarks.suite import first_reach
from benchmarks.tasks import Problem

RACED = ("adam", "sofo_lm", "lbfgs", "hf")  # kinds raced by default (plain SOFO and FGD lose per iteration)
BUDGET_FRACTIONS = (0.25, 0.5, 1.0)  # the budgets reported, as fractions of the race's budget
STEP_CAP = 100  # a racer stops after this many times the task's iteration count, whatever its time
ADAM_CAP = 2  # Adam gives up on its target after this many times the task's iteration count


@dataclasses.dataclass
class RaceRun:
    """One method's race on one seed: `losses[i]` after i steps, reached at `seconds[i]`."""

    label: str
    kind: str
    seed: int
    losses: np.ndarray
    seconds: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.losses) - 1

    def loss_at(self, budget: float) -> float:
        """The loss after the last step finished by `budget` seconds (inf once it is not finite)."""
        index = int(np.searchsorted(self.seconds, budget, side="right")) - 1
        value = float(self.losses[max(index, 0)])
        return value if math.isfinite(value) else math.inf

    def steps_by(self, budget: float) -> int:
        """How many steps had finished by `budget` seconds."""
        return max(int(np.searchsorted(self.seconds, budget, side="right")) - 1, 0)

    def seconds_to(self, target: float) -> float | None:
        reached = first_reach(self.losses, target)
        return None if reached is None else float(self.seconds[reached])


def race_seeds(
    problems: list[Problem],
    seeds: list[int],
    methods: dict[str, MethodRuns],
    cache: dict[str, Compiled],
    *,
    budget: float,
    iterations: int,
    labels: Iterable[str] | None = None,
    options: dict | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, list[RaceRun]]:
    """Races the methods `labels` (default: those of kinds in RACED) for `budget` seconds on each seed.

    Args:
      problems, seeds: one problem per seed, as `seeds.run_task_seeds` built them.
      methods: the per-iteration results (their chosen learning rates are used).
      cache: the compiled chunks `seeds.run_task_seeds` left (nothing is compiled here).
      budget: seconds per method and seed.
      iterations: the task's per-iteration count; a racer stops after STEP_CAP times as many steps.
      options: the `optimizers_for` options the per-iteration runs used.
      progress: `progress(seconds, description)` after every chunk.

    Returns:
      {label: [RaceRun per seed]}.
    """
    if labels is None:
        labels = [label for label, m in methods.items() if m.kind in RACED]
    labels = [label for label in labels if label in methods and label in cache]
    result: dict[str, list[RaceRun]] = {label: [] for label in labels}
    adam = next((label for label in labels if methods[label].kind == "adam"), None)
    targets = adam_targets(methods[adam]) if adam is not None else [None] * len(seeds)
    for seed, problem, target in zip(seeds, problems, targets):
        data = _data(problem)
        racers = []
        for label in labels:
            optimizer = _pick(problem, seed, label, options)
            step, final = cache[label].for_seed(seed, problem)
            racers.append(
                dict(label=label, kind=methods[label].kind, lr=jnp.float32(methods[label].lr), step=step,
                     final=final, state=optimizer.init(problem.params), chunk=cache[label].chunk,
                     losses=[], seconds=[0.0], done=False)
            )
        reference = next((r for r in racers if r["label"] == adam), None)
        while True:
            # Run until the budget, or until Adam's time to its target when that is longer; while Adam has
            # not reached it (and may still: finite, under its step cap), nobody stops on time.
            deadline = budget
            if reference is not None and target is not None and math.isfinite(target):
                reached = first_reach(np.asarray(reference["losses"]), target)
                if reached is not None:
                    deadline = max(budget, reference["seconds"][reached])
                elif not reference["done"] and len(reference["losses"]) < ADAM_CAP * iterations:
                    deadline = math.inf
            active = [r for r in racers if not r["done"] and r["seconds"][-1] < deadline]
            if not active:
                break
            racer = min(active, key=lambda r: r["seconds"][-1])
            tic = time.perf_counter()
            racer["state"], chunk_losses = racer["step"](racer["state"], racer["lr"], data)
            chunk_losses = np.asarray(jax.block_until_ready(chunk_losses))
            elapsed = time.perf_counter() - tic
            chunk, start = racer["chunk"], racer["seconds"][-1]
            racer["losses"].extend(chunk_losses.tolist())
            racer["seconds"].extend((start + elapsed * np.arange(1, chunk + 1) / chunk).tolist())
            if len(racer["losses"]) >= STEP_CAP * iterations or not np.all(np.isfinite(chunk_losses)):
                racer["done"] = True
            if progress is not None:
                progress(min(elapsed, max(budget - start, 0.0)), f"{problem.name} | seed {seed} | race | {racer['label']}")
        for racer in racers:
            losses = racer["losses"] + [float(racer["final"](racer["state"][0], data))]
            result[racer["label"]].append(
                RaceRun(racer["label"], racer["kind"], seed, np.asarray(losses), np.asarray(racer["seconds"]))
            )
    return result


def budgets(budget: float) -> list[float]:
    return [budget * f for f in BUDGET_FRACTIONS]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def race_rows(race: dict[str, list[RaceRun]], methods: dict[str, MethodRuns], budget: float) -> list[dict[str, Any]]:
    """One row per raced method: its loss at each budget (median [min, max] over seeds), the steps it
    made in the whole budget, and when it reached Adam's target (median over the seeds; per seed, "-" where
    it did not within the race)."""
    adam = next((m for m in methods.values() if m.kind == "adam"), None)
    targets = None if adam is None else adam_targets(adam)
    rows = []
    for label, runs in race.items():
        row: dict[str, Any] = {"optimizer": label}
        for b in budgets(budget):
            row[f"loss at {b:.3g} s"] = _spread(np.array([run.loss_at(b) for run in runs]))
        row[f"steps in {budget:.3g} s"] = f"{int(np.median([run.steps_by(budget) for run in runs]))}"
        if targets is not None:
            times = [run.seconds_to(t) if math.isfinite(t) else None for run, t in zip(runs, targets)]
            hits = [t for t in times if t is not None]
            median = "not reached" if len(hits) * 2 <= len(times) else f"{np.median([t if t is not None else math.inf for t in times]):.3g}"
            row["s to Adam's target: median (per seed)"] = f"{median} ({'/'.join(_seconds(t) for t in times)})"
        rows.append(row)
    return rows


@dataclasses.dataclass
class WallClock:
    """sofo.sofo against Adam in the race on one task: seconds to Adam's target, per seed."""

    task: str
    label: str
    sofo_seconds: list[float | None]
    adam_seconds: list[float | None]

    def ratios(self) -> list[float]:
        """sofo.sofo's seconds / Adam's per seed (inf where sofo.sofo did not reach the target in the race,
        which ran at least until Adam reached it)."""
        out = []
        for s, a in zip(self.sofo_seconds, self.adam_seconds):
            out.append(math.inf if s is None or a is None else s / max(a, 1e-9))
        return out

    @property
    def median_ratio(self) -> float:
        return float(np.median(self.ratios()))

    @property
    def met(self) -> bool:
        """The issue-16 target: no more wall-clock than Adam (median over seeds)."""
        return self.median_ratio <= 1.0


def wall_clock(race: dict[str, list[RaceRun]], methods: dict[str, MethodRuns]) -> list[WallClock]:
    """Each raced sofo.sofo against Adam, in seconds to Adam's target (empty without both)."""
    adam_label = next((label for label in race if methods[label].kind == "adam"), None)
    if adam_label is None:
        return []
    targets = adam_targets(methods[adam_label])
    adam_times = [run.seconds_to(t) for run, t in zip(race[adam_label], targets)]
    result = []
    for label, runs in race.items():
        if methods[label].kind != "sofo_lm":
            continue
        times = [run.seconds_to(t) for run, t in zip(runs, targets)]
        result.append(WallClock(methods[label].task, label, times, adam_times))
    return result


def _ranking(values: dict[str, float]) -> str:
    order = sorted(values, key=lambda label: values[label])
    return ", then ".join(f"{label} {_number(values[label])}" for label in order)


def verdict(
    methods: dict[str, MethodRuns], race: dict[str, list[RaceRun]] | None, budget: float | None, iterations: int
) -> str:
    """One plain sentence per task: who wins per iteration and who wins per second on this machine."""
    from benchmarks.seeds import compare_seeds  # noqa: PLC0415 - avoid a cycle at import time

    finals = {label: float(np.median(m.finals())) for label, m in methods.items()}
    words = [f"per iteration: lowest median loss after {iterations} iterations: {_ranking(finals)}"]
    for c in compare_seeds(methods):
        if methods[c.label].kind != "sofo_lm":
            continue
        if c.median_speedup > 0:
            words.append(f"{c.label} reached Adam's target in {c.speedup_spread()} fewer iterations than Adam")
        else:
            words.append(f"{c.label} did not reach Adam's target within {iterations} iterations on most seeds")
    text = "; ".join(words)
    if race and budget:
        at_budget = {label: float(np.median([run.loss_at(budget) for run in runs])) for label, runs in race.items()}
        per_second = [f"lowest median loss at {budget:.3g} s: {_ranking(at_budget)}"]
        for w in wall_clock(race, methods):
            ratio = w.median_ratio
            per_second.append(
                f"{w.label} reached Adam's target in {ratio:.1f}x Adam's wall-clock (median over seeds)"
                if math.isfinite(ratio)
                else f"{w.label} did not reach Adam's target in the race on most seeds (it ran at least "
                f"{budget:.3g} s, and at least as long as Adam took to get there)"
            )
        text += ". Per second on this machine: " + "; ".join(per_second)
    return "Verdict: " + text + "."
