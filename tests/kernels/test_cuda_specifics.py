"""Checks that belong to one device backend or to the test machinery itself, not to an op's
contract (those run over the `backend` fixture in tests/kernels/test_<op>_backends.py):

- Numba CUDA: warp and block collectives of `numba_support`, device adaption and streams, the
  simulator's shared arrays (thread-safe allocation, tests/_emulation/numba_simulator.py), the
  kernels' compilation for the real target (NVVM to PTX, no GPU needed), Numba kernels on CuPy
  arrays (GPU), the GPU benchmark's smoke mode;
- the host CUDA emulator: barrier / warp-collective checks, forgotten outputs;
- CuPy on a GPU: the module cache per device.
Each test is selected with a plain skip (or the `backend` fixture restricted to one backend).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from _backends import over_backends
from _emulation import cuda_host, numba_simulator
from numba import cuda

from sortgrad import kernels
from sortgrad.kernels import isotonic_regression, isotonic_regression_vjp
from sortgrad.kernels._cuda import cupy_loader
from sortgrad.kernels._cuda import numba_support as ns
from sortgrad.kernels.segmented_sort import _cupy as sort_cupy
from sortgrad.testing import assert_same_bits, isotonic_inputs, make_keys

SIM = bool(numba.config.ENABLE_CUDASIM)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_numba_cuda = pytest.mark.skipif(not cuda.is_available(),
                                      reason="needs a CUDA GPU or Numba's simulator")
needs_simulator = pytest.mark.skipif(not SIM, reason="runs on Numba's CUDA simulator")


def _host(a):
    return a.copy_to_host()


# --- Numba CUDA: numba_support ------------------------------------------------------------------

@cuda.jit
def _collectives_kernel(x, exclusive, total, wsum, wmax, wmin, winc, wbcast):
    scratch = cuda.shared.array(64, np.int64)
    warp_totals = cuda.shared.array(32, np.int64)
    tid = cuda.threadIdx.x
    v = x[tid]
    e, t = ns.block_exclusive_sum(v, tid, cuda.blockDim.x, scratch, warp_totals)
    exclusive[tid] = e
    if tid == 0:
        total[0] = t
    wsum[tid] = ns.warp_sum(v, tid, scratch)
    wmax[tid] = ns.warp_max(v, tid, scratch)
    wmin[tid] = ns.warp_min(v, tid, scratch)
    winc[tid] = ns.warp_inclusive_sum(v, tid, scratch)
    wbcast[tid] = ns.warp_broadcast(v, 3, tid, scratch)


@needs_numba_cuda
def test_warp_and_block_collectives():
    x = np.random.default_rng(0).integers(-50, 50, 64).astype(np.int64)
    outs = [cuda.device_array(64, np.int64) for _ in range(7)]
    _collectives_kernel[1, 64](cuda.to_device(x), *outs)
    exclusive, total, wsum, wmax, wmin, winc, wbcast = (_host(o) for o in outs)
    warps = x.reshape(2, 32)
    np.testing.assert_array_equal(exclusive, np.cumsum(x) - x)
    assert total[0] == x.sum()
    np.testing.assert_array_equal(wsum, np.repeat(warps.sum(1), 32))
    np.testing.assert_array_equal(wmax, np.repeat(warps.max(1), 32))
    np.testing.assert_array_equal(wmin, np.repeat(warps.min(1), 32))
    np.testing.assert_array_equal(winc, np.cumsum(warps, 1).ravel())
    np.testing.assert_array_equal(wbcast, np.repeat(warps[:, 3], 32))


@needs_numba_cuda
def test_device_adaption_and_streams():
    d = cuda.to_device(np.arange(6, dtype=np.float32).reshape(2, 3))
    arr, kind = ns.as_device(d)
    assert arr is d and kind == "numba" and ns.like_input(arr, kind) is arr
    with pytest.raises(TypeError, match="device array"):
        ns.as_device(np.zeros(3))
    assert ns.resolve_stream(None, d) is not None
    np.testing.assert_array_equal(_host(ns.zeros((2, 3), np.float64, 0)), np.zeros((2, 3)))
    assert ns.bits_view(d).dtype == np.uint32
    limits = ns.device_limits()
    assert limits.max_threads_per_block >= 256 and limits.warp_size == 32


@cuda.jit
def _shared_identity_kernel(out):
    first = cuda.shared.array(64, numba.int32)
    second = cuda.shared.array(64, numba.int32)
    t = cuda.threadIdx.x
    first[t] = t
    second[t] = -t
    cuda.syncthreads()
    out[cuda.blockIdx.x, t, 0] = first[(t + 1) % 64]
    out[cuda.blockIdx.x, t, 1] = second[(t + 1) % 64]


@needs_simulator
def test_simulator_shared_arrays_are_one_per_block_and_call_site(monkeypatch):
    """A slow allocation invites a thread switch inside lookup-or-create: every thread of the
    block must still see the same array per call site (the unpatched simulator gave threads
    private copies there, and kernels read stale data)."""
    import time

    def slow_empty(shape, dtype):
        time.sleep(1e-3)
        return np.empty(shape, dtype)

    assert numba_simulator.installed()
    monkeypatch.setattr(numba_simulator, "_new_shared_array", slow_empty)
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)  # as the simulator's backend param runs
    try:
        out = np.zeros((3, 64, 2), np.int32)
        _shared_identity_kernel[3, 64](out)
    finally:
        sys.setswitchinterval(old)
    nxt = (np.arange(64) + 1) % 64
    np.testing.assert_array_equal(out[..., 0], np.broadcast_to(nxt, (3, 64)))
    np.testing.assert_array_equal(out[..., 1], np.broadcast_to(-nxt, (3, 64)))


# --- Numba CUDA: the kernels compile for the real target (NVVM, no GPU needed) -------------------

# Exit 77 (a skip) where NVVM is missing; each kernel script below runs after it.
_NVVM_PREAMBLE = textwrap.dedent("""
    import sys
    try:
        from numba.cuda.cudadrv.nvvm import NVVM
        NVVM()
    except Exception as err:
        print("no NVVM:", err)
        sys.exit(77)
