"""Smoke tests of the benchmark suite (`python -m benchmarks`) on its smallest task, a few iterations.

The suite's numbers are checked where they can be: the FGD baseline must see the engine's own tangents
(the SOFO direction is rebuilt from them and a dense solve), and the exact Gauss-Newton step must solve
the linear regression in one step. The peers are checked against independent computations: the
Hessian-free Gauss-Newton-vector product against J^T H_L J from dense `jax.jacfwd` and `jax.hessian`, its
conjugate gradient against `jnp.linalg.solve`, the L-BFGS row's evaluation count against a counter in the
model, and both against the known minimum of a quadratic.
"""

import dataclasses

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

pytest.importorskip("sklearn")

# benchmarks/ is a package at the repository root (not installed with sofo); pyproject's pytest
# settings put the root on sys.path.
from benchmarks import cli, optimizers, seeds, suite, tasks  # noqa: E402

ITERATIONS = 12


def tiny_regression(**overrides):
    sizes = dict(inputs=8, outputs=2, batch=32, iterations=ITERATIONS, tangent_sizes=(8,))
    sizes.update(overrides)
    return tasks.linear_regression(seed=0, quick=True, **sizes)


def test_smallest_task_runs_and_sofo_descends():
    problem = tiny_regression()
    problem, runs = suite.run_task("linreg", quick=True, problem=problem)
    rows, comparisons = suite.summary_rows(problem, runs)

    labels = [row["optimizer"] for row in rows]
    assert labels == [
        "Adam", "SGD+momentum", "SOFO plain K=8", "sofo.sofo K=8", "FGD K=8", "L-BFGS (optax)", "Hessian-free (CG)",
        "Gauss-Newton (exact)",
    ]
    assert all(len(run.losses) == ITERATIONS + 1 for run in runs)

    best = suite.best_runs(runs)
    sofo_run = best["SOFO plain K=8"]
    assert sofo_run.losses[-1] < 0.5 * sofo_run.losses[0]
    # The regression is quadratic: the exact damped Gauss-Newton step (damping 1e-4 of the top eigenvalue,
    # smallest eigenvalue 1e-4) lands within a factor ~1e-4 of the optimum, 0, in one step.
    gauss_newton = best["Gauss-Newton (exact)"]
    assert gauss_newton.losses[1] < 1e-3 * gauss_newton.losses[0]

    assert [c.label for c in comparisons] == ["SOFO plain K=8", "sofo.sofo K=8"]
    assert best["L-BFGS (optax)"].losses[-1] < 0.1 * best["L-BFGS (optax)"].losses[0]
    assert best["Hessian-free (CG)"].losses[-1] < 0.1 * best["Hessian-free (CG)"].losses[0]
    recommended = best["sofo.sofo K=8"]
    assert recommended.losses[-1] < 0.5 * recommended.losses[0]
    assert comparisons[0].adam_iterations <= ITERATIONS
    assert np.all(np.diff(sofo_run.seconds) >= 0)


def test_fgd_uses_the_engines_tangents():
    """Rebuild SOFO's direction from the FGD helper's tangents and a dense damped solve of the engine's
    own sketch: equal only if both drew the same tangents from the key."""
    problem = tiny_regression()
    params = jax.tree_util.tree_map(lambda a: a + 0.3, problem.params)
    k = 6
    key = jax.random.key(3)
    _, direction, info = optimizers.sofo_engine(problem, k)(key, params)
    curvature = np.asarray(info.curvature, np.float64)
    top = np.linalg.eigvalsh(curvature)[-1]
    coefficients = np.linalg.solve(curvature + problem.damping * top * np.eye(k), np.asarray(info.directional_derivatives))

    basis = [optimizers.forward_gradient(key, params, jnp.eye(k)[i], k) for i in range(k)]
    rebuilt = sum(c * ravel_pytree(v)[0] for c, v in zip(coefficients, basis))
    np.testing.assert_allclose(rebuilt, ravel_pytree(direction)[0], rtol=2e-3, atol=1e-6)


def tiny_flipflop_sizes():
    return dict(hidden=8, batch=4, steps=12, iterations=ITERATIONS, tangent_sizes=(6,))


