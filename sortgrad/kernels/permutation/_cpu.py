"""CPU permutation scatter, parallel over rows. Values are moved as raw bits (viewed as
unsigned integers of the same width), so every dtype takes the same compiled code."""

from __future__ import annotations

import numba
import numpy as np

from .._keys import key_dtype


@numba.njit(parallel=True, cache=True, nogil=True)
def _scatter_rows(values, perm, out):
    """out[r, perm[r, i]] = values[r, i]; out must be zero on entry."""
    rows, m = perm.shape
    for r in numba.prange(rows):
        for i in range(m):
            out[r, perm[r, i]] = values[r, i]


@numba.njit(parallel=True, cache=True, nogil=True)
def _inverse_rows(perm, out):
    rows, n = perm.shape
    for r in numba.prange(rows):
        for i in range(n):
            out[r, perm[r, i]] = i


def scatter_rows(values: np.ndarray, perm: np.ndarray, n: int) -> np.ndarray:
    rows = perm.shape[0]
    out = np.zeros((rows, n), dtype=values.dtype)
    if values.size:
        bits = key_dtype(values.dtype) if values.dtype != np.bool_ else np.uint8
        _scatter_rows(values.view(bits), perm, out.view(bits))
    return out


def inverse_rows(perm: np.ndarray) -> np.ndarray:
    out = np.empty(perm.shape, dtype=np.int32)
    if perm.size:
        _inverse_rows(perm, out)
    return out
