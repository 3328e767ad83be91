"""Numba CUDA backend: segmented sort, top-k and permutations against the CPU backend and oracles.

Without a GPU these run on Numba's CUDA simulator (tests/conftest.py sets NUMBA_ENABLE_CUDASIM),
with the tile / stage / select constants lowered so that the multi-tile, multi-pass, chunked and
fallback paths run at sizes of a few dozen elements. On a GPU the same bodies run with both the
lowered and the default constants, and at larger sizes. Results must be bit-identical to the CPU
backend (values compared as raw bits, permutations and indices exactly).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from _emulation import numba_simulator
from numba import cuda

from sortgrad import kernels
from sortgrad.kernels._cuda import numba_support as ns
from sortgrad.kernels.permutation import _numba_cuda as perm_nb
from sortgrad.kernels.segmented_sort import _numba_cuda as sort_nb
from sortgrad.kernels.top_k import _numba_cuda as topk_nb
from sortgrad.testing import reference_segmented_sort, reference_sort_rows, reference_top_k

SIM = bool(numba.config.ENABLE_CUDASIM)
numba_simulator.install()  # conftest installs it for the whole run; idempotent
pytestmark = [
    pytest.mark.skipif(not cuda.is_available(), reason="needs a CUDA GPU or Numba's simulator"),
    pytest.mark.cudasim if SIM else pytest.mark.gpu,
]

# Lowered constants: 16-element sort tiles (rows of 17+ take merge passes), top-k of at most 8
# by radix select with a 16-key row cache and 8-element split chunks, 16-entry permutation stages.
SMALL = {
    sort_nb: dict(SORT_TILE=16, SORT_THREADS=32, MERGE_THREADS=32, MERGE_ITEMS=4),
    topk_nb: dict(TOPK_THREADS=32, TOPK_MAX_K=8, TOPK_CACHE_BYTES=64, TOPK_SPLIT_CHUNK=8),
    perm_nb: dict(PERM_THREADS=32, PERM_STAGE_BYTES=64),
}


@pytest.fixture(scope="module", autouse=True)
def _fast_simulator():
    """The simulator runs each CUDA thread as a Python thread and polls at barriers; a short
    GIL switch interval makes its barriers ~5x faster."""
    old = sys.getswitchinterval()
    if SIM:
        sys.setswitchinterval(5e-5)
    yield
    sys.setswitchinterval(old)


@pytest.fixture(params=["small"] if SIM else ["small", "default"], autouse=True)
def constants(request, monkeypatch):
    if request.param == "small":
        for module, values in SMALL.items():
            for name, value in values.items():
                monkeypatch.setattr(module, name, value)
    return request.param


# Sizes around the warp and the lowered tile (16): one tile, a partial tile, several tiles and
# merge passes. On a GPU also sizes past the default tile (2048) and split chunk (16384).
ROW_SHAPES = [(1, 0), (0, 5), (1, 1), (3, 5), (2, 31), (1, 32), (1, 33), (2, 70)]
if not SIM:
    ROW_SHAPES += [(3, 2047), (2, 2049), (1, 9000), (300, 129), (1, 40000)]

FLOATS = ("float16", "float32", "float64")


def _data(shape, dtype, rng, ties=True):
    """Heavy ties plus the special values of the dtype (NaNs of both signs, infinities, -0.0,
    subnormals, extremes)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape))
    if dtype.name in FLOATS:
        info = np.finfo(dtype)
        tiny_sub = info.smallest_subnormal
        specials = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, tiny_sub, -tiny_sub,
                             info.max, -info.max, info.tiny, 1.0, -1.0, 2.5], dtype=dtype)
        pool = specials if ties else None
        values = rng.integers(-3, 4, size).astype(dtype) if ties else \
            rng.standard_normal(size).astype(dtype)
        if ties:
            pick = rng.random(size) < 0.4
            values[pick] = pool[rng.integers(0, pool.size, int(pick.sum()))]
        return values.reshape(shape)
    if dtype == np.bool_:
        return (rng.random(size) < 0.5).reshape(shape)
    info = np.iinfo(dtype)
    values = rng.integers(-3 if info.min < 0 else 0, 4, size).astype(dtype)
    extremes = np.array([info.min, info.max, 0], dtype=dtype)
    pick = rng.random(size) < 0.2
    values[pick] = extremes[rng.integers(0, 3, int(pick.sum()))]
    return values.reshape(shape)


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8) if a.dtype.itemsize == 1 else a.view(ns.uint_dtype(a.dtype))


