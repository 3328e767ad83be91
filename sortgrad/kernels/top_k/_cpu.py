"""CPU top-k: a bounded insertion buffer per row for small k, a full keyed sort otherwise.

Keys are in IEEE totalOrder (as `jax.lax.top_k`), computed on the fly from the raw bits; the
buffer holds the best k (key, column) pairs seen so far, best first. Columns arrive in
increasing order, so a newcomer with a key equal to the k-th best loses the tie (lower index
wins) and only a strictly larger key enters.
"""

from __future__ import annotations

import numba
import numpy as np

from .._numba import row_parallel

from .._keys import key_of, key_spec, raw_bits
from ..permutation._cpu import gather_rows
from ..segmented_sort._cpu import argsort_rows_by_key

SMALL_K = 64


@row_parallel
def _top_k_insertion(bits, spec, k, indices):
    rows, n = bits.shape
    for r in numba.prange(rows):
        best_keys = np.empty(k, dtype=np.uint64)
        best_cols = np.empty(k, dtype=np.int32)
        filled = 0
        for j in range(n):
            key = key_of(bits[r, j], spec)
            if filled == k:
                if key <= best_keys[k - 1]:
                    continue
                p = k - 1
            else:
                p = filled
                filled += 1
            while p > 0 and best_keys[p - 1] < key:
                best_keys[p] = best_keys[p - 1]
                best_cols[p] = best_cols[p - 1]
                p -= 1
            best_keys[p] = key
            best_cols[p] = j
        indices[r, :] = best_cols


def top_k_rows(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, int32 indices) of the k largest entries of each row, largest first."""
    num_rows, n = rows.shape
    if k == 0 or num_rows == 0:
        return np.empty((num_rows, k), rows.dtype), np.empty((num_rows, k), np.int32)
    if k <= SMALL_K and 8 * k <= n:
        indices = np.empty((num_rows, k), dtype=np.int32)
        _top_k_insertion(raw_bits(rows), key_spec(rows.dtype, canonical=False), k, indices)
    else:
        spec = key_spec(rows.dtype, canonical=False, descending=True)
        indices = np.ascontiguousarray(argsort_rows_by_key(rows, spec)[:, :k])
    return gather_rows(rows, indices), indices
