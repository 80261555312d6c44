"""Minibatch and fresh-trial benchmarks (issue 15): a new batch every step, SOFO against tuned Adam.

    python -m benchmarks --tasks mb_digits,fresh_flipflop,mb_regression --seeds 3
    python -m benchmarks.stochastic --tasks mb_digits --seeds 3 --variants default,same_batch

Each task draws a fresh batch every step (from a fixed training set, or brand-new trials) and reports a
score on data no step was fitted to (test accuracy and loss, or the loss on held-out trials) and the
loss on the whole training set. Adam's learning rate is tuned on a grid (the rate with the best median
score over the seeds); `sofo.sofo` runs with its defaults (learning rate 1, the curvature form exact for
the loss), never tuned. `--variants` adds damping variants of `sofo.sofo` side by side, so old and new
defaults are compared in one process on the same batches and seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sofo
from benchmarks.tasks import cross_entropy, flipflop_data, mse, rnn_cell, rnn_init


@dataclasses.dataclass(frozen=True)
class StochasticProblem:
    """A problem trained on a new batch every step.

    Attributes:
      name, title: command-line key and readable title.
      params: initial parameters.
      curvature: sofo's `loss=` form, exact for the loss ("mse" or "ce").
      batches: a pytree whose leaves have a leading axis of length `iterations` (batch t is leaf[t]).
      batch_loss: `batch_loss(params, batch) -> scalar`, the training loss on one batch (for Adam).
      sofo_update: `sofo_update(opt, opt_state, params, batch) -> (updates, opt_state)`.
      evaluate: `evaluate(params) -> dict` of named scores.
      score: the score Adam's learning rate is tuned on (and the curve records).
      higher_is_better: whether `score` is to be maximised (accuracy) or minimised (a loss).
      iterations, tangent_size: steps per run and sofo's K.
      adam_rates: the Adam learning-rate grid.
      notes: one sentence on the data.
    """

    name: str
    title: str
    params: Any
    curvature: str
    batches: Any
    batch_loss: Callable
    sofo_update: Callable
    evaluate: Callable
    score: str
    higher_is_better: bool
    iterations: int
    tangent_size: int
    adam_rates: tuple[float, ...]
    notes: str = ""


def _feedforward(model, loss):
    """batch_loss and sofo_update for `model(params, x)` and `loss(outputs, y)` on batch = (x, y)."""

    def batch_loss(params, batch):
        x, y = batch
        return loss(model(params, x), y)

    def sofo_update(opt, opt_state, params, batch):
        x, y = batch
        return opt.update(None, opt_state, params, fun=lambda p: model(p, x), loss_fn=lambda out: loss(out, y))

    return batch_loss, sofo_update


def _mlp(sizes, key):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n), jnp.float32) / np.sqrt(m), "b": jnp.zeros((n,), jnp.float32)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]


def _mlp_apply(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def minibatch_digits(seed=0, quick=True, iterations=None):
    """sklearn digits, a 64-64-10 tanh MLP, cross-entropy on batches of 128 drawn fresh each step."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.2, random_state=seed, stratify=data.target
    )
    # Standardised with the spread floored at one grey level: dividing by a near-zero spread (a pixel that is
    # blank in every training image) turned test inputs into values up to 1e6, where weights that no
    # training image constrains, moved freely by random tangents, decided the test logits.
    mean, std = x_train.mean(0), np.maximum(x_train.std(0), 1.0)
    x_train = jnp.asarray((x_train - mean) / std, jnp.float32)
    x_test = jnp.asarray((x_test - mean) / std, jnp.float32)
    y_train, y_test = jnp.asarray(y_train), jnp.asarray(y_test)
    iterations = iterations or 300
    batch = 128
    rng = np.random.default_rng(seed + 100)
    index = np.stack([rng.choice(len(y_train), batch, replace=False) for _ in range(iterations)])
    batches = (x_train[index], y_train[index])
    batch_loss, sofo_update = _feedforward(_mlp_apply, cross_entropy)

    def evaluate(p):
        logits = _mlp_apply(p, x_test)
        return {
            "test accuracy": jnp.mean(jnp.argmax(logits, -1) == y_test),
            "test CE": cross_entropy(logits, y_test),
            "train-set CE": cross_entropy(_mlp_apply(p, x_train), y_train),
        }

    return StochasticProblem(
        name="mb_digits",
        title="Digits (sklearn), MLP 64-64-10 tanh, minibatches of 128",
        params=_mlp((64, 64, 10), jax.random.key(seed + 3)),
        curvature="ce",
        batches=batches,
        batch_loss=batch_loss,
        sofo_update=sofo_update,
        evaluate=evaluate,
        score="test accuracy",
        higher_is_better=True,
        iterations=iterations,
        tangent_size=64,
        adam_rates=(0.001, 0.003, 0.01, 0.03, 0.1),
        notes=f"{len(y_train)} training / {len(y_test)} test images, a fresh batch of {batch} each step",
    )


