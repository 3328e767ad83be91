"""Numba CUDA PAV (`backend="numba"`): forward and VJP against the CPU backend and the oracle.

Runs on a GPU when there is one (marker gpu) and on Numba's CUDA simulator otherwise (marker
cudasim; conftest turns the simulator on). Under the simulator the launch constants are
lowered (32-thread blocks, 4 elements per thread, a tiny shared-memory budget where the global
scratch path is meant) so that small rows already take the multi-chunk and multi-level merges;
on a GPU the default constants run too, on longer rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _emulation import numba_simulator
from numba import cuda

from sortgrad.kernels import isotonic_regression, isotonic_regression_vjp
from sortgrad.kernels._cuda import numba_support as ns
from sortgrad.testing import (finite_difference_jacobian, reference_isotonic,
                              reference_isotonic_vjp)

numba_simulator.install()  # conftest installs it for the whole run; idempotent

pytestmark = [
    pytest.mark.skipif(not cuda.is_available(), reason="needs Numba CUDA or its simulator"),
    pytest.mark.cudasim if ns.SIMULATOR else pytest.mark.gpu,
]

if cuda.is_available():
    from sortgrad.kernels.isotonic import _numba_cuda as nc

REGS = ["l2", "kl"]
DTYPES = [np.float32, np.float64]
# float32 results are float64 sums rounded once; a few float32 ulps of the data scale.
RTOL = {np.float32: 2e-6, np.float64: 1e-12}

# Launch constants: "small" makes 33 entries span 9 threads and 4 merge levels; "global" puts
# the work arrays of any row longer than a few entries in the global scratch buffer, with a
# one-block grid.
LAUNCHES = {
    "default": {},
    "small": {"BLOCK": 32, "CHUNK": 4},
    # global scratch, and one slot per group only: blocks stride over the rows
    "global": {"BLOCK": 32, "CHUNK": 2, "SHARED_BYTES": 256, "SCRATCH_BYTES": 1},
}
LAUNCH_NAMES = ["small", "global"] if ns.SIMULATOR else list(LAUNCHES)
SIZES = [0, 1, 31, 32, 33, 100] + ([] if ns.SIMULATOR else [1023, 1025, 4097, 70_001])


@pytest.fixture(params=LAUNCH_NAMES)
def launch(request, monkeypatch):
    for name, value in LAUNCHES[request.param].items():
        monkeypatch.setattr(nc, name, value)
    return request.param


@pytest.fixture
def small(monkeypatch):
    """The small launch constants (default ones on a GPU stay for the `launch` tests)."""
    for name, value in LAUNCHES["small"].items():
        monkeypatch.setattr(nc, name, value)


# --- helpers ------------------------------------------------------------------------------------

def _inputs(rng, shape, dtype, regularization, kind="random"):
    n = shape[-1]
    if kind == "random":
        s, w = rng.normal(size=shape) * 3, rng.normal(size=shape)
    elif kind == "sorted":  # the soft-op setting: s descending, w = rho or log rho
        s = -np.sort(-rng.normal(size=shape) * n / 4, axis=-1)
        rho = np.arange(n, 0, -1, dtype=np.float64)
        w = np.broadcast_to(rho if regularization == "l2" else np.log(rho), shape).copy()
    elif kind == "ties":  # small integers: heavy ties, exact L2 means
        s, w = rng.integers(0, 3, size=shape).astype(float), rng.integers(0, 2, size=shape) * 1.0
    elif kind == "increasing":  # one block per row
        s, w = np.cumsum(rng.random(shape) + 0.1, axis=-1), np.zeros(shape)
    elif kind == "decreasing":  # no pooling at all
        s, w = -np.cumsum(rng.random(shape) + 0.1, axis=-1), np.zeros(shape)
    elif kind == "constant":  # equal neighbours stay separate blocks
        s, w = np.full(shape, 1.5), np.zeros(shape)
    elif kind == "staircase":  # long stacks that the last merges pool back to one block
        s = -np.cumsum(np.ones(shape), axis=-1)
        s[..., n // 2:] += 2.0 * n
        w = np.zeros(shape)
    else:
        raise ValueError(kind)
    return s.astype(dtype), w.astype(dtype)


def _device_rows(s, w, regularization, shared_w=False):
    """The backend functions on device copies; shared_w passes w as one (1, n) row."""
    w_rows = w[:1] if shared_w else w
    sol, blocks = nc.isotonic_rows(cuda.to_device(s), cuda.to_device(np.ascontiguousarray(w_rows)),
                                   regularization)
    return sol.copy_to_host(), blocks.copy_to_host()


def _device_vjp(g, s, w, blocks, regularization, shared_w=False):
    w_rows = w[:1] if shared_w else w
    gs, gw = nc.isotonic_vjp_rows(cuda.to_device(g), cuda.to_device(s),
                                  cuda.to_device(np.ascontiguousarray(w_rows)),
                                  cuda.to_device(blocks), regularization)
    return gs.copy_to_host(), gw.copy_to_host()


def _scale(*arrays):
    return max([1.0] + [float(np.max(np.abs(a))) for a in arrays if a.size])


def _close(actual, expected, dtype, scale, factor=1.0):
    rtol = RTOL[np.dtype(dtype).type] * factor
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def _check_against_cpu(s, w, regularization, shared_w=False, same_blocks=True, g=None):
    """Forward and VJP of the device backend against the CPU backend; returns the blocks."""
    dtype = s.dtype
    sol, blocks = _device_rows(s, w, regularization, shared_w)
    assert sol.dtype == dtype and blocks.dtype == np.int32
    assert sol.shape == blocks.shape == s.shape
    w_cpu = w[0] if shared_w else w
    ref_sol, ref_blocks = isotonic_regression(s, w_cpu, regularization=regularization)
    _close(sol, ref_sol, dtype, _scale(s, w))
    if same_blocks:
        np.testing.assert_array_equal(blocks, ref_blocks)
    _assert_valid(sol, blocks)
    if g is None:
        g = np.random.default_rng(s.shape[-1]).normal(size=s.shape).astype(dtype)
    # the VJP at the CPU's blocks, so that it is compared on the same partition
    gs, gw = _device_vjp(g, s, w, ref_blocks, regularization, shared_w)
    assert gs.dtype == gw.dtype == dtype and gs.shape == gw.shape == s.shape
    ref_gs, ref_gw = isotonic_regression_vjp(g, s, w_cpu, ref_blocks,
                                             regularization=regularization)
    _close(gs, ref_gs, dtype, _scale(g), factor=4)
    _close(gw, ref_gw, dtype, _scale(g), factor=4)
    return sol, blocks


def _assert_valid(sol, blocks):
    """Ids 0, 1, ... from the left in +0/+1 steps; constant within blocks, non-increasing."""
    if sol.shape[-1] == 0:
        return
    assert np.all(blocks[:, 0] == 0)
    steps = np.diff(blocks, axis=-1)
    assert np.all((steps == 0) | (steps == 1))
    diffs = np.diff(sol, axis=-1)
    assert np.all(diffs[steps == 0] == 0)
    assert np.all(diffs <= 0)


# --- forward and VJP against the CPU backend ------------------------------------------------

# (dtype, w shared by every row?)
VARIANTS = [(np.float32, False), (np.float64, False), (np.float32, True), (np.float64, True)]


def _matches_cpu_cases():
    """(launch, n, dtype, shared_w); the simulator runs a subset (the global-scratch path on
    two multi-chunk sizes, float64 with a shared w once)."""
    cases = []
    for name in LAUNCH_NAMES:
        for n in SIZES:
            for dtype, shared_w in VARIANTS:
                if ns.SIMULATOR and (dtype, shared_w) == (np.float64, True) and n != 33:
                    continue
                if ns.SIMULATOR and name == "global" and (n not in (33, 100) or shared_w):
                    continue
                if ns.SIMULATOR and n == 32 and dtype == np.float64:
                    continue
                ids = f"{name}-{n}-{np.dtype(dtype).name}-{'w_shared' if shared_w else 'w_rows'}"
                cases.append(pytest.param(name, n, dtype, shared_w, id=ids))
    return cases


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("launch, n, dtype, shared_w", _matches_cpu_cases(), indirect=["launch"])
def test_matches_cpu(launch, regularization, dtype, shared_w, n):
    rng = np.random.default_rng(n + 7 * shared_w)
    rows = 1 if n > 5000 else 2 if n > 40 else 3
    kind = "sorted" if n > 1000 else "random"
    s, w = _inputs(rng, (rows, n), dtype, regularization, kind)
    if shared_w:
        w = np.broadcast_to(w[:1], s.shape).copy()
    sol, blocks = _check_against_cpu(s, w, regularization, shared_w)
    if 0 < n <= 40:  # and the oracle (a different algorithm)
        for r in range(rows):
            ref, ref_blocks = reference_isotonic(s[r].astype(np.float64),
                                                 w[r].astype(np.float64), regularization)
            _close(sol[r], ref, dtype, _scale(s, w), factor=2)
            np.testing.assert_array_equal(blocks[r], ref_blocks)


@pytest.mark.parametrize("regularization, kind", [
    (reg, kind) for reg in REGS
    for kind in ["ties", "increasing", "decreasing", "constant", "staircase", "sorted"]
    if reg == "l2" or kind not in ("decreasing", "constant")])
def test_row_shapes(small, regularization, kind):
    """Rows that pool everything, nothing, ties, or a long stack at the last merge."""
    rng = np.random.default_rng(2)
    n = 70 if ns.SIMULATOR else 3001
    s, w = _inputs(rng, (2, n), np.float64, regularization, kind)
    # small-integer L2 means are exact, so the strict violations are the CPU's; KL block
    # values of tied inputs are equal only up to rounding
    same_blocks = not (kind == "ties" and regularization == "kl")
    sol, blocks = _check_against_cpu(s, w, regularization, same_blocks=same_blocks)
    if kind == "increasing" or (kind == "staircase" and regularization == "l2"):
        assert np.all(blocks == 0)
    if kind in ("decreasing", "constant"):
        np.testing.assert_array_equal(blocks, np.broadcast_to(np.arange(n), s.shape))


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_multi_level_merges(monkeypatch, regularization, chunk):
    """One or a few entries per thread: every pooling happens in the tree merges."""
    monkeypatch.setattr(nc, "BLOCK", 32)
    monkeypatch.setattr(nc, "CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    for n in (17, 90):
        s, w = _inputs(rng, (2, n), np.float32, regularization)
        _check_against_cpu(s, w, regularization)


@pytest.mark.parametrize("spread", ["linear", "shifted"])
def test_kl_dynamic_range(launch, spread):
    """KL on linear sums (spread < 600) and on max-shifted sums (spread >> 700), as the CPU."""
    rng = np.random.default_rng(5)
    n = 40
    scale = 800.0 if spread == "shifted" else 40.0
    s = -np.sort(-rng.normal(size=(2, n)) * scale, axis=-1)
    s[:, 10:14] = s[:, 10:11] - np.array([5.0, 0.0, 3.0, 1.0])  # violations to pool
    s[:, 30:] = s[:, 30:31] + rng.normal(size=(2, n - 30))
    w = np.broadcast_to(np.log(np.arange(n, 0, -1.0)), s.shape).copy()
    sol, blocks = _check_against_cpu(s, w, "kl")
    assert np.all(np.isfinite(sol))
    assert blocks[0, -1] < n - 1, "the rows should pool somewhere"
    g = rng.normal(size=s.shape)
    gs, gw = _device_vjp(g, s, w, blocks, "kl")
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gw))


@pytest.mark.parametrize("regularization", REGS)
def test_kl_equal_block_values_stay_monotone(small, regularization):
    """Blocks equal in exact arithmetic must not come out increasing after rounding."""
    s = np.array([[1.0, 1.0, 2.0] * 11])
    w = np.array([[0.0, 1.0, 0.0] * 11])
    sol, _ = _check_against_cpu(s, w, regularization, same_blocks=False)
    assert np.all(np.diff(sol) <= 0)


def test_many_rows_per_block(small):
    """Rows shorter than a warp: several rows per block, idle groups in the last block."""
    rng = np.random.default_rng(12)
    for n in (3, 9):
        s, w = _inputs(rng, (21, n), np.float32, "l2")
        _check_against_cpu(s, w, "l2")


@pytest.mark.parametrize("regularization", REGS)
def test_nan_row_does_not_touch_other_rows(small, regularization):
    rng = np.random.default_rng(6)
    s, w = _inputs(rng, (3, 20), np.float64, regularization)
    clean_sol, clean_blocks = _device_rows(s, w, regularization)
    s[1, 7] = np.nan
    sol, blocks = _device_rows(s, w, regularization)
    np.testing.assert_array_equal(sol[[0, 2]], clean_sol[[0, 2]])
    np.testing.assert_array_equal(blocks[[0, 2]], clean_blocks[[0, 2]])


# --- VJP ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("regularization", REGS)
def test_vjp_matches_oracle_and_finite_differences(small, regularization):
    """float64, tiny rows: the device VJP at the device's blocks against the oracle's VJP and
    against central differences of the oracle's solution."""
    rng = np.random.default_rng(9)
    n = 10
    s, w = _inputs(rng, (2, n), np.float64, regularization)
    g = rng.normal(size=s.shape)
    _, blocks = _device_rows(s, w, regularization)
    assert blocks.max() < n - 1, "the inputs should pool somewhere"
    gs, gw = _device_vjp(g, s, w, blocks, regularization)
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


