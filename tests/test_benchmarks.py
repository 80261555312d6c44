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
from benchmarks import cli, optimizers, suite, tasks  # noqa: E402

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
    assert labels == ["Adam", "SGD+momentum", "SOFO K=8", "FGD K=8", "Gauss-Newton (exact)"]
    assert all(len(run.losses) == ITERATIONS + 1 for run in runs)
    assert {len(problem.learning_rates[run.kind]) for run in runs} >= {1}

    best = suite.best_runs(runs)
    sofo_run = best["SOFO K=8"]
    assert sofo_run.losses[-1] < 0.5 * sofo_run.losses[0]
    # The regression is quadratic: the exact damped Gauss-Newton step (damping 1e-4 of the top eigenvalue,
    # smallest eigenvalue 1e-4) lands within a factor ~1e-4 of the optimum, 0, in one step.
    gauss_newton = best["Gauss-Newton (exact)"]
    assert gauss_newton.losses[1] < 1e-3 * gauss_newton.losses[0]

    assert [c.label for c in comparisons] == ["SOFO K=8"]
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


def test_cli_quick_on_one_task_writes_tables_and_plots(tmp_path, capsys):
    code = cli.main(["--quick", "--tasks", "linreg", "--iterations", "4", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "Summary: SOFO against Adam's best loss" in out
    assert "| linreg" in out
    for name in ("linreg.png", "summary.png", "results.md", "results.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_cli_names_the_extra_when_dependencies_are_missing(monkeypatch, capsys):
    monkeypatch.setattr(cli, "missing_dependencies", lambda: ["tqdm"])
    assert cli.main(["--quick"]) == 2
    assert 'pip install -e ".[bench]"' in capsys.readouterr().err


def test_unknown_task_is_a_usage_error():
    with pytest.raises(SystemExit):
        cli.main(["--tasks", "nope"])
