"""The CuPy isotonic-regression kernels (sortgrad/kernels/isotonic/isotonic.cu + _cupy.py).

Two ways to run them, one set of checks:
  * on a GPU (marker `gpu`, skipped without CuPy and a device): through the public entry points
    `isotonic_regression(cupy_array, ...)` / `isotonic_regression_vjp`, against the CPU backend
    and the float64 oracle `sortgrad.testing.reference_isotonic`;
  * without a GPU: the same .cu compiled as C++ with g++ against the host emulator
    (tests/_emulation: `sortgrad_emulation.cuh`, every CUDA thread a fiber; barriers and warp
    collectives emulated, missing barriers show up as wrong results; `cuda_host.py`, the
    runner), launched by the real launch code of `_cupy.py` (plans, argument lists) through
    `cupy_loader`'s hooks, with NumPy arrays as device memory.
Both cover the small (group per row, shared memory) and the large (tiled, global stack)
kernels: a tile is 2048 entries for L2 and 1024 for KL.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _emulation import cuda_host

from sortgrad.kernels import isotonic_regression, isotonic_regression_vjp
from sortgrad.kernels.isotonic import _cupy
from sortgrad.testing import reference_isotonic, reference_isotonic_vjp

REGS = ["l2", "kl"]
DTYPES = [np.float32, np.float64]
TOL = {np.float32: 2e-6, np.float64: 1e-12}


# --- inputs and checks (shared by the GPU and the emulated runs) ---------------------------

def _inputs(rng, rows, n, dtype, regularization, kind, shared):
    """s (rows, n) and w ((1 if shared else rows), n)."""
    wr = 1 if shared else rows
    if kind == "random":
        s, w = rng.normal(size=(rows, n)) * 3, rng.normal(size=(wr, n))
    elif kind == "sorted":  # the soft-op setting: s sorted descending, w = rho or log rho
        s = -np.sort(-rng.normal(size=(rows, n)) * max(n, 1) / 4, axis=-1)
        rho = np.arange(n, 0, -1, dtype=np.float64)
        w = np.broadcast_to(rho if regularization == "l2" else np.log(rho), (wr, n))
    elif kind == "ties":  # small integers: heavy ties, equal neighbouring blocks
        s = rng.integers(0, 3, size=(rows, n)).astype(float)
        w = rng.integers(0, 2, size=(wr, n)).astype(float)
    elif kind == "flat_then_jump":  # n - 1 equal singletons, then one pool through all of them
        s, w = np.zeros((rows, n)), np.zeros((wr, n))
        if n:
            s[:, -1] = 1.0
    elif kind == "increasing":  # everything pools into one block
        s, w = np.tile(np.arange(n, dtype=float), (rows, 1)), np.zeros((wr, n))
    elif kind == "large_range":  # KL exponents far beyond exp's range
        s, w = rng.normal(size=(rows, n)) * 300, rng.normal(size=(wr, n)) * 300
    else:
        raise ValueError(kind)
    return (np.ascontiguousarray(s, dtype=dtype), np.ascontiguousarray(w, dtype=dtype))


def _assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    scale = max([1.0] + [float(np.max(np.abs(expected)))] if expected.size else [1.0])
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def _assert_valid_blocks(sol, ids):
    """ids 0, 1, ... from the left in +0/+1 steps; solution constant within a block and
    non-increasing."""
    for sol_row, blk in zip(sol, ids):
        if blk.size == 0:
            continue
        assert blk[0] == 0
        steps = np.diff(blk)
        assert np.all((steps == 0) | (steps == 1))
        assert np.all(np.diff(sol_row)[steps == 0] == 0)
        assert np.all(np.diff(sol_row) <= 0)


def _check_forward(run, rows, n, dtype, regularization, kind, shared, seed=0, oracle=None):
    """`run(s, w, regularization)` -> host (solution, block_ids) of the kernel under test.
    Returns the inputs and the kernel's ids for the VJP check."""
    rng = np.random.default_rng(seed)
    s, w = _inputs(rng, rows, n, dtype, regularization, kind, shared)
    sol, ids = run(s, w, regularization)
    assert sol.dtype == dtype and ids.dtype == np.int32
    assert sol.shape == ids.shape == (rows, n)
    cpu_sol, cpu_ids = isotonic_regression(s, w[0] if shared else w,
                                           regularization=regularization)
    _assert_close(sol, cpu_sol, dtype, "solution vs CPU backend")
    _assert_valid_blocks(sol, ids)
    degenerate = kind == "ties" and regularization == "kl"  # block values tie to rounding
    if not degenerate:
        np.testing.assert_array_equal(ids, cpu_ids, err_msg="block ids vs CPU backend")
    if oracle if oracle is not None else n <= 1100:
        wb = np.broadcast_to(w, s.shape)
        for r in range(rows):
            ref_sol, ref_ids = reference_isotonic(s[r].astype(np.float64),
                                                  wb[r].astype(np.float64), regularization)
            _assert_close(sol[r], ref_sol, dtype, f"row {r} vs oracle")
            if not degenerate:
                np.testing.assert_array_equal(ids[r], ref_ids)
    return s, w, ids