@pytest.mark.parametrize("regularization", REGS)
def test_vjp_blocks_are_runs_of_equal_ids(small, regularization):
    """Any int32 ids are memory-safe: blocks are maximal runs of equal ids, as on the CPU."""
    rng = np.random.default_rng(13)
    s, w = _inputs(rng, (2, 45), np.float64, regularization)
    g = rng.normal(size=s.shape)
    ids = np.repeat(np.array([7, -3, 2**31 - 1, 7, 0, -2**31, 5, 5, 9], np.int32), 5)
    blocks = np.stack([ids, ids[::-1]]).copy()
    gs, gw = _device_vjp(g, s, w, blocks, regularization)
    ref_gs, ref_gw = isotonic_regression_vjp(g, s, w, blocks, regularization=regularization)
    np.testing.assert_allclose(gs, ref_gs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gw, ref_gw, rtol=1e-12, atol=1e-12)


def test_vjp_kl_is_max_shifted(small):
    s = np.array([[1000.0, 1001.0, 999.0]])
    w = np.array([[-800.0, -799.0, -801.0]])
    _, blocks = _device_rows(s, w, "kl")
    gs, gw = _device_vjp(np.array([[1.0, 2.0, 3.0]]), s, w, blocks, "kl")
    assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gw))


def _patterned(shape, dtype):
    """A device array filled with the byte 0xA5 (entries a kernel does not write show up)."""
    host = np.empty(shape, dtype)
    host.reshape(-1).view(np.uint8)[...] = 0xA5
    return cuda.to_device(host)


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("n", [0, 33])
def test_out_arrays_are_written_and_returned(launch, regularization, n):
    """`out=`: the kernels write the given arrays and return those objects, with the results of
    out=None (shared and global work arrays)."""
    s, w = _inputs(np.random.default_rng(n + 40), (3, n), np.float64, regularization)
    g = np.random.default_rng(n + 41).normal(size=s.shape)
    ds, dw, dg = cuda.to_device(s), cuda.to_device(w), cuda.to_device(g)
    sol, blocks = nc.isotonic_rows(ds, dw, regularization)
    out = (_patterned(s.shape, np.float64), _patterned(s.shape, np.int32))
    got = nc.isotonic_rows(ds, dw, regularization, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    np.testing.assert_array_equal(got[0].copy_to_host(), sol.copy_to_host())
    np.testing.assert_array_equal(got[1].copy_to_host(), blocks.copy_to_host())
    gs, gw = nc.isotonic_vjp_rows(dg, ds, dw, blocks, regularization)
    out = (_patterned(s.shape, np.float64), _patterned(s.shape, np.float64))
    got = nc.isotonic_vjp_rows(dg, ds, dw, blocks, regularization, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    np.testing.assert_array_equal(got[0].copy_to_host(), gs.copy_to_host())
    np.testing.assert_array_equal(got[1].copy_to_host(), gw.copy_to_host())


# --- through the public kernel API --------------------------------------------------------------

@pytest.mark.parametrize("regularization, backend, shared_w",
                         [("l2", "numba", False), ("kl", None, True)],
                         ids=["l2-numba-w_full", "kl-None-w_shared"])
def test_public_api(small, regularization, backend, shared_w):
    rng = np.random.default_rng(14)
    s, w = _inputs(rng, (2, 3, 17), np.float32, regularization)
    if shared_w:
        w = w[1, 2].copy()
    s0, w0 = s.copy(), w.copy()
    s_dev, w_dev = cuda.to_device(s), cuda.to_device(w)
    sol, blocks = isotonic_regression(s_dev, w_dev, regularization=regularization,
                                      backend=backend)
    assert type(sol).__module__.startswith("numba.cuda")  # Numba arrays in, Numba arrays out
    sol, blocks = sol.copy_to_host(), blocks.copy_to_host()
    ref_sol, ref_blocks = isotonic_regression(s, w, regularization=regularization)
    assert sol.shape == blocks.shape == s.shape
    _close(sol, ref_sol, np.float32, _scale(s, w))
    np.testing.assert_array_equal(blocks, ref_blocks)
    g = rng.normal(size=s.shape).astype(np.float32)
    gs, gw = isotonic_regression_vjp(cuda.to_device(g), s_dev, w_dev, cuda.to_device(blocks),
                                     regularization=regularization, backend=backend)
    ref_gs, ref_gw = isotonic_regression_vjp(g, s, w, ref_blocks, regularization=regularization)
    assert gs.shape == gw.shape == s.shape
    _close(gs.copy_to_host(), ref_gs, np.float32, _scale(g), factor=4)
    _close(gw.copy_to_host(), ref_gw, np.float32, _scale(g), factor=4)
    np.testing.assert_array_equal(s_dev.copy_to_host(), s0)  # inputs untouched
    np.testing.assert_array_equal(w_dev.copy_to_host(), w0)


@pytest.mark.skipif(ns.SIMULATOR, reason="CuPy arrays need a GPU")
@pytest.mark.parametrize("regularization", REGS)
def test_cupy_arrays_on_the_numba_backend(regularization):
    """CuPy in, CuPy out, on CuPy's current stream."""
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(15)
    s, w = _inputs(rng, (4, 300), np.float32, regularization)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        sol, blocks = isotonic_regression(cupy.asarray(s), cupy.asarray(w[0]),
                                          regularization=regularization, backend="numba")
        assert isinstance(sol, cupy.ndarray) and isinstance(blocks, cupy.ndarray)
        g = cupy.asarray(rng.normal(size=s.shape).astype(np.float32))
        gs, gw = isotonic_regression_vjp(g, cupy.asarray(s), cupy.asarray(w[0]), blocks,
                                         regularization=regularization, backend="numba")
        assert isinstance(gs, cupy.ndarray) and isinstance(gw, cupy.ndarray)
    stream.synchronize()
    ref_sol, ref_blocks = isotonic_regression(s, w[0], regularization=regularization)
    _close(sol.get(), ref_sol, np.float32, _scale(s, w))
    np.testing.assert_array_equal(blocks.get(), ref_blocks)
    ref_gs, ref_gw = isotonic_regression_vjp(g.get(), s, w[0], ref_blocks,
                                             regularization=regularization)
    _close(gs.get(), ref_gs, np.float32, _scale(g.get()), factor=4)
    _close(gw.get(), ref_gw, np.float32, _scale(g.get()), factor=4)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5)])