def assert_same_bits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(_bits(got), _bits(want))


def _host(a):
    return a.copy_to_host()


# --- numba_support --------------------------------------------------------------------------

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


@pytest.mark.skipif(not SIM, reason="checks the simulator's shared-array allocation")
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
    out = np.zeros((3, 64, 2), np.int32)
    _shared_identity_kernel[3, 64](out)
    nxt = (np.arange(64) + 1) % 64
    np.testing.assert_array_equal(out[..., 0], np.broadcast_to(nxt, (3, 64)))
    np.testing.assert_array_equal(out[..., 1], np.broadcast_to(-nxt, (3, 64)))


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


# --- segmented sort ---------------------------------------------------------------------------

# 32- and 64-bit floats take every shape; the other key kinds and widths one short row, one past
# a warp and one with merge passes (the kernels differ between dtypes only in the key function).
SORT_PARAMS = [(d, shape) for d in ("float32", "float64") for shape in ROW_SHAPES]
SORT_PARAMS += [(d, shape) for d in ("float16", "int32", "uint64", "int8", "bool")
                for shape in [(3, 5), (1, 33), (2, 70)]]


@pytest.mark.parametrize("dtype,shape", SORT_PARAMS, ids=str)
def test_sort_rows_matches_cpu(dtype, shape):
    rng = np.random.default_rng(hash((dtype, shape)) % 2**32)
    x = _data(shape, dtype, rng)
    dx = cuda.to_device(x)
    for descending in (False, True):
        values, perm = sort_nb.sort_rows(dx, descending)
        want_values, want_perm = kernels.segmented_sort(x, descending=descending)
        assert perm.dtype == np.int32
        np.testing.assert_array_equal(_host(perm), want_perm)
        assert_same_bits(_host(values), want_values)
    np.testing.assert_array_equal(_host(dx), x)  # input untouched


def test_sort_rows_matches_the_oracle():
    rng = np.random.default_rng(7)
    x = _data((3, 37), "float32", rng)
    for descending in (False, True):
        values, perm = sort_nb.sort_rows(cuda.to_device(x), descending)
        want_values, want_perm = reference_sort_rows(x, descending)
        np.testing.assert_array_equal(_host(perm), want_perm)
        assert_same_bits(_host(values), want_values)


def test_sort_distinct_values_and_all_ties():
    rng = np.random.default_rng(3)
    x = np.stack([rng.permutation(40).astype(np.float64), np.zeros(40), -np.zeros(40)])
    x[2, ::3] = 0.0  # -0.0 and +0.0 interleaved: equal, original order kept
    values, perm = sort_nb.sort_rows(cuda.to_device(x), False)
    np.testing.assert_array_equal(_host(perm)[0], np.argsort(x[0]))
    np.testing.assert_array_equal(_host(perm)[1:], np.tile(np.arange(40), (2, 1)))
    assert_same_bits(_host(values)[2], x[2])


SEGMENT_CASES = {
    "mixed": [0, 0, 1, 3, 40, 41, 41, 45, 150, 190],      # empty, 1, 2, long (37), tail 10
    "one_long_among_tiny": [0, 2, 3, 5, 6, 90, 92, 93, 95, 200],
    "all_empty": [0, 0, 0],
    "no_segments": [0],
    "whole": [0, 200],
    "exact_tiles": [0, 16, 48, 112],
}


