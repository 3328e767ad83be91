"""sortgrad.perturbed_top_k (Berthet et al. 2020) against independent references.

References: a naive NumPy loop over the samples (same Gaussian draws, which the contract
fixes: jax.random.normal(key, (S,) + batch + (n,))), exact expectations for n = 2 (closed form)
and n = 3 (one-dimensional quadrature over the order statistics, scipy), and the hard selection
of jax.lax.top_k. Statistical comparisons use tolerances of 5 standard errors computed from the
samples themselves, and check that the standard error is small next to the quantity tested
(so the test can fail).
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import sortgrad
import sortgrad.kernels

# Most tests use an "rbg" key: the contract holds for any key, and XLA on CPU compiles its
# sampler several times faster than threefry's (compilation dominates this file's run time).
# The default threefry key (raw uint32 PRNGKey) is covered by the naive-loop and vmap tests.
KEY = jax.random.key(20200101, impl="rbg")
FRY = jax.random.PRNGKey(20200101)


# --- references --------------------------------------------------------------------------------

def draws(key, shape, num_samples, dtype):
    """The draws the contract specifies, as NumPy."""
    return np.asarray(jax.random.normal(key, (num_samples,) + tuple(shape), dtype))


def naive_selection_indices(v, k):
    """Top-k indices of one row, largest first, ties to the lower index (NumPy, no JAX)."""
    order = sorted(range(v.shape[0]), key=lambda j: (-float(v[j]), j))
    return order[:k]


def naive_perturbed(x, z, k, sigma):
    """P and the per-sample indices by a Python loop over samples and rows.

    x: (..., n) in the compute dtype; z: (S, ..., n). Returns P (..., k, n) = counts / S in x's
    dtype and idx (S, ..., k)."""
    x = np.asarray(x)
    S, n = z.shape[0], x.shape[-1]
    batch = x.shape[:-1]
    counts = np.zeros(batch + (k, n), np.int64)
    idx = np.zeros((S,) + batch + (k,), np.int64)
    sig = x.dtype.type(sigma)
    for s in range(S):
        for b in np.ndindex(*batch):
            v = x[b] + sig * z[(s,) + b]
            sel = naive_selection_indices(v, k)
            idx[(s,) + b] = sel
            for i, j in enumerate(sel):
                counts[b + (i, j)] += 1
    return (counts / S).astype(x.dtype), idx


def naive_gradient(z, idx, g, sigma):
    """The documented estimator: sum_s (f_s - mean f) z_s / ((S - 1) sigma), in float64."""
    S = z.shape[0]
    f = np.take_along_axis(np.broadcast_to(g, (S,) + g.shape), idx[..., None],
                           axis=-1)[..., 0].sum(-1).astype(np.float64)
    f = f - f.mean(0)
    return np.einsum("s...,s...n->...n", f, z.astype(np.float64)) / ((S - 1) * sigma)


def exact_perm_probs(x, sigma):
    """{(a, b, c): Pr(v_a > v_b > v_c)} for v = x + sigma Z, n = 3, by quadrature over v_b."""
    probs = {}
    def pdf(t, mu):
        u = (t - mu) / sigma
        return math.exp(-0.5 * u * u) / (sigma * math.sqrt(2 * math.pi))

    def cdf(t, mu):
        return 0.5 * math.erfc(-(t - mu) / (sigma * math.sqrt(2)))

    x = [float(v) for v in x]
    for a, b, c in itertools.permutations(range(3)):
        def integrand(t, a=a, b=b, c=c):
            return pdf(t, x[b]) * (1.0 - cdf(t, x[a])) * cdf(t, x[c])
        val, _ = integrate.quad(integrand, x[b] - 12 * sigma, x[b] + 12 * sigma,
                                epsabs=1e-14, epsrel=1e-12, limit=200)
        probs[(a, b, c)] = val
    return probs


def exact_p3(x, k, sigma):
    p = np.zeros((k, 3))
    for perm, pr in exact_perm_probs(x, sigma).items():
        for r in range(k):
            p[r, perm[r]] += pr
    return p


def exact_grad3(x, k, sigma, g, h=1e-4):
    """Gradient of F(x) = <G, P_exact(x)> by central differences of the quadrature."""
    x = np.asarray(x, np.float64)
    out = np.zeros(3)
    for j in range(3):
        e = np.zeros(3)
        e[j] = h
        out[j] = (np.sum(g * exact_p3(x + e, k, sigma)) - np.sum(g * exact_p3(x - e, k, sigma))
                  ) / (2 * h)
    return out


def one_hot_top_k(x, k):
    idx = np.asarray(jax.lax.top_k(jnp.asarray(x), k)[1])
    return (idx[..., None] == np.arange(x.shape[-1])).astype(np.float64)


def objective(key, k, g, **kw):
    return lambda x: jnp.sum(sortgrad.perturbed_top_k(key, x, k, **kw) * g)


def jit_grad(key, k, g, **kw):
    """jit(grad) of <G, P(x)>: one compiled program (eager grad compiles several)."""
    return jax.jit(jax.grad(objective(key, k, g, **kw)))


def numpy_top_k_indices(v, k):
    """Stable descending top-k indices over the last axis (no NaNs; ties to the lower index)."""
    return np.argsort(-v, axis=-1, kind="stable")[..., :k]


# --- forward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,key", [(np.float32, KEY), (np.float64, FRY)])
def test_forward_equals_naive_loop(route, dtype, key):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7)).astype(dtype)
    S, k, sigma = 50, 3, 0.7
    p = np.asarray(sortgrad.perturbed_top_k(key, x, k, num_samples=S, sigma=sigma))
    p_ref, _ = naive_perturbed(x, draws(key, x.shape, S, dtype), k, sigma)
    assert p.dtype == dtype and p.shape == (2, 3, k, 7)
    # the selection counts are identical; P = count / S up to one ulp (XLA's vectorised CPU
    # division of float32 is not always correctly rounded)
    counts, counts_ref = np.rint(p.astype(np.float64) * S), np.rint(p_ref * np.float64(S))
    np.testing.assert_array_equal(counts, counts_ref)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(p, p_ref, rtol=eps, atol=0)
    np.testing.assert_allclose(p.astype(np.float64) * S, counts, rtol=2 * eps, atol=0)
    assert np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(p.sum(-1), 1, rtol=0, atol=8 * eps)
    assert np.all(p.sum(-2) <= 1 + 8 * eps)
    # the perturbation does something at this sigma: P is not a hard selection
    assert np.any((p > 0) & (p < 1))


def test_converges_to_hard_selection_as_sigma_shrinks():
    rng = np.random.default_rng(1)
    x = rng.permutation(np.arange(12.0)).reshape(2, 6)  # gaps of at least 1
    k = 3
    hard = one_hot_top_k(x, k)
    errors = []
    for sigma in [3.0, 0.3, 0.01]:
        p = np.asarray(sortgrad.perturbed_top_k(KEY, x, k, num_samples=400, sigma=sigma))
        errors.append(np.abs(p - hard).max())
    assert errors[0] > 0.3
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] == 0.0  # gaps are 100 sigma: no draw reorders them


X3 = np.array([[0.3, -0.2, 0.1], [1.0, 1.0, 0.0], [0.0, 0.05, 2.0], [0.5, 0.5, 0.0]])


@pytest.mark.parametrize("k", [2, 3])
def test_forward_matches_exact_expectation_n3(k):
    sigma, S = 0.5, 20000
    p = np.asarray(sortgrad.perturbed_top_k(KEY, X3, k, num_samples=S, sigma=sigma))
    for x, p_x in zip(X3, p):
        ref = exact_p3(x, k, sigma)
        np.testing.assert_allclose(ref.sum(-1), 1, atol=1e-9)  # the quadrature itself
        se = np.sqrt(ref * (1 - ref) / S)
        assert np.all(np.abs(p_x - ref) <= 5 * se + 1e-12), (x, p_x, ref, se)


# --- gradient -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_is_the_documented_estimator(route, dtype):
    """dx = sum_s (f_s - mean f) z_s / ((S-1) sigma) with the forward's own draws."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 6)).astype(dtype)
    g = rng.standard_normal((3, 2, 6)).astype(dtype)
    S, k, sigma = 40, 2, 0.4
    dx = np.asarray(jit_grad(KEY, k, g, num_samples=S, sigma=sigma)(x))
    z = draws(KEY, x.shape, S, dtype)
    _, idx = naive_perturbed(x, z, k, sigma)
    ref = naive_gradient(z, idx, g, sigma)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_gradient_single_sample_has_no_baseline():
    x = np.array([0.2, 0.0, -0.1, 0.4])
    g = np.array([[1.0, -2.0, 0.5, 3.0]])
    sigma = 0.3
    dx = np.asarray(jit_grad(KEY, 1, g, num_samples=1, sigma=sigma)(x))
    z = draws(KEY, x.shape, 1, np.float64)[0]
    j = naive_selection_indices(x + sigma * z, 1)[0]
    np.testing.assert_allclose(dx, g[0, j] * z / sigma, rtol=1e-13)


