"""Engine overhead: one SOFO step against the bare batched-JVP floor on a vanilla RNN.

    python -m benchmarks.engine_overhead [--quick]

The floor is the work SOFO cannot avoid: the same `vmap(jvp)` of the model alone, with the same K
tangents, jitted. Everything the engine adds on top (tangent sampling, the loss's directional
derivatives, the K x K curvature sketch, the eigen-solve and the map back to parameter space) is the
overhead. Two pairs are timed:

  unrolled: `value_and_sofo_grad` on a `fun` that runs the RNN with `lax.scan` and returns all outputs,
            against `vmap(jvp(fun))`;
  scan:     `value_and_sofo_grad_scan` on the cell, against a `lax.scan` that carries the primal latent
            and its K tangents and nothing else (each step's output tangents are reduced to K numbers so
            that XLA cannot drop the readout).

All functions are timed round-robin (one call of each per round, so a noisy neighbour on a shared
machine slows all of them alike); the table gives the median over rounds after a warm-up call, in wall
time and in this process's CPU time (all threads), which moves much less when other processes compete
for the cores. On an idle machine trust the wall time: CPU time weighs a single-threaded piece (the
sampler, eigh) half as much as it costs in wall time on 2 busy threads. A breakdown times the engine's
pieces on their own, each jitted, to show where the overhead goes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

# jax's CPU eigh calls scipy's OpenBLAS, whose threads spin-wait on each other: on a shared, loaded
# machine a 128 x 128 eigh then takes ~100 ms instead of ~2 ms. One thread is what an idle machine gives.
# OpenBLAS reads this when it loads (at the first eigh), so it works unless LAPACK is already loaded.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
_BLAS_THREADS = os.environ["OPENBLAS_NUM_THREADS"] + (
    " (set too late: LAPACK was already loaded)" if "scipy.linalg.cython_lapack" in sys.modules else ""
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import sofo  # noqa: E402
from sofo import _curvature, _solve, _tangents  # noqa: E402  the engine's pieces, only to time them one by one

DAMPING = 1e-5


# --- the model: a vanilla tanh RNN with a linear readout -------------------------------------------


def rnn_params(key: jax.Array, hidden: int, inputs: int, outputs: int, dtype=jnp.float32) -> dict:
    """Weights of z' = tanh(W z + U x + b), y = C z' (1/sqrt(fan-in) Gaussian init)."""
    kw, ku, kc = jax.random.split(key, 3)
    return {
        "W": jax.random.normal(kw, (hidden, hidden), dtype) / jnp.sqrt(hidden),
        "U": jax.random.normal(ku, (hidden, inputs), dtype) / jnp.sqrt(inputs),
        "b": jnp.zeros((hidden,), dtype),
        "C": jax.random.normal(kc, (outputs, hidden), dtype) / jnp.sqrt(hidden),
    }


def rnn_cell(params: dict, z: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step on a batch: z (B, N), x (B, inputs) -> (z' (B, N), y (B, outputs))."""
    z_new = jnp.tanh(z @ params["W"].T + x @ params["U"].T + params["b"])
    return z_new, z_new @ params["C"].T


def rnn_rollout(params: dict, z0: jax.Array, xs: jax.Array) -> jax.Array:
    """Runs the cell over time-major xs (T, B, inputs); returns the outputs batch-major (B, T, outputs).

    Batch-major so that the engine's mse curvature (H_L = I / leading-axis size) divides by B.
    """
    _, ys = jax.lax.scan(lambda z, x: rnn_cell(params, z, x), z0, xs)
    return jnp.swapaxes(ys, 0, 1)


def mse(y: jax.Array, target: jax.Array) -> jax.Array:
    """0.5 * mean over the leading (batch) axis of the summed squared error: the engine's 'mse' form."""
    return 0.5 * jnp.sum((y - target) ** 2) / y.shape[0]