SEGMENT_PARAMS = [(case, "float32") for case in SEGMENT_CASES]
SEGMENT_PARAMS += [("mixed", "float16"), ("mixed", "int64"), ("one_long_among_tiny", "float64"),
                   ("exact_tiles", "uint64")]


@pytest.mark.parametrize("case,dtype", SEGMENT_PARAMS)
def test_sort_segments_matches_cpu(case, dtype):
    rng = np.random.default_rng(len(case))
    offsets = np.array(SEGMENT_CASES[case], np.int64)
    x = _data((200,), dtype, rng)
    dx = cuda.to_device(x)
    for descending in (False, True):
        values, perm = sort_nb.sort_segments(dx, offsets, descending)
        want_values, want_perm = kernels.segmented_sort(x, offsets, descending=descending)
        np.testing.assert_array_equal(_host(perm), want_perm)
        assert_same_bits(_host(values), want_values)
        oracle_values, oracle_perm = reference_segmented_sort(x, offsets, descending)
        np.testing.assert_array_equal(_host(perm), oracle_perm)


def test_sort_segments_of_an_empty_array():
    values, perm = sort_nb.sort_segments(cuda.to_device(np.zeros(0, np.float32)),
                                         np.array([0], np.int64), False)
    assert values.shape == perm.shape == (0,)


# --- top-k ------------------------------------------------------------------------------------

TOPK_CASES = [((1, 1), [0, 1]), ((3, 5), [0, 1, 5]), ((2, 31), [1, 8, 9, 31]),
              ((1, 33), [2, 33]), ((1, 40), [1, 7, 8, 9])]
if not SIM:
    TOPK_CASES += [((50, 4096), [1, 16, 64, 256, 1024, 1025]), ((2, 100000), [1, 64, 1024])]
# 32- and 64-bit floats take every case; the other key widths and kinds a few (the simulator
# is slow, and the kernel differs between dtypes only in the key function and pass count).
TOPK_PARAMS = [(d, shape, ks) for d in ("float32", "float64") for shape, ks in TOPK_CASES]
TOPK_PARAMS += [(d, (2, 31), [1, 9]) for d in ("float16", "int32", "uint64", "int8")]
TOPK_PARAMS += [(d, (1, 40), [7]) for d in ("float16", "uint64")]


@pytest.mark.parametrize("dtype,shape,ks", TOPK_PARAMS, ids=str)
def test_top_k_matches_cpu(dtype, shape, ks):
    rng = np.random.default_rng(hash((dtype, shape)) % 2**32)
    x = _data(shape, dtype, rng)
    dx = cuda.to_device(x)
    for k in ks:
        values, indices = topk_nb.top_k_rows(dx, k)
        want_values, want_indices = kernels.top_k(x, k)
        assert values.shape == indices.shape == (shape[0], k) and indices.dtype == np.int32
        np.testing.assert_array_equal(_host(indices), want_indices, err_msg=f"k={k}")
        assert_same_bits(_host(values), want_values)


def test_top_k_totalorder_nans_and_zeros_match_the_oracle():
    x = np.array([[1.0, -np.nan, np.nan, -0.0, 0.0, np.inf, -np.inf, np.nan, -0.0, 0.0, 1.0,
                   -np.nan, 3.0, -1.0, 0.0, 2.0, 1.0, np.nan]], np.float32)
    for k in (1, 3, 8, 18):
        values, indices = topk_nb.top_k_rows(cuda.to_device(x), k)
        want_values, want_indices = reference_top_k(x[0], k)
        np.testing.assert_array_equal(_host(indices)[0], want_indices)
        assert_same_bits(_host(values)[0], want_values)


def test_top_k_distinct_and_constant_rows():
    rng = np.random.default_rng(5)
    x = np.stack([rng.permutation(48).astype(np.float32), np.full(48, 2.0, np.float32)])
    values, indices = topk_nb.top_k_rows(cuda.to_device(x), 6)
    np.testing.assert_array_equal(_host(indices)[0], np.argsort(-x[0], kind="stable")[:6])
    np.testing.assert_array_equal(_host(indices)[1], np.arange(6))


