"""The invariants of test_soft_extremes.py (issue 14: exact limits for every finite input and
eps > 0) on the device routes of the soft ops: the CuPy / CUDA C route (`soft/_cupy.py`,
`soft.cu`) on the host emulator, the Numba CUDA route (`soft/_numba_cuda.py`) on the simulator
(small rows, few examples: every CUDA thread is a Python thread there), and both on a real
GPU where there is one.

Every case checks the device result against the invariants (ranks in [1, n], masks in [0, 1]
summing to k, soft sorts sorted within [min x, max x], hard limits where no block can bridge a
gap, no -0.0 that is not an input's, nothing non-finite) and against the CPU backend, which is
exact (test_soft_extremes.py): values to a few float64 ulps of the data scale (float32: of the
output rounding), and the VJP with the device's own residuals (perm, block ids, ranks) against
the CPU's VJP with those same residuals. The rows come from test_soft_extremes' strategy
(eps in [1e-300, 1e300], |x| up to the dtype max, subnormals, ties, -0.0, n = 1, 2, 3, 31, 33,
1025; cut to at most 33 entries on the simulator).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _backends import cpu_result, on_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_soft_extremes import _all_gaps_exceed, _hard_mask, _hard_ranks, rows

OP = "soft"
DEVICES = ("cupy-emulated", "numba-simulator", "cupy", "numba")
# float64 results agree with the CPU to rounding of the block sums; float32 to the output's
# rounding (1 ulp) on top
RTOL = {"float32": 2.5e-7, "float64": 1e-12}
SIM_MAX_N = 33


def _examples(backend) -> int:
    return 15 if backend.simulated else 40


def _settings(backend):
    return settings(max_examples=_examples(backend), deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@st.composite
def _device_rows(draw, simulated: bool):
    """test_soft_extremes' rows, some shifted by 2^k eps, k in [20, 52]: x / eps large, inside
    the fast path of the rank and mask (k < 40: where s - PAV(s - w) would cancel) or past it
    with blocks that pool values which are not tied (k >= 40: the fallback)."""
    x, eps = draw(rows())
    if simulated and x.shape[0] > SIM_MAX_N:
        x = x[:draw(st.sampled_from([SIM_MAX_N, 3]))]
    if draw(st.integers(0, 2)) == 0:  # offset + eps * spread * z, |z| <= 1 (ties kept)
        offset = draw(st.sampled_from([-1.0, 1.0])) * 2.0 ** draw(st.integers(20, 52)) * eps
        z = x.astype(np.float64)
        top = np.abs(z).max()
        z = z / top if top > 0 else z
        spread = 2.0 ** draw(st.integers(-3, 11))
        with np.errstate(over="ignore", invalid="ignore"):
            shifted = (offset + eps * spread * z).astype(x.dtype)
        if np.all(np.isfinite(shifted)):
            x = shifted
    return np.ascontiguousarray(x.reshape(1, -1)), eps


def _cotangent(x):
    rng = np.random.default_rng(x.shape[-1])
    return rng.standard_normal(x.shape).astype(x.dtype)


def _close(dev, cpu, dtype, atol, what):
    dev = np.asarray(dev, np.float64)
    cpu = np.asarray(cpu, np.float64)
    np.testing.assert_allclose(dev, cpu, rtol=RTOL[dtype.name], atol=atol, err_msg=what)


def _vjp_scale(dx):
    d = np.asarray(dx, np.float64)
    return float(np.abs(d[np.isfinite(d)]).max(initial=0.0))


def _check_vjp(backend, name, x, residuals, args, what, s_max=0.0):
    """The VJP with the device's residuals against the CPU's with the same residuals. s_max:
    the largest |x / eps| where the CPU's softmax reads x / eps itself (its KL rank fast path;
    the devices take s relative to each block), whose rounding moves the CPU's weights by
    about s_max 2^-52 relative."""
    g = _cotangent(x)
    dx = backend.call(OP, name, g, x, *residuals, *args)
    ref = cpu_result(OP, name, g, x, *residuals, *args)
    # (a gradient of size 1 / eps may overflow the dtype: then on both)
    scale = _vjp_scale(ref)
    rel = max(1e-9 if x.dtype == np.float64 else 1e-5, 16 * s_max * 2.0 ** -52)
    _close(dx, ref, x.dtype, rel * scale, what)


# --- soft rank ----------------------------------------------------------------------------------

@on_backends(*DEVICES)
@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_soft_rank_extremes(backend, reg):
    @given(data=_device_rows(backend.simulated), descending=st.booleans())
    @_settings(backend)
    def check(data, descending):
        x, eps = data
        n = x.shape[1]
        what = f"rank {reg} desc={descending} eps={eps!r} x={x!r}"
        ranks, perm, ids = backend.call(OP, "soft_rank_rows", x, eps, reg, descending)
        r = np.asarray(ranks, np.float64)[0]
        assert np.all(np.isfinite(r)), what
        assert np.all((r >= 1.0) & (r <= n)), what
        xs = np.asarray(x[0], np.float64)
        bridge = n + 1.0 if reg == "l2" else math.log(max(n, 1)) + 1.0
        if _all_gaps_exceed(xs, eps, bridge):
            hard = _hard_ranks(-xs if descending else xs)
            _close(r, hard, x.dtype, 0.0, what + " (hard)")
        cpu = cpu_result(OP, "soft_rank_rows", x, eps, reg, descending)[0]
        _close(ranks, cpu, x.dtype, RTOL["float64"] * n, what)
        with np.errstate(over="ignore"):
            s_max = float(np.abs(xs).max() / eps)
        _check_vjp(backend, "soft_rank_vjp_rows", x, (ranks, perm, ids),
                   (eps, reg, descending), what + " vjp",
                   s_max=s_max if reg == "kl" and s_max <= 2.0 ** 40 else 0.0)

    check()


# --- soft top-k mask ----------------------------------------------------------------------------

@on_backends(*DEVICES)
def test_soft_top_k_mask_extremes(backend):
    @given(data=_device_rows(backend.simulated), kfrac=st.floats(0, 1))
    @_settings(backend)
    def check(data, kfrac):
        x, eps = data
        n = x.shape[1]
        k = round(kfrac * n)
        what = f"mask k={k} eps={eps!r} x={x!r}"
        mask, perm, ids = backend.call(OP, "soft_top_k_mask_rows", x, k, eps)
        m = np.asarray(mask, np.float64)[0]
        assert np.all(np.isfinite(m)), what
        assert np.all((m >= 0.0) & (m <= 1.0)), what
        assert abs(m.sum() - k) <= 1e-5 * n, what
        assert not np.any(np.signbit(m)), what
        xs = np.asarray(x[0], np.float64)
        if _all_gaps_exceed(xs, eps, 2.0):
            np.testing.assert_allclose(m, _hard_mask(xs, k), rtol=0, atol=1e-6, err_msg=what)
        cpu = cpu_result(OP, "soft_top_k_mask_rows", x, k, eps)[0]
        _close(mask, cpu, x.dtype, RTOL["float64"], what)
        _check_vjp(backend, "soft_top_k_mask_vjp_rows", x, (perm, ids), (eps,), what + " vjp")

    check()


# --- soft sort ----------------------------------------------------------------------------------

@on_backends(*DEVICES)
@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_soft_sort_extremes(backend, reg):
    @given(data=_device_rows(backend.simulated), descending=st.booleans())
    @_settings(backend)
    def check(data, descending):
        x, eps = data
        n = x.shape[1]
        what = f"sort {reg} desc={descending} eps={eps!r} x={x!r}"
        out, perm, ids = backend.call(OP, "soft_sort_rows", x, eps, reg, descending)
        assert out.dtype == x.dtype
        o = np.asarray(out, np.float64)[0]
        xs = np.asarray(x[0], np.float64)
        assert np.all(np.isfinite(o)), what
        asc = o[::-1] if descending else o
        assert np.all(np.diff(asc) >= 0), what
        if reg == "l2":
            assert np.all((o >= xs.min()) & (o <= xs.max())), what
        if not np.any((xs == 0) & np.signbit(xs)):
            assert not np.any((o == 0) & np.signbit(o)), what
        with np.errstate(over="ignore", invalid="ignore"):
            largest_gap = float(np.diff(np.sort(xs)).max()) if n > 1 else 0.0
        if largest_gap * eps < 0.5:  # no block pools: the sorted input, bit for bit
            hard = np.sort(x[0])[::-1] if descending else np.sort(x[0])
            assert np.array_equal(out[0], hard), what
        cpu = cpu_result(OP, "soft_sort_rows", x, eps, reg, descending)[0]
        with np.errstate(over="ignore"):
            scale = float(np.abs(xs).max())
        tiny = float(np.finfo(x.dtype).smallest_subnormal) * 2
        _close(out, cpu, x.dtype, RTOL["float64"] * scale + tiny, what)
        _check_vjp(backend, "soft_sort_vjp_rows", x, (perm, ids), (eps, reg, descending),
                   what + " vjp")

    check()


# --- the fixed cases of test_soft_extremes ------------------------------------------------------

@on_backends(*DEVICES)
@pytest.mark.parametrize("dtype, big", [("float64", 1e18), ("float64", 1e300),
                                        ("float32", 1e30), ("float32", 3e38)])
@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_huge_inputs_give_hard_ranks(backend, dtype, big, reg):
    x = (np.array([[3.0, -1.0, 2.0, 2.0, 0.0, -5.0]]) * (big / 5.0)).astype(dtype)
    np.testing.assert_array_equal(backend.call(OP, "soft_rank_rows", x, 1.0, reg, False)[0][0],
                                  _hard_ranks(x[0]))
    for k in (2, 3):
        np.testing.assert_array_equal(backend.call(OP, "soft_top_k_mask_rows", x, k, 1.0)[0][0],
                                      _hard_mask(x[0], k))


@on_backends(*DEVICES)
@pytest.mark.parametrize("eps", [1e-20, 1e-300])
@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tiny_eps_gives_hard_ops(backend, eps, reg, dtype):
    x = np.array([[5.0, 1.0, 2.0, 2.0, -0.0, 0.5, -7.0]], dtype=dtype)
    hard = _hard_ranks(x[0])
    np.testing.assert_array_equal(backend.call(OP, "soft_rank_rows", x, eps, reg, False)[0][0],
                                  hard)
    np.testing.assert_array_equal(backend.call(OP, "soft_rank_rows", x, eps, reg, True)[0][0],
                                  _hard_ranks(-x[0].astype(np.float64)))
    for k in (0, 3, 7):
        np.testing.assert_array_equal(backend.call(OP, "soft_top_k_mask_rows", x, k, eps)[0][0],
                                      _hard_mask(x[0], k))
    out = backend.call(OP, "soft_sort_rows", x, eps, reg, False)[0][0]
    np.testing.assert_array_equal(out, np.sort(x[0]))
    assert np.signbit(out[np.flatnonzero(out == 0)]).all()  # the input's -0.0 comes back


@on_backends(*DEVICES)
def test_kl_rank_at_moderate_extremes(backend):
    x = np.array([[1e15, -2e15, 3e15, 1e15]])
    np.testing.assert_array_equal(backend.call(OP, "soft_rank_rows", x, 1e-12, "kl", False)[0],
                                  [[2.5, 1.0, 4.0, 2.5]])


@on_backends(*DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_subnormals_sort_by_value(backend, dtype):
    """Subnormal inputs: ranks and masks at an eps of their size follow their order, soft
    sorts give them back sorted, bit for bit (the sort order of `sort` would tie them with
    zero, and a flush to zero would lose them)."""
    tiny = float(np.finfo(dtype).smallest_subnormal)
    x = (np.array([[3.0, -2.0, 0.0, 5.0, 1.0, -7.0, 6.0]]) * tiny * 1024).astype(dtype)
    xs = x[0].astype(np.float64)
    eps = max(tiny, 1e-300)
    if dtype == "float32":  # every gap >= 1024 eps: hard ranks and masks
        for reg in ("l2", "kl"):
            for descending in (False, True):
                r = backend.call(OP, "soft_rank_rows", x, eps, reg, descending)[0][0]
                np.testing.assert_array_equal(r, _hard_ranks(-xs if descending else xs))
        np.testing.assert_array_equal(backend.call(OP, "soft_top_k_mask_rows", x, 2, eps)[0][0],
                                      _hard_mask(x[0], 2))
    for reg in ("l2", "kl"):
        for descending in (False, True):
            out = backend.call(OP, "soft_sort_rows", x, 1.0, reg, descending)[0][0]
            hard = np.sort(x[0])[::-1] if descending else np.sort(x[0])
            np.testing.assert_array_equal(out.view(f"u{x.itemsize}"),
                                          hard.view(f"u{x.itemsize}"))


@on_backends(*DEVICES)
@pytest.mark.parametrize("n", [33, 1025])
def test_translation_in_the_fast_path(backend, n):
    """x + c with c / eps = 2^36 (inside the fast path): ranks and masks of x, the soft sort
    shifted by c, nothing of x / eps cancelling against itself (the outputs to float64
    rounding; the PAV decides its blocks on s - w rounded at ulp(2^36), so the mask may move
    by that much, on the CPU as on the devices, which agree to rounding)."""
    if backend.simulated and n > SIM_MAX_N:
        pytest.skip("a case the simulator leaves to the other backends")
    rng = np.random.default_rng(n)
    base = rng.standard_normal((1, n)) * 2.0 ** -4
    c = 2.0 ** 36
    x = base + c  # exact: |base| < 2^-1 keeps 2^-16 resolution, base is a multiple of 2^-16
    x = np.round(x * 2.0 ** 16) / 2.0 ** 16
    base = x - c  # exactly the data of x
    for reg in ("l2", "kl"):
        for descending in (False, True):
            r = backend.call(OP, "soft_rank_rows", x, 1.0, reg, descending)[0]
            ref = cpu_result(OP, "soft_rank_rows", base, 1.0, reg, descending)[0]
            np.testing.assert_allclose(r, ref, rtol=1e-12, atol=1e-12 * n)
            out = backend.call(OP, "soft_sort_rows", x, 1.0, reg, descending)[0]
            ref = cpu_result(OP, "soft_sort_rows", base, 1.0, reg, descending)[0] + c
            np.testing.assert_allclose(out, ref, rtol=0, atol=2.0 ** -16)
    for k in (1, n // 2):
        m = backend.call(OP, "soft_top_k_mask_rows", x, k, 1.0)[0]
        np.testing.assert_allclose(m, cpu_result(OP, "soft_top_k_mask_rows", x, k, 1.0)[0],
                                   rtol=0, atol=1e-12)
        ref = cpu_result(OP, "soft_top_k_mask_rows", base, k, 1.0)[0]
        np.testing.assert_allclose(m, ref, rtol=0, atol=2.0 ** -16)


@on_backends(*DEVICES)
@pytest.mark.parametrize("shift", [44, 48])
def test_fallback_pools_untied_values(backend, shift):
    """x / eps = 2^shift + O(1): past the fast path, with blocks of distinct values (rows 0, 1)
    and blocks that bridge gaps wider than one step of rho (row 2: runs of 4 ties 3 eps
    apart); the KL rank VJP takes s relative to each block (x / eps itself has no bits left
    for the softmax)."""
    rng = np.random.default_rng(shift)
    n = 33
    eps = 1e-3
    z = np.round(rng.standard_normal((3, n)) * 8.0) / 16.0
    z[2] = 3.0 * (np.arange(n) // 4)
    x = (2.0 ** shift + z) * eps
    x[1] = -x[1]
    g = _cotangent(x)
    for reg in ("l2", "kl"):
        for descending in (False, True):
            ranks, perm, ids = backend.call(OP, "soft_rank_rows", x, eps, reg, descending)
            assert np.all(ids.max(axis=1) < n - 1)  # some blocks pool
            np.testing.assert_allclose(ranks, cpu_result(OP, "soft_rank_rows", x, eps, reg,
                                                         descending)[0],
                                       rtol=1e-12, atol=1e-12 * n)
            dx = backend.call(OP, "soft_rank_vjp_rows", g, x, ranks, perm, ids, eps, reg,
                              descending)
            ref = cpu_result(OP, "soft_rank_vjp_rows", g, x, ranks, perm, ids, eps, reg,
                             descending)
            np.testing.assert_allclose(dx, ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())
    m = backend.call(OP, "soft_top_k_mask_rows", x, n // 2, eps)[0]
    np.testing.assert_allclose(m, cpu_result(OP, "soft_top_k_mask_rows", x, n // 2, eps)[0],
                               rtol=0, atol=1e-12)


@on_backends(*DEVICES)
@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_mixed_rows_in_one_batch(backend, reg):
    """Fast-path, fallback and non-finite rows side by side: each row as on its own."""
    rng = np.random.default_rng(7)
    # past the stage of the prep / finish kernels (simulator: 128 entries, else 2048): the
    # direct global-memory paths and the isotonic kernels' multi-tile rows
    n = 130 if backend.simulated else 2100
    x = rng.standard_normal((4, n))
    x[1] *= 1e200  # x / eps overflows: the fallback
    x[2, 5] = np.nan
    x[3] = np.round(x[3] * 3)  # ties
    for eps in (1e-3, 1.0):
        ranks, _, ids = backend.call(OP, "soft_rank_rows", x, eps, reg, False)
        cpu = cpu_result(OP, "soft_rank_rows", x, eps, reg, False)[0]
        np.testing.assert_allclose(ranks, cpu, rtol=1e-12, atol=1e-12 * n)
        assert np.all(ids[2] == 0)
        mask = backend.call(OP, "soft_top_k_mask_rows", x, n // 3, eps)[0]
        np.testing.assert_allclose(mask, cpu_result(OP, "soft_top_k_mask_rows", x, n // 3,
                                                    eps)[0], rtol=0, atol=1e-12)
