"""The quantile-selection problem, end to end: python -m sortgrad.demo [--help].

Given A (N,), B (N, M) and theta (M,), let C = B @ theta, A_high = A at the k largest entries
of C and A_low = A at the k smallest. We want theta maximising
    f(theta) = mean(A_high) - mean(A_low).
The hard selection is piecewise constant in theta, so its gradient is zero; the demo
  (a) shows that zero gradient,
  (b) computes sortgrad's gradient of a soft version of f (soft top-k masks of the
      standardised scores, or perturbed top-k selections) and checks it: the mask gradient
      against central differences with a step and tolerance fit for the dtype, the perturbed
      (Monte-Carlo) gradient against finite differences of the smoothed objective, with the
      Monte-Carlo standard errors of both,
  (c) maximises the soft f by gradient ascent (Adam) and reports the hard f before and after
      against the best achievable value, the maximum of the hard f over theta (exact when B
      has rank N, or by an exhaustive search over the selections some theta makes when that is
      small; otherwise an upper bound, labelled as one: see `best_achievable`),
  (d) with --plot PATH, writes a PNG of the soft and hard objective over the steps.
Flags are checked before any work (bad ones exit with status 2 and a one-line message).
Each step is a function below, tested in tests/test_demo.py.
"""

from __future__ import annotations

import argparse
import heapq
import importlib.util
import itertools
import math
import os
import sys
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import sortgrad
from sortgrad.selection import quantile_count, soft_selected_mean, standardize


class Problem(NamedTuple):
    a: jax.Array      # (N,) values to select
    b: jax.Array      # (N, M) features
    theta: jax.Array  # (M,) initial parameters
    k: int            # size of the top and of the bottom set


class Settings(NamedTuple):
    method: str = "mask"           # "mask" (soft top-k masks) or "perturbed"
    strength: float = 2.0          # mask: regularization strength on standardised scores
    sigma: float = 0.5             # perturbed: noise scale on standardised scores
    num_samples: int = 256         # perturbed: Monte-Carlo samples per evaluation


def make_problem(n: int = 10, m: int = 20, k: int = 3, seed: int = 0,
                 dtype=np.float64) -> Problem:
    """A, B and theta drawn from numpy.random.default_rng(seed), standard normal."""
    if not 1 <= k <= n // 2:
        raise ValueError(f"k must be in [1, N // 2] so the top and bottom sets are disjoint; "
                         f"got k = {k}, N = {n}")
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n).astype(dtype)
    b = rng.standard_normal((n, m)).astype(dtype)
    theta = rng.standard_normal(m).astype(dtype)
    return Problem(jnp.asarray(a), jnp.asarray(b), jnp.asarray(theta), k)


def hard_objective(theta, a, b, k: int):
    """mean(A_high) - mean(A_low) with hard top-k selections of C = B @ theta."""
    scores = b @ theta
    _, high = sortgrad.top_k(scores, k)
    _, low = sortgrad.top_k(-scores, k)
    return a[high].mean() - a[low].mean()


def best_objective(a, k: int) -> float:
    """An upper bound on the hard objective: mean of the k largest A minus the k smallest.

    It ignores whether any theta selects those sets; it is the maximum over theta when B has
    rank N (then every score vector C = B @ theta is reachable), not in general (M < N).
    """
    ordered = np.sort(np.asarray(a, dtype=np.float64))
    return float(ordered[-k:].mean() - ordered[:k].mean())


class Best(NamedTuple):
    value: float  # the maximum of the hard objective over theta, or an upper bound on it
    exact: bool   # True: the maximum; False: an upper bound only
    how: str      # how it was found, one line


