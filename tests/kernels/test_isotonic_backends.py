"""Isotonic regression (PAV) on every backend (the `backend` fixture, tests/_backends.py):
`isotonic_rows` and `isotonic_vjp_rows` against the float64 oracles of `sortgrad.testing`
(`reference_isotonic`, `reference_isotonic_vjp`, finite differences) and, on the device
backends, the CPU backend (float32 2e-6, float64 1e-12 of the data scale; block ids exactly,
except where KL block values of tied inputs tie only up to rounding).

Kernel paths: CuPy has a small kernel (a group of threads per row, shared memory) and a large
one (tiles of 2048 entries for L2, 1024 for KL; a global stack of persistent blocks: the
emulator has 2 SMs, so 8 of them); Numba stages a row's work arrays in shared memory or, past
its budget, in global scratch (`launch="global"`: a tiny shared budget and one scratch slot,
so blocks stride over the rows). On the simulator (and "numba-lowered") blocks have 32
threads of 4 entries, so 33 entries already span 9 threads and 4 merge levels.

Cases come in three tiers (`over_backends`): small rows everywhere, rows of thousands on every
backend but the simulator, the longest on real devices only.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
from _backends import CUPY, DEVICE, PUBLIC, cpu_result, on_backends, over_backends

from sortgrad.kernels import isotonic_regression, isotonic_regression_vjp
from sortgrad.kernels.isotonic import _cupy as iso_cupy
from sortgrad.testing import (
    finite_difference_jacobian,
    isotonic_inputs,
    reference_isotonic,
    reference_isotonic_vjp,
)

OP = "isotonic"
REGS = ["l2", "kl"]
DTYPES = [np.float32, np.float64]
# float32 results are float64 sums rounded once: a few float32 ulps of the data scale.
TOL = {np.float32: 2e-6, np.float64: 1e-12}
# Launch variants of the Numba kernels ("own": the backend's constants; the others apply to
# the Numba backends only).
LAUNCHES = {"own": {}, "global": {"BLOCK": 32, "CHUNK": 2, "SHARED_BYTES": 256,
                                  "SCRATCH_BYTES": 1}}


def _numba_launches_only(spec, launch, *rest):
    return launch == "own" or spec.kind == "numba"


def _launch(backend, launch):
    backend.configure(OP, numba=LAUNCHES[launch])


def inputs(seed, rows, n, dtype, regularization, kind="random", shared=False):
    """s (rows, n) and w ((1 if shared else rows), n)."""
    return isotonic_inputs(np.random.default_rng(seed), (rows, n), dtype, regularization, kind,
                           w_shape=(1, n) if shared else None)


def _scale(*arrays):
    return max([1.0] + [float(np.max(np.abs(a))) for a in arrays if a.size])


def close(actual, expected, dtype, *, scale=1.0, factor=1.0, what=""):
    tol = TOL[np.dtype(dtype).type] * factor
    scale = max(scale, _scale(np.asarray(expected)))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def assert_valid_blocks(sol, ids):
    """Ids 0, 1, ... from the left in +0/+1 steps; the solution constant within a block and
    non-increasing."""
    for sol_row, blk in zip(sol, ids):
        if blk.size == 0:
            continue
        assert blk[0] == 0
        steps = np.diff(blk)
        assert np.all((steps == 0) | (steps == 1))
        assert np.all(np.diff(sol_row)[steps == 0] == 0)
        assert np.all(np.diff(sol_row) <= 0)


def check_isotonic(backend, s, w, regularization, *, degenerate=False, oracle=None, seed=1,
                   oracle_rows=2, stream=None):
    """Forward: dtypes, shapes, valid blocks, the CPU backend (device backends), the oracle
    (rows of at most 1100 unless `oracle` says); VJP at the backend's block ids: the CPU
    backend and the oracle (`oracle_rows` rows). Returns (solution, block ids)."""
    dtype = s.dtype.type
    rows, n = s.shape
    sol, ids = backend.call(OP, "isotonic_rows", s, w, regularization, stream=stream)
    assert sol.dtype == dtype and ids.dtype == np.int32
    assert sol.shape == ids.shape == s.shape
    assert_valid_blocks(sol, ids)
    data = _scale(s, w)
    if backend.device:
        cpu_sol, cpu_ids = cpu_result(OP, "isotonic_rows", s, w, regularization)
        close(sol, cpu_sol, dtype, scale=data, what="solution vs CPU backend")
        if not degenerate:
            np.testing.assert_array_equal(ids, cpu_ids, err_msg="block ids vs CPU backend")
    wb = np.broadcast_to(w, s.shape)
    if oracle if oracle is not None else n <= 1100:
        for r in range(rows):
            ref_sol, ref_ids = reference_isotonic(s[r], wb[r], regularization)
            close(sol[r], ref_sol, dtype, scale=data, factor=2, what=f"row {r} vs oracle")
            if not degenerate:
                np.testing.assert_array_equal(ids[r], ref_ids, err_msg=f"row {r} vs oracle")
    g = np.random.default_rng(seed).normal(size=s.shape).astype(dtype)
    grad_s, grad_w = backend.call(OP, "isotonic_vjp_rows", g, s, w, ids, regularization,
                                  stream=stream)
    assert grad_s.dtype == grad_w.dtype == dtype and grad_s.shape == grad_w.shape == s.shape
    if backend.device:
        cpu_s, cpu_w = cpu_result(OP, "isotonic_vjp_rows", g, s, w, ids, regularization)
        close(grad_s, cpu_s, dtype, scale=_scale(g), factor=4, what="grad_s vs CPU backend")
        close(grad_w, cpu_w, dtype, scale=_scale(g), factor=4, what="grad_w vs CPU backend")
    for r in range(min(oracle_rows, rows) if n <= 1100 else 0):
        ref_s, ref_w = reference_isotonic_vjp(g[r], s[r], wb[r], ids[r], regularization)
        close(grad_s[r], ref_s, dtype, scale=_scale(g), factor=4, what="grad_s vs oracle")
        close(grad_w[r], ref_w, dtype, scale=_scale(g), factor=4, what="grad_w vs oracle")
    return sol, ids


# --- forward and VJP over sizes, dtypes, shared w -----------------------------------------------

VARIANTS = [(np.float32, False), (np.float64, False), (np.float32, True), (np.float64, True)]


def _numba_cases(sizes):
    """(launch, rows, n, kind, dtype, shared) of the Numba files: (simulator subset, rest)."""
    sim, rest = [], []
    for launch in ("own", "global"):
        for n in sizes:
            for dtype, shared in VARIANTS:
                case = (launch, 1 if n > 5000 else 2 if n > 40 else 3, n,
                        "sorted" if n > 1000 else "random", dtype, shared)
                # the simulator: the global-scratch path on two multi-chunk sizes, float64
                # with a shared w once
                skip = ((dtype, shared) == (np.float64, True) and n != 33
                        or launch == "global" and (n not in (33, 100) or shared)
                        or n == 32 and dtype == np.float64)
                (rest if skip else sim).append(case)
    return sim, rest


_SIM, _REST = _numba_cases([0, 1, 31, 32, 33, 100])
_, _NUMBA_GPU = _numba_cases([1023, 1025, 4097, 70_001])
# the CuPy files: 3 rows around the group sizes and the tiles, w per row and shared
_CUPY_EMU = [("own", 3, n, "random", dtype, shared)
             for n in [0, 1, 2, 7, 31, 32, 33, 100, 1023, 1025, 2049, 4097]
             for dtype in DTYPES for shared in (False, True)]
_CUPY_GPU = [("own", 2 if n > 5000 else 5, n, "random", dtype, shared)
             for n in [0, 1, 31, 32, 33, 1023, 1025, 4097, 65536]
             for dtype in DTYPES for shared in (False, True)]


@over_backends("launch,rows,n,kind,dtype,shared", simulator=_SIM, emulator=_REST + _CUPY_EMU,
               gpu=_NUMBA_GPU + _CUPY_GPU, where=_numba_launches_only)
@pytest.mark.parametrize("regularization", REGS)
def test_isotonic_rows(backend, launch, rows, n, kind, dtype, shared, regularization):
    _launch(backend, launch)
    s, w = inputs(n + 7 * shared, rows, n, dtype, regularization, kind, shared)
    check_isotonic(backend, s, w, regularization)


@over_backends("rows,n", emulator=[(2, 33), (2, 1025), (2, 4097)], gpu=[(3, 65536)])
@pytest.mark.parametrize("kind", ["sorted", "ties", "flat_then_jump", "ramp", "large_range"])
@pytest.mark.parametrize("regularization", REGS)
def test_isotonic_kinds(backend, rows, n, kind, regularization):
    """The soft-op setting (sorted s, shared w = rho or log rho), heavy ties, n - 1 equal
    singletons then one pool through all of them, one pool of everything, KL exponents far
    beyond exp's range."""
    for dtype in DTYPES:
        s, w = inputs(0, rows, n, dtype, regularization, kind, shared=kind == "sorted")
        check_isotonic(backend, s, w, regularization,
                       degenerate=kind == "ties" and regularization == "kl")