def _statistical_check(x, g, k, sigma, S, exact):
    """x: (B, n) problems, g: (B, k, n), exact: (B, n). |estimate - exact| <= 5 SE."""
    dx = np.asarray(jit_grad(KEY, k, g, num_samples=S, sigma=sigma)(x))
    # standard error of the estimator, per component, from the same draws
    z = draws(KEY, x.shape, S, np.float64)
    idx = numpy_top_k_indices(x + sigma * z, k)  # (S, B, k)
    f = np.take_along_axis(np.broadcast_to(g, (S,) + g.shape), idx[..., None],
                           axis=-1)[..., 0].sum(-1)  # (S, B)
    terms = (f - f.mean(0))[..., None] * z / sigma
    se = terms.std(axis=0, ddof=1) / math.sqrt(S)
    scale = np.abs(exact).max(axis=-1, keepdims=True)
    assert np.all(se < 0.1 * scale), (se, exact)  # the check has teeth
    assert np.all(np.abs(dx - exact) <= 5 * se), (dx, exact, se)


def test_gradient_matches_closed_form_n2():
    """n = 2, k = 1: P[0, 0] = Phi(d), d = (x0 - x1) / (sigma sqrt 2)."""
    sigma, S = 0.4, 100_000
    x = np.array([[0.3, 0.0], [0.0, 0.0], [-0.2, 0.5]])
    g = np.array([[[1.5, -0.5]], [[1.5, -0.5]], [[-1.0, 2.0]]])
    d = (x[:, 0] - x[:, 1]) / (sigma * math.sqrt(2))
    dfdx0 = (g[:, 0, 0] - g[:, 0, 1]) * stats.norm.pdf(d) / (sigma * math.sqrt(2))
    exact = np.stack([dfdx0, -dfdx0], axis=-1)
    _statistical_check(x, g, 1, sigma, S, exact)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gradient_matches_exact_smoothed_objective_n3(k):
    sigma, S = 0.5, 100_000
    x = X3[[0, 3]]
    g0 = np.array([[1.0, -2.0, 0.5], [0.3, 1.2, -1.0], [2.0, 0.0, -0.7]])[:k]
    g = np.stack([g0, g0[::-1]])
    exact = np.stack([exact_grad3(x[b], k, sigma, g[b]) for b in range(2)])
    _statistical_check(x, g, k, sigma, S, exact)


