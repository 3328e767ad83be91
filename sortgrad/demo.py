"""The quantile-selection problem, end to end: python -m sortgrad.demo [--help].

Given A (N,), B (N, M) and theta (M,), let C = B @ theta, A_high = A at the k largest entries
of C and A_low = A at the k smallest. We want theta maximising
    f(theta) = mean(A_high) - mean(A_low).
The hard selection is piecewise constant in theta, so its gradient is zero; the demo
  (a) shows that zero gradient,
  (b) computes sortgrad's gradient of a soft version of f (soft top-k masks of the
      standardised scores, or perturbed top-k selections) and checks it against central
      finite differences,
  (c) maximises the soft f by gradient ascent (Adam) and reports the hard f before and after
      against the best achievable value (mean of the k largest A minus mean of the k smallest),
  (d) with --plot PATH, writes a PNG of the soft and hard objective over the steps.
Each step is a function below, tested in tests/test_demo.py.
"""

from __future__ import annotations

import argparse
import sys
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
    """The best achievable hard objective: mean of the k largest A minus the k smallest."""
    ordered = np.sort(np.asarray(a))
    return float(ordered[-k:].mean() - ordered[:k].mean())


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


class GradientCheck(NamedTuple):
    gradient: np.ndarray
    finite_differences: np.ndarray
    max_abs_error: float
    relative_error: float  # max |gradient - fd| / max |fd|


def check_gradient(problem: Problem, settings: Settings = Settings(), key=None,
                   step: float | None = None) -> GradientCheck:
    """sortgrad's gradient of the soft objective at the initial theta against central
    differences. The perturbed objective is checked with the same samples on both sides
    (common random numbers) and a larger step, since its Monte-Carlo average is piecewise
    constant at the scale of single samples: expect agreement to sampling error only.
    """
    a, b, theta, k = problem
    if settings.method == "perturbed":
        key = jax.random.PRNGKey(0) if key is None else key
        settings = settings._replace(num_samples=max(settings.num_samples, 20000))
        step = 0.05 if step is None else step
    else:
        step = 1e-6 if step is None else step
    objective = jax.jit(lambda t: soft_objective(t, a, b, k, settings, key))
    gradient = np.asarray(jax.jit(jax.grad(
        lambda t: soft_objective(t, a, b, k, settings, key)))(theta))
    fd = central_differences(lambda t: float(objective(jnp.asarray(t, theta.dtype))),
                             theta, step)
    error = float(np.abs(gradient - fd).max())
    return GradientCheck(gradient, fd, error, error / max(float(np.abs(fd).max()), 1e-300))


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


def plot_history(history: History, best: float, path: str, title: str = "") -> None:
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
    ax.axhline(best, color="grey", linestyle="--", label="best achievable")
    ax.set_xlabel("step")
    ax.set_ylabel("mean(A_high) - mean(A_low)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sortgrad.demo",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10, help="N, number of rows of B (10)")
    parser.add_argument("--m", type=int, default=20, help="M, number of columns of B (20)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--k", type=int, default=None, help="size of each selected set (3)")
    size.add_argument("--quantile", type=float, default=None,
                      help="select the top and bottom q-quantile instead of k (e.g. 0.25)")
    parser.add_argument("--steps", type=int, default=200, help="optimisation steps (200)")
    parser.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (0.1)")
    parser.add_argument("--method", choices=("mask", "perturbed"), default="mask",
                        help="soft top-k masks or perturbed top-k (mask)")
    parser.add_argument("--strength", type=float, default=Settings._field_defaults["strength"],
                        help="mask regularization strength, on standardised scores (2.0)")
    parser.add_argument("--sigma", type=float, default=Settings._field_defaults["sigma"],
                        help="perturbed: noise scale on standardised scores (0.5)")
    parser.add_argument("--samples", type=int, default=Settings._field_defaults["num_samples"],
                        help="perturbed: Monte-Carlo samples per step (256)")
    parser.add_argument("--seed", type=int, default=0, help="numpy.random.default_rng seed (0)")
    parser.add_argument("--float32", action="store_true", help="float32 instead of float64")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the objectives")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.quantile is not None:
        if not 0.0 < args.quantile <= 0.5:
            parser.error(f"--quantile must be in (0, 0.5], got {args.quantile}")
        args.k = quantile_count(args.n, args.quantile)
    elif args.k is None:
        args.k = 3
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def main(argv=None) -> History:
    args = parse_args(argv)
    if not args.float32:
        jax.config.update("jax_enable_x64", True)
    dtype = np.float32 if args.float32 else np.float64
    problem = make_problem(args.n, args.m, args.k, args.seed, dtype)
    settings = Settings(args.method, args.strength, args.sigma, args.samples)
    a, b, theta, k = problem
    best = best_objective(a, k)
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

    print(f"\n(b) sortgrad gradient of the soft objective ({args.method}) vs central "
          "differences:")
    check = check_gradient(problem, settings)
    print(f"    max |grad| = {np.abs(check.gradient).max():.4g}, max |grad - fd| = "
          f"{check.max_abs_error:.2e} (relative {check.relative_error:.2e})"
          + ("; Monte-Carlo, agreement to sampling error" if args.method == "perturbed"
             else ""))

    print(f"\n(c) gradient ascent on the soft objective, {args.steps} Adam steps, "
          f"lr {args.lr}:")
    history = optimise(problem, settings, steps=args.steps, learning_rate=args.lr,
                       seed=args.seed, progress=None if args.quiet else progress_bar())
    print(f"    hard objective before {history.hard[0]:+.4f}, after {history.hard[-1]:+.4f}, "
          f"best achievable {best:+.4f} ({100 * history.hard[-1] / best:.1f}% of best)")

    if args.plot:
        plot_history(history, best, args.plot,
                     f"N={args.n}, M={args.m}, k={k}, {args.method}")
        print(f"\n(d) plot written to {args.plot}")
    print(f"\ndone in {time.perf_counter() - started:.1f} s")
    return history


if __name__ == "__main__":
    main()