""")

_HARD_PTX_SCRIPT = textwrap.dedent("""
    from sortgrad.kernels._cuda import numba_support as ns
    from sortgrad.kernels.permutation import _numba_cuda as perm_nb
    from sortgrad.kernels.segmented_sort import _numba_cuda as sort_nb
    from sortgrad.kernels.top_k import _numba_cuda as topk_nb
    cases = (sort_nb.ptx_cases(("float32", "float64")) + topk_nb.ptx_cases(("float32",
             "float64")) + perm_nb.ptx_cases(("float32",)))
    ptx = ns.compile_ptx_cases(cases, cc=(8, 0))
    assert all(".entry" in p for p in ptx.values())
    print("compiled", len(cases), "kernels")
""")

_ISOTONIC_PTX_SCRIPT = textwrap.dedent("""
    from numba import types as nt
    from sortgrad.kernels._cuda import numba_support as ns
    from sortgrad.kernels.isotonic import _numba_cuda as nc
    # both regularizations in shared memory, one global-scratch variant (the kernels differ
    # only in where the work arrays come from), float64 once (loads and final casts)
    variants = [("float32", "l2", True), ("float32", "kl", True), ("float64", "kl", False)]
    compiled = 0
    for dtype, reg, shared in variants:
        A = nt.Array(getattr(nt, dtype), 2, "C")
        I, F = nt.Array(nt.int32, 2, "C"), nt.Array(nt.float64, 2, "C")
        scalars = (nt.int64, nt.int64, nt.int64, nt.int64, nt.boolean, F, I)
        cap = 819 if shared else 1
        keys = (A, nt.boolean)  # the forward's tie keys and whether to read them
        for kernel, sig in ((nc._forward_kernel(dtype, reg, shared, 256, cap),
                             (A, A, A, I) + scalars + keys),
                            (nc._vjp_kernel(dtype, reg, shared, 256, cap),
                             (A, A, A, I, A, A) + scalars)):
            ptx = ns.compile_ptx_cases([(kernel, sig)], cc=(8, 0))
            assert all(".entry" in p for p in ptx.values())
            compiled += 1
    print("compiled", compiled)
""")


_SOFT_PTX_SCRIPT = textwrap.dedent("""
    from sortgrad.kernels._cuda import numba_support as ns
    from sortgrad.kernels.soft import _numba_cuda as nb
    ptx = ns.compile_ptx_cases(nb.ptx_cases(), cc=(8, 0))
    assert ptx and all(".entry" in p for p in ptx.values())
""")


@needs_simulator  # a GPU run compiles the kernels anyway
@pytest.mark.parametrize("script", [_HARD_PTX_SCRIPT, _ISOTONIC_PTX_SCRIPT, _SOFT_PTX_SCRIPT],
                         ids=["sort-top_k-permutation", "isotonic", "soft"])
def test_numba_kernels_compile_to_ptx(script):
    """The simulator does not type-check: compile the kernel variants with NVVM to PTX."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", SORTGRAD_TEST_CUDASIM="0")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _NVVM_PREAMBLE + script], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr


# --- Numba CUDA on a GPU: CuPy arrays in, CuPy arrays out ----------------------------------------