# --- transformations ----------------------------------------------------------------------------

def test_jit_equals_eager_forward_and_gradient():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 9))
    g = rng.standard_normal((2, 4, 9))
    kw = dict(num_samples=64, sigma=0.3)
    eager = sortgrad.perturbed_top_k(KEY, x, 4, **kw)
    jitted = jax.jit(lambda key, x: sortgrad.perturbed_top_k(key, x, 4, **kw))(KEY, x)
    np.testing.assert_array_equal(eager, jitted)
    f = objective(KEY, 4, g, **kw)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(x), jax.grad(f)(x), rtol=1e-12, atol=1e-14)


def test_vmap_over_x_and_over_keys_equals_loop(route):
    rng = np.random.default_rng(4)
    xs = rng.standard_normal((3, 8))
    gs = rng.standard_normal((3, 2, 8))
    keys = jax.random.split(FRY, 3)
    kw = dict(num_samples=32, sigma=0.5)

    def one(key, x):
        return sortgrad.perturbed_top_k(key, x, 2, **kw)

    def grad_one(key, x, g):
        return jax.grad(lambda v: jnp.sum(one(key, v) * g))(x)

    shared = jax.vmap(one, in_axes=(None, 0))(FRY, xs)
    per_key = jax.vmap(one)(keys, xs)
    keys_only = jax.vmap(one, in_axes=(0, None))(keys, xs[0])
    for b in range(3):
        np.testing.assert_array_equal(shared[b], one(FRY, xs[b]))
        np.testing.assert_array_equal(per_key[b], one(keys[b], xs[b]))
        np.testing.assert_array_equal(keys_only[b], one(keys[b], xs[0]))
    grads = jax.jit(jax.vmap(grad_one))(keys, xs, gs)
    for b in range(3):
        np.testing.assert_allclose(grads[b], grad_one(keys[b], xs[b], gs[b]), rtol=1e-12,
                                   atol=1e-14)


