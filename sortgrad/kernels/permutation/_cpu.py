"""CPU permutation scatter, parallel over rows. Values are moved as raw bits (viewed as
unsigned integers of the same width), so every dtype takes the same compiled code. The zero fill
and the scatter are one pass per row (the backward of top-k writes n zeros per k values: a
separate fill would stream the whole output through memory twice)."""

from __future__ import annotations

import numba
import numpy as np

from .._rows import bits_dtype, row_parallel

DTYPES = None  # values of any dtype move as bits (or through NumPy)


@row_parallel
def _zero_scatter_rows(out, values, perm):
    """out[r] = 0, then out[r, perm[r, i]] = values[r, i]: one pass per row, the values landing
    while its zeros are still in cache."""
    rows, n = out.shape
    m = perm.shape[1]
    for r in numba.prange(rows):
        row = out[r]
        for j in range(n):
            row[np.uint64(j)] = 0
        for i in range(m):
            row[perm[r, i]] = values[r, i]


@row_parallel
def _inverse_rows(perm, out):
    rows, n = perm.shape
    for r in numba.prange(rows):
        for i in range(n):
            out[r, perm[r, i]] = i


def scatter_rows(values: np.ndarray, perm: np.ndarray, n: int, *, out=None) -> np.ndarray:
    """out[r, perm[r, i]] = values[r, i], zeros elsewhere; out (rows, n) of values' dtype."""
    rows = perm.shape[0]
    if out is None:
        out = np.empty((rows, n), dtype=values.dtype)
    bits = bits_dtype(values.dtype)
    if bits is None:  # e.g. complex128: NumPy
        out[...] = 0
        if values.size:
            np.put_along_axis(out, perm, values, axis=-1)
        return out
    if out.size == 0:
        return out
    # A single long row stays on one thread: splitting its fill over two was no faster on the
    # 2-core machine (the fill runs at memory speed). XLA hands over freshly mapped output
    # buffers of 32 MiB and more, whose first touch costs a page fault per 4 KiB (~2 us in the
    # VM: ~35 ms for 64 MiB, ten times the fill); madvise(MADV_HUGEPAGE) cut that to ~8 ms when
    # calls came back to back, but made it 100-300 ms when the VM host had reclaimed the freed
    # huge pages between calls (interleaved benchmark rounds), so the pages are left alone.
    _zero_scatter_rows(out.view(bits), values.view(bits), perm)
    return out


def inverse_rows(perm: np.ndarray, *, out=None) -> np.ndarray:
    """out[r, perm[r, i]] = i (int32)."""
    if out is None:
        out = np.empty(perm.shape, dtype=np.int32)
    if perm.size:
        _inverse_rows(perm, out)
    return out
