"""CPU segmented sort: NumPy's SIMD sorts on composite keys, Numba for the ragged case.

Stability comes from the key, not from the sort: for keys of at most 32 bits, each element is
sorted as the 64-bit composite (key << 32 | column), which is unique, so any sort (NumPy's
vectorised quicksort here) yields the stable order. 64-bit keys take NumPy's vectorised argsort
and then a pass that puts the columns of each run of equal keys back in increasing order.
"""

from __future__ import annotations

import numba
import numpy as np

from .._rows import (PARALLEL_MIN_ELEMENTS, gather_rows_into, map_row_chunks,
                     row_parallel)

from .._keys import (KeySpec, canonical_nan_bits, canonicalize_nans, composite_keys, key_of,
                     key_spec, keys, raw_bits, spec_tuple)
from ..._validate import KEY_DTYPES

DTYPES = KEY_DTYPES


@row_parallel
def _low_words(composite, perm):
    rows, n = composite.shape
    for r in numba.prange(rows):
        for j in range(n):
            perm[r, j] = composite[r, j] & np.uint64(0xFFFFFFFF)


@row_parallel
def _restore_tie_order(row_keys, perm):
    """Within each run of equal keys of a sorted row, sort the columns ascending (stability)."""
    rows, n = perm.shape
    for r in numba.prange(rows):
        i = 0
        while i < n:
            key = row_keys[r, perm[r, i]]
            j = i + 1
            while j < n and row_keys[r, perm[r, j]] == key:
                j += 1
            if j - i > 1:
                perm[r, i:j] = np.sort(perm[r, i:j])
            i = j


@row_parallel
def _argsort_segments(seg_keys, offsets, perm):
    """perm[a:b] = stable argsort of seg_keys[a:b] for each segment [a, b) of the offsets."""
    for s in numba.prange(offsets.shape[0] - 1):
        a = offsets[s]
        b = offsets[s + 1]
        if b - a > 1:
            perm[a:b] = np.argsort(seg_keys[a:b], kind="mergesort")
        elif b - a == 1:
            perm[a] = 0


@numba.njit(cache=True, nogil=True)
def _argsort_small_rows(bits, spec, perm):
    """The composite-key argsort of every row in one serial call (for small inputs, where the
    fixed cost of separate passes dominates)."""
    rows, n = bits.shape
    composite = np.empty(n, dtype=np.uint64)
    for r in range(rows):
        if bits.itemsize <= 4:
            for j in range(n):
                composite[j] = (key_of(bits[r, j], spec) << np.uint64(32)) | np.uint64(j)
            composite.sort()
            for j in range(n):
                perm[r, j] = composite[j] & np.uint64(0xFFFFFFFF)
        else:  # 64-bit keys: a stable sort of the keys themselves
            for j in range(n):
                composite[j] = key_of(bits[r, j], spec)
            perm[r, :] = np.argsort(composite, kind="mergesort")