def test_public_api_empty(shape):
    s = cuda.to_device(np.zeros(shape))
    sol, blocks = isotonic_regression(s, s, regularization="l2", backend="numba")
    assert sol.shape == blocks.shape == shape and blocks.dtype == np.int32
    gs, gw = isotonic_regression_vjp(s, s, s, blocks, regularization="kl", backend="numba")
    assert gs.shape == gw.shape == shape


# --- the real CUDA target -----------------------------------------------------------------------

_PTX_SCRIPT = textwrap.dedent("""
    import sys
    from numba import types as nt
    from sortgrad.kernels._cuda import numba_support as ns
    from sortgrad.kernels.isotonic import _numba_cuda as nc
    try:
        from numba.cuda.cudadrv import nvvm
        nvvm.NVVM()
    except Exception as err:
        print("no NVVM:", err)
        sys.exit(77)
    # both regularizations in shared memory, one global-scratch variant (the kernels differ
    # only in where the work arrays come from), float64 once (loads and final casts)
    variants = [("float32", "l2", True), ("float32", "kl", True), ("float64", "kl", False)]
    compiled = 0
    for dtype, reg, shared in variants:
        A = nt.Array(getattr(nt, dtype), 2, "C")
        I, F = nt.Array(nt.int32, 2, "C"), nt.Array(nt.float64, 2, "C")
        scalars = (nt.int64, nt.int64, nt.int64, nt.int64, nt.boolean, F, I)
        cap = 819 if shared else 1
        for kernel, sig in ((nc._forward_kernel(dtype, reg, shared, 256, cap), (A, A, A, I)),
                            (nc._vjp_kernel(dtype, reg, shared, 256, cap), (A, A, A, I, A, A))):
            ptx = ns.compile_ptx_cases([(kernel, sig + scalars)], cc=(8, 0))
            assert all(".entry" in p for p in ptx.values())
            compiled += 1
    print("compiled", compiled)
""")


@pytest.mark.skipif(not ns.SIMULATOR, reason="a GPU run compiles the kernels anyway")
def test_kernels_compile_for_the_real_target():
    """The simulator does not type-check; compile every kernel variant with NVVM to PTX."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", SORTGRAD_TEST_CUDASIM="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
