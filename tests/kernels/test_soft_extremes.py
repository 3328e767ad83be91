"""Soft rank, soft sort and soft top-k mask (CPU backend) at extreme ratios of input to
strength (issue 14): for every finite eps in [1e-300, 1e300] and every finite input up to the
dtype's max (also tiny and subnormal), L2 and KL, float32 and float64:
- ranks in [1, n] summing to n (n + 1) / 2, equal to the hard ranks (ties averaged) once every
  gap of x exceeds what a PAV block can bridge (n eps for L2, eps log n for KL);
- masks in [0, 1] summing to k, equal to the hard mask (tied stretches averaged) once every gap
  exceeds 2 eps;
- soft sorts sorted, within [min x, max x], L2 summing to sum(x), equal to the sorted x when no
  gap reaches 1 / eps (singleton blocks give the input bits; a zero that is not an input -0.0
  is +0.0);
- no NaN or inf from finite input; agreement with the float64 oracles where those are valid
  (moderate x / eps and n / eps, where their s - PAV(s - w) does not cancel).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sortgrad import kernels
from sortgrad.testing.oracles import (reference_soft_rank, reference_soft_sort,
                                      reference_soft_top_k_mask)

SIZES = (1, 2, 3, 31, 33, 1025)
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _rank(x, eps, reg, descending=False):
    return kernels.soft_rank(x, eps, regularization=reg, descending=descending,
                             backend="cpu")[0]


def _sort(x, eps, reg, descending=False):
    return kernels.soft_sort(x, eps, regularization=reg, descending=descending,
                             backend="cpu")[0]


def _mask(x, k, eps):
    return kernels.soft_top_k_mask(x, k, eps, backend="cpu")[0]


@st.composite
def rows(draw):
    """(x, eps): a row with ties, of any magnitude up to the dtype's max (or tiny/subnormal)."""
    n = draw(st.sampled_from(SIZES))
    dtype = np.dtype(draw(st.sampled_from(["float32", "float64"])))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    finfo = np.finfo(dtype)
    kind = draw(st.sampled_from(["normal", "huge", "tiny", "spread", "integers"]))
    if kind == "integers":
        x = rng.integers(-3, 4, n).astype(np.float64)
    else:
        x = rng.standard_normal(n)
    if kind == "huge":
        x = x / max(np.abs(x).max(), 1e-300) * float(finfo.max) * draw(st.floats(0.01, 1.0))
    elif kind == "tiny":  # down to subnormals
        x = x * float(finfo.smallest_subnormal) * 2.0 ** draw(st.integers(0, 60))
    elif kind == "spread":  # magnitudes from subnormal to the max within one row
        lo, hi = math.log2(float(finfo.smallest_subnormal)), math.log2(float(finfo.max))
        x = np.sign(x) * np.exp2(rng.uniform(lo, hi - 1, n))
    else:
        x = x * 10.0 ** draw(st.floats(-30, 30))
    if n > 2 and draw(st.booleans()):  # ties
        idx = rng.integers(0, n, n // 2 + 1)
        x[idx] = x[idx[0]]
    if n > 1 and draw(st.booleans()):
        x[rng.integers(0, n)] = -0.0
    x = np.clip(x, -float(finfo.max), float(finfo.max)).astype(dtype)
    eps = 10.0 ** draw(st.floats(-300, 300))
    return x, eps


def _hard_ranks(x):
    """1-based ascending ranks, ties averaged."""
    xs = np.asarray(x, np.float64)
    order = np.argsort(xs, kind="stable")
    r = np.empty(len(xs))
    sx = xs[order]
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and sx[j + 1] == sx[i]:
            j += 1
        r[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return r


def _hard_mask(x, k):
    """The top-k mask, a tied stretch across the cut-off averaged."""
    xs = np.asarray(x, np.float64)
    order = np.argsort(-xs, kind="stable")
    m = np.empty(len(xs))
    sx = xs[order]
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and sx[j + 1] == sx[i]:
            j += 1
        m[order[i:j + 1]] = max(0, min(j + 1, k) - i) / (j + 1 - i)
        i = j + 1
    return m


def _all_gaps_exceed(x, eps, bridge):
    """Whether every nonzero gap of the sorted row exceeds bridge * eps (an overflowing
    difference exceeds every finite bound, as does the true gap)."""
    xs = np.sort(np.asarray(x, np.float64))
    with np.errstate(over="ignore", invalid="ignore"):
        d = np.diff(xs)
        bound = bridge * eps
    return bool(np.all((d == 0) | (d > bound)))


def _moderate(x, eps, n):
    with np.errstate(over="ignore"):
        s = np.abs(np.asarray(x, np.float64)).max() / eps
    return s <= 1e6 and n / eps <= 1e6 and np.abs(np.asarray(x, np.float64)).max() < 1e150


def _rtol(dtype):
    return 1e-5 if np.dtype(dtype) == np.float32 else 1e-10


@pytest.mark.parametrize("reg", ["l2", "kl"])
@given(data=rows(), descending=st.booleans())
@SETTINGS
def test_soft_rank_extremes(data, reg, descending):
    x, eps = data
    n = x.shape[0]
    r = np.asarray(_rank(x, eps, reg, descending), np.float64)
    assert np.all(np.isfinite(r))
    assert np.all((r >= 1.0) & (r <= n)), (r.min(), r.max())
    tol = _rtol(x.dtype) * n * n
    assert abs(r.sum() - n * (n + 1) / 2) <= tol
    xs = np.asarray(x, np.float64)
    for v in np.unique(xs):  # tied entries share one value
        assert np.ptp(r[xs == v]) <= _rtol(x.dtype) * n
    bridge = n + 1.0 if reg == "l2" else math.log(max(n, 1)) + 1.0
    if _all_gaps_exceed(x, eps, bridge):  # no block bridges a gap: the hard ranks, ties averaged
        hard = _hard_ranks(-xs if descending else xs)
        np.testing.assert_allclose(r, hard, rtol=_rtol(x.dtype), atol=0)
    if _moderate(x, eps, n):
        ref = reference_soft_rank(xs, eps, reg, descending)
        np.testing.assert_allclose(r, ref, rtol=_rtol(x.dtype), atol=1e-6 * n)


@given(data=rows(), kfrac=st.floats(0, 1))
@SETTINGS
def test_soft_top_k_mask_extremes(data, kfrac):
    x, eps = data
    n = x.shape[0]
    k = int(round(kfrac * n))
    m = np.asarray(_mask(x, k, eps), np.float64)
    assert np.all(np.isfinite(m))
    assert np.all((m >= 0.0) & (m <= 1.0))
    assert abs(m.sum() - k) <= _rtol(x.dtype) * n * 10
    xs = np.asarray(x, np.float64)
    for v in np.unique(xs):
        assert np.ptp(m[xs == v]) <= _rtol(x.dtype) * 10
    assert not np.any(np.signbit(m))  # never -0.0
    if _all_gaps_exceed(x, eps, 2.0):
        np.testing.assert_allclose(m, _hard_mask(xs, k), rtol=0, atol=_rtol(x.dtype) * 10)
    if _moderate(x, eps, n):
        np.testing.assert_allclose(m, reference_soft_top_k_mask(xs, k, eps),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("reg", ["l2", "kl"])
@given(data=rows(), descending=st.booleans())
@SETTINGS
def test_soft_sort_extremes(data, reg, descending):
    x, eps = data
    n = x.shape[0]
    out = _sort(x, eps, reg, descending)
    assert out.dtype == x.dtype
    o = np.asarray(out, np.float64)
    xs = np.asarray(x, np.float64)
    assert np.all(np.isfinite(o))
    asc = o[::-1] if descending else o
    assert np.all(np.diff(asc) >= 0)  # sorted
    if reg == "l2":
        assert np.all((o >= xs.min()) & (o <= xs.max()))
        down = 2.0 ** -64  # exact, and no overflow of the sums
        scale = np.abs(xs * down).sum()
        assert abs((o * down).sum() - (xs * down).sum()) <= 1e-6 * scale * n
    if not np.any((xs == 0) & np.signbit(xs)):  # no input -0.0: no output -0.0
        assert not np.any((o == 0) & np.signbit(o))
    with np.errstate(over="ignore", invalid="ignore"):
        largest_gap = float(np.diff(np.sort(xs)).max()) if n > 1 else 0.0
    if largest_gap * eps < 0.5:  # every gap below 1 / (2 eps): no block pools
        hard = np.sort(x)[::-1] if descending else np.sort(x)
        assert np.array_equal(out, hard)  # -0.0 == 0.0: tied zeros may come in either order
    if _moderate(x, eps, n) and (reg == "l2" or n / eps <= 600):
        ref = reference_soft_sort(xs, eps, reg, descending)
        scale = max(np.abs(xs).max(), n / eps, 1.0 if reg == "kl" else 0.0)  # KL: its logs
        tiny = float(np.finfo(x.dtype).smallest_subnormal) * 2  # the output's rounding
        np.testing.assert_allclose(o, ref, rtol=_rtol(x.dtype), atol=1e-9 * scale + tiny)


# --- the README figures and the cases of issue 14 -------------------------------------------

def test_standard_normal_default_eps():
    x = np.random.default_rng(0).standard_normal(1000)
    for reg in ("l2", "kl"):
        r = _rank(x, 1.0, reg)
        assert 1.0 <= r.min() and r.max() <= 1000.0
        np.testing.assert_allclose(r, reference_soft_rank(x, 1.0, reg), rtol=1e-12, atol=1e-9)
        assert abs(r.sum() - 500500.0) < 1e-6


@pytest.mark.parametrize("dtype, big", [("float64", 1e18), ("float64", 1e300),
                                        ("float32", 1e30), ("float32", 3e38)])
@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_huge_inputs_give_hard_ranks(dtype, big, reg):
    x = (np.array([3.0, -1.0, 2.0, 2.0, 0.0, -5.0]) * (big / 5.0)).astype(dtype)
    hard = _hard_ranks(x)
    np.testing.assert_array_equal(_rank(x, 1.0, reg), hard)
    np.testing.assert_array_equal(_mask(x, 2, 1.0), _hard_mask(x, 2))
    np.testing.assert_array_equal(_mask(x, 3, 1.0), _hard_mask(x, 3))


@pytest.mark.parametrize("eps", [1e-20, 1e-100, 1e-300])
@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tiny_eps_gives_hard_ops(eps, reg, dtype):
    x = np.array([5.0, 1.0, 2.0, 2.0, -0.0, 0.5, -7.0], dtype=dtype)
    np.testing.assert_array_equal(_rank(x, eps, reg), _hard_ranks(x))
    np.testing.assert_array_equal(_rank(x, eps, reg, True), _hard_ranks(-x.astype(np.float64)))
    for k in range(8):
        np.testing.assert_array_equal(_mask(x, k, eps), _hard_mask(x, k))
    out = _sort(x, eps, reg)
    np.testing.assert_array_equal(out, np.sort(x))
    assert np.signbit(out[np.flatnonzero(out == 0)]).all()  # the input's -0.0 comes back


def test_kl_rank_at_moderate_extremes():
    """KL ranks were off at eps = 1e-12, |x| ~ 1e15 (x / eps swallowed log rho)."""
    x = np.array([1e15, -2e15, 3e15, 1e15])
    np.testing.assert_array_equal(_rank(x, 1e-12, "kl"), [2.5, 1.0, 4.0, 2.5])