ROW_SHAPES = [(reg, kind) for reg in REGS
              for kind in ["ties", "increasing", "decreasing", "constant", "staircase", "sorted"]
              if reg == "l2" or kind not in ("decreasing", "constant")]


@over_backends("regularization,kind,n", simulator=[(r, k, 70) for r, k in ROW_SHAPES],
               emulator=[(r, k, 3001) for r, k in ROW_SHAPES])
def test_isotonic_row_shapes(backend, regularization, kind, n):
    """Rows that pool everything, nothing, ties, or a long stack at the last merge."""
    s, w = inputs(2, 2, n, np.float64, regularization, kind)
    # small-integer L2 means are exact, so the pooling decisions are the CPU's; KL block
    # values of tied inputs are equal only up to rounding
    _, blocks = check_isotonic(backend, s, w, regularization,
                               degenerate=kind == "ties" and regularization == "kl")
    if kind == "increasing" or (kind == "staircase" and regularization == "l2"):
        assert np.all(blocks == 0)
    if kind == "constant":  # equal neighbours pool
        assert np.all(blocks == 0)
    if kind == "decreasing":
        np.testing.assert_array_equal(blocks, np.broadcast_to(np.arange(n), s.shape))


@over_backends("regularization", emulator=REGS)
def test_isotonic_long_rows(backend, regularization):
    """Many tiles per row, more rows than persistent blocks (rows reuse scratch slots)."""
    for kind in ("random", "sorted", "flat_then_jump"):
        s, w = inputs(0, 10, 20000 if kind == "random" else 9000, np.float32, regularization,
                      kind, shared=kind == "sorted")
        check_isotonic(backend, s, w, regularization, oracle=False)


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_multi_level_merges(backend, regularization, chunk):
    """One or a few entries per Numba thread: every pooling happens in the tree merges."""
    backend.configure(OP, numba={"BLOCK": 32, "CHUNK": chunk})
    for n in (17, 90):
        s, w = inputs(chunk + n, 2, n, np.float32, regularization)
        check_isotonic(backend, s, w, regularization)