def test_seeds_choose_one_rate_per_task_and_count_blow_ups():
    problems, methods = seeds.run_task_seeds(
        "flipflop", quick=True, seeds=[0, 1], kinds=["adam", "sofo", "sofo_lm"], sizes=tiny_flipflop_sizes()
    )
    assert [p.xs.shape for p in problems] == [(12, 4, 3)] * 2
    assert not np.array_equal(problems[0].xs, problems[1].xs)  # each seed has its own data
    assert set(methods) == {"Adam (BPTT)", "SOFO plain K=6", "sofo.sofo K=6"}
    adam = methods["Adam (BPTT)"]
    assert adam.lr in adam.grid and len(adam.runs) == 2
    for run, problem in zip(adam.runs, problems):
        assert len(run.losses) == ITERATIONS + 1
        np.testing.assert_allclose(run.losses[0], problem.objective(problem.params), rtol=1e-5)
    recommended = methods["sofo.sofo K=6"]
    for run, problem in zip(recommended.runs, problems):
        np.testing.assert_allclose(run.losses[0], problem.objective(problem.params), rtol=1e-5)
        assert run.losses[-1] < run.losses[0]  # sofo.sofo never accepts a step that raises the loss
        assert np.all(np.diff(run.losses[:-1]) <= 1e-5 * run.losses[0])
    rows = seeds.task_rows(methods)
    assert [r["optimizer"] for r in rows] == list(methods)
    assert all(r["blow-ups"].endswith("/2") for r in rows)
    comparisons = seeds.compare_seeds(methods)
    assert [c.label for c in comparisons] == ["SOFO plain K=6", "sofo.sofo K=6"]
    for c in comparisons:
        assert len(c.speedups()) == 2 and all(s >= 0 for s in c.speedups())
    # Adam's target is its mean loss over the last 10% of its run, iteration 0 to 12 (13 values: the last one).
    for target, run in zip(seeds.adam_targets(adam), adam.runs):
        np.testing.assert_allclose(target, np.mean(run.losses[-1:]))


def test_the_rate_chosen_has_the_best_median_score():
    run = lambda final: suite.Run("t", "adam", "x", None, 1.0, np.asarray([9.0] * 9 + [final]), np.arange(10), np.ones(1), 0.0)  # noqa: E731
    per_lr = {0.1: [run(1.0), run(9.0), run(9.0)], 0.01: [run(3.0), run(3.0), run(0.5)], 0.001: [run(2.0), run(8.0), run(2.5)]}
    # medians of the last-10% score: 9.0, 3.0, 2.5
    assert seeds.choose_rate(per_lr, (0.1, 0.01, 0.001)) == 0.001
    per_lr[0.001][0] = run(np.nan)  # a diverged seed scores inf: the median is then 8.0
    assert seeds.choose_rate(per_lr, (0.1, 0.01, 0.001)) == 0.01


def test_blow_up_counts_runs_above_ten_times_their_initial_loss():
    run = lambda losses: suite.Run("t", "sofo", "x", 1, 1.0, np.asarray(losses), np.arange(len(losses)), np.ones(1), 0.0)  # noqa: E731
    method = seeds.MethodRuns("t", "sofo", "x", 1.0, (1.0,), [run([1.0, 0.5]), run([1.0, 11.0, 0.1]), run([1.0, np.nan])])
    assert method.blow_ups() == 2