def _reachable(b: np.ndarray, groups) -> bool:
    """Is there one theta whose scores C = B @ theta put each given set strictly above the rest?

    `groups` is a list of (indices, sign): the entries `indices` of sign * C must all exceed
    every other entry (sign -1: they are the smallest of C). Each group has its own threshold
    s, with sign * b_i . theta >= s + 1 on the set and <= s off it (a margin of 1 is no loss:
    the strict inequalities are homogeneous). One linear-programming feasibility problem.
    """
    from scipy.optimize import linprog

    n, m = b.shape
    rows, rhs = [], []
    for g, (indices, sign) in enumerate(groups):
        inside = np.zeros(n, bool)
        inside[list(indices)] = True
        block = np.zeros((n, m + len(groups)))
        block[:, :m] = np.where(inside[:, None], -sign * b, sign * b)
        block[:, m + g] = np.where(inside, 1.0, -1.0)
        rows.append(block)
        rhs.append(np.where(inside, -1.0, 0.0))
    result = linprog(np.zeros(m + len(groups)), A_ub=np.concatenate(rows),
                     b_ub=np.concatenate(rhs), bounds=(None, None), method="highs")
    return result.status == 0


def best_achievable(a, b, k: int, *, max_sets: int = 1500, max_pairs: int = 20000) -> Best:
    """The best achievable hard objective: max over theta of mean(A_high) - mean(A_low).

    Exact in two cases; otherwise the upper bound `best_objective`, labelled as one:
      - B has rank N: every score vector is reachable, so the best k-subsets of A are.
      - C(N, k) <= max_sets and scipy is installed: exhaustive search. A set is a reachable
        top-k set when a linear program finds a theta scoring it strictly above the rest (the
        reachable bottom-k sets are the same family, by theta -> -theta); pairs (top, bottom)
        of reachable sets are then tried in decreasing order of their objective, and the
        first pair one theta makes at once is the maximum (at most max_pairs tries).
    Selections that need tied scores are left out (ties happen on a set of theta of measure 0).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = a.shape[0]
    bound = best_objective(a, k)
    if np.linalg.matrix_rank(b) == n:
        return Best(bound, True, "exact: B has rank N, so every order of the scores is reachable")
    fallback = (f"upper bound: the best k-subsets of A, ignoring whether any theta selects them "
                f"(rank B = {np.linalg.matrix_rank(b)} < N; no exhaustive search")
    if math.comb(n, k) > max_sets:
        return Best(bound, False, fallback + f": C(N, k) = {math.comb(n, k)} > {max_sets})")
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        return Best(bound, False, fallback + ": it needs scipy)")
    reachable = [s for s in itertools.combinations(range(n), k) if _reachable(b, [(s, 1)])]
    high = sorted(reachable, key=lambda s: -a[list(s)].mean())  # best top sets first
    low = sorted(reachable, key=lambda s: a[list(s)].mean())    # best bottom sets first

    def value(i, j):
        return a[list(high[i])].mean() - a[list(low[j])].mean()

    heap, seen, tries = [(-value(0, 0), 0, 0)], {(0, 0)}, 0
    while heap and tries < max_pairs:
        _, i, j = heapq.heappop(heap)
        if not set(high[i]) & set(low[j]):
            tries += 1
            if _reachable(b, [(high[i], 1), (low[j], -1)]):
                return Best(float(value(i, j)), True,
                            f"exact: exhaustive search over the {len(reachable)} top-k sets "
                            f"some theta selects ({tries} pairs tried)")
        for ni, nj in ((i + 1, j), (i, j + 1)):
            if ni < len(high) and nj < len(low) and (ni, nj) not in seen:
                seen.add((ni, nj))
                heapq.heappush(heap, (-value(ni, nj), ni, nj))
    return Best(bound, False, fallback + f": more than {max_pairs} pairs to try)")


def soft_objective(theta, a, b, k: int, settings: Settings = Settings(), key=None):
    """A differentiable stand-in for `hard_objective`.

    "mask": soft means of A under soft top-k / bottom-k masks of the standardised scores.
    "perturbed": mean of P_high @ A minus mean of P_low @ A, with P the perturbed top-k
    selection matrices of the standardised scores and of their negation (needs `key`).
    """
    scores = b @ theta
    if settings.method == "mask":
        high = soft_selected_mean(a, scores, k, regularization_strength=settings.strength)
        low = soft_selected_mean(a, scores, k, largest=False,
                                 regularization_strength=settings.strength)
        return high - low
    if settings.method == "perturbed":
        z = standardize(scores)
        key_high, key_low = jax.random.split(key)
        p_high = sortgrad.perturbed_top_k(key_high, z, k, num_samples=settings.num_samples,
                                          sigma=settings.sigma)
        p_low = sortgrad.perturbed_top_k(key_low, -z, k, num_samples=settings.num_samples,
                                         sigma=settings.sigma)
        return (p_high @ a).mean() - (p_low @ a).mean()
    raise ValueError(f"method must be 'mask' or 'perturbed', got {settings.method!r}")


def central_differences(f, theta, step: float = 1e-6) -> np.ndarray:
    """Central differences of a scalar function of a 1-D array, in float64."""
    theta = np.asarray(theta, dtype=np.float64)
    basis = np.eye(theta.shape[0])
    return np.array([(f(theta + step * e) - f(theta - step * e)) / (2 * step) for e in basis])


def fd_step(theta) -> float:
    """A central-difference step fit for theta's dtype: eps ** (1/3) * max(1, max |theta|).

    The error of a central difference is about h^2 |f'''| / 6 (truncation) plus eps |f| / h
    (rounding of f in its dtype), smallest near h = eps ** (1/3) on the scale of theta:
    6e-6 for float64, 5e-3 for float32 (a step of 1e-6 in float32 is mostly rounding).
    """
    eps = float(np.finfo(np.asarray(theta).dtype).eps)
    return eps ** (1 / 3) * max(1.0, float(np.abs(np.asarray(theta, np.float64)).max()))


def fd_tolerance(dtype) -> float:
    """Relative tolerance of the mask check, 30 eps ** (2/3): the error of a central
    difference at step eps ** (1/3) is of order eps ** (2/3) (1e-9 float64, 7e-4 float32)."""
    return 30 * float(np.finfo(dtype).eps) ** (2 / 3)


class GradientCheck(NamedTuple):
    """The mask gradient against central differences of the soft objective."""
    gradient: np.ndarray
    finite_differences: np.ndarray
    max_abs_error: float
    relative_error: float  # max |gradient - fd| / max |fd|
    step: float            # the central-difference step, `fd_step`
    tolerance: float       # the relative error allowed, `fd_tolerance`
    dtype: str

    @property
    def passed(self) -> bool:
        return self.relative_error <= self.tolerance

    def lines(self) -> list[str]:
        verdict = "passed" if self.passed else "FAILED"
        return [(f"max |grad| = {np.abs(self.gradient).max():.4g}, max |grad - fd| = "
                 f"{self.max_abs_error:.2e}, relative {self.relative_error:.2e} <= "
                 f"{self.tolerance:.1e}: {verdict}"),
                (f"(tolerance 30 eps^(2/3) for {self.dtype}: central differences, step "
                 f"eps^(1/3) max(1, |theta|) = {self.step:.1e}, err ~ eps^(2/3))")]


class MonteCarloCheck(NamedTuple):
    """The perturbed gradient estimator against finite differences of the smoothed objective,
    along a few unit directions u of theta, each side with its Monte-Carlo standard error."""
    directions: np.ndarray   # (D, M) unit vectors
    gradient: np.ndarray     # (M,) sortgrad's estimate, averaged over `keys` keys
    estimate: np.ndarray     # (D,) u . gradient
    estimate_se: np.ndarray  # (D,) its standard error, from the spread over the keys
    finite_differences: np.ndarray  # (D,) central differences of the smoothed objective
    fd_se: np.ndarray        # (D,) their standard error, from the spread over the draws
    keys: int                # independent gradient estimates
    samples_per_key: int     # Monte-Carlo samples in each
    fd_samples: int          # common random draws of the finite differences
    step: float
    threshold: float = 4.0   # |z| allowed

    @property
    def z(self) -> np.ndarray:
        """(estimate - fd) in units of their combined standard error."""
        return (self.estimate - self.finite_differences) / np.hypot(self.estimate_se, self.fd_se)

    @property
    def passed(self) -> bool:
        return bool(np.abs(self.z).max() <= self.threshold)

    @property
    def samples(self) -> int:
        """Every Monte-Carlo draw the check made (the pilot gradient's included)."""
        return (self.keys + 1) * self.samples_per_key + self.fd_samples

    @property
    def relative_error(self) -> float:
        return float(np.abs(self.estimate - self.finite_differences).max()
                     / max(float(np.abs(self.finite_differences).max()), 1e-300))

    def lines(self) -> list[str]:
        worst = int(np.argmax(np.abs(self.z)))
        verdict = "passed" if self.passed else "FAILED"
        return [(f"u.grad vs central differences of the smoothed objective along "
                 f"{len(self.directions)} directions u: max |difference| = "
                 f"{np.abs(self.estimate - self.finite_differences).max():.2e}, "
                 f"{np.abs(self.z).max():.1f} standard errors (<= {self.threshold:g}): "
                 f"{verdict}"),
                (f"(Monte-Carlo noise, shrinking as 1/sqrt(samples): u.grad = "
                 f"{self.estimate[worst]:+.4f} +- {self.estimate_se[worst]:.4f} "
                 f"({self.keys} keys x {self.samples_per_key} samples), differences "
                 f"{self.finite_differences[worst]:+.4f} +- {self.fd_se[worst]:.4f} "
                 f"({self.fd_samples} common draws, step {self.step:g}))")]


def check_gradient(problem: Problem, settings: Settings = Settings(), key=None,
                   step: float | None = None):
    """Checks sortgrad's gradient of the soft objective at the initial theta.

    "mask": a `GradientCheck` against central differences with a step and a tolerance fit
    for the dtype (`fd_step`, `fd_tolerance`). "perturbed": a `MonteCarloCheck`, see
    `check_perturbed_gradient` (`key` seeds it, `step` is its finite-difference step).
    """
    a, b, theta, k = problem
    if settings.method == "perturbed":
        seed = 0 if key is None else int(jax.random.randint(key, (), 0, 2 ** 30))
        return check_perturbed_gradient(problem, settings, seed=seed,
                                        step=0.05 if step is None else step)
    step = fd_step(theta) if step is None else step
    objective = jax.jit(lambda t: soft_objective(t, a, b, k, settings, key))
    gradient = np.asarray(jax.jit(jax.grad(
        lambda t: soft_objective(t, a, b, k, settings, key)))(theta))
    fd = central_differences(lambda t: float(objective(jnp.asarray(t, theta.dtype))),
                             theta, step)
    error = float(np.abs(gradient - fd).max())
    return GradientCheck(gradient, fd, error, error / max(float(np.abs(fd).max()), 1e-300),
                         step, fd_tolerance(theta.dtype), np.dtype(theta.dtype).name)


def check_perturbed_gradient(problem: Problem, settings: Settings | None = None, *,
                             keys: int = 8, samples_per_key: int = 5000,
                             fd_samples: int = 10000, directions: int = 3, step: float = 0.05,
                             seed: int = 0) -> MonteCarloCheck:
    """The perturbed gradient estimator, checked for what it is: an unbiased Monte-Carlo
    estimate of the gradient of the smoothed objective
        F(theta) = E_Z[f_hard(z(theta) + sigma Z)],  z = standardize(B @ theta).
    Its projection on each of `directions` unit vectors u (the first along a pilot estimate
    of the gradient, the others random) is averaged over `keys` independent keys of
    `samples_per_key` samples, with a standard error from their spread. It is compared with
    central differences (F(theta + step u) - F(theta - step u)) / (2 step), estimated apart
    from sortgrad's estimator: hard top-k per draw on `fd_samples` Gaussian draws common to
    both sides (common random numbers), with the standard error of the per-draw differences.
    It passes when every difference is within 4 combined standard errors (the step's own bias,
    of order step^2, is far below them). The cost is fixed, whatever settings.num_samples:
    (keys + 1) * samples_per_key draws for the gradients and fd_samples for the differences.
    """
    a, b, theta, k = problem
    settings = (settings or Settings())._replace(method="perturbed", num_samples=samples_per_key)
    grad = jax.jit(jax.grad(lambda t, key: soft_objective(t, a, b, k, settings, key)))
    pilot_key, gradient_key, fd_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    gradients = np.stack([np.asarray(grad(theta, kk), np.float64)
                          for kk in jax.random.split(gradient_key, keys)])
    pilot = np.asarray(grad(theta, pilot_key), np.float64)
    rng = np.random.default_rng(seed)
    units = np.concatenate([pilot[None] / np.linalg.norm(pilot),
                            rng.standard_normal((directions - 1, theta.shape[0]))])
    units /= np.linalg.norm(units, axis=1, keepdims=True)
    projections = gradients @ units.T  # (keys, D)

    @jax.jit
    def hard_per_draw(t, draws):  # f_hard(z(t) + sigma z_s) for every draw s
        w = standardize(b @ t) + settings.sigma * draws
        _, high = sortgrad.top_k(w, k)
        _, low = sortgrad.top_k(-w, k)
        return a[high].mean(-1) - a[low].mean(-1)

    draws = jax.random.normal(fd_key, (fd_samples, a.shape[0]), theta.dtype)
    per_draw = []
    for u in units:
        u = jnp.asarray(u, theta.dtype)
        plus = np.asarray(hard_per_draw(theta + step * u, draws), np.float64)
        minus = np.asarray(hard_per_draw(theta - step * u, draws), np.float64)
        per_draw.append((plus - minus) / (2 * step))
    per_draw = np.stack(per_draw)  # (D, fd_samples)
    return MonteCarloCheck(
        units, gradients.mean(0), projections.mean(0),
        projections.std(0, ddof=1) / math.sqrt(keys), per_draw.mean(1),
        per_draw.std(1, ddof=1) / math.sqrt(fd_samples), keys, samples_per_key, fd_samples,
        step)


class History(NamedTuple):
    theta: jax.Array
    soft: np.ndarray  # soft objective before each step and after the last
    hard: np.ndarray  # hard objective, likewise


def optimise(problem: Problem, settings: Settings = Settings(), *, steps: int = 200,
             learning_rate: float = 0.1, seed: int = 0, progress=None) -> History:
    """Gradient ascent (Adam) on the soft objective; records soft and hard objectives.

    `progress(step, steps, soft, hard)` is called after every step when given.
    """
    a, b, theta, k = problem
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8

    def value_and_grad(t, key):
        return jax.value_and_grad(lambda u: soft_objective(u, a, b, k, settings, key))(t)

    @jax.jit
    def step_fn(state, key):
        t, m, v, i = state
        soft, g = value_and_grad(t, key)
        i = i + 1
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1 ** i), v / (1 - beta2 ** i)
        t = t + learning_rate * m_hat / (jnp.sqrt(v_hat) + adam_eps)  # ascent
        return (t, m, v, i), soft, hard_objective(state[0], a, b, k)

    evaluate = jax.jit(lambda t, key: (soft_objective(t, a, b, k, settings, key),
                                       hard_objective(t, a, b, k)))
    keys = jax.random.split(jax.random.PRNGKey(seed), steps + 1)
    state = (theta, jnp.zeros_like(theta), jnp.zeros_like(theta), jnp.zeros((), theta.dtype))
    soft_values, hard_values = [], []
    for i in range(steps):
        state, soft, hard = step_fn(state, keys[i])
        soft_values.append(float(soft))
        hard_values.append(float(hard))
        if progress is not None:
            progress(i + 1, steps, soft_values[-1], hard_values[-1])
    soft, hard = evaluate(state[0], keys[steps])
    soft_values.append(float(soft))
    hard_values.append(float(hard))
    return History(state[0], np.array(soft_values), np.array(hard_values))


def progress_bar(stream=sys.stderr, width: int = 30):
    """A text progress bar for `optimise`, redrawn in place on `stream`."""
    def show(step, steps, soft, hard):
        if step % max(1, steps // 50) and step != steps:
            return  # redraw about 50 times in all
        done = width * step // steps
        stream.write(f"\r  [{'#' * done}{'.' * (width - done)}] {step:4d}/{steps}  "
                     f"soft {soft:+.4f}  hard {hard:+.4f}")
        if step == steps:
            stream.write("\n")
        stream.flush()
    return show


def plot_history(history: History, best: float, path: str, title: str = "",
                 label: str = "best achievable") -> None:
    """Writes a PNG of the soft and hard objective over the steps (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("--plot needs matplotlib: pip install 'sortgrad[demo]'") from err
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    steps = np.arange(len(history.soft))
    ax.plot(steps, history.soft, label="soft objective (optimised)")
    ax.step(steps, history.hard, where="post", label="hard objective")
    ax.axhline(best, color="grey", linestyle="--", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("mean(A_high) - mean(A_low)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line: "python -m sortgrad.demo: error: ... (see --help)"."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _check_plot_path(parser: argparse.ArgumentParser, path: str) -> None:
    """--plot PATH: matplotlib importable and PATH's directory writable, before any work."""
    if importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install 'sortgrad[demo]'")
    if os.path.isdir(path):
        parser.error(f"--plot {path}: is a directory, give a file name such as demo.png")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"--plot {path}: directory {folder} does not exist")
    try:  # a real write: os.access says yes to root on a read-only file system
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        parser.error(f"--plot {path}: cannot write in {folder} ({err.strerror})")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        parser.error(f"--plot {path}: file is not writable")


def parse_args(argv=None) -> argparse.Namespace:
    """The demo's flags, all checked here (before any work): a bad one exits with status 2."""
    parser = _Parser(prog="python -m sortgrad.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10, help="N, number of rows of B (10)")
    parser.add_argument("--m", type=int, default=20, help="M, number of columns of B (20)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--k", type=int, default=None,
                      help="size of each selected set, 1 <= k <= N // 2 (3)")
    size.add_argument("--quantile", type=float, default=None,
                      help="select the top and bottom q-quantile instead of k (e.g. 0.25)")
    parser.add_argument("--steps", type=int, default=200, help="optimisation steps (200)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (0.1)")
    parser.add_argument("--method", choices=("mask", "perturbed"), default="mask",
                        help="soft top-k masks or perturbed top-k (mask)")
    parser.add_argument("--strength", type=float, default=Settings._field_defaults["strength"],
                        help="mask regularization strength, on standardised scores, > 0 (2.0)")
    parser.add_argument("--sigma", type=float, default=Settings._field_defaults["sigma"],
                        help="perturbed: noise scale on standardised scores, > 0 (0.5)")
    parser.add_argument("--samples", type=int, default=Settings._field_defaults["num_samples"],
                        help="perturbed: Monte-Carlo samples per step (256)")
    parser.add_argument("--seed", type=int, default=0, help="numpy.random.default_rng seed (0)")
    parser.add_argument("--float32", action="store_true", help="float32 instead of float64")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the objectives")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.n < 2:
        parser.error(f"--n must be >= 2 (a top and a disjoint bottom set), got {args.n}")
    if args.m < 1:
        parser.error(f"--m must be >= 1, got {args.m}")
    if args.quantile is not None:
        if not 0.0 < args.quantile <= 0.5:
            parser.error(f"--quantile must be in (0, 0.5], got {args.quantile}")
        args.k = quantile_count(args.n, args.quantile)
        if args.k > args.n // 2:
            parser.error(f"--quantile {args.quantile} of N = {args.n} selects k = {args.k} > "
                         f"N // 2 = {args.n // 2}: the top and bottom sets would overlap")
    elif args.k is None:
        args.k = 3
    if not 1 <= args.k <= args.n // 2:
        parser.error(f"--k must be in [1, N // 2] = [1, {args.n // 2}] so the top and bottom "
                     f"sets are disjoint, got {args.k}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    for flag in ("lr", "strength", "sigma"):
        value = getattr(args, flag)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{flag} must be finite and > 0, got {value}")
    if args.samples < 2:
        parser.error(f"--samples must be >= 2, got {args.samples}")
    if args.plot is not None:
        _check_plot_path(parser, args.plot)
    return args


def main(argv=None) -> History:
    args = parse_args(argv)
    if not args.float32:
        jax.config.update("jax_enable_x64", True)
    dtype = np.float32 if args.float32 else np.float64
    problem = make_problem(args.n, args.m, args.k, args.seed, dtype)
    settings = Settings(args.method, args.strength, args.sigma, args.samples)
    a, b, theta, k = problem
    started = time.perf_counter()
    print(f"sortgrad demo: N={args.n}, M={args.m}, k={k}, method={args.method}, "
          f"{np.dtype(dtype).name}, device {jax.devices()[0].platform}")

    print("\n(a) gradient of the hard selection, d f / d theta with f = mean(A_high) - "
          "mean(A_low):")
    for name, top_k in (("jax.lax.top_k", jax.lax.top_k), ("sortgrad.top_k", sortgrad.top_k)):
        def hard(t, top_k=top_k):
            scores = b @ t
            return a[top_k(scores, k)[1]].mean() - a[top_k(-scores, k)[1]].mean()
        grad = np.asarray(jax.grad(hard)(theta))
        print(f"    through {name:15s} max |grad| = {np.abs(grad).max():.3g}  "
              "(zero: the selection is piecewise constant in theta)")

    if args.method == "perturbed":
        print("\n(b) sortgrad gradient of the soft objective (perturbed, a Monte-Carlo "
              "estimate) vs central differences:")
    else:
        print("\n(b) sortgrad gradient of the soft objective (mask) vs central differences:")
    check = check_gradient(problem, settings)
    for line in check.lines():
        print(f"    {line}")

    print(f"\n(c) gradient ascent on the soft objective, {args.steps} Adam steps, "
          f"lr {args.lr}:")
    history = optimise(problem, settings, steps=args.steps, learning_rate=args.lr,
                       seed=args.seed, progress=None if args.quiet else progress_bar())
    best = best_achievable(a, b, k)
    label = "best achievable" if best.exact else "upper bound on the best"
    print(f"    hard objective before {history.hard[0]:+.4f}, after {history.hard[-1]:+.4f}; "
          f"{label} {best.value:+.4f} ({100 * history.hard[-1] / best.value:.1f}% of "
          f"{'best' if best.exact else 'the bound'})")
    print(f"    ({best.how}" + ("" if best.exact else "; the maximum over theta lies between "
                                   "the best value reached and this bound") + ")")

    if args.plot:
        plot_history(history, best.value, args.plot,
                     f"N={args.n}, M={args.m}, k={k}, {args.method}",
                     label=label + ("" if best.exact else " (not necessarily reachable)"))
        print(f"\n(d) plot written to {args.plot}")
    print(f"\ndone in {time.perf_counter() - started:.1f} s")
    return history


if __name__ == "__main__":
    main()