def minibatch_regression(seed=0, quick=True, iterations=None):
    """A noisy random teacher MLP 8-32-1 learnt by an 8-64-64-1 tanh MLP, 0.5 * MSE on batches of 64."""
    key_teacher, key_x, key_noise, key_init = jax.random.split(jax.random.key(seed + 7), 4)
    teacher = _mlp((8, 32, 1), key_teacher)
    x = jax.random.normal(key_x, (3000, 8), jnp.float32)
    y = _mlp_apply(teacher, x) + 0.1 * jax.random.normal(key_noise, (3000, 1), jnp.float32)
    x_train, y_train, x_test, y_test = x[:2000], y[:2000], x[2000:], y[2000:]
    iterations = iterations or 300
    batch = 64
    rng = np.random.default_rng(seed + 200)
    index = np.stack([rng.choice(len(y_train), batch, replace=False) for _ in range(iterations)])
    batch_loss, sofo_update = _feedforward(_mlp_apply, mse)

    def evaluate(p):
        return {"test MSE": mse(_mlp_apply(p, x_test), y_test), "train-set MSE": mse(_mlp_apply(p, x_train), y_train)}

    return StochasticProblem(
        name="mb_regression",
        title="Regression, MLP 8-64-64-1 tanh on a noisy teacher, minibatches of 64",
        params=_mlp((8, 64, 64, 1), key_init),
        curvature="mse",
        batches=(x_train[index], y_train[index]),
        batch_loss=batch_loss,
        sofo_update=sofo_update,
        evaluate=evaluate,
        score="test MSE",
        higher_is_better=False,
        iterations=iterations,
        tangent_size=32,
        adam_rates=(0.001, 0.003, 0.01, 0.03),
        notes="2000 training / 1000 test points (noise variance 0.01, so the best 0.5*MSE is 0.005)",
    )


