"""CPU permutation scatter, parallel over rows. Values are moved as raw bits (viewed as
unsigned integers of the same width), so every dtype takes the same compiled code."""

from __future__ import annotations

import numba
import numpy as np

from .._rows import bits_dtype, row_parallel

DTYPES = None  # values of any dtype move as bits (or through NumPy)


@row_parallel
def _scatter_rows(values, perm, out):
    """out[r, perm[r, i]] = values[r, i]; out must be zero on entry."""
    rows, m = perm.shape
    for r in numba.prange(rows):
        for i in range(m):
            out[r, perm[r, i]] = values[r, i]


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
        out = np.zeros((rows, n), dtype=values.dtype)
    else:
        out[...] = 0
    if values.size:
        bits = bits_dtype(values.dtype)
        if bits is None:
            np.put_along_axis(out, perm, values, axis=-1)
        else:
            _scatter_rows(values.view(bits), perm, out.view(bits))
    return out


def inverse_rows(perm: np.ndarray, *, out=None) -> np.ndarray:
    """out[r, perm[r, i]] = i (int32)."""
    if out is None:
        out = np.empty(perm.shape, dtype=np.int32)
    if perm.size:
        _inverse_rows(perm, out)
    return out