def _check_vjp(run_vjp, s, w, ids, regularization, seed=1, oracle_rows=2):
    """`run_vjp(g, s, w, ids, regularization)` -> host (grad_s, grad_w)."""
    dtype = s.dtype.type
    shared = w.shape[0] == 1 and s.shape[0] != 1
    g = np.random.default_rng(seed).normal(size=s.shape).astype(dtype)
    grad_s, grad_w = run_vjp(g, s, w, ids, regularization)
    assert grad_s.dtype == grad_w.dtype == dtype and grad_s.shape == grad_w.shape == s.shape
    cpu_s, cpu_w = isotonic_regression_vjp(g, s, w[0] if shared else w, ids,
                                           regularization=regularization)
    _assert_close(grad_s, cpu_s, dtype, "grad_s vs CPU backend")
    _assert_close(grad_w, cpu_w, dtype, "grad_w vs CPU backend")
    wb = np.broadcast_to(w, s.shape)
    for r in range(min(oracle_rows, s.shape[0]) if s.shape[1] <= 1100 else 0):
        ref_s, ref_w = reference_isotonic_vjp(g[r], s[r], wb[r], ids[r], regularization)
        _assert_close(grad_s[r], ref_s, dtype, "grad_s vs oracle")
        _assert_close(grad_w[r], ref_w, dtype, "grad_w vs oracle")


# --- host emulation (tests/_emulation/cuda_host.py) ---------------------------------------