def test_many_rows_per_block(backend):
    """Rows shorter than a warp: several rows per block, idle groups in the last block."""
    for n in (3, 9):
        s, w = inputs(12 + n, 21, n, np.float32, "l2")
        check_isotonic(backend, s, w, "l2")


# --- kinks: equal neighbouring blocks pool (DESIGN.md "Kinks": the pooled side) -----------------
# Before, only strict violations pooled and every row below came out in finer blocks.

# y = s - w per row, and the block ids: equal neighbours pool, also when the equality appears
# only after a pool ([1, 3, 2]: 1 and 3 pool to 2, equal to the next 2)
_L2_KINKS = [([2.0, 2.0, 2.0, 2.0, 2.0], [0, 0, 0, 0, 0]),
             ([1.0, 3.0, 2.0, 0.0, 0.0], [0, 0, 0, 1, 1]),
             ([2.0, 0.0, 2.0, 1.0, -1.0], [0, 1, 1, 1, 2]),
             ([3.0, 1.0, 2.0, 0.0, -1.0], [0, 1, 1, 2, 3])]  # no equality: unchanged


@pytest.mark.parametrize("dtype", DTYPES)
def test_l2_equal_neighbours_pool(backend, dtype):
    rng = np.random.default_rng(31)
    y = np.array([row for row, _ in _L2_KINKS])
    w = rng.integers(-4, 5, size=y.shape).astype(dtype)  # small integers: exact s - w
    s = (y + w).astype(dtype)
    _, ids = check_isotonic(backend, s, w, "l2")
    np.testing.assert_array_equal(ids, [blocks for _, blocks in _L2_KINKS])


