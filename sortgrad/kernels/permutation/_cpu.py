"""CPU permutation scatter, parallel over rows. Values are moved as raw bits (viewed as
unsigned integers of the same width), so every dtype takes the same compiled code. The zero fill
and the scatter are one pass per row (the backward of top-k writes n zeros per k values: a
separate fill would stream the whole output through memory twice)."""

from __future__ import annotations

import ctypes
import sys

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


# Outputs at least this large are first advised to the kernel as huge-page memory (as NumPy
# does for its own large arrays): XLA hands over freshly mapped buffers, and their first touch
# -- our zero fill -- costs one page fault per 4 KiB (~2 us each in a VM: 35 ms for 64 MiB,
# ten times the fill itself); with 2 MiB pages it is a few hundred faults.
_HUGE_PAGES_MIN_BYTES = 4 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # Linux
_madvise = None


def _advise_huge_pages(a: np.ndarray) -> None:
    """madvise(MADV_HUGEPAGE) on the 2 MiB pages inside `a`'s memory (Linux; a no-op
    elsewhere or where the call fails). Only a hint: the contents and the mapping stay."""
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                pass
    if not _madvise:
        return
    start = a.ctypes.data
    begin = -(-start // _HUGE_PAGE) * _HUGE_PAGE
    end = (start + a.nbytes) // _HUGE_PAGE * _HUGE_PAGE
    if end > begin:
        _madvise(begin, end - begin, _MADV_HUGEPAGE)


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
    if out.nbytes >= _HUGE_PAGES_MIN_BYTES:
        _advise_huge_pages(out)
    # (a single long row stays on one thread: splitting its fill over two was no faster on
    # the 2-core machine, the fill runs at memory speed)
    _zero_scatter_rows(out.view(bits), values.view(bits), perm)
    return out


def inverse_rows(perm: np.ndarray, *, out=None) -> np.ndarray:
    """out[r, perm[r, i]] = i (int32)."""
    if out is None:
        out = np.empty(perm.shape, dtype=np.int32)
    if perm.size:
        _inverse_rows(perm, out)
    return out