def fresh_flipflop(seed=0, quick=True, iterations=None, fresh=True):
    """The 3-bit flip-flop with brand-new trials every step (batch 32, T=100), RNN N=64, K=32.

    With `fresh=False`, the full-batch task of `benchmarks.tasks.flipflop` (quick sizes): the same 32
    trials every step, scored by their loss (the control for the damping rule)."""
    iterations = iterations or (150 if quick else 500)
    hidden, batch, steps = 64, 32, 100
    if fresh:
        xs, ys = flipflop_data(iterations * batch, steps, seed=seed + 1000)
        # (T, iterations * B, 3) -> (iterations, T, B, 3): batch t is trials [t B, (t + 1) B).
        split = lambda a: jnp.asarray(a.reshape(steps, iterations, batch, 3).transpose(1, 0, 2, 3))  # noqa: E731
    else:
        xs, ys = flipflop_data(batch, steps, seed=seed)
        split = lambda a: jnp.broadcast_to(jnp.asarray(a), (iterations,) + a.shape)  # noqa: E731
    batches = (split(xs), split(ys))
    train_xs, train_ys = (jnp.asarray(a) for a in flipflop_data(batch, steps, seed=seed))
    test_xs, test_ys = (jnp.asarray(a) for a in flipflop_data(256, steps, seed=seed + 5000))
    cell = rnn_cell(0.5)

    def rollout_loss(params, xs_, ys_):
        z0 = jnp.zeros((xs_.shape[1], hidden), jnp.float32)
        _, outs = jax.lax.scan(lambda z, x: cell(params, z, x), z0, xs_)
        return jnp.sum(jax.vmap(mse)(outs, ys_))

    def batch_loss(params, batch_):
        return rollout_loss(params, *batch_)

    def sofo_update(opt, opt_state, params, batch_):
        xs_, ys_ = batch_
        z0 = jnp.zeros((batch, hidden), jnp.float32)
        return opt.update(None, opt_state, params, cell=cell, loss_fn=mse, z0=z0, xs=xs_, ys=ys_)

    if fresh:
        name, kind, score = "fresh_flipflop", "with fresh trials", "held-out loss"
        evaluate = lambda p: {"held-out loss": rollout_loss(p, test_xs, test_ys)}  # noqa: E731
        notes = f"{batch} new trials every step; the score is the summed loss on 256 trials never trained on"
    else:
        name, kind, score = "fixed_flipflop", "full batch (control)", "training loss"
        evaluate = lambda p: {  # noqa: E731
            "training loss": rollout_loss(p, train_xs, train_ys), "held-out loss": rollout_loss(p, test_xs, test_ys)
        }
        notes = f"the same {batch} trials every step, as `python -m benchmarks --quick --tasks flipflop`"
    return StochasticProblem(
        name=name,
        title=f"3-bit flip-flop, {kind}, vanilla RNN (N={hidden}, T={steps})",
        params=rnn_init(jax.random.key(seed + 1), hidden, 3, 3),
        curvature="mse",
        batches=batches,
        batch_loss=batch_loss,
        sofo_update=sofo_update,
        evaluate=evaluate,
        score=score,
        higher_is_better=False,
        iterations=iterations,
        tangent_size=32,
        adam_rates=(0.001, 0.003, 0.01, 0.03),
        notes=notes,
    )


TASKS: dict[str, Callable[..., StochasticProblem]] = {
    "mb_digits": minibatch_digits,
    "fresh_flipflop": fresh_flipflop,
    "mb_regression": minibatch_regression,
    "fixed_flipflop": lambda seed=0, quick=True, iterations=None: fresh_flipflop(seed, quick, iterations, fresh=False),
}

# sofo.sofo damping variants (name -> adaptive_damping): "default" is the library's default.
VARIANTS: dict[str, Any] = {
    "default": True,
    "same_batch": sofo.AdaptiveDamping(next_batch=False),  # the rule before issue 15: same-batch ratio only
    "floor_0.1": sofo.AdaptiveDamping(min_damping=0.1, next_batch=False),  # a constant higher floor
    # the held-out verdict as a ratio of running averages over ~100 steps (opt-in, issue 15 part A)
    "average_0.99": sofo.AdaptiveDamping(held_out_average=0.99),
    # a paired comparison of two dampings on the next batch (K-FAC's greedy adjustment; opt-in)
    "compare_3": sofo.AdaptiveDamping(held_out_compare=3.0),
    "compare_1.7": sofo.AdaptiveDamping(held_out_compare=3.0**0.5),
    # the same, with the same-batch safety net reduced to rejected steps (rho >= 0 for an accepted one)
    "compare_3_reject_only": sofo.AdaptiveDamping(held_out_compare=3.0, lower_ratio=0.0),
    # a constant damping (the bounds pinned, the same-batch rule left only to reject steps): fixed_0.3 etc.
    **{f"fixed_{x:g}": sofo.AdaptiveDamping(min_damping=x, max_damping=x, next_batch=False)
       for x in (1e-5, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)},
}


