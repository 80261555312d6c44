"""Tables (markdown, readable in a terminal) and figures (PNG) from the suite's runs."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from benchmarks.suite import Comparison, Run, best_runs
from benchmarks.tasks import Problem


def _cell(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return "diverged" if math.isnan(value) or value > 0 else str(value)
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A markdown table with padded columns (so it also reads as plain text)."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(c for c in row if c not in columns)
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), rule] + [line(r) for r in cells])


def comparison_rows(problems: dict[str, Problem], comparisons: Sequence[Comparison]) -> list[dict[str, Any]]:
    rows = []
    for c in comparisons:
        problem = problems[c.task]
        rows.append(
            {
                "task": c.task,
                "n params": problem.size,
                "SOFO": c.label.replace("SOFO ", ""),
                "step time SOFO/Adam": f"{c.time_ratio:.1f}x",
                "Adam's best loss": c.target,
                "Adam iters": c.adam_iterations,
                "SOFO iters": "not reached" if c.sofo_iterations is None else c.sofo_iterations,
                "fewer iters": "-" if c.speedup is None else f"{c.speedup:.1f}x",
                "Adam s": f"{c.adam_seconds:.2f}",
                "SOFO s": "-" if c.sofo_seconds is None else f"{c.sofo_seconds:.2f}",
            }
        )
    return rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_STYLE = {"sofo": "-", "sofo_lm": "-", "fgd": "-.", "adam": "--", "sgd": ":", "gn": "-"}


def _positive(losses: np.ndarray, floor: float) -> np.ndarray:
    """Losses for a log axis: nan/inf dropped, values at or below 0 drawn at `floor`."""
    out = np.where(np.isfinite(losses), losses, np.nan)
    return np.maximum(out, floor)


def plot_task(problem: Problem, runs: list[Run], path: str) -> None:
    """Loss vs iteration and loss vs wall-clock (compile excluded) for the best learning rate of each
    optimizer."""
    plt = _plt()
    best = best_runs(runs)
    finite = np.concatenate([r.losses[np.isfinite(r.losses)] for r in best.values()])
    positive = finite[finite > 0]
    floor = float(positive.min()) / 10 if positive.size else 1e-12
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for run in best.values():
        label = f"{run.label} (lr {run.lr:g})"
        style = dict(ls=_STYLE.get(run.kind, "-"), lw=2 if run.kind in ("sofo", "sofo_lm") else 1.3)
        losses = _positive(run.losses, floor)
        axes[0].plot(np.arange(len(losses)), losses, label=label, **style)
        # The time axis is logarithmic: start at the first timed step.
        axes[1].plot(run.seconds[1:], losses[1:], label=label, **style)
    if problem.reference is not None:
        name, value = problem.reference
        if value > 0:
            for ax in axes:
                ax.axhline(value, color="grey", lw=1, ls="--", label=name)
    for ax, xlabel in zip(axes, ("iteration", "wall-clock seconds (compile excluded)")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3, which="both")
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(problem.title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary(comparisons: Sequence[Comparison], path: str, subtitle: str = "") -> None:
    """Two bar charts per task: per-step time SOFO/Adam and how many times fewer iterations SOFO needs
    to reach Adam's best loss ("not reached" where SOFO did not get there within the run)."""
    plt = _plt()
    names = [f"{c.task}\n{c.label.replace('SOFO ', '')}" for c in comparisons]
    x = np.arange(len(comparisons))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(names) + 4), 4), constrained_layout=True)
    axes[0].bar(x, [c.time_ratio for c in comparisons], color="tab:blue")
    axes[0].axhline(1, color="k", lw=1)
    axes[0].set_ylabel("time per step, SOFO / Adam")
    axes[0].set_yscale("log")
    speedups = [c.speedup if c.speedup is not None else np.nan for c in comparisons]
    axes[1].bar(x, speedups, color="tab:green")
    for i, c in enumerate(comparisons):
        if c.speedup is None:
            axes[1].annotate("not\nreached", (i, 1.0), ha="center", va="bottom", fontsize=8, color="tab:red")
        else:
            axes[1].annotate(f"{c.speedup:.1f}x", (i, c.speedup), ha="center", va="bottom", fontsize=8)
    axes[1].axhline(1, color="k", lw=1)
    axes[1].axhline(10, color="grey", lw=1, ls="--", label="10x goal")
    finite = [v for v in speedups if np.isfinite(v)]
    axes[1].set_ylim(0.5, max([20.0] + [2 * v for v in finite]))
    axes[1].set_ylabel("Adam iters / SOFO iters to Adam's best loss")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, fontsize=8)
        ax.grid(alpha=0.3, axis="y", which="both")
    fig.suptitle("SOFO vs Adam" + (f" ({subtitle})" if subtitle else ""))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- several seeds ------------------------------------------------------------------------------------