@over_backends("n", simulator=[300], backends=("numba",))
def test_numba_backend_on_cupy_arrays(backend, n):
    """Launches follow CuPy's current stream; results are CuPy arrays."""
    cupy = pytest.importorskip("cupy")
    x = make_keys(np.random.default_rng(4), (4, n), "float32", "special")
    cx = cupy.asarray(x)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        values, perm = kernels.segmented_sort(cx, backend="numba")
        top_values, top_indices = kernels.top_k(cx, 7, backend="numba")
        out = kernels.permutation_scatter(top_values, top_indices, n, backend="numba")
    stream.synchronize()
    assert all(isinstance(a, cupy.ndarray) for a in (values, perm, top_values, out))
    want_values, want_perm = kernels.segmented_sort(x)
    assert_same_bits(values.get(), want_values)
    np.testing.assert_array_equal(perm.get(), want_perm)
    want_top = kernels.top_k(x, 7)
    np.testing.assert_array_equal(top_indices.get(), want_top[1])
    assert_same_bits(out.get(), kernels.permutation_scatter(*want_top, n))


@over_backends("regularization", simulator=["l2", "kl"], backends=("numba",))
def test_numba_isotonic_on_cupy_arrays(backend, regularization):
    """CuPy in, CuPy out, on CuPy's current stream."""
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(15)
    s, w = isotonic_inputs(rng, (4, 300), np.float32, regularization)
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
    scale = max(1.0, float(np.abs(s).max()), float(np.abs(w).max()))
    np.testing.assert_allclose(sol.get(), ref_sol, rtol=2e-6, atol=2e-6 * scale)
    np.testing.assert_array_equal(blocks.get(), ref_blocks)
    ref_gs, ref_gw = isotonic_regression_vjp(g.get(), s, w[0], ref_blocks,
                                             regularization=regularization)
    gscale = max(1.0, float(np.abs(g.get()).max()))
    np.testing.assert_allclose(gs.get(), ref_gs, rtol=8e-6, atol=8e-6 * gscale)
    np.testing.assert_allclose(gw.get(), ref_gw, rtol=8e-6, atol=8e-6 * gscale)


# --- Numba CUDA: the GPU benchmark's smoke mode ---------------------------------------------------

@pytest.mark.slow
@needs_numba_cuda
def test_gpu_benchmark_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    env = dict(os.environ)
    if SIM:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "perf", "bench_gpu_numba.py"),
                             "--smoke", "--out", str(out)], env=env, capture_output=True,
                            text=True, timeout=600, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    records = json.loads(out.read_text())["records"]
    assert {r["case"] for r in records} >= {"sort_rows8", "sort_ragged", "top_k1",
                                            "scatter_1row"}
    assert all(r["agree"] for r in records)


# --- the host CUDA emulator (tests/_emulation/cuda_host.py) -------------------------------------

EMULATOR_CHECKS = r"""
__global__ void good(int* out) {
  __shared__ int s[64];
  s[threadIdx.x] = (int)threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = s[63 - threadIdx.x] + __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void shuffle_after_exit(int* out) {
  if (threadIdx.x & 1) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}
__global__ void mixed_barriers(int* out) {
  if ((threadIdx.x & 31) < 16) __syncwarp(); else __syncthreads();
  out[threadIdx.x] = 1;
}
"""


def test_emulator_checks_barriers(cuda_emulator, tmp_path):
    """The emulator runs correct code and rejects barriers that not every thread reaches."""
    names = ["good", "divergent_barrier", "shuffle_after_exit", "mixed_barriers"]
    source = cuda_host.EmulatedSource("checks", "checks.cu", names, str(tmp_path),
                                      code=EMULATOR_CHECKS)
    source.build().load()
    out = np.zeros(64, np.int32)
    source.launch("good", 1, 64, (out,))
    t = np.arange(64)
    np.testing.assert_array_equal(out, (63 - t) + (t ^ 1))
    for name, message in [("divergent_barrier", "__syncthreads after some threads"),
                          ("shuffle_after_exit", "warp collective after some lanes"),
                          ("mixed_barriers", "deadlock")]:
        with pytest.raises(RuntimeError, match=message):
            source.launch(name, 1, 64, (out,))


def test_emulator_catches_forgotten_outputs(cuda_emulator):
    """The emulator's fresh arrays are not zero: an unwritten output entry fails the tests."""
    with cuda_emulator.installed():
        a = cupy_loader.xp().empty((3,), np.int32)
    assert (a != 0).all()


# --- CuPy on a GPU: the module cache -----------------------------------------------------------

@over_backends("source", simulator=[sort_cupy.SOURCE], backends=("cupy",))
def test_cupy_module_cache_per_device(backend, source):
    expressions = sort_cupy.CUDA_SOURCES[source]
    module = cupy_loader.get_module(sort_cupy.PACKAGE, source, expressions)
    assert module is cupy_loader.get_module(sort_cupy.PACKAGE, source, expressions)
    with pytest.raises(KeyError):
        cupy_loader.get_kernel(sort_cupy.PACKAGE, source, "sg_sort_small<float>")