@dataclasses.dataclass
class Run:
    scores: dict[str, float]
    curve: np.ndarray  # the first score after every step
    seconds: float
    rejected: int = 0


def _run(problem, make_opt, update, evaluate_every=10):
    opt = make_opt()
    evaluate = jax.jit(problem.evaluate)

    @jax.jit
    def chunk(params, opt_state, batches):
        def body(carry, batch):
            params, opt_state = carry
            updates, opt_state = update(opt, opt_state, params, batch)
            params = optax.apply_updates(params, updates)
            accepted = opt_state[0].accepted if isinstance(opt_state[0], sofo.SofoState) else jnp.asarray(True)
            return (params, opt_state), accepted

        (params, opt_state), accepted = jax.lax.scan(body, (params, opt_state), batches)
        return params, opt_state, jnp.sum(~accepted)

    params, opt_state = problem.params, opt.init(problem.params)
    first = problem.score
    curve, rejected, start = [], 0, time.perf_counter()
    for t0 in range(0, problem.iterations, evaluate_every):
        batches = jax.tree_util.tree_map(lambda b: b[t0 : t0 + evaluate_every], problem.batches)
        params, opt_state, r = chunk(params, opt_state, batches)
        rejected += int(r)
        curve.append(float(evaluate(params)[first]))
    seconds = time.perf_counter() - start
    return Run({k: float(v) for k, v in evaluate(params).items()}, np.asarray(curve), seconds, rejected)


def run_task(name, seeds, quick=True, iterations=None, variants=("default", "same_batch"), log=print):
    """Runs tuned Adam and the sofo.sofo variants on `seeds`; returns {method: [Run per seed]}."""
    problems = [TASKS[name](seed=s, quick=quick, iterations=iterations) for s in seeds]
    problem = problems[0]
    results: dict[str, list[Run]] = {}
    sign = -1 if problem.higher_is_better else 1
    first = problem.score
    adam_runs = {}
    for lr in problem.adam_rates:
        adam_runs[lr] = []
        for p in problems:
            def update(opt, opt_state, params, batch, p=p):
                grads = jax.grad(p.batch_loss)(params, batch)
                return opt.update(grads, opt_state, params)

            adam_runs[lr].append(_run(p, lambda lr=lr: optax.adam(lr), update))
    best = min(adam_runs, key=lambda lr: sign * statistics.median(r.scores[first] for r in adam_runs[lr]))
    for lr, runs in adam_runs.items():
        log(f"  adam lr={lr}: {first} median {statistics.median(r.scores[first] for r in runs):.4g}")
    results[f"Adam (tuned, lr={best})"] = adam_runs[best]
    for variant in variants:
        runs = []
        for seed, p in zip(seeds, problems):
            make = lambda: sofo.sofo(  # noqa: E731
                tangent_size=p.tangent_size, curvature=p.curvature, key=seed, adaptive_damping=VARIANTS[variant]
            )
            runs.append(_run(p, make, p.sofo_update))
        results[f"sofo.sofo ({variant})"] = runs
    return problem, results