def test_top_k_splits_long_rows_into_chunks():
    """Few long rows go through the two-stage chunked path; ties across chunk boundaries keep
    the lowest indices."""
    assert topk_nb._chunks(1, 64, 3, 8, ns.device_limits().multiprocessor_count) > 1
    x = np.zeros((1, 64), np.float32)
    x[0, [5, 20, 40, 63]] = 1.0
    values, indices = topk_nb.top_k_rows(cuda.to_device(x), 6)
    np.testing.assert_array_equal(_host(indices)[0], [5, 20, 40, 63, 0, 1])


# --- permutations -----------------------------------------------------------------------------

PERM_SHAPES = [(1, 0), (0, 4), (1, 1), (3, 5), (2, 16), (2, 17), (1, 33)]
if not SIM:
    PERM_SHAPES += [(100, 300), (3, 5000), (1, 70000)]


@pytest.mark.parametrize("shape", PERM_SHAPES, ids=str)
def test_inverse_permutation_matches_cpu(shape):
    rows, n = shape
    rng = np.random.default_rng(n)
    perm = np.array([rng.permutation(n) for _ in range(rows)], np.int32).reshape(shape)
    inv = perm_nb.inverse_rows(cuda.to_device(perm))
    assert inv.dtype == np.int32
    np.testing.assert_array_equal(_host(inv), kernels.inverse_permutation(perm))


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int8", "uint64", "bool"])
@pytest.mark.parametrize("shape", PERM_SHAPES, ids=str)
def test_permutation_scatter_matches_cpu(dtype, shape):
    rows, n = shape
    rng = np.random.default_rng(n + 1)
    m = max(0, n - 3)
    perm = np.array([rng.permutation(n)[:m] for _ in range(rows)], np.int32).reshape(rows, m)
    values = _data((rows, m), dtype, rng)
    out = perm_nb.scatter_rows(cuda.to_device(values), cuda.to_device(perm), n)
    assert_same_bits(_host(out), kernels.permutation_scatter(values, perm, n))


@pytest.mark.parametrize("n", [4, 40])  # staged (n <= 16 int32 / float32 entries) and direct
def test_out_of_range_entries_are_skipped(n):
    perm = np.array([[5 if n == 4 else 50, -1, 0, 2**31 - 1], [1, 0, 2, 3]], np.int32)
    values = np.arange(1, 9, dtype=np.float32).reshape(2, 4)
    out = _host(perm_nb.scatter_rows(cuda.to_device(values), cuda.to_device(perm), n))
    want = np.zeros((2, n), np.float32)
    want[0, 0], want[1, :4] = 3.0, [6.0, 5.0, 7.0, 8.0]
    np.testing.assert_array_equal(out, want)
    inv = _host(perm_nb.inverse_rows(cuda.to_device(perm[:, :4] if n == 4 else perm)))
    np.testing.assert_array_equal(inv[1], [1, 0, 2, 3])


# --- out= (the row-function protocol): results written into given arrays -----------------------

def _patterned(shape, dtype):
    """A device array filled with the byte 0xA5 (entries a kernel does not write show up)."""
    host = np.empty(tuple(shape), np.dtype(dtype))
    host.reshape(-1).view(np.uint8)[...] = 0xA5
    return cuda.to_device(host)


def _check_out(fn, *args, **kwargs):
    """fn(*args, out=given) writes the given device arrays and returns those objects; the results
    are bit-identical to fn(*args) (out=None)."""
    fresh = fn(*args, **kwargs)
    single = not isinstance(fresh, tuple)
    fresh = (fresh,) if single else fresh
    given = tuple(_patterned(f.shape, f.dtype) for f in fresh)
    got = fn(*args, out=given[0] if single else given, **kwargs)
    got = (got,) if single else got
    assert isinstance(got, tuple) and len(got) == len(given)
    for g, o, f in zip(got, given, fresh):
        assert g is o, "the function must return the arrays given in out"
        assert_same_bits(_host(g), _host(f))


