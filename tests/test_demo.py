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


def test_perturbed_check_at_n_1000_is_fixed_work_and_explains_its_noise():
    # The old check drew 20000 samples x (1 + 2 M) evaluations (6 minutes at N = 1000); the
    # new one draws a fixed 9 x 5000 + 10000, whatever --samples (about 10-25 s here).
    problem = demo.make_problem(n=1000, m=20, k=3)
    check = demo.check_gradient(problem, demo.Settings(method="perturbed", num_samples=256))
    assert (check.keys, check.samples_per_key, check.fd_samples) == (8, 5000, 10000)
    assert check.samples == 55000
    assert np.abs(check.estimate).max() > 0.1  # a real signal, not two noises near zero
    assert check.passed, check.lines()
    assert np.all(check.estimate_se > 0) and np.all(check.fd_se > 0)
    text = "\n".join(check.lines())
    assert "standard errors" in text and "Monte-Carlo noise" in text and "+-" in text


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
    assert ": passed" in out and "(exact: B has rank N" in out
    assert history.hard[-1] > history.hard[0]
    if HAVE_MATPLOTLIB:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_runs_as_a_script(tmp_path):
    # float32, and M < N: the gradient check passes with the float32 step, the best is exact
    result = subprocess.run([sys.executable, "-m", "sortgrad.demo", "--n", "8", "--m", "6",
                             "--k", "2", "--steps", "5", "--float32", "--quiet"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "float32" in result.stdout and "% of best" in result.stdout
    assert "<= 7.3e-04: passed" in result.stdout and "exhaustive search" in result.stdout


def test_float32_gradient_check_passes_with_a_dtype_aware_step():
    problem = demo.make_problem(dtype=np.float32)
    check = demo.check_gradient(problem)
    eps = np.finfo(np.float32).eps
    assert check.step == pytest.approx(eps ** (1 / 3) * max(1.0, np.abs(problem.theta).max()))
    assert check.tolerance == pytest.approx(30 * eps ** (2 / 3))
    assert check.passed and check.relative_error < check.tolerance, check.lines()
    # the old step, 1e-6, is all float32 rounding: the same tolerance fails it
    assert not demo.check_gradient(problem, step=1e-6).passed
    assert "float32" in check.lines()[1] and "eps^(2/3)" in check.lines()[1]


def _best_by_angle_sweep(a, b, k):
    """Brute-force optimum over theta in R^2: the score order only changes where two scores
    cross, so evaluating between consecutive crossing angles visits every reachable order."""
    n = len(a)
    crossings = []
    for i in range(n):
        for j in range(i + 1, n):
            d = b[i] - b[j]
            phi = np.arctan2(d[1], d[0]) + np.pi / 2
            crossings += [phi % (2 * np.pi), (phi + np.pi) % (2 * np.pi)]
    crossings = np.sort(crossings)
    mids = (crossings + np.append(crossings[1:], crossings[0] + 2 * np.pi)) / 2
    best = -np.inf
    for phi in mids:
        order = np.argsort(-(b @ np.array([np.cos(phi), np.sin(phi)])))
        best = max(best, a[order[:k]].mean() - a[order[-k:]].mean())
    return best


@pytest.mark.parametrize("n, k, seed", [(8, 2, 0), (10, 3, 2)])
def test_best_achievable_is_the_brute_force_optimum_when_m_is_less_than_n(n, k, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(n), rng.standard_normal((n, 2))
    best = demo.best_achievable(a, b, k)
    want = _best_by_angle_sweep(a, b, k)
    assert best.exact and best.value == pytest.approx(want, rel=1e-12)
    assert best.value < demo.best_objective(a, k) - 0.1  # the old "best" was not reachable
    assert "exhaustive" in best.how


def test_best_achievable_is_exact_at_full_rank_and_a_labelled_bound_otherwise(problem):
    best = demo.best_achievable(problem.a, problem.b, problem.k)  # N = 10 <= M = 20
    assert best.exact and best.value == demo.best_objective(problem.a, problem.k)
    big = demo.make_problem(n=1000, m=20, k=3)
    bound = demo.best_achievable(big.a, big.b, big.k)
    assert not bound.exact and bound.value == demo.best_objective(big.a, big.k)
    assert bound.how.startswith("upper bound")


@pytest.mark.parametrize("argv", [
    ["--k", "6"], ["--k", "0"], ["--strength", "0"], ["--strength", "nan"], ["--sigma", "-1"],
    ["--n", "1", "--quantile", "0.5"], ["--n", "1"], ["--m", "0"], ["--samples", "1"],
    ["--steps", "0"], ["--lr", "0"], ["--n", "ten"], ["--quantile", "0.75"],
])
def test_bad_flags_exit_2_with_one_line_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(argv)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""  # no work started
    assert err.count("\n") == 1 and err.startswith("python -m sortgrad.demo: error: "), err


def test_plot_path_is_checked_before_the_run(tmp_path, capsys):
    for path in (tmp_path / "missing" / "demo.png", tmp_path):
        with pytest.raises(SystemExit) as exit_:
            demo.main(["--plot", str(path)])
        assert exit_.value.code == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and "--plot" in err, err


def test_bad_flag_exits_2_from_the_command_line():
    result = subprocess.run([sys.executable, "-m", "sortgrad.demo", "--k", "6"],
                            capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("python -m sortgrad.demo: error: --k must be in [1, N // 2] = "
                             "[1, 5] so the top and bottom sets are disjoint, got 6 "
                             "(see --help)\n")
