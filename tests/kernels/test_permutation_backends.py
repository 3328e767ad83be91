"""Permutations on every backend (the `backend` fixture, tests/_backends.py): `inverse_rows`
and `scatter_rows` against the definitions (inv[perm[i]] = i; out[perm[i]] = values[i], zeros
elsewhere, written out below with NumPy fancy indexing) and, on the device backends, the CPU
backend, bit for bit; values of every dtype move as raw bits (NaN payloads, -0.0).

Kernel paths: the staged scatter (an output row staged in shared memory, written coalesced;
on the simulator's lowered constants rows of up to 16 four-byte entries) and the direct one
(zeroes the output first: 9000 float32 entries on CuPy, more than 16 on the simulator), partial
permutations (m < n, the backward of top-k), out-of-range entries (skipped on the device
backends; the CPU entry point rejects them before its row function runs).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from _backends import CUPY, DEVICE, PUBLIC, PUBLIC_DEVICE, cpu_result, over_backends, seed

from sortgrad import kernels
from sortgrad.kernels._cuda import cupy_loader
from sortgrad.testing import SIZES, assert_same_bits, make_keys, random_perms

OP = "permutation"
FLOATS = ("float16", "float32", "float64")


def perms(rng, rows, m, n):
    """rows random partial permutations: the first m entries of permutations of 0..n-1."""
    return np.ascontiguousarray(random_perms(rng, (rows,), n, np.int32)[:, :m])


def values_of(rng, shape, dtype, pattern=None):
    pattern = pattern or ("special" if dtype in FLOATS else "random")
    return make_keys(rng, shape, dtype, pattern, payloads=True, more_subnormals=True)


def scatter_definition(values, perm, n):
    """out[r, perm[r, i]] = values[r, i] for entries in [0, n); zeros elsewhere."""
    out = np.zeros(values.shape[:-1] + (n,), values.dtype)
    for r in range(values.shape[0]):
        keep = (perm[r] >= 0) & (perm[r] < n)
        out[r, perm[r][keep]] = values[r][keep]
    return out


def inverse_definition(perm):
    inv = np.zeros(perm.shape, np.int32)
    for r in range(perm.shape[0]):
        inv[r, perm[r]] = np.arange(perm.shape[1], dtype=np.int32)
    return inv


def check_scatter(backend, values, perm, n, out):
    assert_same_bits(out, scatter_definition(values, perm, n), "scatter vs definition")
    if backend.device:
        assert_same_bits(out, cpu_result(OP, "scatter_rows", values, perm, n),
                         "scatter vs CPU backend")


def check_inverse(backend, perm, inv):
    assert inv.dtype == np.int32
    np.testing.assert_array_equal(inv, inverse_definition(perm), err_msg="vs definition")
    if backend.device:
        np.testing.assert_array_equal(inv, cpu_result(OP, "inverse_rows", perm),
                                      err_msg="vs CPU backend")


# --- scatter ----------------------------------------------------------------------------------

SIM_SHAPES = [(1, 0), (0, 4), (1, 1), (3, 5), (2, 16), (2, 17), (1, 33)]
GPU_SHAPES = [(100, 300), (3, 5000), (1, 70000)]
SIM_DTYPES = ("float32", "float64", "float16", "int8", "uint64", "bool")
EMU_DTYPES = ("float32", "float64", "float16", "int8", "bool")


@over_backends("dtype,rows,n,ms",
               simulator=[(d, rows, n, [max(0, n - 3)]) for d in SIM_DTYPES
                          for rows, n in SIM_SHAPES],
               emulator=[(d, 3, n, sorted({0, n // 2, n})) for d in EMU_DTYPES
                         for n in SIZES + (9000,)],
               gpu=[(d, rows, n, sorted({0, n // 2, n})) for d in ("float32", "float64")
                    for rows, n in GPU_SHAPES])
def test_scatter_rows(backend, dtype, rows, n, ms):
    rng = np.random.default_rng(seed("scatter", dtype, rows, n))
    for m in ms:
        perm = perms(rng, rows, m, n)
        values = values_of(rng, (rows, m), dtype)
        check_scatter(backend, values, perm, n, backend.call(OP, "scatter_rows", values, perm, n))


@over_backends("n", simulator=[4, 40], backends=DEVICE)
def test_out_of_range_entries_are_skipped(backend, n):
    """Staged (n = 4) and direct (n = 40 on the lowered constants) scatter; the inverse of a
    valid row next to a row with out-of-range entries."""
    perm = np.array([[5 if n == 4 else 50, -1, 0, 2**31 - 1], [1, 0, 2, 3]], np.int32)
    values = np.arange(1, 9, dtype=np.float32).reshape(2, 4)
    out = backend.call(OP, "scatter_rows", values, perm, n)
    want = np.zeros((2, n), np.float32)
    want[0, 0], want[1, :4] = 3.0, [6.0, 5.0, 7.0, 8.0]
    np.testing.assert_array_equal(out, want)
    inv = backend.call(OP, "inverse_rows", perm)
    np.testing.assert_array_equal(inv[1], [1, 0, 2, 3])


@over_backends("n", emulator=[5, 33, 1025, 9000], backends=DEVICE)
def test_scatter_skips_out_of_range(backend, n):
    rng = np.random.default_rng(n)
    perm = perms(rng, 2, n, n)
    perm[:, 0], perm[:, -1] = -1, n + 3
    values = rng.standard_normal((2, n)).astype(np.float32)
    out = backend.call(OP, "scatter_rows", values, perm, n)
    assert_same_bits(out, scatter_definition(values, perm, n))


# --- inverse ----------------------------------------------------------------------------------

@over_backends("rows,n", simulator=SIM_SHAPES,
               emulator=[(rows, n) for n in SIZES + (9000,) for rows in (1, 5)],
               gpu=GPU_SHAPES)
def test_inverse_rows(backend, rows, n):
    perm = perms(np.random.default_rng(seed("inverse", rows, n)), rows, n, n)
    check_inverse(backend, perm, backend.call(OP, "inverse_rows", perm))


# --- out= (the row-function protocol) -----------------------------------------------------------

# staged (n <= 16 entries on the simulator) and direct (zeroes out first: 9000 float32 on CuPy)
@over_backends("rows,n", simulator=[(1, 0), (3, 5), (2, 17), (1, 33)],
               emulator=[(3, 0), (3, 33), (3, 9000)])
def test_out_permutations(backend, rows, n):
    rng = np.random.default_rng(seed("out-perm", rows, n))
    backend.check_out(OP, "inverse_rows", perms(rng, rows, n, n))
    part = perms(rng, rows, n // 2, n)
    values = values_of(rng, part.shape, "float32")
    backend.check_out(OP, "scatter_rows", values, part, n)


def test_row_functions_take_out_and_stream_by_keyword(backend):
    module = backend.module(OP)
    for fn in (module.inverse_rows, module.scatter_rows):
        params = inspect.signature(fn).parameters
        for name in ("out", "stream") if backend.device else ("out",):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (fn.__name__, name)
            assert params[name].default is None


# --- streams ----------------------------------------------------------------------------------

@over_backends("rows,n", simulator=[(2, 20)], gpu=[(64, 5000)], backends=DEVICE)
def test_permutations_on_streams(backend, rows, n):
    rng = np.random.default_rng(seed("stream", rows, n))
    perm = perms(rng, rows, n, n)
    values = values_of(rng, (rows, n - 2), "float64")
    for stream in backend.streams():
        check_inverse(backend, perm, backend.call(OP, "inverse_rows", perm, stream=stream))
        part = np.ascontiguousarray(perm[:, :-2])
        check_scatter(backend, values, part, n,
                      backend.call(OP, "scatter_rows", values, part, n, stream=stream))


# --- backend-specific: launch batches of the CuPy kernels ----------------------------------------

@over_backends("n", simulator=[5, 3000], backends=CUPY)
def test_row_batches(backend, n, monkeypatch):
    """Launches of at most MAX_ROWS_PER_LAUNCH rows (int32 row numbers in the kernels)."""
    monkeypatch.setattr(cupy_loader, "MAX_ROWS_PER_LAUNCH", 4)
    rng = np.random.default_rng(seed("batches", n))
    perm = perms(rng, 11, n, n)
    check_inverse(backend, perm, backend.call(OP, "inverse_rows", perm))
    part = np.ascontiguousarray(perm[:, : n // 2])
    values = values_of(rng, part.shape, "float32")
    check_scatter(backend, values, part, n, backend.call(OP, "scatter_rows", values, part, n))


# --- the public API with backend arrays ----------------------------------------------------------

@over_backends("n,m", simulator=[(20, 5), (50, 50)], backends=PUBLIC)
def test_public_api(backend, n, m):
    """Batch shapes through the public entry points; the backend named or followed."""
    rng = np.random.default_rng(seed("public", n, m))
    p = random_perms(rng, (2, 3), n, np.int32)
    inv = kernels.inverse_permutation(backend.to_backend(p), backend=backend.kind)
    assert backend.is_native(inv) and inv.shape == p.shape
    check_inverse(backend, p.reshape(-1, n), backend.to_host(inv).reshape(-1, n))
    v = values_of(rng, (2, 3, m), "float64")
    part = np.ascontiguousarray(p[..., :m])
    out = kernels.permutation_scatter(backend.to_backend(v), backend.to_backend(part), n + 10)
    assert backend.is_native(out) and out.shape == (2, 3, n + 10)
    check_scatter(backend, v.reshape(-1, m), part.reshape(-1, m), n + 10,
                  backend.to_host(out).reshape(-1, n + 10))


@over_backends("n", simulator=[4], backends=PUBLIC_DEVICE)
def test_argument_errors(backend, n):
    with pytest.raises(TypeError, match="host array"):
        kernels.inverse_permutation(np.arange(n, dtype=np.int32), backend=backend.kind)
    with pytest.raises(TypeError, match="perm must be int32"):
        kernels.inverse_permutation(backend.to_backend(np.arange(n)), backend=backend.kind)
    with pytest.raises(ValueError, match="smaller than the row length"):
        kernels.permutation_scatter(backend.to_backend(np.ones((2, 3), np.float32)),
                                    backend.to_backend(np.zeros((2, 3), np.int32)), 2)