@numba.njit(cache=True, nogil=True)
def _sort_small_rows_into(bits, spec, reverse, out_bits, perm):
    """perm and values (as bits) of every row in one serial call; rows reversed if `reverse`."""
    _argsort_small_rows(bits, spec, perm)
    rows, n = bits.shape
    for r in range(rows):
        if reverse:
            for j in range(n // 2):
                t = perm[r, j]
                perm[r, j] = perm[r, n - 1 - j]
                perm[r, n - 1 - j] = t
        for j in range(n):
            out_bits[r, j] = bits[r, perm[r, j]]


# LSD radix sort of long rows: digits of RADIX_BITS, one counting pass for all digits.
RADIX_BITS = 11
RADIX_MIN_N = 512  # rows at least this long take the radix sort (measured: faster from ~400)


@numba.njit(cache=True, nogil=True, inline="always")
def radix_passes(keys_a, keys_b, cols_a, cols_b, counts):
    """The LSD passes of `_radix_argsort_rows` over keys_a (with columns cols_a), given the
    digit counts of every pass (counts[d, digit], as the counting pass leaves them; they are
    overwritten). Ping-pongs between the a and b buffers; returns True where the sorted keys
    and columns end up in the b buffers (an odd number of passes ran)."""
    n = keys_a.shape[0]
    passes, buckets = counts.shape
    mask = np.uint64(buckets - 1)
    swapped = False
    for d in range(passes):
        shift = np.uint64(d * RADIX_BITS)
        if counts[d, (np.uint64(keys_a[0]) >> shift) & mask] == n:
            continue  # one digit value in the whole row: the pass would not move anything
        total = 0
        for b in range(buckets):  # exclusive prefix sums: first slot of each digit
            c = counts[d, b]
            counts[d, b] = total
            total += c
        for j in range(n):
            key = keys_a[j]
            b = (np.uint64(key) >> shift) & mask
            p = counts[d, b]
            counts[d, b] = p + 1
            keys_b[p] = key
            cols_b[p] = cols_a[j]
        keys_a, keys_b = keys_b, keys_a
        cols_a, cols_b = cols_b, cols_a
        swapped = not swapped
    return swapped


@row_parallel
def _radix_argsort_rows(bits, spec, perm):
    """perm[r] = the stable argsort of row r by key_of(bits, spec), by LSD radix sort.

    Keys fit in the width of the dtype, so a row takes ceil(width / RADIX_BITS) passes; each
    pass is a stable counting scatter of (key, column) pairs, and passes whose digit is the
    same for the whole row are skipped. Columns start in increasing order, so equal keys keep
    it: the result is the stable order without composite keys. The row's perm is one of the
    column buffers (no copy where an even number of passes ran).
    """
    rows, n = bits.shape
    sp = spec_tuple(spec)
    width = bits.itemsize * 8
    passes = (width + RADIX_BITS - 1) // RADIX_BITS
    buckets = 1 << RADIX_BITS
    mask = np.uint64(buckets - 1)
    for r in numba.prange(rows):
        keys_a = np.empty(n, dtype=bits.dtype)
        keys_b = np.empty(n, dtype=bits.dtype)
        cols_a = perm[r]
        cols_b = np.empty(n, dtype=np.int32)
        counts = np.zeros((passes, buckets), dtype=np.int32)
        for j in range(n):
            key = key_of(bits[r, j], sp)
            keys_a[j] = key
            cols_a[j] = j
            for d in range(passes):
                counts[d, (key >> np.uint64(d * RADIX_BITS)) & mask] += 1
        if radix_passes(keys_a, keys_b, cols_a, cols_b, counts):
            for j in range(n):
                cols_a[j] = cols_b[j]


def _sort_each_row(a: np.ndarray) -> None:
    """In-place sort of each row, both cores working (NumPy's sort releases the GIL)."""
    def chunk(start, stop):
        a[start:stop].sort(axis=-1)
    map_row_chunks(chunk, a.shape[0], row_len=a.shape[1])


def argsort_rows_by_key(rows: np.ndarray, spec: KeySpec, out: np.ndarray | None = None
                        ) -> np.ndarray:
    """int32 permutation that sorts each row of a 2-D array by its keys (ascending unsigned
    order of key_of(bits, spec)), ties in column order; written into `out` (C-contiguous
    int32 of rows' shape) when given."""
    num_rows, n = rows.shape
    perm = np.empty((num_rows, n), dtype=np.int32) if out is None else out
    if rows.size == 0:
        return perm
    if n >= RADIX_MIN_N:
        _radix_argsort_rows(raw_bits(rows), spec, perm)
    elif rows.size < PARALLEL_MIN_ELEMENTS:
        _argsort_small_rows(raw_bits(rows), spec, perm)
    elif rows.dtype.itemsize <= 4:
        composite = np.empty((num_rows, n), dtype=np.uint64)
        composite_keys(raw_bits(rows), spec, composite)
        _sort_each_row(composite)
        _low_words(composite, perm)
    else:
        row_keys = keys(rows, spec)
        perm64 = np.empty((num_rows, n), dtype=np.int64)

        def chunk(start, stop):
            perm64[start:stop] = np.argsort(row_keys[start:stop], axis=-1)

        map_row_chunks(chunk, num_rows, row_len=n)
        _restore_tie_order(row_keys, perm64)
        perm[...] = perm64
    return perm


def sort_rows(rows: np.ndarray, descending: bool, *, reverse: bool = False, out=None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort of each row of a 2-D array; returns (values, int32 column permutation),
    written into `out` = (values, perm) when given; `reverse` as in `sort_rows_into`."""
    if out is None:
        out = np.empty(rows.shape, dtype=rows.dtype), np.empty(rows.shape, dtype=np.int32)
    values, perm = out
    sort_rows_into(np.ascontiguousarray(rows), values, perm, descending=descending,
                   reverse=reverse)
    return values, perm


def argsort_rows(rows: np.ndarray, descending: bool, *, out=None) -> np.ndarray:
    """The int32 permutation of `sort_rows` alone (no values are gathered)."""
    spec = key_spec(rows.dtype, canonical=True, descending=descending)
    return argsort_rows_by_key(np.ascontiguousarray(rows), spec, out=out)


def sort_rows_into(rows: np.ndarray, values_out: np.ndarray, perm_out: np.ndarray, *,
                   descending: bool = False, reverse: bool = False) -> None:
    """`sort_rows` writing into caller-owned arrays (no allocation on the small-input path).

    rows: C-contiguous 2-D; values_out (rows' dtype) and perm_out (int32): C-contiguous, rows'
    shape, not overlapping rows. reverse: each output row reversed (the ascending stable sort
    read backwards is `jnp.sort(..., descending=True)`: ties in reverse column order).
    """
    spec = key_spec(rows.dtype, canonical=True, descending=descending)
    if 0 < rows.size < PARALLEL_MIN_ELEMENTS and rows.shape[1] < RADIX_MIN_N:
        _sort_small_rows_into(raw_bits(rows), spec, reverse, raw_bits(values_out), perm_out)
    else:
        argsort_rows_by_key(rows, spec, out=perm_out)
        if reverse:
            perm_out[...] = perm_out[:, ::-1]   # NumPy buffers overlapping assignments
        gather_rows_into(rows, perm_out, values_out)
    if canonical_nan_bits(rows.dtype) and rows.shape[1] > 1:
        # bfloat16: XLA:CPU writes the canonical NaN of each sign (one-element rows are not
        # sorted there: they keep their bits)
        canonicalize_nans(values_out)


def sort_segments(x: np.ndarray, offsets: np.ndarray, descending: bool, *, out=None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Stable sort of each segment [offsets[s], offsets[s+1]) of a 1-D array; elements past
    the last offset are copied through with perm 0.

    Returns (values, perm) where perm holds positions relative to the segment start, written
    into `out` = (values, perm) when given.
    """
    if out is None:
        out = np.empty(x.shape, dtype=x.dtype), np.empty(x.shape, dtype=np.int32)
    values, perm = out
    end = int(offsets[-1])
    perm[end:] = 0
    values[end:] = x[end:]
    if end:
        seg_keys = keys(x[:end], key_spec(x.dtype, canonical=True, descending=descending))
        _argsort_segments(seg_keys, offsets.astype(np.int64), perm[:end])
    lengths = np.diff(offsets)
    starts = np.repeat(offsets[:-1].astype(np.int64), lengths)
    values[:end] = x[starts + perm[:end]]
    if canonical_nan_bits(x.dtype) and end:
        # bfloat16: canonical NaNs in every segment of more than one element, as in rows
        canonicalize_nans(values[:end], np.repeat(lengths > 1, lengths))
    return values, perm