@pytest.mark.parametrize("spread", ["linear", "shifted"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_equal_neighbours_pool(backend, spread, dtype):
    """KL on both CPU paths (spread of exponents below / above LINEAR_KL_SPREAD): equal
    singletons s - w pool (linear: equal products of the sums), and w = s (every block value
    exactly 0) is one block."""
    top = 3.0 if spread == "linear" else 700.0  # 700 - (-200) > 600: the shifted sums
    s = np.array([[top, top, 1.0, 0.0, 0.0, -1.0],
                  [top, top, -100.0, -200.0, -200.0, -200.0]])
    s = s[:1] if spread == "linear" else s[1:]
    w = np.zeros_like(s)
    rng = np.random.default_rng(32)
    s2 = -np.sort(-rng.normal(size=(2, 6)) * (1.0 if spread == "linear" else 400.0), axis=-1)
    s, w = np.concatenate([s, s2]).astype(dtype), np.concatenate([w, s2]).astype(dtype)
    sol, ids = check_isotonic(backend, s, w, "kl")
    np.testing.assert_array_equal(ids, [[0, 0, 1, 2, 2, 3] if spread == "linear"
                                        else [0, 0, 1, 2, 2, 2], [0] * 6, [0] * 6])
    np.testing.assert_allclose(sol[1:], 0.0, atol=1e-12)


@over_backends("n", simulator=[33, 70], emulator=[1025, 3001, 5000])
@pytest.mark.parametrize("regularization", REGS)
def test_equal_neighbours_pool_across_chunks(backend, n, regularization):
    """Long rows: the equalities sit across thread chunks, tree-merge levels and (CuPy) tiles.
    Row 0: w = s (every block value exactly 0): one block. Row 1 (L2): groups y = c + (1, 3, 2)
    (a pool, then an equality) with c falling by 10: blocks of 3. Row 1 (KL): runs of 1 to 5
    entries with w = s - d, d falling per run (every value of a run exactly d: the shifted
    copies that `kl_value` keeps exact; the spread > 600 takes the shifted sums on the CPU)."""
    rng = np.random.default_rng(n)
    s0 = -np.sort(-rng.normal(size=n) * 3)
    if regularization == "l2":
        y = (np.tile([1.0, 3.0, 2.0], -(-n // 3))[:n] - 10.0 * (np.arange(n) // 3))
        s1, w1 = y + 1.0, np.ones(n)
        expected = np.arange(n) // 3
    else:
        lengths = rng.integers(1, 6, size=n)
        run = np.repeat(np.arange(n), lengths)[:n]
        s1 = rng.integers(-300, 300, size=n).astype(float)
        w1 = s1 - (1000.0 - 2.0 * run)
        expected = run
    s, w = np.stack([s0, s1]), np.stack([s0, w1])
    _, ids = check_isotonic(backend, s, w, regularization, oracle=n <= 3001)
    np.testing.assert_array_equal(ids[0], 0)
    np.testing.assert_array_equal(ids[1], expected)


# --- KL range, NaNs --------------------------------------------------------------------------------

@over_backends("launch,spread", simulator=[(launch, spread) for launch in LAUNCHES
                                           for spread in ("linear", "shifted")],
               where=_numba_launches_only)
def test_kl_dynamic_range(backend, launch, spread):
    """KL on linear sums (spread < 600) and on max-shifted sums (spread >> 700), as the CPU."""
    _launch(backend, launch)
    rng = np.random.default_rng(5)
    n = 40
    scale = 800.0 if spread == "shifted" else 40.0
    s = -np.sort(-rng.normal(size=(2, n)) * scale, axis=-1)
    s[:, 10:14] = s[:, 10:11] - np.array([5.0, 0.0, 3.0, 1.0])  # violations to pool
    s[:, 30:] = s[:, 30:31] + rng.normal(size=(2, n - 30))
    w = np.broadcast_to(np.log(np.arange(n, 0, -1.0)), s.shape).copy()
    sol, blocks = check_isotonic(backend, s, w, "kl")
    assert np.all(np.isfinite(sol))
    assert blocks[0, -1] < n - 1, "the rows should pool somewhere"
    gs, gw = backend.call(OP, "isotonic_vjp_rows", rng.normal(size=s.shape), s, w, blocks, "kl")
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gw))


@pytest.mark.parametrize("regularization", REGS)
def test_kl_equal_block_values_stay_monotone(backend, regularization):
    """Blocks equal in exact arithmetic must not come out increasing after rounding."""
    s = np.array([[1.0, 1.0, 2.0] * 11])
    w = np.array([[0.0, 1.0, 0.0] * 11])
    sol, _ = check_isotonic(backend, s, w, regularization, degenerate=True)
    assert np.all(np.diff(sol) <= 0)


@over_backends("n", simulator=[20], emulator=[50, 3000])
@pytest.mark.parametrize("regularization", REGS)
def test_nan_row_is_isolated(backend, n, regularization):
    """A NaN makes its own row unspecified, never another row's, and the kernels finish."""
    s, w = inputs(4 + n, 3, n, np.float64, regularization)
    clean_sol, clean_ids = backend.call(OP, "isotonic_rows", s, w, regularization)
    s[1, n // 2] = np.nan
    sol, ids = backend.call(OP, "isotonic_rows", s, w, regularization)
    np.testing.assert_array_equal(sol[[0, 2]], clean_sol[[0, 2]])
    np.testing.assert_array_equal(ids[[0, 2]], clean_ids[[0, 2]])
    cpu_sol, cpu_ids = cpu_result(OP, "isotonic_rows", s, w, regularization)
    for r in (0, 2):
        close(sol[r], cpu_sol[r], np.float64, what="clean row")
        np.testing.assert_array_equal(ids[r], cpu_ids[r])


# --- float32 subnormals (CuPy compiles with -ftz=true) --------------------------------------------
# The CuPy kernels widen float32 through its bits and narrow float64 results the same way
# (sortgrad_float.cuh), so subnormal float32 data gives the CPU backend's bits. On a GPU this
# guards against -ftz=true flushing them (test_cuda_compile.py checks the PTX for that); the
# emulator does not flush, there it guards the conversions themselves. Data: integers k times
# 2^-149 with |k| < 2^24 (subnormals and the lowest normal binade), so float64 sums are exact
# in any order and every result is one correctly rounded division, the same on both backends.

ULP = 2.0 ** -149  # the smallest float32 subnormal


def _tiny(k):
    k = np.asarray(k, dtype=np.int64)
    assert np.all(np.abs(k) < 2 ** 24)
    return (k * ULP).astype(np.float32)


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _is_subnormal(a):
    return (a != 0) & (np.abs(a) < np.finfo(np.float32).tiny)


def _subnormal_inputs(rng, rows, n, regularization, shared):
    """L2: a falling trend plus noise (plenty of pooling); KL: s - w strictly decreasing (no
    pooling: a KL pool's log-sum-exp is rounded differently on the two backends; exp(s - max)
    == 1 for all entries, so the CPU's linear PAV must compare the singletons by s - w, not by
    the products of exponentials, which are all equal and would pool everything)."""
    w_rows = 1 if shared else rows
    k_w = rng.integers(-2 ** 20, 2 ** 20, size=(w_rows, n))
    if regularization == "l2":
        trend = np.linspace(2 ** 23, -2 ** 23, n).round().astype(np.int64)
        k_s = trend + rng.integers(-2 ** 21, 2 ** 21, size=(rows, n))
    else:
        k_y = np.stack([-np.sort(-rng.choice(2 ** 23, size=n, replace=False)) - 2 ** 22
                        for _ in range(rows)])
        k_s = k_y + k_w
    k_s[k_s == 0] = 1  # no -0.0 anywhere, and no +0.0 in s: zeros come from the arithmetic
    return _tiny(k_s), _tiny(k_w)


def _run_ids(rng, rows, n):
    """Runs of equal ids (1 to a few entries) for the VJP."""
    return (np.cumsum(rng.random((rows, n)) < 0.4, axis=1)).astype(np.int32)


def _check_bits_vs_cpu(backend, function, *args):
    got = backend.call(OP, function, *args)
    ref = cpu_result(OP, function, *args)
    for what, g, r in zip(("first", "second"), got, ref):
        if r.dtype == np.float32:
            mismatch = np.flatnonzero(_bits(g) != _bits(r))
            assert mismatch.size == 0, (
                f"{function}: {mismatch.size} float32 results differ from the CPU's bits, "
                f"e.g. at {mismatch[:5]}: {g.ravel()[mismatch[:5]]} vs {r.ravel()[mismatch[:5]]}")
        else:
            np.testing.assert_array_equal(g, r, err_msg=f"{function}: {what} output vs CPU")
    return got


@over_backends("n,shared", emulator=[(33, False), (100, True), (3000, False), (3000, True)],
               gpu=[(70_001, False)], backends=CUPY)
@pytest.mark.parametrize("regularization", REGS)
def test_float32_subnormals_match_cpu_bits(backend, n, shared, regularization):
    """Subnormal float32 input: the solution, the block ids and the VJP are the CPU backend's,
    bit for bit (small and large kernels)."""
    rng = np.random.default_rng(n + 3 * shared)
    rows = 2 if n > 5000 else 3
    s, w = _subnormal_inputs(rng, rows, n, regularization, shared)
    assert _is_subnormal(s).mean() > 0.3
    sol, ids = _check_bits_vs_cpu(backend, "isotonic_rows", s, w, regularization)
    assert _is_subnormal(sol).any()
    if regularization == "kl":
        np.testing.assert_array_equal(ids, np.broadcast_to(np.arange(n), ids.shape))
    else:
        assert ids[:, -1].max() < n - 1, "the rows should pool"
    g = _tiny(rng.integers(-2 ** 22, 2 ** 22, size=(rows, n)))
    run_ids = _run_ids(rng, rows, n)
    for blocks in (ids, run_ids):
        gs, gw = _check_bits_vs_cpu(backend, "isotonic_vjp_rows", g, s, w, blocks,
                                    regularization)
        assert _is_subnormal(gs).any() and _is_subnormal(gw).any()


@on_backends(*CUPY)
def test_float32_subnormal_rounding(backend):
    """L2: pooled means of subnormals round half to even, into the smallest normal, to -0.0
    below zero; -0.0 and +-inf pass through."""
    regularization = "l2"

    def u(*k):
        return [kk * ULP for kk in k]
    s = np.array([[np.inf] + u(3) + [-0.0] + u(-1, -5, -6, -7, -8, -9, -10, -11) + [-np.inf],
                  u(2 ** 23 - 1, 2 ** 23, 2, 3, 0, 1, -1, 0, -2, -1, -4, -3)], np.float32)
    w = np.zeros_like(s)
    w[0, 1] = ULP
    sol, ids = _check_bits_vs_cpu(backend, "isotonic_rows", s, w, regularization)
    expected = np.array([[np.inf] + u(2) + [-0.0] + u(-1, -5, -6, -7, -8, -9, -10, -11)
                         + [-np.inf],
                         u(2 ** 23, 2 ** 23, 2, 2, 0, 0) + [-0.0, -0.0] + u(-2, -2, -4, -4)],
                        np.float32)
    np.testing.assert_array_equal(_bits(sol), _bits(expected))
    assert _bits(sol)[1, 0] == 0x00800000  # the smallest normal
    np.testing.assert_array_equal(ids, [np.arange(12), np.arange(12) // 2])
    g = _tiny([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
               [2 ** 23 - 1, 2 ** 23, 5, 6, -1, 0, 1, 2, -3, -2, 7, 8]])
    gs, gw = _check_bits_vs_cpu(backend, "isotonic_vjp_rows", g, s, w, ids, regularization)
    np.testing.assert_array_equal(_bits(gs[0]), _bits(g[0]))
    np.testing.assert_array_equal(_bits(gs[1]), _bits(np.float32(
        u(2 ** 23, 2 ** 23, 6, 6) + [-0.0, -0.0] + u(2, 2, -2, -2, 8, 8))))
    np.testing.assert_array_equal(_bits(gw), _bits(-gs))


# --- VJP ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("regularization", REGS)
def test_vjp_matches_oracle_and_finite_differences(backend, regularization):
    """float64, tiny rows: the VJP at the backend's blocks against the oracle's VJP and against
    central differences of the oracle's solution."""
    rng = np.random.default_rng(9)
    n = 10
    s, w = isotonic_inputs(rng, (2, n), np.float64, regularization)
    g = rng.normal(size=s.shape)
    _, blocks = backend.call(OP, "isotonic_rows", s, w, regularization)
    assert blocks.max() < n - 1, "the inputs should pool somewhere"
    gs, gw = backend.call(OP, "isotonic_vjp_rows", g, s, w, blocks, regularization)
    for r in range(2):
        ref_s, ref_w = reference_isotonic_vjp(g[r], s[r], w[r], blocks[r], regularization)
        np.testing.assert_allclose(gs[r], ref_s, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gw[r], ref_w, rtol=1e-12, atol=1e-12)

        def f_s(v, r=r):
            return g[r] @ reference_isotonic(v, w[r], regularization)[0]

        def f_w(v, r=r):
            return g[r] @ reference_isotonic(s[r], v, regularization)[0]
        np.testing.assert_allclose(gs[r], finite_difference_jacobian(f_s, s[r], 1e-6),
                                   rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(gw[r], finite_difference_jacobian(f_w, w[r], 1e-6),
                                   rtol=1e-6, atol=1e-7)


@over_backends("ids_kind,n", simulator=[("runs", 45)], emulator=[("random", 40), ("random", 3000)])
@pytest.mark.parametrize("regularization", REGS)
def test_vjp_reads_runs_of_equal_ids(backend, ids_kind, n, regularization):
    """The VJP reads runs of equal ids, never ids as indices: any int32 ids are memory-safe and
    give what the CPU and the oracle give (blocks = maximal runs of equal ids)."""
    rng = np.random.default_rng(13 if ids_kind == "runs" else 3)
    s, w = isotonic_inputs(rng, (2, n), np.float64, regularization)
    g = rng.normal(size=s.shape)
    if ids_kind == "runs":
        ids = np.repeat(np.array([7, -3, 2**31 - 1, 7, 0, -2**31, 5, 5, 9], np.int32), 5)
        ids = np.stack([ids, ids[::-1]]).copy()
    else:
        ids = rng.integers(-2 ** 31, 2 ** 31 - 1, size=(2, n)).astype(np.int32)
        ids[:, 5:9] = 7  # one longer run
    gs, gw = backend.call(OP, "isotonic_vjp_rows", g, s, w, ids, regularization)
    ref = cpu_result(OP, "isotonic_vjp_rows", g, s, w, ids, regularization)
    np.testing.assert_allclose(gs, ref[0], rtol=1e-12, atol=1e-12 * _scale(g))
    np.testing.assert_allclose(gw, ref[1], rtol=1e-12, atol=1e-12 * _scale(g))
    for r in range(2):
        ref_s, ref_w = reference_isotonic_vjp(g[r], s[r], w[r], ids[r], regularization)
        close(gs[r], ref_s, np.float64, scale=_scale(g), factor=4, what="grad_s vs oracle")
        close(gw[r], ref_w, np.float64, scale=_scale(g), factor=4, what="grad_w vs oracle")


def test_vjp_kl_is_max_shifted(backend):
    s = np.array([[1000.0, 1001.0, 999.0]])
    w = np.array([[-800.0, -799.0, -801.0]])
    _, blocks = backend.call(OP, "isotonic_rows", s, w, "kl")
    gs, gw = backend.call(OP, "isotonic_vjp_rows", np.array([[1.0, 2.0, 3.0]]), s, w, blocks,
                          "kl")
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gw))


# --- out= (the row-function protocol), streams ----------------------------------------------------

@over_backends("launch,rows,n,shared",
               simulator=[(launch, 3, n, False) for launch in LAUNCHES for n in (0, 33)],
               emulator=[("own", 3, n, True) for n in (0, 100, 3000)],  # small, large kernels
               gpu=[("own", 8, n, True) for n in (100, 5000)], where=_numba_launches_only)
@pytest.mark.parametrize("regularization", REGS)
def test_isotonic_out(backend, launch, rows, n, shared, regularization):
    """out=, on a stream: the kernels write the given arrays (pre-filled with a byte pattern)
    and return those objects, with the results of out=None (shared and global work arrays)."""
    _launch(backend, launch)
    s, w = inputs(n + 40, rows, n, np.float64, regularization, shared=shared)
    g = np.random.default_rng(n + 41).normal(size=s.shape)
    stream = backend.streams()[0]
    _, ids = backend.check_out(OP, "isotonic_rows", s, w, regularization, stream=stream)
    backend.check_out(OP, "isotonic_vjp_rows", g, s, w, ids, regularization, stream=stream)


def test_row_functions_take_out_and_stream_by_keyword(backend):
    module = backend.module(OP)
    for fn in (module.isotonic_rows, module.isotonic_vjp_rows):
        params = inspect.signature(fn).parameters
        for name in ("out", "stream") if backend.device else ("out",):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (fn.__name__, name)
            assert params[name].default is None


@over_backends("rows,n", simulator=[(3, 20)], gpu=[(64, 5000)], backends=DEVICE)
@pytest.mark.parametrize("regularization", REGS)
def test_isotonic_on_streams(backend, rows, n, regularization):
    """The row functions run on the given stream (CuPy: a Stream and its raw handle) and leave
    the inputs untouched (`Backend.call` checks)."""
    s, w = inputs(6, rows, n, np.float64, regularization, shared=True)
    for stream in backend.streams():
        _, ids = check_isotonic(backend, s, w, regularization, stream=stream, oracle_rows=1)
        g = np.ones_like(s)
        gs, _ = backend.call(OP, "isotonic_vjp_rows", g, s, w, ids, regularization,
                             stream=stream)
        # a block's grad_s sums to the block's sum of g (here its size), whatever the reg
        assert math.isclose(float(gs.sum()), float(g.sum()), rel_tol=1e-9)


# --- the public API with backend arrays ----------------------------------------------------------

@over_backends("shape,w_kind,regularization,explicit",
               simulator=[((2, 3, 17), "full", "l2", True), ((2, 3, 17), "shared", "kl", False)],
               gpu=[(shape, "shared", reg, False) for shape in [(1500, 3000), (4, 7, 300),
                                                                (3000, 17)] for reg in REGS],
               backends=PUBLIC)
def test_public_api(backend, shape, w_kind, regularization, explicit):
    """Backend arrays in, backend arrays out (batch shapes through the public reshape; w per
    row or one shared row); the backend named or followed; inputs untouched."""
    name = backend.kind if explicit else None
    s, w = isotonic_inputs(np.random.default_rng(14), shape, np.float32, regularization)
    if w_kind == "shared":
        w = w.reshape(-1, shape[-1])[-1].copy()
    s_dev, w_dev = backend.to_backend(s), backend.to_backend(w)
    sol, blocks = isotonic_regression(s_dev, w_dev, regularization=regularization, backend=name)
    assert backend.is_native(sol) and backend.is_native(blocks)
    assert sol.shape == blocks.shape == shape
    sol, blocks_host = backend.to_host(sol), backend.to_host(blocks)
    ref_sol, ref_blocks = isotonic_regression(s, w, regularization=regularization)
    close(sol, ref_sol, np.float32, scale=_scale(s, w))
    np.testing.assert_array_equal(blocks_host, ref_blocks)
    if shape[-1] <= 40:
        wb = np.broadcast_to(w, shape).reshape(-1, shape[-1])
        for r, row in enumerate(s.reshape(-1, shape[-1])):
            close(sol.reshape(-1, shape[-1])[r], reference_isotonic(row, wb[r], regularization)[0],
                  np.float32, scale=_scale(s, w), factor=2)
    g = np.random.default_rng(15).normal(size=shape).astype(np.float32)
    gs, gw = isotonic_regression_vjp(backend.to_backend(g), s_dev, w_dev, blocks,
                                     regularization=regularization, backend=name)
    assert backend.is_native(gs) and gs.shape == gw.shape == shape
    ref_gs, ref_gw = isotonic_regression_vjp(g, s, w, ref_blocks, regularization=regularization)
    close(backend.to_host(gs), ref_gs, np.float32, scale=_scale(g), factor=4)
    close(backend.to_host(gw), ref_gw, np.float32, scale=_scale(g), factor=4)
    np.testing.assert_array_equal(backend.to_host(s_dev), s)  # inputs untouched
    np.testing.assert_array_equal(backend.to_host(w_dev), w)


@over_backends("shape", simulator=[(0,), (3, 0), (0, 5)], backends=PUBLIC)
def test_public_api_empty(backend, shape):
    s = backend.to_backend(np.zeros(shape))
    sol, blocks = isotonic_regression(s, s, regularization="l2", backend=backend.kind)
    assert sol.shape == blocks.shape == shape and blocks.dtype == np.int32
    gs, gw = isotonic_regression_vjp(s, s, s, blocks, regularization="kl", backend=backend.kind)
    assert gs.shape == gw.shape == shape


# --- backend-specific: the CuPy launch plans ----------------------------------------------------

@pytest.mark.parametrize("regularization", REGS)
def test_cupy_plans(regularization):
    """Group sizes and the small/large split (pure shape arithmetic, no kernel)."""
    items = iso_cupy.ITEMS[regularization]
    tile = iso_cupy.BLOCK * items
    assert iso_cupy.plan(5, 1, regularization, 132, 8) == ("small", 1, 1)
    assert iso_cupy.plan(1000, items + 1, regularization, 132, 8) == ("small", 8, 2)
    assert iso_cupy.plan(3, tile, regularization, 132, 8) == ("small", 3, iso_cupy.BLOCK)
    kind, grid, blocks = iso_cupy.plan(10_000, tile + 1, regularization, 132, 8)
    assert (kind, grid, blocks) == ("large", 132 * iso_cupy.BLOCKS_PER_SM,
                                    132 * iso_cupy.BLOCKS_PER_SM)
    assert iso_cupy.plan(2, 10 ** 9, regularization, 132, 32)[1:] == (1, 1)  # scratch budget