def trace(name, seed=0, variant="default", iterations=None, every=10, log=print):
    """Prints sofo.sofo's per-step damping diagnostics on one seed (`--trace`): the batch loss, the
    damping, the same-batch ratio rho, the held-out ratio of the previous step (D / q) and its held-out
    reduction D = L_next(theta_prev) - L_next(theta), the step's curvature term q, and acceptance."""
    p = TASKS[name](seed=seed, iterations=iterations)
    opt = sofo.sofo(tangent_size=p.tangent_size, curvature=p.curvature, key=seed, adaptive_damping=VARIANTS[variant])

    @jax.jit
    def go(params, opt_state, batches):
        def body(carry, batch):
            params, opt_state = carry
            updates, opt_state = p.sofo_update(opt, opt_state, params, batch)
            s = opt_state[0]
            q = s.previous.curvature_term if s.previous is not None else jnp.zeros([])
            return (optax.apply_updates(params, updates), opt_state), (s.value, s.damping, s.ratio, s.held_out_ratio, q, s.accepted)

        return jax.lax.scan(body, (params, opt_state), batches)

    (params, _), out = go(p.params, opt.init(p.params), p.batches)
    value, damping, ratio, held, q, accepted = (np.asarray(o) for o in out)
    judged_q = np.concatenate([[0.0], q[:-1]])  # the curvature term of the step judged at t (step t - 1)
    reduction = held * judged_q
    log(f"{name} seed {seed} ({variant}): " + ", ".join(f"{k} {float(v):.4g}" for k, v in p.evaluate(params).items()))
    for t in range(0, len(value), every):
        log(f"  step {t:4d}  loss {value[t]:9.4g}  damping {damping[t]:8.2e}  rho {ratio[t]:6.2f}  held-out rho "
            f"{held[t]:7.2f}  D {reduction[t]:8.3g}  q {q[t]:8.3g}  accepted {bool(accepted[t])}")
    for lo in range(0, len(value), 50):
        m = judged_q[lo : lo + 50] > 0
        if m.any():
            d, qq = reduction[lo : lo + 50][m], judged_q[lo : lo + 50][m]
            log(f"  steps {lo}-{lo + 49}: damping median {np.median(damping[lo : lo + 50]):.2g}; held-out rho median "
                f"{np.median(d / qq):.2f}, below 1/4 {np.mean(d / qq < 0.25):.0%}; D mean {d.mean():.3g} sd {d.std():.3g}; "
                f"q median {np.median(qq):.3g}; rejected {int((~accepted[lo : lo + 50]).sum())}")
    return value, damping, ratio, held, q, accepted


def _spread(values, digits=3):
    values = sorted(values)
    return f"{statistics.median(values):.{digits}g} [{values[0]:.{digits}g}, {values[-1]:.{digits}g}]"


def markdown(problem, results, seeds):
    names = [problem.score] + [n for n in next(iter(results.values()))[0].scores if n != problem.score]
    header = "| method | " + " | ".join(names) + " | rejected steps | s/run |"
    lines = [header, "|" + "---|" * (len(names) + 3)]
    for method, runs in results.items():
        cells = [_spread([r.scores[n] for r in runs]) for n in names]
        rejected = _spread([r.rejected for r in runs]) if "sofo" in method else "-"
        seconds = _spread([r.seconds for r in runs], 2)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {rejected} | {seconds} |")
    return (
        f"### {problem.title}\n\n{problem.notes}; {len(seeds)} seeds ({seeds[0]}-{seeds[-1]}), "
        f"{problem.iterations} steps, K={problem.tangent_size}; median [min, max] over seeds.\n\n" + "\n".join(lines)
    )


def run(names, seeds, quick=True, iterations=None, variants=("default", "same_batch"), log=print):
    """Runs each task and prints its table; returns the markdown."""
    texts = []
    for name in names:
        problem, results = run_task(name, seeds, quick=quick, iterations=iterations, variants=variants, log=log)
        text = markdown(problem, results, seeds)
        log("\n" + text + "\n")
        texts.append(text)
    return "\n\n".join(texts)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stochastic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--variants", default="default,same_batch", help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--trace", action="store_true", help="print per-step damping diagnostics for --seed instead")
    args = parser.parse_args(argv)
    names = [t for t in args.tasks.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    bad = [t for t in names if t not in TASKS] + [v for v in variants if v not in VARIANTS]
    if bad:
        parser.error(f"unknown task(s) or variant(s): {', '.join(bad)}")
    if args.trace:
        for name in names:
            for variant in variants:
                trace(name, args.seed, variant, iterations=args.iterations)
        return 0
    run(names, list(range(args.seed, args.seed + args.seeds)), iterations=args.iterations, variants=variants)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