def test_leading_dims_and_axis():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 3))  # selection axis 1
    g = rng.standard_normal((2, 3, 2, 6))
    kw = dict(num_samples=16, sigma=0.5)
    p = sortgrad.perturbed_top_k(KEY, x, 2, axis=1, **kw)
    moved = np.moveaxis(x, 1, -1)
    assert p.shape == (2, 3, 2, 6)
    np.testing.assert_array_equal(p, sortgrad.perturbed_top_k(KEY, moved, 2, **kw))
    np.testing.assert_array_equal(p, sortgrad.perturbed_top_k(KEY, x, 2, axis=-2, **kw))
    p_ref, _ = naive_perturbed(moved, draws(KEY, moved.shape, 16, np.float64), 2, 0.5)
    np.testing.assert_array_equal(p, p_ref)
    dx = jax.jit(jax.grad(
        lambda v: jnp.sum(sortgrad.perturbed_top_k(KEY, v, 2, axis=1, **kw) * g)))(x)
    dmoved = jit_grad(KEY, 2, g, **kw)(moved)
    np.testing.assert_allclose(dx, np.moveaxis(np.asarray(dmoved), -1, 1), rtol=1e-12)


@pytest.mark.parametrize("mode", ["pure", "buffer"])
def test_one_top_k_callback_per_evaluation(monkeypatch, mode):
    """jit forward, jit(grad) and jit(vmap) each run the top-k kernel once, on all rows."""
    calls = []
    original = sortgrad.kernels.top_k

    def counting(x, k, **kwargs):
        calls.append(np.shape(x))
        return original(x, k, **kwargs)

    replay = sortgrad.kernels.CallPlan.__call__

    def counting_replay(plan, arrays, out):  # later buffer-mode calls replay a call plan
        calls.append(np.shape(arrays[0]))
        return replay(plan, arrays, out)

    monkeypatch.setattr(sortgrad.kernels, "top_k", counting)
    monkeypatch.setattr(sortgrad.kernels.CallPlan, "__call__", counting_replay)
    xs = np.random.default_rng(6).standard_normal((3, 10))
    g = np.ones((3, 4, 10))
    with sortgrad.callback_mode(mode):
        fwd = jax.jit(lambda x: sortgrad.perturbed_top_k(KEY, x, 4, num_samples=100))
        grad = jax.jit(jax.grad(lambda x: jnp.sum(
            sortgrad.perturbed_top_k(KEY, x, 4, num_samples=100) * g)))
        vmapped = jax.jit(jax.vmap(lambda x: sortgrad.perturbed_top_k(KEY, x, 4,
                                                                        num_samples=100)))
        for fn in [fwd, grad, vmapped] if mode == "pure" else [fwd, grad]:
            jax.block_until_ready(fn(xs))  # compile + first run
            calls.clear()
            jax.block_until_ready(fn(xs))
            assert len(calls) == 1, (fn, calls)
            # every sample of every problem in one call (leading dims are batch dims)
            assert (int(np.prod(calls[0][:-1])), calls[0][-1]) == (100 * 3, 10)


# --- special values and dtypes ------------------------------------------------------------------

def test_nan_row_gives_nan_block_and_gradient_other_rows_unaffected():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 5))
    x_nan = x.copy()
    x_nan[1, 2] = np.nan
    g = rng.standard_normal((3, 2, 5))
    kw = dict(num_samples=50, sigma=0.5)
    p = np.asarray(sortgrad.perturbed_top_k(KEY, x_nan, 2, **kw))
    p_clean = np.asarray(sortgrad.perturbed_top_k(KEY, x, 2, **kw))
    assert np.all(np.isnan(p[1]))
    np.testing.assert_array_equal(p[[0, 2]], p_clean[[0, 2]])
    grad = jit_grad(KEY, 2, g, **kw)
    dx, dx_clean = np.asarray(grad(x_nan)), np.asarray(grad(x))
    assert np.all(np.isnan(dx[1]))
    np.testing.assert_array_equal(dx[[0, 2]], dx_clean[[0, 2]])


