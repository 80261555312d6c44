"""Compiled memory of one training step against the sequence length T: SOFO scan vs unrolled vs BPTT.

    python -m benchmarks.memory [--quick] [--out results/]

For each T the step is only compiled, never run: XLA's `memory_analysis()` of the compiled executable
gives the peak temporary buffer (`temp_size_in_bytes`, what the step allocates beyond its inputs and
outputs) and the argument and output sizes. Three steps on the same vanilla tanh RNN:

  SOFO scan:     `value_and_sofo_grad_scan` on the cell; carries K latent tangents through the scan, so
                 its memory should not depend on T;
  SOFO unrolled: `value_and_sofo_grad` on a `fun` that scans the cell and returns all T outputs; it
                 keeps K output tangents for every step (linear in T);
  Adam + BPTT:   `jax.value_and_grad` through the same rollout plus an `optax.adam` update; reverse mode
                 stores the activations of every step (linear in T).

Prints a table and writes `memory.png` (temp memory against T) into `--out`.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

import jax
import jax.numpy as jnp
import optax

import sofo
from benchmarks.engine_overhead import machine_header, mse, rnn_cell, rnn_params, rnn_rollout

TIME_STEPS = (50, 100, 200, 400, 800, 1600)
QUICK_TIME_STEPS = (50, 400, 1600)
TEMP_BUDGET_MB = 40.0  # the goal for SOFO scan at N=128, B=64, K=128
MB = 1e6
# Buffer assignment (so memory_analysis) is fixed on the optimised HLO, before code generation: skipping
# LLVM's optimisation gives the same numbers (checked against a full compile) in a third of the time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def sofo_scan_step(tangent_size: int) -> Callable:
    """step(key, params, z0, xs, ys) -> (value, direction, info)."""
    return sofo.value_and_sofo_grad_scan(rnn_cell, mse, tangent_size=tangent_size, curvature="mse")


def sofo_unrolled_step(tangent_size: int) -> Callable:
    """step(key, params, z0, xs, ys): the unrolled engine on the whole rollout (outputs batch-major)."""

    def step(key, params, z0, xs, ys):
        targets = jnp.swapaxes(ys, 0, 1)
        engine = sofo.value_and_sofo_grad(
            lambda p: rnn_rollout(p, z0, xs), lambda out: mse(out, targets), tangent_size=tangent_size
        )
        return engine(key, params)

    return step


def adam_bptt_step(learning_rate: float = 1e-3) -> tuple[Callable, optax.GradientTransformation]:
    """step(params, opt_state, z0, xs, ys) -> (value, params, opt_state): backprop through time + Adam."""
    optimizer = optax.adam(learning_rate)

    def step(params, opt_state, z0, xs, ys):
        targets = jnp.swapaxes(ys, 0, 1)
        value, grads = jax.value_and_grad(lambda p: mse(rnn_rollout(p, z0, xs), targets))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return value, optax.apply_updates(params, updates), opt_state

    return step, optimizer


def compiled_memory(step: Callable, *args) -> dict[str, float] | None:
    """Temp, argument and output bytes (in MB) of `jax.jit(step)` compiled for `args`; None if unknown."""
    stats = jax.jit(step).lower(*args).compile(compiler_options=FAST_COMPILE).memory_analysis()
    if stats is None:
        return None
    return {
        "temp": stats.temp_size_in_bytes / MB,
        "argument": stats.argument_size_in_bytes / MB,
        "output": stats.output_size_in_bytes / MB,
    }


def measure(
    time_steps: tuple[int, ...], hidden: int, batch: int, tangent_size: int, inputs: int, outputs: int
) -> dict[str, dict[int, dict[str, float] | None]]:
    """Compiled memory of the three steps for each T; only shapes are used (nothing is run)."""
    params = rnn_params(jax.random.key(0), hidden, inputs, outputs)
    key = jax.random.key(1)
    z0 = jax.ShapeDtypeStruct((batch, hidden), jnp.float32)
    adam, optimizer = adam_bptt_step()
    opt_state = optimizer.init(params)
    results: dict[str, dict[int, dict[str, float] | None]] = {
        "SOFO scan": {},
        "SOFO unrolled": {},
        "Adam + BPTT": {},
    }
    for t in time_steps:
        xs = jax.ShapeDtypeStruct((t, batch, inputs), jnp.float32)
        ys = jax.ShapeDtypeStruct((t, batch, outputs), jnp.float32)
        results["SOFO scan"][t] = compiled_memory(sofo_scan_step(tangent_size), key, params, z0, xs, ys)
        results["SOFO unrolled"][t] = compiled_memory(sofo_unrolled_step(tangent_size), key, params, z0, xs, ys)
        results["Adam + BPTT"][t] = compiled_memory(adam, params, opt_state, z0, xs, ys)
    return results


def plot(results: dict, path: str, title: str) -> None:
    """Temp memory against T, log-log, one line per method, with the SOFO scan budget dashed."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (name, by_t), marker in zip(results.items(), "osd"):
        ts = [t for t, m in by_t.items() if m is not None]
        ax.plot(ts, [by_t[t]["temp"] for t in ts], marker=marker, label=name)
    ax.axhline(TEMP_BUDGET_MB, color="grey", linestyle="--", linewidth=1, label=f"{TEMP_BUDGET_MB:.0f} MB goal")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    time_steps = sorted({t for by_t in results.values() for t in by_t})
    ax.set_xticks(time_steps, [str(t) for t in time_steps])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("compiled peak temp memory (MB)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"T in {QUICK_TIME_STEPS} only")
    parser.add_argument("--out", default="results", help="folder for memory.png (created if missing)")
    parser.add_argument("--hidden", type=int, default=128, help="N, the RNN's latent size")
    parser.add_argument("--batch", type=int, default=64, help="B, the batch size")
    parser.add_argument("--tangents", type=int, default=128, help="K, the number of tangents")
    parser.add_argument("--inputs", type=int, default=16, help="the RNN's input size")
    parser.add_argument("--outputs", type=int, default=16, help="the readout size")
    args = parser.parse_args(argv)
    time_steps = QUICK_TIME_STEPS if args.quick else TIME_STEPS

    results = measure(time_steps, args.hidden, args.batch, args.tangents, args.inputs, args.outputs)
    size = (
        f"vanilla tanh RNN: N={args.hidden} B={args.batch} K={args.tangents} inputs={args.inputs} "
        f"outputs={args.outputs}, float32"
    )
    print(machine_header())
    print(size + "; compiled memory of one step (MB = 1e6 bytes), from XLA's memory_analysis()")
    print()
    print(f"| {'T':>5} | {'method':<13} | {'temp MB':>9} | {'args MB':>8} | {'out MB':>7} |")
    print(f"|{'-' * 7}|{'-' * 15}|{'-' * 11}|{'-' * 10}|{'-' * 9}|")
    for t in time_steps:
        for name, by_t in results.items():
            m = by_t[t]
            if m is None:
                print(f"| {t:>5} | {name:<13} | {'n/a':>9} | {'n/a':>8} | {'n/a':>7} |")
            else:
                print(
                    f"| {t:>5} | {name:<13} | {m['temp']:>9.2f} | {m['argument']:>8.2f} | {m['output']:>7.2f} |"
                )

    scan = [m["temp"] for m in results["SOFO scan"].values() if m is not None]
    if scan:
        first, last = time_steps[0], time_steps[-1]
        growth = {name: by_t[last]["temp"] / by_t[first]["temp"] for name, by_t in results.items()}
        print()
        print(
            f"temp growth T={first} -> {last}: "
            + ", ".join(f"{name} x{g:.2f}" for name, g in growth.items())
            + f"; SOFO scan max {max(scan):.2f} MB (goal <= {TEMP_BUDGET_MB:.0f} MB, flat in T)"
        )
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "memory.png")
        plot(results, path, size)
        print(f"plot: {path}")
    else:
        print("memory_analysis() returned None on this backend: no numbers, no plot.")
    return results


if __name__ == "__main__":
    main()