def rnn_problem(hidden: int, time_steps: int, batch: int, inputs: int, outputs: int, seed: int = 0) -> dict:
    """Parameters, initial latent, time-major inputs and targets for one benchmark size."""
    kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
    return {
        "params": rnn_params(kp, hidden, inputs, outputs),
        "z0": jnp.zeros((batch, hidden), jnp.float32),
        "xs": jax.random.normal(kx, (time_steps, batch, inputs), jnp.float32),
        "ys": jax.random.normal(ky, (time_steps, batch, outputs), jnp.float32),
    }


# --- the four timed functions --------------------------------------------------------------------


def unrolled_fns(problem: dict, tangent_size: int) -> tuple[Callable, Callable]:
    """(floor, engine) for the unrolled rollout; floor(params, tangents), engine(key, params)."""
    z0, xs = problem["z0"], problem["xs"]
    targets = jnp.swapaxes(problem["ys"], 0, 1)
    fun = lambda p: rnn_rollout(p, z0, xs)  # noqa: E731
    loss_fn = lambda out: mse(out, targets)  # noqa: E731

    @jax.jit
    def floor(params, tangents):
        return jax.vmap(lambda v: jax.jvp(fun, (params,), (v,)), out_axes=(None, 0))(tangents)

    engine = jax.jit(
        sofo.value_and_sofo_grad(fun, loss_fn, tangent_size=tangent_size, damping=DAMPING, curvature="mse")
    )
    return floor, engine


def scan_floor_fn(tangent_size: int) -> Callable:
    """floor(params, tangents, z0, xs, ys): the batched-JVP scan carrying the latent and its K tangents."""

    def floor(params, tangents, z0, xs, ys):
        del ys  # same signature as the engine; the floor has no loss
        latent_tangents = jnp.zeros((tangent_size,) + z0.shape, z0.dtype)

        def step(carry, x):
            z, dz, total = carry
            (z_new, y), (dz_new, dy) = jax.vmap(
                lambda v, d: jax.jvp(lambda p, zz: rnn_cell(p, zz, x), (params, z), (v, d)),
                out_axes=(None, 0),
            )(tangents, dz)
            # K numbers per step keep the readout and its tangents alive at negligible cost.
            return (z_new, dz_new, total + jnp.sum(dy, axis=(1, 2)) + jnp.sum(y)), None

        init = (z0, latent_tangents, jnp.zeros((tangent_size,), z0.dtype))
        return jax.lax.scan(step, init, xs)[0]

    return jax.jit(floor)


def scan_fns(tangent_size: int) -> tuple[Callable, Callable]:
    """(floor, engine) for the recurrent engine.

    floor(params, tangents, z0, xs, ys) and engine(key, params, z0, xs, ys).
    """
    engine = jax.jit(
        sofo.value_and_sofo_grad_scan(rnn_cell, mse, tangent_size=tangent_size, damping=DAMPING, curvature="mse")
    )
    return scan_floor_fn(tangent_size), engine