def test_infinities_are_selected_like_lax_top_k():
    x = np.array([np.inf, 0.0, -np.inf, np.inf, 1.0])
    p = np.asarray(sortgrad.perturbed_top_k(KEY, x, 3, num_samples=20, sigma=0.1))
    np.testing.assert_array_equal(p[0], [1, 0, 0, 0, 0])  # tied +inf: lower index first
    np.testing.assert_array_equal(p[1], [0, 0, 0, 1, 0])
    assert p[2, 4] > 0.9 and p[2, 2] == 0
    dx = jit_grad(KEY, 3, np.ones((3, 5)), num_samples=20, sigma=0.1)(x)
    assert np.all(np.isfinite(dx))


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16])
def test_16_bit_computes_in_float32(route, dtype):
    x = np.random.default_rng(8).standard_normal((2, 6)).astype(dtype)
    p = sortgrad.perturbed_top_k(KEY, x, 2, num_samples=30)
    ref = sortgrad.perturbed_top_k(KEY, x.astype(np.float32), 2, num_samples=30)
    assert p.dtype == dtype
    np.testing.assert_array_equal(p, ref.astype(dtype))
    dx = jax.jit(jax.grad(lambda v: jnp.sum(
        sortgrad.perturbed_top_k(KEY, v, 2, num_samples=30).astype(jnp.float32))))(x)
    assert dx.dtype == dtype


def test_k_zero_and_k_equals_n(route):
    x = np.random.default_rng(9).standard_normal((2, 4))
    p0 = sortgrad.perturbed_top_k(KEY, x, 0, num_samples=10)
    assert p0.shape == (2, 0, 4) and p0.dtype == x.dtype
    np.testing.assert_array_equal(
        jax.grad(lambda v: jnp.sum(sortgrad.perturbed_top_k(KEY, v, 0)))(x), np.zeros((2, 4)))
    p = np.asarray(sortgrad.perturbed_top_k(KEY, x, 4, num_samples=10, sigma=1.0))
    np.testing.assert_allclose(p.sum(-2), 1, atol=1e-12)  # k = n: doubly stochastic


# --- argument checks ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(k=5), ValueError, r"0 <= k <= n = 4, got k = 5"),
    (dict(k=-1), ValueError, r"got k = -1"),
    (dict(k=1.5), TypeError, r"k must be"),
    (dict(k=True), TypeError, r"k must be"),
    (dict(num_samples=0), ValueError, r"num_samples must be >= 1"),
    (dict(num_samples=-3), ValueError, r"num_samples"),
    (dict(num_samples=2.0), TypeError, r"num_samples"),
    (dict(sigma=0.0), ValueError, r"sigma must be finite and > 0"),
    (dict(sigma=-0.1), ValueError, r"sigma"),
    (dict(sigma=float("nan")), ValueError, r"sigma"),
    (dict(sigma=float("inf")), ValueError, r"sigma"),
    (dict(sigma="0.1"), TypeError, r"sigma"),
    (dict(axis=2), ValueError, r"axis"),
    (dict(x=np.arange(4)), TypeError, r"x must be a floating-point array"),
    (dict(x=np.ones(4, bool)), TypeError, r"x must be a floating-point array"),
    (dict(x=np.float32(1.0)), ValueError, r"at least one dimension"),
])
def test_bad_arguments(kwargs, exc, match):
    args = dict(x=np.zeros((2, 4), np.float32), k=2, num_samples=10, sigma=0.1, axis=-1)
    args.update(kwargs)
    x, k = args.pop("x"), args.pop("k")
    with pytest.raises(exc, match=match):
        sortgrad.perturbed_top_k(KEY, x, k, **args)
    with pytest.raises(exc, match=match):  # also at trace time under jit
        jax.jit(lambda v: sortgrad.perturbed_top_k(KEY, v, k, **args))(x)