def test_cli_quick_on_one_task_writes_tables_and_plots(tmp_path, capsys, monkeypatch):
    original = tasks.TASKS["flipflop"]
    monkeypatch.setitem(tasks.TASKS, "flipflop", lambda seed=0, quick=True, **kw: original(seed, quick, **tiny_flipflop_sizes()))
    code = cli.main(
        ["--quick", "--tasks", "flipflop", "--seeds", "2", "--out", str(tmp_path), "--methods", "adam,sofo_lm,hf",
         "--cg-steps", "3"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "Summary: SOFO and its peers against tuned Adam" in out
    assert "sofo.sofo K=6" in out and "blow-ups" in out and "Hessian-free (CG)" in out
    assert "3 CG steps per iteration" in out and "1 f+g, 3 GGN-v, 1 f" in out
    assert "Equal wall-clock" in out and "loss at" in out and "s to Adam's target" in out
    verdicts = [line for line in out.splitlines() if line.startswith("Verdict: per iteration: ")]
    assert len(verdicts) == 1 and "Per second on this machine: " in verdicts[0]
    assert "10x goal" not in out
    for name in ("flipflop.png", "summary.png", "results.md", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    raced = {(r["optimizer"], r["seed"]) for r in results["race"]}
    assert raced == {(label, seed) for label in ("Adam (BPTT)", "sofo.sofo K=6", "Hessian-free (CG)") for seed in (0, 1)}
    for r in results["race"]:  # every racer used its budget (the last chunk may run over it)
        assert r["seconds"][-1] >= r["budget_s"] and len(r["losses"]) == len(r["seconds"])


def test_cli_names_the_extra_when_dependencies_are_missing(monkeypatch, capsys):
    monkeypatch.setattr(cli, "missing_dependencies", lambda: ["tqdm"])
    assert cli.main(["--quick"]) == 2
    assert 'pip install -e ".[bench]"' in capsys.readouterr().err


def test_unknown_task_is_a_usage_error():
    with pytest.raises(SystemExit):
        cli.main(["--tasks", "nope"])


# --- the peers: Hessian-free and L-BFGS ------------------------------------------------------------------


def tiny_rnn_float64():
    """A 3-unit flip-flop RNN over 4 steps, batch 2, in float64 (for exactness against dense derivatives)."""
    problem = tasks.flipflop(seed=0, quick=True, hidden=3, batch=2, steps=4, iterations=2, tangent_sizes=(2,))
    as64 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)  # noqa: E731
    return dataclasses.replace(
        problem, params=as64(problem.params), z0=as64(problem.z0),
        xs=as64(problem.xs) + 0.5, ys=as64(problem.ys) - 0.25,  # nonzero inputs and targets on every step
    )


def test_gauss_newton_vector_product_is_jt_hl_j_v():
    problem = tiny_rnn_float64()
    params = jax.tree_util.tree_map(lambda a: a + 0.1, problem.params)  # nonzero biases: a generic point
    value, grad, ggn, unravel = optimizers.gauss_newton_products(problem, params)

    theta, _ = ravel_pytree(params)
    outputs, unravel_outputs = ravel_pytree(problem.outputs(params))
    jacobian = jax.jacfwd(lambda t: ravel_pytree(problem.outputs(unravel(t)))[0])(theta)
    loss_hessian = jax.hessian(lambda o: problem.output_loss(unravel_outputs(o)))(outputs)
    dense = jacobian.T @ loss_hessian @ jacobian
    v = jax.random.normal(jax.random.key(0), theta.shape, jnp.float64)
    np.testing.assert_allclose(ggn(v), dense @ v, rtol=1e-10, atol=1e-12)
    want_value, want_grad = jax.value_and_grad(lambda t: problem.objective(unravel(t)))(theta)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-12)


def test_conjugate_gradient_solves_the_damped_system():
    n = 12
    factor = jax.random.normal(jax.random.key(1), (n, 5), jnp.float64)
    curvature = factor @ factor.T  # rank 5: singular without the damping, like a Gauss-Newton matrix
    damping = 0.3
    b = jax.random.normal(jax.random.key(2), (n,), jnp.float64)
    x0 = jax.random.normal(jax.random.key(3), (n,), jnp.float64)
    matvec = lambda v: curvature @ v + damping * v  # noqa: E731
    want = jnp.linalg.solve(curvature + damping * jnp.eye(n), b)
    solve = jax.jit(optimizers.conjugate_gradient, static_argnums=(0, 3))
    for start in (jnp.zeros(n), x0):
        x, residual = solve(matvec, b, start, n)
        np.testing.assert_allclose(x, want, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(residual, b - matvec(x), atol=1e-9)
    # Fewer steps than n: not solved, but the error in the system's norm goes down step by step.
    errors = []
    for steps in (1, 2, 3):
        x, _ = solve(matvec, b, jnp.zeros(n), steps)
        errors.append(float((x - want) @ (curvature + damping * jnp.eye(n)) @ (x - want)))
    assert errors[0] > errors[1] > errors[2] > 0


def _run(optimizer, problem, iterations):
    step = jax.jit(optimizer.step)
    state, losses = optimizer.init(problem.params), []
    for _ in range(iterations):
        state, loss = step(state, jnp.float32(1.0))
        losses.append(float(loss))
    losses.append(float(problem.objective(state[0])))
    return state, np.asarray(losses)


def test_hessian_free_solves_a_quadratic_and_never_raises_the_loss():
    problem = tiny_regression(inputs=4, outputs=2)  # 8 parameters, Hessian eigenvalues 1 ... 1e-4, minimum 0
    _, losses = _run(optimizers.make_hessian_free(problem, cg_steps=8), problem, 25)
    assert np.all(np.diff(losses) <= 0)  # a step that would raise the loss is rejected
    assert losses[-1] < 1e-5 * losses[0]


def test_lbfgs_reaches_the_minimum_of_a_quadratic_and_counts_its_evaluations():
    calls = []
    problem = tiny_regression(inputs=4, outputs=2)
    counted = dataclasses.replace(
        problem, fun=lambda p: (jax.debug.callback(lambda: calls.append(1)), problem.fun(p))[1]
    )
    optimizer = optimizers.make_lbfgs(counted)
    state, losses = _run(optimizer, counted, 30)
    assert losses[-1] < 1e-6 * losses[0]
    calls_during_steps = len(calls) - 1  # the last call is the final objective in _run
    assert int(optimizer.evaluations(state)) == calls_during_steps >= 30


def test_race_reads_the_loss_at_a_budget_and_the_time_to_a_target():
    from benchmarks import race

    run = race.RaceRun("x", "adam", 0, np.asarray([4.0, 3.0, 2.0, np.nan]), np.asarray([0.0, 0.1, 0.2, 0.3]))
    assert run.steps == 3
    assert run.loss_at(0.05) == 4.0 and run.loss_at(0.1) == 3.0 and run.loss_at(0.25) == 2.0
    assert run.loss_at(1.0) == np.inf  # diverged by then
    assert run.seconds_to(2.5) == 0.2 and run.seconds_to(1.0) is None


def test_fewer_iterations_uses_adams_tail_mean_not_its_last_value():
    def run(kind, losses):
        losses = np.asarray(losses, float)
        return suite.Run("t", kind, kind, None, 1.0, losses, np.arange(len(losses)) * 0.1, np.ones(1), 0.0)

    # Adam's last 10% (2 of 20 values) averages 2.0, though its very last value is a lucky 1.0.
    adam = seeds.MethodRuns("t", "adam", "adam", 1.0, (1.0,), [run("adam", [9.0] * 18 + [3.0, 1.0])])
    other = seeds.MethodRuns("t", "sofo_lm", "sofo", 1.0, (1.0,), [run("sofo_lm", [9.0] * 4 + [2.0] * 16)])
    (comparison,) = seeds.compare_seeds({"adam": adam, "sofo": other})
    assert seeds.adam_targets(adam) == [2.0]
    assert comparison.adam_iterations == [19] and comparison.sofo_iterations == [4]
    assert comparison.speedup_spread() == "4.8x [4.8, 4.8]"


def test_race_runs_everyone_until_adam_reaches_its_target_when_that_takes_longer_than_the_budget():
    """Fake compiled chunks (each sleeps 20 ms for 2 steps): Adam reaches its target, 1.0, at step 8,
    about 80 ms in, after the 20 ms budget; the other method must run at least that long too."""
    import time as clock

    from benchmarks import race

    problem = tasks.flipflop(seed=0, quick=True, **dict(tiny_flipflop_sizes(), iterations=8))
    adam_run = suite.Run("flipflop", "adam", "Adam (BPTT)", None, 0.01, np.asarray([5.0] * 8 + [1.0]), np.arange(9.0), np.ones(1), 0.0)
    other_run = dataclasses.replace(adam_run, kind="sofo_lm", label="sofo.sofo K=6")
    methods = {
        "Adam (BPTT)": seeds.MethodRuns("flipflop", "adam", "Adam (BPTT)", 0.01, (0.01,), [adam_run]),
        "sofo.sofo K=6": seeds.MethodRuns("flipflop", "sofo_lm", "sofo.sofo K=6", 1.0, (1.0,), [other_run]),
    }

    def fake(losses_of_step):
        count = [0]

        def step(state, lr, data):
            clock.sleep(0.02)
            losses = np.asarray([losses_of_step(count[0]), losses_of_step(count[0] + 1)])
            count[0] += 2
            return state, losses

        return seeds.Compiled(2, {"shared": (step, lambda params, data: 9.0)})  # the loss after the last chunk

    cache = {"Adam (BPTT)": fake(lambda k: 5.0 - 0.5 * k), "sofo.sofo K=6": fake(lambda k: 3.0)}
    raced = race.race_seeds([problem], [0], methods, cache, budget=0.02, iterations=8)
    (adam,), (other,) = raced["Adam (BPTT)"], raced["sofo.sofo K=6"]
    adam_time = adam.seconds_to(1.0)
    assert adam_time is not None and adam_time > 0.05 and adam.steps_by(adam_time) == 8
    assert other.seconds[-1] >= adam_time and other.seconds_to(1.0) is None
    (clock_row,) = race.wall_clock(raced, methods)
    assert clock_row.ratios() == [np.inf] and not clock_row.met
