"""Top-k on every backend (the `backend` fixture, tests/_backends.py): `top_k_rows` against the
oracle `sortgrad.testing.reference_top_k` (IEEE totalOrder, ties to the lower index) and, on
the device backends, the CPU backend -- values bit for bit, indices exactly; k = 0, 1, n and
the thresholds of the kernels (warp filter up to 32, radix select, the sort path).

Cases come in three tiers (`over_backends`): small rows everywhere (on the simulator the lowered
constants make k <= 8 a radix select over a 16-key cache and split rows into 8-element chunks),
rows past the default thresholds on every backend but the simulator, the longest on real
devices only. Kernel paths of the CuPy kernels: split rows (several blocks per row, then a
reduction), a short last chunk, row batches.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest
from _backends import CUPY, DEVICE, PUBLIC, PUBLIC_DEVICE, cpu_result, over_backends, seed

from sortgrad import kernels
from sortgrad.kernels._cuda import cupy_loader
from sortgrad.kernels.top_k import _cupy as topk_cupy
from sortgrad.testing import SIZES, assert_same_bits, make_keys, reference_top_k

OP = "top_k"
OTHER_DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                "uint64")


def keys(rng, shape, dtype, pattern):
    return make_keys(rng, shape, dtype, pattern, payloads=True, more_subnormals=True)


def _order(x):
    """Each row's full totalOrder ranking (the oracle's top-k for every k is its prefix)."""
    return [reference_top_k(row, row.shape[0])[1] for row in x]


def check_top_k(backend, x, k, values, indices, order=None):
    rows = x.shape[0]
    assert values.shape == indices.shape == (rows, k) and indices.dtype == np.int32
    assert values.dtype == x.dtype
    order = _order(x) if order is None else order
    want_indices = np.array([o[:k] for o in order], np.int64).reshape(rows, k)
    np.testing.assert_array_equal(indices, want_indices, err_msg=f"indices vs oracle, k={k}")
    assert_same_bits(values, np.take_along_axis(x, want_indices, axis=1), f"values, k={k}")
    if backend.device:
        cpu_values, cpu_indices = cpu_result(OP, "top_k_rows", x, k)
        assert_same_bits(values, cpu_values, f"values vs CPU backend, k={k}")
        np.testing.assert_array_equal(indices, cpu_indices, err_msg=f"vs CPU backend, k={k}")


def _ks(n):
    return sorted({k for k in (0, 1, 5, 32, 33, 100, 2049, n) if k <= n})


# 32- and 64-bit floats take every small case; the other key widths and kinds a few (the
# kernels differ between dtypes only in the key function and the pass count).
SMALL = [((1, 1), [0, 1]), ((3, 5), [0, 1, 5]), ((2, 31), [1, 8, 9, 31]), ((1, 33), [2, 33]),
         ((1, 40), [1, 7, 8, 9])]
TOPK_SIM = ([(d, rows, n, "special", ks) for d in ("float32", "float64")
             for (rows, n), ks in SMALL]
            + [(d, 2, 31, "special", [1, 9]) for d in ("float16", "int32", "uint64", "int8")]
            + [(d, 1, 40, "special", [7]) for d in ("float16", "uint64")])
TOPK_EMU = ([("float32", 1 if n >= 4097 else 2, n, p, _ks(n)) for n in SIZES
             for p in ("random", "ties", "special")]
            + [(d, 1 if n >= 4097 else 2, n, "special", _ks(n)) for d in ("float16", "float64")
               for n in (33, 1025, 4097)]
            + [(d, 2, n, "random", _ks(n)) for d in OTHER_DTYPES for n in (1500, 1504)])
TOPK_GPU = [(d, rows, n, "special", ks) for d in ("float32", "float64")
            for (rows, n), ks in [((50, 4096), [1, 16, 64, 256, 1024, 1025]),
                                  ((2, 100000), [1, 64, 1024])]]


@functools.cache
def _case(dtype, rows, n, pattern):
    x = keys(np.random.default_rng(seed("topk", dtype, rows, n, pattern)), (rows, n), dtype,
             pattern)
    return x, _order(x)


@over_backends("dtype,rows,n,pattern,ks", simulator=TOPK_SIM, emulator=TOPK_EMU, gpu=TOPK_GPU)
def test_top_k(backend, dtype, rows, n, pattern, ks):
    x, order = _case(dtype, rows, n, pattern)
    for k in ks:
        values, indices = backend.call(OP, "top_k_rows", x, k)
        check_top_k(backend, x, k, values, indices, order)


@over_backends("pattern,extra", emulator=[(p, e) for p in ("random", "ties", "special")
                                          for e in (5, 8)])
def test_top_k_split_rows(backend, pattern, extra):
    """Few long rows: the CuPy filter splits each row over several blocks, then reduces
    (extra 5: scalar loads, 8: vector loads)."""
    x = keys(np.random.default_rng(seed("split", pattern, extra)),
             (1, 3 * topk_cupy.MIN_CHUNK + extra), "float32", pattern)
    order = _order(x)
    for k in (1, 7, 32, 33, 300):
        check_top_k(backend, x, k, *backend.call(OP, "top_k_rows", x, k), order)


@over_backends("n,fill", simulator=[(3203, 200), (3200, 200), (3203, 3195), (3200, 3195)],
               backends=CUPY)
def test_top_k_short_last_chunk(backend, n, fill):
    """Many chunks per row and a last chunk shorter than k (its candidate list is padded with
    max() items), with keys equal to that padding's: NaNs with all bits set. MIN_CHUNK 64 and
    64 SMs: 41 chunks of 80, the last of 3 (n = 3203: scalar loads; 3200: vector loads). Rows
    mostly of the lowest key: the k-th largest is one, so padding and real entries tie."""
    backend.configure(OP, cupy={"MIN_CHUNK": 64})
    backend.set_sm_count(64)  # a real device keeps its own (132 SMs split the same way)
    rng = np.random.default_rng(seed("short-last-chunk", n, fill))
    x = keys(rng, (1, n), "float32", "special")
    x.view(np.uint32)[0, rng.choice(n, fill, replace=False)] = 0xFFFFFFFF
    order = _order(x)
    for k in (5, 40, 64):
        check_top_k(backend, x, k, *backend.call(OP, "top_k_rows", x, k), order)


@over_backends("n", emulator=[3000])
def test_top_k_ascending_rows(backend, n):
    """Increasing rows: every element beats the running threshold of the warp filter."""
    x = np.arange(2 * n, dtype=np.float32).reshape(2, n)
    for k in (1, 32, 500):
        check_top_k(backend, x, k, *backend.call(OP, "top_k_rows", x, k))


def test_top_k_totalorder_nans_and_zeros(backend):
    x = np.array([[1.0, -np.nan, np.nan, -0.0, 0.0, np.inf, -np.inf, np.nan, -0.0, 0.0, 1.0,
                   -np.nan, 3.0, -1.0, 0.0, 2.0, 1.0, np.nan]], np.float32)
    for k in (1, 3, 8, 18):
        values, indices = backend.call(OP, "top_k_rows", x, k)
        want_values, want_indices = reference_top_k(x[0], k)
        np.testing.assert_array_equal(indices[0], want_indices)
        assert_same_bits(values[0], want_values)
        check_top_k(backend, x, k, values, indices)


def test_top_k_distinct_and_constant_rows(backend):
    rng = np.random.default_rng(5)
    x = np.stack([rng.permutation(48).astype(np.float32), np.full(48, 2.0, np.float32)])
    values, indices = backend.call(OP, "top_k_rows", x, 6)
    np.testing.assert_array_equal(indices[0], np.argsort(-x[0], kind="stable")[:6])
    np.testing.assert_array_equal(indices[1], np.arange(6))
    check_top_k(backend, x, 6, values, indices)


def test_top_k_splits_long_rows_into_chunks(backend):
    """Few long rows (on the lowered simulator constants: the two-stage chunked path); ties
    across chunk boundaries keep the lowest indices."""
    if backend.kind == "numba":
        from sortgrad.kernels._cuda import numba_support as ns
        module = backend.module(OP)
        assert module._chunks(1, 64, 3, 8, ns.device_limits().multiprocessor_count) > 1
    x = np.zeros((1, 64), np.float32)
    x[0, [5, 20, 40, 63]] = 1.0
    values, indices = backend.call(OP, "top_k_rows", x, 6)
    np.testing.assert_array_equal(indices[0], [5, 20, 40, 63, 0, 1])
    check_top_k(backend, x, 6, values, indices)


# --- out= (the row-function protocol) -----------------------------------------------------------

# one block per row, split rows, the sort path, k = 0, k = n
@over_backends("shape,k,pattern",
               simulator=[((3, 5), 1, "special"), ((1, 40), 7, "special"),
                          ((1, 40), 9, "special"), ((2, 31), 0, "special")],
               emulator=[((2, 100), 100, "ties"), ((2, 1500), 5, "ties"),
                         ((2, 1500), 100, "ties"), ((1, 4097), 2049, "ties"),
                         ((3, 40), 0, "ties"), ((1, 3 * topk_cupy.MIN_CHUNK + 5), 7, "ties")])
def test_out_top_k_rows(backend, shape, k, pattern):
    x = keys(np.random.default_rng(seed("out-topk", shape, k)), shape, "float64", pattern)
    backend.check_out(OP, "top_k_rows", x, k)


def test_row_functions_take_out_and_stream_by_keyword(backend):
    params = inspect.signature(backend.module(OP).top_k_rows).parameters
    for name in ("out", "stream") if backend.device else ("out",):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default is None


# --- streams ----------------------------------------------------------------------------------

@over_backends("rows,n,k", simulator=[(2, 40, 7)], gpu=[(64, 5000, 16)], backends=DEVICE)
def test_top_k_on_streams(backend, rows, n, k):
    x = keys(np.random.default_rng(seed("stream", n)), (rows, n), "float32", "random")
    for stream in backend.streams():
        values, indices = backend.call(OP, "top_k_rows", x, k, stream=stream)
        check_top_k(backend, x, k, values, indices)


# --- backend-specific: launch batches of the CuPy kernels ----------------------------------------

@over_backends("n", simulator=[5, 3000], backends=CUPY)
def test_row_batches(backend, n, monkeypatch):
    """Launches of at most MAX_ROWS_PER_LAUNCH rows (int32 row numbers in the kernels)."""
    monkeypatch.setattr(cupy_loader, "MAX_ROWS_PER_LAUNCH", 4)
    x = keys(np.random.default_rng(seed("batches", n)), (11, n), "float32", "ties")
    for k in sorted({3, min(40, n), n}):
        check_top_k(backend, x, k, *backend.call(OP, "top_k_rows", x, k))


# --- the public API with backend arrays ----------------------------------------------------------

@over_backends("n,k", simulator=[(20, 5)], emulator=[(1025, 7)], backends=PUBLIC)
def test_public_api(backend, n, k):
    x = keys(np.random.default_rng(seed("public", n)), (2, 3, n), "float32", "special")
    values, indices = kernels.top_k(backend.to_backend(x), k)  # the backend follows the array
    assert backend.is_native(values) and backend.is_native(indices)
    assert values.shape == indices.shape == (2, 3, k)
    rows = x.reshape(-1, n)
    check_top_k(backend, rows, k, backend.to_host(values).reshape(-1, k),
                backend.to_host(indices).reshape(-1, k))
    for stream in backend.streams() if backend.device else [None]:
        values, indices = kernels.top_k(backend.to_backend(x), k, backend=backend.kind,
                                        stream=stream)
        backend.synchronize(stream)
        check_top_k(backend, rows, k, backend.to_host(values).reshape(-1, k),
                    backend.to_host(indices).reshape(-1, k))


@over_backends("n", simulator=[4], backends=PUBLIC_DEVICE)
def test_argument_errors(backend, n):
    with pytest.raises(TypeError, match="host array"):
        kernels.top_k(np.arange(float(n)), 1, backend=backend.kind)
    with pytest.raises(TypeError, match="complex64"):
        kernels.top_k(backend.to_backend(np.zeros((3, n), np.complex64)), 1,
                      backend=backend.kind)
    with pytest.raises(ValueError, match="k must satisfy"):
        kernels.top_k(backend.to_backend(np.zeros((3, n), np.float32)), n + 1,
                      backend=backend.kind)

