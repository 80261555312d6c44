"""Smoke tests of the benchmark suite (`python -m benchmarks`) on its smallest task, a few iterations.

The suite's numbers are checked where they can be: the FGD baseline must see the engine's own tangents
(the SOFO direction is rebuilt from them and a dense solve), and the exact Gauss-Newton step must solve
the linear regression in one step.
"""

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
    assert labels == ["Adam", "SGD+momentum", "SOFO plain K=8", "sofo.sofo K=8", "FGD K=8", "Gauss-Newton (exact)"]
    assert all(len(run.losses) == ITERATIONS + 1 for run in runs)
    assert {len(problem.learning_rates[run.kind]) for run in runs} >= {1}

    best = suite.best_runs(runs)
    sofo_run = best["SOFO plain K=8"]
    assert sofo_run.losses[-1] < 0.5 * sofo_run.losses[0]
    # The regression is quadratic: the exact damped Gauss-Newton step (damping 1e-4 of the top eigenvalue,
    # smallest eigenvalue 1e-4) lands within a factor ~1e-4 of the optimum, 0, in one step.
    gauss_newton = best["Gauss-Newton (exact)"]
    assert gauss_newton.losses[1] < 1e-3 * gauss_newton.losses[0]

    assert [c.label for c in comparisons] == ["SOFO plain K=8", "sofo.sofo K=8"]
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
    code = cli.main(["--quick", "--tasks", "flipflop", "--seeds", "2", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "Summary: SOFO against tuned Adam" in out
    assert "sofo.sofo K=6" in out and "blow-ups" in out
    assert "10x goal" not in out
    for name in ("flipflop.png", "summary.png", "results.md", "results.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_cli_names_the_extra_when_dependencies_are_missing(monkeypatch, capsys):
    monkeypatch.setattr(cli, "missing_dependencies", lambda: ["tqdm"])
    assert cli.main(["--quick"]) == 2
    assert 'pip install -e ".[bench]"' in capsys.readouterr().err


def test_unknown_task_is_a_usage_error():
    with pytest.raises(SystemExit):
        cli.main(["--tasks", "nope"])
