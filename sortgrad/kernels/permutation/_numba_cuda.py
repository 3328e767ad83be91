"""Numba CUDA inverse permutation and permutation scatter, staged through shared memory.

Contract (the row-function protocol of `sortgrad.kernels._backends`; called by
`sortgrad.kernels.inverse_permutation` / `permutation_scatter` after validation):
- `inverse_rows(perm, *, out=None, stream=None) -> inv`: perm int32 (rows, n);
  inv[r, perm[r, i]] = i.
- `scatter_rows(values, perm, n, *, out=None, stream=None) -> out`: values (rows, m) of a dtype
  in DTYPES, perm int32 (rows, m), out (rows, n) of values' dtype: out[r, perm[r, i]] =
  values[r, i], zeros elsewhere (the direct path zeroes `out` first; the staged one writes
  every entry).
Entries of perm outside [0, n) are skipped, never written (memory safety; the dispatch does not
check entries). With repeated entries one of the values lands (which one is unspecified); an
inverse of a non-permutation has unspecified entries (zero where nothing landed). Values move as
raw bits, so every dtype keeps its exact bits. Results are written into `out` when given
(returned as given), else into new arrays of the input's kind; all work is queued on `stream`
without synchronising.

Launch mapping
- Rows of n <= PERM_STAGE_BYTES / itemsize: a block takes as many whole rows as fit in its
  shared stage, zeroes the stage, scatters into it (random accesses hit shared memory only),
  and writes the stage back: reads of perm/values and writes of out are both coalesced.
- Longer rows: a zero fill, then a grid-stride scatter straight to global memory (coalesced
  reads, scattered writes).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import cuda

from .._cuda import numba_support as ns

DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
          "uint16", "uint32", "uint64", "bool")

PERM_THREADS = 256          # threads per block (multiple of 32)
PERM_STAGE_BYTES = 16384    # shared stage per block


def _config():
    threads = int(PERM_THREADS)
    if threads % 32 or threads > 1024:
        raise ValueError("PERM_THREADS must be a multiple of 32, at most 1024")
    return threads, int(PERM_STAGE_BYTES)


@functools.lru_cache(maxsize=None)
def _staged_kernel(out_dtype_name: str, threads: int, stage_len: int):
    """Rows [b*rows_per_block, ...) of a launch through a shared stage of out's dtype.
    inverse: the value landing at perm[r, i] is i, else values[r, i]."""
    out_t = numba.from_dtype(np.dtype(out_dtype_name))

    @cuda.jit
    def kernel(values, perm, inverse, rows, m, n, rows_per_block, out):
        stage = cuda.shared.array(stage_len, out_t)
        tid = cuda.threadIdx.x
        r0 = np.int64(cuda.blockIdx.x) * rows_per_block
        nr = rows - r0
        if nr > rows_per_block:
            nr = rows_per_block
        for p in range(tid, nr * n, threads):
            stage[p] = 0
        cuda.syncthreads()
        for p in range(tid, nr * m, threads):
            local_row = p // m
            i = p - local_row * m
            t = perm[r0 * m + p]
            if t >= 0 and t < n:
                if inverse:
                    stage[local_row * n + t] = i
                else:
                    stage[local_row * n + t] = values[r0 * m + p]
        cuda.syncthreads()
        for p in range(tid, nr * n, threads):
            out[r0 * n + p] = stage[p]

    return kernel


@cuda.jit
def _direct_kernel(values, perm, inverse, rows, m, n, out):
    """out[r, perm[r, i]] = values[r, i] (or i), grid-stride over all rows * m entries."""
    p = np.int64(cuda.grid(1))
    step = np.int64(cuda.gridsize(1))
    while p < rows * m:
        r = p // m
        i = p - r * m
        t = perm[p]
        if t >= 0 and t < n:
            if inverse:
                out[r * n + t] = i
            else:
                out[r * n + t] = values[p]
        p += step


def _run(values_bits, perm, rows: int, m: int, n: int, out_bits, inverse: bool, stream):
    threads, stage_bytes = _config()
    stage_len = stage_bytes // np.dtype(out_bits.dtype).itemsize
    if rows == 0 or n == 0:
        return
    if n <= stage_len:
        rows_per_block = max(1, stage_len // n)
        kernel = _staged_kernel(np.dtype(out_bits.dtype).name, threads, stage_len)
        kernel[-(-rows // rows_per_block), threads, stream](values_bits, perm, inverse, rows, m,
                                                            n, rows_per_block, out_bits)
        return
    if not inverse:
        ns.fill(out_bits, 0, stream)
    if m:
        _direct_kernel[ns.grid_for(rows * m, threads), threads, stream](
            values_bits, perm, inverse, rows, m, n, out_bits)


def inverse_rows(perm, *, out=None, stream=None):
    """inv[r, perm[r, i]] = i for each row of an int32 (rows, n) device array. `out`: the inv
    array to write (returned); the kernels write it directly."""
    p, kind = ns.as_device(perm)
    stream_ = ns.resolve_stream(stream, perm)
    rows, n = (int(d) for d in p.shape)
    if out is None:
        inv = ns.empty((rows, n), np.int32, kind, stream_)
        result = ns.like_input(inv, kind)
    else:
        (inv,), result = ns.out_views((out,)), out
    flat_p = ns.flat(p)
    _run(ns.placeholder(np.int32), flat_p, rows, n, n, ns.flat(inv), True, stream_)
    return result


def scatter_rows(values, perm, n, *, out=None, stream=None):
    """out[r, perm[r, i]] = values[r, i], zeros elsewhere; out (rows, n) of values' dtype.
    `out`: the array to write (returned); the kernels write it directly."""
    v, kind = ns.as_device(values)
    p, _ = ns.as_device(perm)
    stream_ = ns.resolve_stream(stream, values)
    rows, m = (int(d) for d in v.shape)
    n = int(n)
    if out is None:
        target = ns.empty((rows, n), v.dtype, kind, stream_)
        result = ns.like_input(target, kind)
    else:
        (target,), result = ns.out_views((out,)), out
    _run(ns.bits_view(ns.flat(v)), ns.flat(p), rows, m, n, ns.bits_view(ns.flat(target)),
         False, stream_)
    return result


def ptx_cases(dtypes=("float16", "float32", "float64", "int8")):
    """(dispatcher, signature) pairs for `numba_support.compile_ptx_cases`."""
    from numba import types
    threads, stage_bytes = _config()
    i64, i32a = types.int64, types.int32[::1]
    cases = []
    for name in dtypes:
        bits = ns.uint_dtype(name)
        bits_t = numba.from_dtype(bits)[::1]
        cases.append((_staged_kernel(bits.name, threads, stage_bytes // bits.itemsize),
                      (bits_t, i32a, types.boolean, i64, i64, i64, i64, bits_t)))
        cases.append((_direct_kernel, (bits_t, i32a, types.boolean, i64, i64, i64, bits_t)))
    cases.append((_staged_kernel("int32", threads, stage_bytes // 4),
                  (i32a, i32a, types.boolean, i64, i64, i64, i64, i32a)))
    cases.append((_direct_kernel, (i32a, i32a, types.boolean, i64, i64, i64, i32a)))
    return cases