@pytest.mark.parametrize("shape", [(1, 0), (3, 5), (2, 70)], ids=str)
def test_out_sort_rows(shape):
    x = cuda.to_device(_data(shape, "float32", np.random.default_rng(21)))
    for descending in (False, True):
        _check_out(sort_nb.sort_rows, x, descending)


def test_out_sort_segments():
    x = cuda.to_device(_data((200,), "float16", np.random.default_rng(22)))
    _check_out(sort_nb.sort_segments, x, np.array(SEGMENT_CASES["mixed"], np.int64), True)
    _check_out(sort_nb.sort_segments, cuda.to_device(np.zeros(0, np.float32)),
               np.array([0], np.int64), False)


@pytest.mark.parametrize("shape,k", [((3, 5), 1), ((1, 40), 7), ((1, 40), 9), ((2, 31), 0)],
                         ids=str)
def test_out_top_k_rows(shape, k):  # one block per row, split rows, the sort path, k = 0
    x = cuda.to_device(_data(shape, "float64", np.random.default_rng(23)))
    _check_out(topk_nb.top_k_rows, x, k)


@pytest.mark.parametrize("shape", [(1, 0), (3, 5), (2, 17), (1, 33)], ids=str)
def test_out_permutations(shape):  # staged (n <= 16 entries) and direct (zeroes out first)
    rows, n = shape
    rng = np.random.default_rng(n + 24)
    perm = np.array([rng.permutation(n) for _ in range(rows)], np.int32).reshape(shape)
    _check_out(perm_nb.inverse_rows, cuda.to_device(perm))
    part = np.ascontiguousarray(perm[:, : n // 2])
    values = _data(part.shape, "float32", rng)
    _check_out(perm_nb.scatter_rows, cuda.to_device(values), cuda.to_device(part), n)


def test_row_functions_take_out_and_stream_by_keyword():
    import inspect
    from sortgrad.kernels.isotonic import _numba_cuda as iso_nb
    for fn in (sort_nb.sort_rows, sort_nb.sort_segments, topk_nb.top_k_rows,
               perm_nb.inverse_rows, perm_nb.scatter_rows, iso_nb.isotonic_rows,
               iso_nb.isotonic_vjp_rows):
        params = inspect.signature(fn).parameters
        for name in ("out", "stream"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (fn.__name__, name)
            assert params[name].default is None


# --- the public API with backend="numba" --------------------------------------------------------

def test_public_api_on_numba_device_arrays():
    rng = np.random.default_rng(11)
    x = _data((2, 3, 20), "float32", rng)
    dx = cuda.to_device(x)
    values, perm = kernels.segmented_sort(dx, descending=True, backend="numba")
    want_values, want_perm = kernels.segmented_sort(x, descending=True)
    assert values.shape == x.shape
    np.testing.assert_array_equal(_host(perm), want_perm)
    assert_same_bits(_host(values), want_values)

    values, indices = kernels.top_k(dx, 5)  # backend follows the array
    want_values, want_indices = kernels.top_k(x, 5)
    assert values.shape == (2, 3, 5)
    np.testing.assert_array_equal(_host(indices), want_indices)
    assert_same_bits(_host(values), want_values)

    offsets = np.array([0, 7, 7, 30, 55])
    flat = x.reshape(-1)
    values, perm = kernels.segmented_sort(cuda.to_device(flat), cuda.to_device(offsets))
    want_values, want_perm = kernels.segmented_sort(flat, offsets)
    np.testing.assert_array_equal(_host(perm), want_perm)
    assert_same_bits(_host(values), want_values)

    sort_perm = kernels.segmented_sort(x)[1]
    inv = kernels.inverse_permutation(cuda.to_device(sort_perm), backend="numba")
    assert inv.shape == x.shape
    np.testing.assert_array_equal(_host(inv), kernels.inverse_permutation(sort_perm))
    top_values, top_indices = kernels.top_k(x, 5)
    out = kernels.permutation_scatter(cuda.to_device(top_values), cuda.to_device(top_indices),
                                      20)
    assert out.shape == x.shape
    assert_same_bits(_host(out), kernels.permutation_scatter(top_values, top_indices, 20))


def test_public_api_with_an_explicit_stream():
    stream = cuda.stream()
    x = _data((2, 9), "float64", np.random.default_rng(2))
    values, perm = kernels.segmented_sort(cuda.to_device(x), backend="numba", stream=stream)
    stream.synchronize()
    np.testing.assert_array_equal(_host(perm), kernels.segmented_sort(x)[1])


@pytest.mark.skipif(SIM, reason="CuPy arrays need a GPU")
def test_cupy_arrays_in_cupy_arrays_out():
    cupy = pytest.importorskip("cupy")
    x = _data((4, 300), "float32", np.random.default_rng(4))
    cx = cupy.asarray(x)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:  # launches follow CuPy's current stream
        values, perm = kernels.segmented_sort(cx, backend="numba")
        top_values, top_indices = kernels.top_k(cx, 7, backend="numba")
        out = kernels.permutation_scatter(top_values, top_indices, 300, backend="numba")
    stream.synchronize()
    assert all(isinstance(a, cupy.ndarray) for a in (values, perm, top_values, out))
    want_values, want_perm = kernels.segmented_sort(x)
    assert_same_bits(values.get(), want_values)
    np.testing.assert_array_equal(perm.get(), want_perm)
    want_top = kernels.top_k(x, 7)
    np.testing.assert_array_equal(top_indices.get(), want_top[1])
    assert_same_bits(out.get(), kernels.permutation_scatter(*want_top, 300))


def test_bad_launches_are_refused():
    with pytest.raises(TypeError, match="host array"):
        kernels.segmented_sort(np.arange(4.0), backend="numba")
    with pytest.raises(TypeError, match="host array"):
        kernels.top_k(np.arange(4.0), 1, backend="numba")
    with pytest.raises(TypeError, match="complex64"):
        kernels.segmented_sort(cuda.to_device(np.zeros(4, np.complex64)), backend="numba")
    with pytest.raises(TypeError, match="complex64"):
        kernels.top_k(cuda.to_device(np.zeros(4, np.complex64)), 1, backend="numba")
    with pytest.raises(TypeError, match="perm must be int32"):
        kernels.inverse_permutation(cuda.to_device(np.arange(4)), backend="numba")
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.segmented_sort(cuda.to_device(np.zeros((4, 3), np.float32)).T,
                               backend="numba")
    with pytest.raises(ValueError, match="k must satisfy"):
        kernels.top_k(cuda.to_device(np.zeros(4, np.float32)), 5, backend="numba")


# --- the kernels compile for the real target (NVVM, no GPU needed) ------------------------------

_PTX_SCRIPT = textwrap.dedent("""
    import sys
    try:
        from numba.cuda.cudadrv.nvvm import NVVM
        NVVM()
    except Exception as err:
        print("no NVVM:", err)
        sys.exit(77)
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


@pytest.mark.skipif(not SIM, reason="the simulator run checks the real target's compilation")
def test_kernels_compile_to_ptx():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    result = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr


# --- the GPU benchmark's smoke mode ---------------------------------------------------------------

@pytest.mark.slow
def test_gpu_benchmark_smoke(tmp_path, constants):
    if constants != "small":
        pytest.skip("runs once")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "smoke.json"
    env = dict(os.environ)
    if SIM:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    result = subprocess.run([sys.executable, os.path.join(root, "perf", "bench_gpu_numba.py"),
                             "--smoke", "--out", str(out)], env=env, capture_output=True,
                            text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    import json
    records = json.loads(out.read_text())["records"]
    assert {r["case"] for r in records} >= {"sort_rows8", "sort_ragged", "top_k1",
                                            "scatter_1row"}
    assert all(r["agree"] for r in records)