def plot_task_seeds(problem: Problem, methods: dict, path: str, subtitle: str = "") -> None:
    """Loss against iterations and against wall-clock (compile excluded): the median over seeds as a line,
    the range over seeds as a band, for each optimizer at its chosen learning rate."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    everything = np.concatenate([run.losses for m in methods.values() for run in m.runs])
    positive = everything[np.isfinite(everything) & (everything > 0)]
    floor = float(positive.min()) / 10 if positive.size else 1e-12
    for method in methods.values():
        losses = np.stack([_positive(run.losses, floor) for run in method.runs])
        seconds = np.median(np.stack([run.seconds for run in method.runs]), axis=0)
        median = np.nanmedian(losses, axis=0)
        low, high = np.nanmin(losses, axis=0), np.nanmax(losses, axis=0)
        tuned = " tuned" if len(method.grid) > 1 else ""
        label = f"{method.label} (lr {method.lr:g}{tuned}; {method.blow_ups()} blow-ups)"
        style = dict(ls=_STYLE.get(method.kind, "-"), lw=2 if method.kind in ("sofo", "sofo_lm") else 1.3)
        steps = np.arange(losses.shape[1])
        line = axes[0].plot(steps, median, label=label, **style)[0]
        axes[0].fill_between(steps, low, high, color=line.get_color(), alpha=0.15, lw=0)
        axes[1].plot(seconds[1:], median[1:], color=line.get_color(), **style)
        axes[1].fill_between(seconds[1:], low[1:], high[1:], color=line.get_color(), alpha=0.15, lw=0)
    if problem.reference is not None and problem.reference[1] > 0:
        for ax in axes:
            ax.axhline(problem.reference[1], color="grey", lw=1, ls="--", label=problem.reference[0])
    for ax, xlabel in zip(axes, ("iteration", "wall-clock seconds (median over seeds, compile excluded)")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (median, band: min-max over seeds)")
        ax.grid(alpha=0.3, which="both")
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(problem.title + (f" ({subtitle})" if subtitle else ""))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary_seeds(comparisons: Sequence, path: str, subtitle: str = "") -> None:
    """Per task and SOFO variant: time per step relative to Adam (left) and how many times fewer
    iterations than Adam it needs to reach Adam's final loss, median over seeds (right). Every bar is
    labelled; a seed on which SOFO never reached Adam's final loss counts as 0x ("miss")."""
    plt = _plt()
    names = [f"{c.task}\n" + c.label.replace(" K=", "\nK=").replace(" (", "\n(") for c in comparisons]
    x = np.arange(len(comparisons))
    fig, axes = plt.subplots(2, 1, figsize=(max(9, 1.1 * len(names) + 3), 8), constrained_layout=True)
    ratios = [c.time_ratio for c in comparisons]
    axes[0].bar(x, ratios, color="tab:blue")
    for i, value in enumerate(ratios):
        axes[0].annotate(f"{value:.1f}x", (i, value), ha="center", va="bottom", fontsize=8)
    axes[0].axhline(1, color="k", lw=1)
    axes[0].set_ylabel("time per step, method / Adam (median)")
    axes[0].set_ylim(0, max(ratios + [1.0]) * 1.25)
    speedups = [c.median_speedup for c in comparisons]
    axes[1].bar(x, speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
    for i, c in enumerate(comparisons):
        text = f"{c.median_speedup:.1f}x"
        if c.misses:
            text += f"\n{c.misses}/{c.seeds} missed"
        if c.blow_ups:
            text += f"\n{c.blow_ups}/{c.seeds} blew up"
        axes[1].annotate(text, (i, max(c.median_speedup, 0)), ha="center", va="bottom", fontsize=8)
    axes[1].axhline(1, color="k", lw=1, label="as many iterations as Adam")
    axes[1].set_ylim(0, max(speedups + [1.0]) * 1.35)
    axes[1].set_ylabel("Adam iters / method iters\nto Adam's target")
    axes[1].legend(fontsize=8, loc="upper left")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("SOFO and its peers vs tuned Adam, median over seeds" + (f" ({subtitle})" if subtitle else ""))
    fig.savefig(path, dpi=110)
    plt.close(fig)
