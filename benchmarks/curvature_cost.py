"""The cost of the default curvature ("exact") next to the fast paths and the network's JVPs.

    python -m benchmarks.curvature_cost [--rounds 15] [--tangent-size 32]

For each problem three jitted functions are timed round-robin in one process (one call of each per
round, median over rounds after a warm-up call):

  floor:  the K-tangent forward pass alone (`vmap(jvp)` of the model, or the scan carrying the latent
          and its K tangents): the work no SOFO step can avoid;
  fast:   a full SOFO step with the problem's fast path ("mse" or "ce"; it includes the per-step check
          of that path against loss_fn, one Hessian-vector product of the loss and a host callback
          that fires only on a mismatch);
  unchecked: the same fast-path step with the check patched out (for this measurement only: the
          library has no switch for it), to show what the check costs;
  exact:  the same step with the default curvature="exact" (K Hessian-vector products of the loss, by
          forward-over-reverse on the loss alone).

The table gives milliseconds per call (median, with the 25th-75th percentile range over rounds),
exact / fast, exact / unchecked, and the extra cost of "exact" over the unchecked fast path in units of
the floor: (exact - unchecked) / floor.

A second table (`--training`) shows why the default is "exact": `sofo.sofo` on a masked
context-dependent integration task (the loss counts the response period only, through `ys`), at its
defaults against the same optimiser forced onto the old default, the "mse" fast path, over seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import sofo
from sofo import _adaptive, _curvature
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


@contextlib.contextmanager
def _unchecked():
    """The engine without the fast-path check (patched out while a step is traced; measurement only)."""
    saved = _curvature.warn_on_mismatch, _curvature.fast_path_mismatch
    _curvature.warn_on_mismatch = lambda *args: None
    _curvature.fast_path_mismatch = lambda curvature, loss_fn, outputs, tangents, dtype: jnp.zeros((), dtype)
    try:
        yield
    finally:
        _curvature.warn_on_mismatch, _curvature.fast_path_mismatch = saved


def _compiled(fn, args):
    """fn jitted and traced now (so a patch active at this point is what gets compiled)."""
    return jax.jit(fn).lower(*args).compile()


def calls(problem: tasks.Problem, tangent_size: int) -> dict:
    """The floor, the fast-path step (checked and unchecked) and the exact step of one problem, compiled."""
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
        args = (key, problem.params, problem.z0, problem.xs, problem.ys)
        build = lambda curvature: sofo.value_and_sofo_grad_scan(  # noqa: E731
            problem.cell, problem.step_loss, tangent_size=tangent_size, damping=problem.damping,
            curvature=curvature, sampler="balanced",
        )
    else:
        floor = jax.vmap(lambda p, t: jax.jvp(problem.fun, (p,), (t,))[1], in_axes=(None, 0))
        out["floor"] = (jax.jit(floor), (problem.params, tangents))
        args = (key, problem.params)
        build = lambda curvature: sofo.value_and_sofo_grad(  # noqa: E731
            problem.fun, problem.loss_fn, tangent_size=tangent_size, damping=problem.damping,
            curvature=curvature, sampler="balanced",
        )
    out["fast"] = (_compiled(build(problem.curvature), args), args)
    with _unchecked():
        out["unchecked"] = (_compiled(build(problem.curvature), args), args)
    out["exact"] = (_compiled(build("exact"), args), args)
    return out


def integration_task(seed: int, hidden: int = 32, batch: int = 32, steps: int = 60, respond: int = 15):
    """Context-dependent integration: integrate the cued one of two noisy channels; answer at the end only.

    Inputs (T, B, 4): two noisy evidence channels and a one-hot context cue; the target, during the last
    `respond` steps only, is the running mean of the cued channel. The mask lives in `ys`.
    """
    rng = np.random.default_rng(seed)
    means = rng.uniform(-1, 1, (batch, 2))
    evidence = means[None] + rng.normal(0, 1.0, (steps, batch, 2))
    context = rng.integers(0, 2, batch)
    cue = np.zeros((steps, batch, 2))
    cue[:, np.arange(batch), context] = 1.0
    xs = np.concatenate([evidence, cue], -1).astype(np.float32)
    chosen = evidence[:, np.arange(batch), context]
    targets = (np.cumsum(chosen, 0) / np.arange(1, steps + 1)[:, None])[..., None].astype(np.float32)
    mask = np.zeros((steps, batch, 1), np.float32)
    mask[-respond:] = 1.0
    params = tasks.rnn_init(jax.random.key(seed), hidden, 4, 1)
    cell = tasks.rnn_cell(0.2)

    def step_loss(y, target):
        t, m = target
        return 0.5 * jnp.sum(m * (y - t) ** 2) / (batch * respond)

    return params, cell, step_loss, jnp.zeros((batch, hidden), jnp.float32), jnp.asarray(xs), (
        jnp.asarray(targets), jnp.asarray(mask))


def train_masked(seed: int, curvature: str | None, iterations: int, tangent_size: int) -> float:
    params, cell, step_loss, z0, xs, ys = integration_task(seed)
    options = {} if curvature is None else {"curvature": curvature}
    opt = sofo.sofo(tangent_size=tangent_size, key=seed, **options)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(None, state, params, cell=cell, loss_fn=step_loss, z0=z0, xs=xs, ys=ys)
        return jax.tree_util.tree_map(jnp.add, params, updates), state

    for _ in range(iterations):
        params, state = step(params, state)
    return float(_adaptive.rollout_loss(cell, step_loss, params, z0, xs, ys))


def training_table(seeds: int, iterations: int, tangent_size: int) -> dict:
    print(f"\nsofo.sofo on a masked integration task (leaky tanh RNN N=32, T=60, loss on the last 15 steps), "
          f"K={tangent_size}, {iterations} steps, {seeds} seeds: final loss, median [min, max]")
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sofo.CurvatureWarning)  # the mse row is the mismatch, on purpose
        for label, curvature in (("defaults (curvature='exact')", None), ("curvature='mse' (the old default)", "mse")):
            finals = [train_masked(seed, curvature, iterations, tangent_size) for seed in range(seeds)]
            results[label] = finals
            print(f"  {label:<36} {np.median(finals):.3e} [{min(finals):.3e}, {max(finals):.3e}]")
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tangent-size", type=int, default=32)
    parser.add_argument("--training", action="store_true", help="also run the masked-task training table")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=150)
    args = parser.parse_args(argv)
    print(machine_header())
    print(f"K = {args.tangent_size}, {args.rounds} rounds, wall ms per call: median [25th-75th percentile]\n")
    header = (f"{'problem':<44} {'fast':>5} {'floor':>18} {'fast step':>18} {'unchecked':>18} {'exact step':>18} "
              f"{'exact/fast':>10} {'exact/unchecked':>15} {'(exact-unch.)/floor':>19}")
    print(header)
    print("-" * len(header))
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", sofo.CurvatureWarning)  # the fast paths must be right on these losses
        for problem in problems():
            wall, _ = time_round_robin(calls(problem, args.tangent_size), args.rounds)
            med = {k: statistics.median(v) * 1e3 for k, v in wall.items()}
            row = dict(problem=problem.title, fast_form=problem.curvature, **{f"{k}_ms": v for k, v in med.items()},
                       ratio=med["exact"] / med["fast"], ratio_unchecked=med["exact"] / med["unchecked"],
                       extra_floors=(med["exact"] - med["unchecked"]) / med["floor"])
            rows.append(row)
            spread = {k: np.percentile(np.asarray(v) * 1e3, [25, 75]) for k, v in wall.items()}
            cells = [f"{med[k]:6.2f} [{spread[k][0]:.1f}-{spread[k][1]:.1f}]" for k in ("floor", "fast", "unchecked", "exact")]
            print(f"{problem.title[:44]:<44} {problem.curvature:>5} " + " ".join(f"{c:>18}" for c in cells)
                  + f" {row['ratio']:>10.2f} {row['ratio_unchecked']:>15.2f} {row['extra_floors']:>19.2f}")
    if args.training:
        training_table(args.seeds, args.iterations, args.tangent_size)
    return rows


if __name__ == "__main__":
    main()
