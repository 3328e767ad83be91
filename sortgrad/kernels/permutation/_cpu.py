"""CPU permutation scatter, parallel over rows. Values are moved as raw bits (viewed as
unsigned integers of the same width), so every dtype takes the same compiled code."""

from __future__ import annotations

import numba
import numpy as np

from .._rows import row_parallel

from .._keys import key_dtype

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


@row_parallel
def _gather_rows(values, perm, out):
    rows, m = perm.shape
    for r in numba.prange(rows):
        for i in range(m):
            out[r, i] = values[r, perm[r, i]]


def _bits_dtype(dtype):
    """The unsigned integer dtype of the same width, or None (e.g. complex128: 16 bytes)."""
    if dtype.itemsize not in (1, 2, 4, 8) or dtype.kind in "OV":
        return None
    return np.uint8 if dtype == np.bool_ else key_dtype(dtype)


def gather_rows(values: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """out[r, i] = values[r, perm[r, i]] (the values' exact bits)."""
    return gather_rows_into(values, perm, np.empty(perm.shape, dtype=values.dtype))


def gather_rows_into(values: np.ndarray, perm: np.ndarray, out: np.ndarray) -> np.ndarray:
    """gather_rows writing into `out` (C-contiguous, perm's shape, values' dtype); returns it."""
    if out.size:
        bits = _bits_dtype(values.dtype)
        if bits is None:
            out[...] = np.take_along_axis(values, perm, axis=-1)
        else:
            _gather_rows(np.ascontiguousarray(values).view(bits), perm, out.view(bits))
    return out


def scatter_rows(values: np.ndarray, perm: np.ndarray, n: int, *, out=None) -> np.ndarray:
    """out[r, perm[r, i]] = values[r, i], zeros elsewhere; out (rows, n) of values' dtype."""
    rows = perm.shape[0]
    if out is None:
        out = np.zeros((rows, n), dtype=values.dtype)
    else:
        out[...] = 0
    if values.size:
        bits = _bits_dtype(values.dtype)
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
