"""The demo's steps as functions: the quantile-selection problem end to end."""

import importlib.util
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sortgrad import demo

HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def problem():
    return demo.make_problem()  # the default: N=10, M=20, k=3, default_rng(0), float64


def test_default_problem_is_the_documented_one(problem):
    rng = np.random.default_rng(0)
    a, b, theta = rng.standard_normal(10), rng.standard_normal((10, 20)), rng.standard_normal(20)
    np.testing.assert_array_equal(problem.a, a)
    np.testing.assert_array_equal(problem.b, b)
    np.testing.assert_array_equal(problem.theta, theta)
    assert problem.k == 3 and problem.a.dtype == jnp.float64


def test_hard_objective_against_numpy(problem):
    a, b, theta = (np.asarray(v) for v in problem[:3])
    k = problem.k
    order = np.argsort(-(b @ theta), kind="stable")
    want = a[order[:k]].mean() - a[order[-k:]].mean()
    np.testing.assert_allclose(float(demo.hard_objective(theta, a, b, k)), want, rtol=1e-12)
    assert demo.best_objective(a, k) == pytest.approx(np.sort(a)[-3:].mean()
                                                      - np.sort(a)[:3].mean())


def test_hard_selection_gradient_is_zero(problem):
    grad = jax.grad(demo.hard_objective)(problem.theta, problem.a, problem.b, problem.k)
    assert np.all(np.asarray(grad) == 0)


def test_soft_mask_gradient_matches_central_differences(problem):
    check = demo.check_gradient(problem, demo.Settings(method="mask"))
    assert np.abs(check.gradient).max() > 1e-2  # not the zero of the hard selection
    np.testing.assert_allclose(check.gradient, check.finite_differences, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("strength", [0.5, 2.0])
def test_soft_mask_objective_tends_to_hard_as_strength_shrinks(problem, strength):
    a, b, theta, k = problem
    hard = float(demo.hard_objective(theta, a, b, k))
    close = float(demo.soft_objective(theta, a, b, k, demo.Settings(strength=1e-4)))
    assert close == pytest.approx(hard, abs=1e-9)
    far = float(demo.soft_objective(theta, a, b, k, demo.Settings(strength=strength)))
    assert abs(far - hard) > 1e-6  # the soft objective is a different function


def test_optimisation_reaches_95_percent_of_best(problem):
    best = demo.best_objective(problem.a, problem.k)
    history = demo.optimise(problem, steps=200)
    assert history.hard[0] < 0.5 * best
    assert history.hard[-1] >= 0.95 * best
    assert len(history.soft) == len(history.hard) == 201


def test_optimisation_reports_progress(problem):
    seen = []
    demo.optimise(problem, steps=5, progress=lambda *args: seen.append(args))
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5] and all(s[1] == 5 for s in seen)


def test_perturbed_gradient_matches_finite_differences_to_sampling_error(problem):
    check = demo.check_gradient(problem, demo.Settings(method="perturbed"))
    assert np.abs(check.gradient).max() > 1e-2
    assert check.relative_error < 0.25, check


def test_perturbed_optimisation_improves(problem):
    best = demo.best_objective(problem.a, problem.k)
    history = demo.optimise(problem, demo.Settings(method="perturbed", num_samples=128),
                            steps=150)
    assert history.hard[-1] >= 0.9 * best


def test_quantile_flag_selects_quartiles():
    args = demo.parse_args(["--n", "12", "--quantile", "0.25"])
    assert args.k == 3
    args = demo.parse_args(["--n", "10", "--quantile", "0.25"])
    assert args.k == 3
    with pytest.raises(SystemExit):
        demo.parse_args(["--quantile", "0.75"])


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="k must be in"):
        demo.make_problem(n=10, k=6)


def test_main_prints_the_four_parts(capsys, tmp_path):
    plot = tmp_path / "objective.png"
    argv = ["--steps", "60", "--quiet"] + (["--plot", str(plot)] if HAVE_MATPLOTLIB else [])
    history = demo.main(argv)
    out = capsys.readouterr().out
    assert "through jax.lax.top_k   max |grad| = 0 " in out
    assert "through sortgrad.top_k  max |grad| = 0 " in out
    assert "central differences" in out and "best achievable" in out
    assert history.hard[-1] > history.hard[0]
    if HAVE_MATPLOTLIB:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_runs_as_a_script(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sortgrad.demo", "--n", "8", "--m", "6",
                             "--k", "2", "--steps", "20", "--float32", "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "float32" in result.stdout and "% of best" in result.stdout
