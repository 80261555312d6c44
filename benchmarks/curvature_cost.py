"""The cost of the default curvature ("exact") next to the fast paths and the network's JVPs.

    python -m benchmarks.curvature_cost [--rounds 15] [--tangent-size 32]

For each problem three jitted functions are timed round-robin in one process (one call of each per
round, median over rounds after a warm-up call):

  floor:  the K-tangent forward pass alone (`vmap(jvp)` of the model, or the scan carrying the latent
          and its K tangents): the work no SOFO step can avoid;
  fast:   a full SOFO step with the problem's fast path ("mse" or "ce"; it includes the per-step check
          of that path against loss_fn, one Hessian-vector product of the loss);
  exact:  the same step with the default curvature="exact" (K Hessian-vector products of the loss, by
          forward-over-reverse on the loss alone).

The table gives milliseconds per call, exact / fast, and the extra cost of "exact" in units of the
floor: (exact - fast) / floor.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import sofo
from benchmarks import tasks
from benchmarks.engine_overhead import machine_header, time_round_robin


def regression_mlp(seed: int = 0, batch: int = 256) -> tasks.Problem:
    """An 8-64-64-1 tanh MLP on a smooth random target (feed-forward regression)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (batch, 8), jnp.float32)
    y = jnp.sin(x @ jax.random.normal(keys[1], (8, 1), jnp.float32))
    sizes = [(8, 64), (64, 64), (64, 1)]
    params = [
        {"w": jax.random.normal(k, shape, jnp.float32) / np.sqrt(shape[0]), "b": jnp.zeros(shape[1], jnp.float32)}
        for k, shape in zip(keys[2:], sizes)
    ]

    def fun(p):
        h = x
        for layer in p[:-1]:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        return h @ p[-1]["w"] + p[-1]["b"]

    return tasks.Problem(
        name="mlp", title="MLP 8-64-64-1 regression (B=256)", params=params, curvature="mse", iterations=0,
        tangent_sizes=(32,), damping=1e-2, learning_rates={}, fun=fun, loss_fn=lambda out: tasks.mse(out, y),
    )


def problems() -> list[tasks.Problem]:
    return [
        regression_mlp(),
        tasks.digits(quick=True),
        tasks.flipflop(quick=True),
        tasks.lorenz(quick=True),
    ]


def calls(problem: tasks.Problem, tangent_size: int) -> dict:
    """The floor, the fast-path step and the exact step of one problem, jitted, with their arguments."""
    key = jax.random.key(0)
    tangents = sofo._tangents.sample(key, problem.params, tangent_size, "balanced")
    out = {}
    if problem.recurrent:
        def floor(params, tangents):
            def step(carry, x):
                z, dz = carry
                (z, y), (dz, dy) = jax.vmap(
                    lambda t, d: jax.jvp(lambda p, zz: problem.cell(p, zz, x), (params, z), (t, d)),
                    out_axes=((None, None), 0),
                )(tangents, dz)
                return (z, dz), jnp.sum(dy)
            dz0 = jnp.zeros((tangent_size,) + problem.z0.shape, problem.z0.dtype)
            return jax.lax.scan(step, (problem.z0, dz0), problem.xs)[1].sum()

        out["floor"] = (jax.jit(floor), (problem.params, tangents))
        for name, curvature in (("fast", problem.curvature), ("exact", "exact")):
            engine = sofo.value_and_sofo_grad_scan(
                problem.cell, problem.step_loss, tangent_size=tangent_size, damping=problem.damping,
                curvature=curvature, sampler="balanced",
            )
            out[name] = (jax.jit(engine), (key, problem.params, problem.z0, problem.xs, problem.ys))
    else:
        floor = jax.vmap(lambda p, t: jax.jvp(problem.fun, (p,), (t,))[1], in_axes=(None, 0))
        out["floor"] = (jax.jit(floor), (problem.params, tangents))
        for name, curvature in (("fast", problem.curvature), ("exact", "exact")):
            engine = sofo.value_and_sofo_grad(
                problem.fun, problem.loss_fn, tangent_size=tangent_size, damping=problem.damping,
                curvature=curvature, sampler="balanced",
            )
            out[name] = (jax.jit(engine), (key, problem.params))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tangent-size", type=int, default=32)
    args = parser.parse_args(argv)
    print(machine_header())
    print(f"K = {args.tangent_size}, {args.rounds} rounds, median wall ms per call (CPU ms in brackets)\n")
    header = f"{'problem':<44} {'fast':>5} {'floor':>14} {'fast step':>14} {'exact step':>14} {'exact/fast':>10} {'(exact-fast)/floor':>18}"
    print(header)
    print("-" * len(header))
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", sofo.CurvatureWarning)  # the fast paths must be right on these losses
        for problem in problems():
            wall, cpu = time_round_robin(calls(problem, args.tangent_size), args.rounds)
            med = {k: statistics.median(v) * 1e3 for k, v in wall.items()}
            med_cpu = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
            row = dict(problem=problem.title, fast_form=problem.curvature, **{f"{k}_ms": v for k, v in med.items()},
                       ratio=med["exact"] / med["fast"], extra_floors=(med["exact"] - med["fast"]) / med["floor"])
            rows.append(row)
            cells = [f"{med[k]:7.2f} ({med_cpu[k]:5.1f})" for k in ("floor", "fast", "exact")]
            print(f"{problem.title[:44]:<44} {problem.curvature:>5} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14} "
                  f"{row['ratio']:>10.2f} {row['extra_floors']:>18.2f}")
    return rows


if __name__ == "__main__":
    main()