@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The emulator with isotonic.cu built; 2 SMs: 8 persistent blocks for the large kernels."""
    return cuda_host.make_emulator(tmp_path_factory, packages=[_cupy.PACKAGE], sm_count=2)


def _emu_run(emu):
    return lambda s, w, reg: emu.call(_cupy.isotonic_rows, s, w, reg)


def _emu_run_vjp(emu):
    return lambda g, s, w, ids, reg: emu.call(_cupy.isotonic_vjp_rows, g, s, w, ids, reg)


EMU_SIZES = [0, 1, 2, 7, 31, 32, 33, 100, 1023, 1025, 2049, 4097]


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", EMU_SIZES)
def test_emulated_random(emu, n, dtype, regularization):
    for shared in (False, True):
        s, w, ids = _check_forward(_emu_run(emu), 3, n, dtype, regularization, "random", shared)
        _check_vjp(_emu_run_vjp(emu), s, w, ids, regularization)


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("kind", ["sorted", "ties", "flat_then_jump", "increasing",
                                  "large_range"])
@pytest.mark.parametrize("n", [33, 1025, 4097])
def test_emulated_kinds(emu, n, kind, regularization):
    for dtype in DTYPES:
        s, w, ids = _check_forward(_emu_run(emu), 2, n, dtype, regularization, kind,
                                   shared=kind == "sorted")
        _check_vjp(_emu_run_vjp(emu), s, w, ids, regularization)


@pytest.mark.parametrize("regularization", REGS)
def test_emulated_long_rows(emu, regularization):
    """Many tiles per row, more rows than persistent blocks (rows reuse scratch slots)."""
    for kind in ("random", "sorted", "flat_then_jump"):
        s, w, ids = _check_forward(_emu_run(emu), 10, 20000 if kind == "random" else 9000,
                                   np.float32, regularization, kind, shared=kind == "sorted",
                                   oracle=False)
        _check_vjp(_emu_run_vjp(emu), s, w, ids, regularization)


@pytest.mark.parametrize("regularization", REGS)
def test_emulated_plans(regularization):
    """Group sizes and the small/large split (pure shape arithmetic, no kernel)."""
    items = _cupy.ITEMS[regularization]
    tile = _cupy.BLOCK * items
    assert _cupy.plan(5, 1, regularization, 132, 8) == ("small", 1, 1)
    assert _cupy.plan(1000, items + 1, regularization, 132, 8) == ("small", 8, 2)
    assert _cupy.plan(3, tile, regularization, 132, 8) == ("small", 3, _cupy.BLOCK)
    kind, grid, blocks = _cupy.plan(10_000, tile + 1, regularization, 132, 8)
    assert (kind, grid, blocks) == ("large", 132 * _cupy.BLOCKS_PER_SM, 132 * _cupy.BLOCKS_PER_SM)
    assert _cupy.plan(2, 10 ** 9, regularization, 132, 32)[1:] == (1, 1)  # scratch budget


@pytest.mark.parametrize("regularization", REGS)
def test_emulated_vjp_any_block_ids(emu, regularization):
    """The VJP reads runs of equal ids, never ids as indices: arbitrary int32 ids are safe and
    give what the CPU gives."""
    rng = np.random.default_rng(3)
    for n in (40, 3000):
        s, w = _inputs(rng, 2, n, np.float64, regularization, "random", False)
        ids = rng.integers(-2 ** 31, 2 ** 31 - 1, size=(2, n)).astype(np.int32)
        ids[:, 5:9] = 7  # one longer run
        _check_vjp(_emu_run_vjp(emu), s, w, ids, regularization, oracle_rows=0)


@pytest.mark.parametrize("regularization", REGS)
def test_emulated_nan_row_is_isolated(emu, regularization):
    """A NaN makes its own row unspecified, never another row's, and the kernels finish."""
    for n in (50, 3000):
        s, w = _inputs(np.random.default_rng(4), 3, n, np.float64, regularization, "random",
                       False)
        s[1, n // 2] = np.nan
        sol, ids = emu.call(_cupy.isotonic_rows, s, w, regularization)
        cpu_sol, cpu_ids = isotonic_regression(s, w, regularization=regularization)
        for r in (0, 2):
            _assert_close(sol[r], cpu_sol[r], np.float64, "clean row")
            np.testing.assert_array_equal(ids[r], cpu_ids[r])


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("n", [0, 100, 3000])  # small and large kernels
def test_emulated_out(emu, n, regularization):
    """`out=`: the kernels write the given arrays (pre-filled with a byte pattern) and return
    those objects, with the results of out=None."""
    s, w = _inputs(np.random.default_rng(8), 3, n, np.float64, regularization, "random", True)
    g = np.random.default_rng(9).normal(size=s.shape)
    sol, ids = emu.call(_cupy.isotonic_rows, s, w, regularization)
    out = (cuda_host.HOST_XP.empty(s.shape, s.dtype), cuda_host.HOST_XP.empty(s.shape, np.int32))
    got = emu.call(_cupy.isotonic_rows, s, w, regularization, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    np.testing.assert_array_equal(got[0], sol)
    np.testing.assert_array_equal(got[1], ids)
    grads = emu.call(_cupy.isotonic_vjp_rows, g, s, w, ids, regularization)
    out = tuple(cuda_host.HOST_XP.empty(s.shape, s.dtype) for _ in range(2))
    got = emu.call(_cupy.isotonic_vjp_rows, g, s, w, ids, regularization, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    np.testing.assert_array_equal(got[0], grads[0])
    np.testing.assert_array_equal(got[1], grads[1])


# --- GPU ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cp():
    cupy = pytest.importorskip("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # CuPy raises its own CUDARuntimeError without a driver
        count = 0
    if count == 0:
        pytest.skip("no CUDA GPU")
    return cupy


def _gpu_run(cp):
    def run(s, w, regularization):
        sol, ids = isotonic_regression(cp.asarray(s), cp.asarray(w if w.shape[0] > 1 or
                                                                  s.shape[0] == 1 else w[0]),
                                       regularization=regularization)
        assert isinstance(sol, cp.ndarray) and isinstance(ids, cp.ndarray)
        return sol.get(), ids.get()
    return run


def _gpu_run_vjp(cp):
    def run(g, s, w, ids, regularization):
        shared = w.shape[0] == 1 and s.shape[0] != 1
        grad_s, grad_w = isotonic_regression_vjp(cp.asarray(g), cp.asarray(s),
                                                 cp.asarray(w[0] if shared else w),
                                                 cp.asarray(ids), regularization=regularization)
        assert isinstance(grad_s, cp.ndarray) and isinstance(grad_w, cp.ndarray)
        return grad_s.get(), grad_w.get()
    return run


GPU_SIZES = [0, 1, 31, 32, 33, 1023, 1025, 4097, 65536]


@pytest.mark.gpu
@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", GPU_SIZES)
def test_gpu_random(cp, n, dtype, regularization):
    rows = 2 if n > 5000 else 5
    for shared in (False, True):
        s, w, ids = _check_forward(_gpu_run(cp), rows, n, dtype, regularization, "random",
                                   shared)
        _check_vjp(_gpu_run_vjp(cp), s, w, ids, regularization)


@pytest.mark.gpu
@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("kind", ["sorted", "ties", "flat_then_jump", "increasing",
                                  "large_range"])
@pytest.mark.parametrize("n", [33, 1025, 4097, 65536])
def test_gpu_kinds(cp, n, kind, regularization):
    for dtype in DTYPES:
        s, w, ids = _check_forward(_gpu_run(cp), 3, n, dtype, regularization, kind,
                                   shared=kind == "sorted")
        _check_vjp(_gpu_run_vjp(cp), s, w, ids, regularization)


@pytest.mark.gpu
@pytest.mark.parametrize("regularization", REGS)
def test_gpu_many_rows_and_batch_shape(cp, regularization):
    """More rows than persistent blocks; a 3-D batch goes through the public reshape."""
    rng = np.random.default_rng(5)
    for shape in [(1500, 3000), (4, 7, 300), (3000, 17)]:
        s = rng.normal(size=shape).astype(np.float32)
        w = rng.normal(size=shape[-1:]).astype(np.float32)
        sol, ids = isotonic_regression(cp.asarray(s), cp.asarray(w),
                                       regularization=regularization)
        cpu_sol, cpu_ids = isotonic_regression(s, w, regularization=regularization)
        assert sol.shape == ids.shape == shape
        _assert_close(sol.get(), cpu_sol, np.float32, str(shape))
        np.testing.assert_array_equal(ids.get(), cpu_ids)
        g = rng.normal(size=shape).astype(np.float32)
        gs, gw = isotonic_regression_vjp(cp.asarray(g), cp.asarray(s), cp.asarray(w), ids,
                                         regularization=regularization)
        cpu_gs, cpu_gw = isotonic_regression_vjp(g, s, w, cpu_ids,
                                                 regularization=regularization)
        _assert_close(gs.get(), cpu_gs, np.float32, "grad_s")
        _assert_close(gw.get(), cpu_gw, np.float32, "grad_w")


@pytest.mark.gpu
def test_gpu_stream_and_backend_module(cp):
    """The backend functions run on a given stream and leave the inputs untouched."""
    rng = np.random.default_rng(6)
    s = cp.asarray(rng.normal(size=(64, 5000)))
    w = cp.asarray(rng.normal(size=(1, 5000)))
    s_before, w_before = s.copy(), w.copy()
    stream = cp.cuda.Stream(non_blocking=True)
    for reg in REGS:
        sol, ids = _cupy.isotonic_rows(s, w, reg, stream=stream)
        g = cp.ones_like(s)
        gs, gw = _cupy.isotonic_vjp_rows(g, s, w, ids, reg, stream=stream.ptr)
        stream.synchronize()
        cpu_sol, cpu_ids = isotonic_regression(s.get(), w.get()[0], regularization=reg)
        _assert_close(sol.get(), cpu_sol, np.float64, reg)
        np.testing.assert_array_equal(ids.get(), cpu_ids)
        # a block's grad_s sums to the block's sum of g (here its size), whatever the reg
        assert math.isclose(float(gs.sum()), float(g.sum()), rel_tol=1e-9)
    assert bool((s == s_before).all()) and bool((w == w_before).all())



@pytest.mark.gpu
def test_gpu_out_arrays(cp):
    """`out=` on the device: the given CuPy arrays are written on the given stream and
    returned, with the results of out=None."""
    rng = np.random.default_rng(7)
    stream = cp.cuda.Stream(non_blocking=True)
    for n in (100, 5000):  # small and large kernels
        s = cp.asarray(rng.normal(size=(8, n)))
        w = cp.asarray(rng.normal(size=(1, n)))
        g = cp.asarray(rng.normal(size=(8, n)))
        for reg in REGS:
            sol, ids = _cupy.isotonic_rows(s, w, reg)
            grads = _cupy.isotonic_vjp_rows(g, s, w, ids, reg)
            out = (cp.full(s.shape, np.nan), cp.full(s.shape, -7, dtype=np.int32))
            got = _cupy.isotonic_rows(s, w, reg, out=out, stream=stream)
            out_vjp = (cp.full(s.shape, np.nan), cp.full(s.shape, np.nan))
            got_vjp = _cupy.isotonic_vjp_rows(g, s, w, ids, reg, out=out_vjp, stream=stream)
            stream.synchronize()
            assert got[0] is out[0] and got[1] is out[1]
            assert got_vjp[0] is out_vjp[0] and got_vjp[1] is out_vjp[1]
            assert bool((got[0] == sol).all()) and bool((got[1] == ids).all())
            assert bool((got_vjp[0] == grads[0]).all()) and bool((got_vjp[1] == grads[1]).all())
