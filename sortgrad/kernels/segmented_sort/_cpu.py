"""CPU segmented sort: NumPy's SIMD sorts on composite keys, Numba for the ragged case.

Stability comes from the key, not from the sort: for keys of at most 32 bits, each element is
sorted as the 64-bit composite (key << 32 | column), which is unique, so any sort (NumPy's
vectorised quicksort here) yields the stable order. 64-bit keys take NumPy's vectorised argsort
and then a pass that puts the columns of each run of equal keys back in increasing order.
"""

from __future__ import annotations

import numba
import numpy as np

from .._common import map_row_chunks
from .._keys import sort_keys

_LOW32 = np.uint64(0xFFFFFFFF)


def _sort_rows_composite(rows: np.ndarray, key_fn, perm: np.ndarray, start: int,
                         stop: int) -> None:
    keys = key_fn(rows[start:stop])
    n = rows.shape[1]
    composite = keys.astype(np.uint64) << np.uint64(32)
    composite |= np.arange(n, dtype=np.uint64)
    composite.sort(axis=-1)
    perm[start:stop] = composite & _LOW32


@numba.njit(parallel=True, cache=True, nogil=True)
def _restore_tie_order(sorted_keys, perm):
    """Within each run of equal keys of a sorted row, sort the columns ascending (stability)."""
    rows, n = perm.shape
    for r in numba.prange(rows):
        i = 0
        while i < n:
            j = i + 1
            while j < n and sorted_keys[r, j] == sorted_keys[r, i]:
                j += 1
            if j - i > 1:
                perm[r, i:j] = np.sort(perm[r, i:j])
            i = j


@numba.njit(parallel=True, cache=True, nogil=True)
def _argsort_segments(keys, offsets, perm):
    """perm[a:b] = stable argsort of keys[a:b] for each segment [a, b) of the CSR offsets."""
    for s in numba.prange(offsets.shape[0] - 1):
        a = offsets[s]
        b = offsets[s + 1]
        if b - a > 1:
            perm[a:b] = np.argsort(keys[a:b], kind="mergesort")
        elif b - a == 1:
            perm[a] = 0


def argsort_rows_by_key(rows: np.ndarray, key_fn) -> np.ndarray:
    """int32 permutation sorting each row of a 2-D array by the unsigned keys key_fn(rows)
    ascending, ties in column order."""
    num_rows, n = rows.shape
    perm = np.empty((num_rows, n), dtype=np.int32)
    if rows.size == 0:
        return perm
    if rows.dtype.itemsize <= 4:
        map_row_chunks(lambda a, b: _sort_rows_composite(rows, key_fn, perm, a, b),
                       num_rows, row_len=n)
    else:
        keys = key_fn(rows)
        perm64 = np.empty((num_rows, n), dtype=np.int64)

        def chunk(a, b):
            perm64[a:b] = np.argsort(keys[a:b], axis=-1)

        map_row_chunks(chunk, num_rows, row_len=n)
        _restore_tie_order(np.take_along_axis(keys, perm64, axis=-1), perm64)
        perm[...] = perm64
    return perm


def sort_rows(rows: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort of each row of a 2-D array; returns (values, int32 column permutation)."""
    perm = argsort_rows_by_key(rows, lambda a: sort_keys(a, descending))
    return np.take_along_axis(rows, perm, axis=-1), perm


def sort_segments(x: np.ndarray, offsets: np.ndarray, descending: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort of each segment [offsets[s], offsets[s+1]) of a 1-D array.

    Returns (values, perm) where perm holds positions relative to the segment start.
    """
    perm = np.zeros(x.shape[0], dtype=np.int32)
    if x.shape[0]:
        _argsort_segments(sort_keys(x, descending), offsets.astype(np.int64), perm)
    starts = np.repeat(offsets[:-1].astype(np.int64), np.diff(offsets))
    return x[starts + perm], perm
