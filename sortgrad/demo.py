"""The quantile-selection problem, end to end (minimal version).

Given A (N,), B (N, M) and theta (M,), let C = B @ theta and A_high = A at the top-k entries of
C. The objective f(theta) = mean(A_high) has a zero gradient through a hard top-k selection;
the soft top-k mask gives a useful one. Run: python -m sortgrad.demo [--n N --m M --k K].
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import sortgrad


def make_problem(n: int, m: int, seed: int):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(n)), jnp.asarray(rng.standard_normal((n, m))),
            jnp.asarray(rng.standard_normal(m)))


def hard_objective(theta, a, b, k):
    _, idx = sortgrad.top_k(b @ theta, k)
    return a[idx].mean()


def soft_objective(theta, a, b, k, strength):
    scores = b @ theta
    scores = (scores - scores.mean()) / (scores.std() + 1e-12)  # strength is scale-free
    mask = sortgrad.soft_top_k_mask(scores, k, regularization_strength=strength)
    return (mask * a).sum() / k


def central_differences(f, theta, step=1e-6):
    basis = np.eye(theta.shape[0])
    return np.array([(f(theta + step * e) - f(theta - step * e)) / (2 * step) for e in basis])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--m", type=int, default=20)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    a, b, theta = make_problem(args.n, args.m, args.seed)

    hard_grad = jax.grad(hard_objective)(theta, a, b, args.k)
    print(f"hard top-{args.k} objective  {hard_objective(theta, a, b, args.k):+.6f}")
    print(f"|grad| through hard top-k:  {float(jnp.abs(hard_grad).max()):.3g}  (zero: the "
          "selection is piecewise constant in theta)")

    soft = jax.jit(lambda t: soft_objective(t, a, b, args.k, args.strength))
    soft_grad = np.asarray(jax.grad(soft_objective)(theta, a, b, args.k, args.strength))
    fd = central_differences(lambda t: float(soft(t)), np.asarray(theta))
    print(f"soft top-{args.k} objective  {float(soft(theta)):+.6f} (strength {args.strength})")
    print(f"|grad| through the soft mask: {np.abs(soft_grad).max():.3g}; max deviation from "
          f"central differences {np.abs(soft_grad - fd).max():.2e}")

    step = jax.jit(lambda t: t + 0.5 * jax.grad(soft_objective)(t, a, b, args.k, args.strength))
    for _ in range(100):
        theta = step(theta)
    best = float(jnp.sort(a)[-args.k:].mean())
    print(f"after 100 ascent steps: hard objective {hard_objective(theta, a, b, args.k):+.6f} "
          f"(best achievable {best:+.6f})")


if __name__ == "__main__":
    main()