def breakdown_fns(problem: dict, tangent_size: int, key: jax.Array) -> dict[str, tuple[Callable, tuple]]:
    """The engine's pieces beyond the floor, each jitted alone, on the problem's real shapes.

    The first five are the unrolled engine's; the last is the work the scan engine adds inside its loop
    (each step's loss jvp and K x K curvature, over T steps); both engines share sampling and the solve.
    """
    params = problem["params"]
    targets = jnp.swapaxes(problem["ys"], 0, 1)
    floor, _ = unrolled_fns(problem, tangent_size)
    tangents = _tangents.sample(key, params, tangent_size, "normal")
    outputs, output_tangents = floor(params, tangents)
    loss_fn = lambda out: mse(out, targets)  # noqa: E731

    def directions(y, u):
        return jax.vmap(lambda t: jax.jvp(loss_fn, (y,), (t,)), out_axes=(None, 0))(u)

    def scan_loop_work(ys_seq, us_seq, targets_seq):
        """The scan engine's per-step extra work (loss jvp, curvature), summed over T, on given tangents."""

        def step(carry, inputs):
            y, u, target = inputs
            step_loss = lambda out: mse(out, target)  # noqa: E731
            value, directional = jax.vmap(lambda t: jax.jvp(step_loss, (y,), (t,)), out_axes=(None, 0))(u)
            curvature = _curvature.mse(y, u, jnp.float32)
            return jax.tree_util.tree_map(jnp.add, carry, (value, directional, curvature)), None

        init = (jnp.zeros(()), jnp.zeros((tangent_size,)), jnp.zeros((tangent_size, tangent_size)))
        return jax.lax.scan(step, init, (ys_seq, us_seq, targets_seq))[0]

    time_major = (  # per step: y_t (B, out), its K tangents (K, B, out), the target (B, out)
        jnp.swapaxes(outputs, 0, 1),
        jnp.transpose(output_tangents, (2, 0, 1, 3)),
        problem["ys"],
    )
    directional = jax.jit(directions)(outputs, output_tangents)[1]
    curvature = jax.jit(lambda y, u: _curvature.mse(y, u, jnp.float32))(outputs, output_tangents)
    coefficients = _solve.damped_solve(curvature, directional, DAMPING)[0]
    return {
        "sample tangents (K x n normal)": (
            jax.jit(lambda k: _tangents.sample(k, params, tangent_size, "normal")),
            (key,),
        ),
        "loss directional derivatives": (jax.jit(directions), (outputs, output_tangents)),
        "curvature gram (JV)^T (JV) / B": (
            jax.jit(lambda y, u: _curvature.mse(y, u, jnp.float32)),
            (outputs, output_tangents),
        ),
        "eigh + damped solve (K x K)": (
            jax.jit(lambda g, d: _solve.damped_solve(g, d, DAMPING)),
            (curvature, directional),
        ),
        "combine V c (back to params)": (jax.jit(_solve.combine), (tangents, coefficients)),
        "scan: in-loop loss jvp + curvature": (jax.jit(scan_loop_work), time_major),
    }


# --- timing --------------------------------------------------------------------------------------


