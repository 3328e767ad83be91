"""CPU top-k: a bounded insertion buffer per row for small k, a full keyed sort otherwise.

Keys are in IEEE totalOrder (as `jax.lax.top_k`; bfloat16 NaNs of one sign tie, and come back
as the canonical NaN of their sign, see `_keys`), computed on the fly from the raw bits; the
buffer holds the best k (key, column) pairs seen so far, best first. Columns arrive in
increasing order, so a newcomer with a key equal to the k-th best loses the tie (lower index
wins) and only a strictly larger key enters.
"""

from __future__ import annotations

import numba
import numpy as np


from .._rows import gather_rows, num_threads, row_parallel
from .._keys import canonicalize_nans, key_of, key_spec, raw_bits, spec_tuple
from ..segmented_sort._cpu import argsort_rows_by_key
from ..._validate import KEY_DTYPES

DTYPES = KEY_DTYPES

SMALL_K = 64
_BLOCK = 32  # elements screened together


@numba.njit(cache=True, nogil=True, inline="always")
def _better(key_a, col_a, key_b, col_b):
    """(key_a, col_a) ranks before (key_b, col_b): larger key, then lower column."""
    return key_a > key_b or (key_a == key_b and col_a < col_b)


@row_parallel
def _top_k_chunks(bits, vals, screen_vals, spec, k, chunks, best_keys, best_cols):
    """Best k of each of `chunks` equal column ranges of every row, best first: a bounded
    insertion buffer. Columns arrive in increasing order, so a newcomer equal to the k-th best
    loses the tie and only a strictly larger key enters. Unfilled slots keep column -1.

    Once the buffer is full, blocks of _BLOCK columns are screened first and skipped when none
    of their entries can beat the k-th best. With `screen_vals` (float32/float64; `vals` is the
    row data as floats) the screen compares values with t, the k-th best's value: an entry can
    only rank above t in totalOrder if not (v < t) (NaN and values equal to t pass, and their
    keys decide), so the screen is a vectorised float comparison and only the entries that pass
    it get keys. Otherwise the block's keys are computed and their maximum compared.
    """
    rows, n = bits.shape
    sp = spec_tuple(spec)
    for task in numba.prange(rows * chunks):
        r = task // chunks
        c = task % chunks
        lo = n * c // chunks
        hi = n * (c + 1) // chunks
        keys_out = best_keys[r, c]
        cols_out = best_cols[r, c]
        cols_out[:] = -1
        filled = 0
        t = vals[r, lo]  # the k-th best's value once the buffer is full (screen_vals only)
        for start in range(lo, hi, _BLOCK):
            stop = min(start + _BLOCK, hi)
            if filled == k:
                if screen_vals:
                    hit = False
                    for j in range(start, stop):
                        hit |= not (vals[r, j] < t)
                else:
                    block_max = np.uint64(0)
                    for j in range(start, stop):
                        block_max = max(block_max, key_of(bits[r, j], sp))
                    hit = block_max > keys_out[k - 1]
                if not hit:
                    continue
            for j in range(start, stop):
                if screen_vals and filled == k and vals[r, j] < t:
                    continue
                key = key_of(bits[r, j], sp)
                if filled == k:
                    if key <= keys_out[k - 1]:
                        continue
                    p = k - 1
                else:
                    p = filled
                    filled += 1
                while p > 0 and keys_out[p - 1] < key:
                    keys_out[p] = keys_out[p - 1]
                    cols_out[p] = cols_out[p - 1]
                    p -= 1
                keys_out[p] = key
                cols_out[p] = j
                if screen_vals and filled == k:
                    t = vals[r, cols_out[k - 1]]


@numba.njit(cache=True, nogil=True)
def _merge_chunks(best_keys, best_cols, k, indices):
    """Best k of the chunk candidates of each row (key descending, column ascending)."""
    rows, chunks = best_keys.shape[0], best_keys.shape[1]
    keys = np.empty(k, dtype=np.uint64)
    for r in range(rows):
        keys[:] = best_keys[r, 0]
        indices[r, :] = best_cols[r, 0]
        for c in range(1, chunks):
            for t in range(k):
                key, col = best_keys[r, c, t], best_cols[r, c, t]
                if col < 0 or not _better(key, col, keys[k - 1], indices[r, k - 1]):
                    break  # candidates are best first: the rest of this chunk loses too
                p = k - 1
                while p > 0 and _better(key, col, keys[p - 1], indices[r, p - 1]):
                    keys[p] = keys[p - 1]
                    indices[r, p] = indices[r, p - 1]
                    p -= 1
                keys[p] = key
                indices[r, p] = col


# Rows at least this long are split over threads when there are fewer rows than threads: below
# it, one thread finishes before a sleeping pool would wake up (the screen skips most blocks).
SPLIT_MIN_N = 1 << 18


def _chunks_per_row(num_rows: int, n: int, k: int) -> int:
    """Split rows only when there are fewer rows than threads and each piece stays long."""
    threads = num_threads()
    if num_rows >= threads or n < SPLIT_MIN_N:
        return 1
    return max(1, min(-(-threads // num_rows), n // max(8 * k, 4096)))


def top_k_rows(rows: np.ndarray, k: int, *, out=None) -> tuple[np.ndarray, np.ndarray]:
    """(values, int32 indices) of the k largest entries of each row, largest first; written
    into `out` = (values, indices), each (rows, k), when given."""
    num_rows, n = rows.shape
    if out is not None:
        values, indices = _top_k_rows(rows, k)
        out[0][...], out[1][...] = values, indices
        return out
    return _top_k_rows(rows, k)


def _top_k_rows(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    num_rows, n = rows.shape
    if k == 0 or num_rows == 0:
        return np.empty((num_rows, k), rows.dtype), np.empty((num_rows, k), np.int32)
    if k <= SMALL_K and 8 * k <= n:
        chunks = _chunks_per_row(num_rows, n, k)
        best_keys = np.empty((num_rows, chunks, k), dtype=np.uint64)
        best_cols = np.empty((num_rows, chunks, k), dtype=np.int32)
        screen = rows.dtype in (np.float32, np.float64)
        # chunks > 1: the prange runs over rows x chunks, so one row is several tasks
        kernel = _top_k_chunks.parallel if chunks > 1 else _top_k_chunks
        kernel(raw_bits(rows), rows if screen else raw_bits(rows), screen,
               key_spec(rows.dtype, canonical=False), k, chunks, best_keys, best_cols)
        if chunks == 1:
            indices = best_cols[:, 0, :]
        else:
            indices = np.empty((num_rows, k), dtype=np.int32)
            _merge_chunks(best_keys, best_cols, k, indices)
    else:
        spec = key_spec(rows.dtype, canonical=False, descending=True)
        indices = np.ascontiguousarray(argsort_rows_by_key(rows, spec)[:, :k])
    values = gather_rows(rows, indices)
    if n > 1:
        # bfloat16: the canonical NaN of each sign, as XLA:CPU writes (one-element rows are
        # not sorted there: they keep their bits); a no-op for the other dtypes
        canonicalize_nans(values)
    return values, indices