def time_round_robin(
    calls: dict[str, tuple[Callable, tuple]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds per call for each entry, one call of each per round, after a
    warm-up (compile) call of each.

    CPU time (all of this process's threads) counts the work done and is much less sensitive than wall
    time to other processes competing for the cores.
    """
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def machine_header() -> str:
    """One line naming the machine: platform, CPU, cores, jax version and the device."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = jax.devices()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"machine: {platform.system()} {platform.machine()} | {cpu} | {cores} cores | "
        f"jax {jax.__version__} | device {device.platform}:{device.device_kind} | "
        f"OPENBLAS_NUM_THREADS={_BLAS_THREADS}"
    )


def _ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def _row(cells: list[str], widths: list[int]) -> str:
    padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
    return "| " + " | ".join(padded) + " |"


def _rule(widths: list[int]) -> str:
    return "|" + "|".join("-" * (w + 2) for w in widths) + "|"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T=10 and 3 rounds (a smoke run)")
    parser.add_argument("--hidden", type=int, default=128, help="N, the RNN's latent size")
    parser.add_argument("--time", type=int, default=50, help="T, the number of time steps")
    parser.add_argument("--batch", type=int, default=64, help="B, the batch size")
    parser.add_argument("--tangents", type=int, default=128, help="K, the number of tangents")
    parser.add_argument("--inputs", type=int, default=16, help="the RNN's input size")
    parser.add_argument("--outputs", type=int, default=16, help="the readout size")
    parser.add_argument("--rounds", type=int, default=15, help="timed calls of each function")
    parser.add_argument("--no-breakdown", action="store_true", help="skip timing the engine's pieces")
    args = parser.parse_args(argv)
    if args.quick:
        args.time, args.rounds = 10, 3

    problem = rnn_problem(args.hidden, args.time, args.batch, args.inputs, args.outputs)
    params, z0, xs, ys = problem["params"], problem["z0"], problem["xs"], problem["ys"]
    key = jax.random.key(1)
    tangents = _tangents.sample(key, params, args.tangents, "normal")  # the engine draws these same K
    n = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))

    unrolled_floor, unrolled_engine = unrolled_fns(problem, args.tangents)
    scan_floor, scan_engine = scan_fns(args.tangents)
    calls = {
        "unrolled floor": (unrolled_floor, (params, tangents)),
        "unrolled engine": (unrolled_engine, (key, params)),
        "scan floor": (scan_floor, (params, tangents, z0, xs, ys)),
        "scan engine": (scan_engine, (key, params, z0, xs, ys)),
    }
    load_before = os.getloadavg()[0]
    wall, cpu = time_round_robin(calls, args.rounds)
    load_after = os.getloadavg()[0]

    print(machine_header())
    print(
        f"vanilla tanh RNN: N={args.hidden} T={args.time} B={args.batch} K={args.tangents} "
        f"inputs={args.inputs} outputs={args.outputs} (n={n} params), float32, mse; median of "
        f"{args.rounds} rounds after warm-up; load average {load_before:.1f} -> {load_after:.1f}"
    )
    print()
    widths = [24, 8, 9, 8, 9, 10, 8, 8]
    header = ["engine", "floor ms", "engine ms", "overhead", "floor cpu", "engine cpu", "overhead", "cpu best"]
    print(_row(header, widths))
    print(_rule(widths))
    rows = {}
    for label, prefix in (("value_and_sofo_grad", "unrolled"), ("value_and_sofo_grad_scan", "scan")):
        floor, engine = f"{prefix} floor", f"{prefix} engine"
        row = {
            "floor_ms": _ms(wall[floor]),
            "engine_ms": _ms(wall[engine]),
            "floor_cpu_ms": _ms(cpu[floor]),
            "engine_cpu_ms": _ms(cpu[engine]),
        }
        row["overhead"] = 100 * (row["engine_ms"] / row["floor_ms"] - 1)
        row["cpu_overhead"] = 100 * (row["engine_cpu_ms"] / row["floor_cpu_ms"] - 1)
        row["cpu_best_overhead"] = 100 * (min(cpu[engine]) / min(cpu[floor]) - 1)
        rows[prefix] = row
        print(
            _row(
                [
                    label,
                    f"{row['floor_ms']:.1f}",
                    f"{row['engine_ms']:.1f}",
                    f"{row['overhead']:.1f}%",
                    f"{row['floor_cpu_ms']:.1f}",
                    f"{row['engine_cpu_ms']:.1f}",
                    f"{row['cpu_overhead']:.1f}%",
                    f"{row['cpu_best_overhead']:.1f}%",
                ],
                widths,
            )
        )
    print(
        "ms: wall clock; cpu: this process's CPU time (all threads), steadier on a shared machine; "
        "overhead = engine / floor - 1 (medians); cpu best: the same from each one's fastest round"
    )

    if not args.no_breakdown:
        pieces = breakdown_fns(problem, args.tangents, key)
        piece_wall, piece_cpu = time_round_robin(pieces, args.rounds)
        print()
        print("where the extra time goes (each piece jitted alone; medians; % of the matching floor):")
        widths = [34, 8, 8, 8, 8]
        print(_row(["piece", "ms", "% floor", "cpu ms", "% floor"], widths))
        print(_rule(widths))
        for name in piece_wall:
            prefix = "scan" if name.startswith("scan") else "unrolled"
            ms, cpu_ms = _ms(piece_wall[name]), _ms(piece_cpu[name])
            print(
                _row(
                    [
                        name,
                        f"{ms:.2f}",
                        f"{100 * ms / rows[prefix]['floor_ms']:.1f}%",
                        f"{cpu_ms:.2f}",
                        f"{100 * cpu_ms / rows[prefix]['floor_cpu_ms']:.1f}%",
                    ],
                    widths,
                )
            )
    return rows


if __name__ == "__main__":
    main()
