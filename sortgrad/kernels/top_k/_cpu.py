"""CPU top-k: one screening pass over each row against a rising threshold, then a sort of the
survivors only (never of the row, never a cost of k per column).

Order. Every dtype is read as signed integers of its width (its raw bits) and mapped to a key
whose signed order is the order of `jax.lax.top_k` (IEEE totalOrder on floats):
    key(v) = v ^ ((v >> (width - 1)) & fmask) ^ xmask
with fmask = all bits but the sign for floats (a negative float's magnitude bits are flipped:
sign-magnitude to two's complement, so -NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN and
the NaNs of one sign are ordered by payload), 0 for integers; xmask = the sign bit for unsigned
integers and bool (their order onto the signed one), 0 otherwise. bfloat16, whose NaNs of one
sign tie in XLA:CPU (it compares through float32), is first given the canonical NaN of each
sign (0x7FC0 | sign) in a copy, in rows of more than one element; the values are then read from
that copy, which is also what XLA writes. Keys are computed in registers (int64, the
sign-extended key of the dtype's width), never stored for a whole row.

Screen. A row (or a column range of one) is read in blocks of _BLOCK columns: a vectorised
"any key > t" against the current threshold t, and only for a block with a hit a vectorised
bit mask of its hits, walked hit by hit. A column enters only with key > t strictly: t is the
k-th best key so far and the k entries at or above it have lower columns, so a later tie loses
(ties go to the lower index). On random data a block hits with probability ~ _BLOCK k / column,
so a row costs about one vectorised read plus O(k log(n / k)) entries.

Two ways to keep t, by k:
  k <= INSERTION_K  a buffer of the best k, sorted (largest first, ties in column order): an
                    entry is inserted, t is its last key (exact). Done, the buffer is sorted. A
                    row that makes it move too much (ascending rows: every column is inserted
                    at the front) falls back to the other way.
  k > INSERTION_K   a buffer of up to 2 k + 2 _BLOCK entries in column order, compacted to its
                    best k whenever it holds 2 k (quickselect for the k-th key t, then the keys
                    > t and the first k - #(> t) keys == t: the lowest columns, order kept), so
                    t lags the exact k-th best by at most k entries, O(1) amortised work each.
                    The first cap columns also estimate the row's k-th best (a rank a few
                    standard deviations above its expected rank in that prefix): the screen
                    starts at the estimate, and a row whose final k-th best falls below it
                    (its prefix was not typical) is selected again without. At the end the k
                    survivors are sorted by key, descending, stably (LSD radix on bytes).
Long rows with fewer rows than threads are split into column ranges (one task each); the best k
of every range of a row (ties in column order, ranges in column order) are merged by one more
compaction and sort.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba.cpython.unsafe.numbers import leading_zeros, trailing_zeros

from .._rows import PARALLEL_MIN_ELEMENTS, num_threads, row_parallel
from ..._validate import KEY_DTYPES

DTYPES = KEY_DTYPES

_BLOCK = 64  # columns screened together
_INSERTION_MAX = 32  # survivors sorted by insertion up to this many, by radix sort above
INSERTION_K = 32  # k up to this: a sorted insertion buffer (exact threshold); above: compaction
_CANONICAL_NAN = {"bfloat16": (0x7FFF, 0x7F80, 0x8000, 0x7FC0)}  # abs mask, +inf, sign, NaN


@functools.lru_cache(maxsize=None)
def key_params(dtype):
    """(signed view dtype, spec, is bfloat16) for `dtype`; spec is a read-only int64 array
    [fmask, xmask, offset, wmask, digits] (the key map above; the radix sort's descending
    unsigned key is wmask - ((key + offset) & wmask), offset and wmask as uint64 bits)."""
    dtype = np.dtype(dtype)
    width = dtype.itemsize * 8
    is_float = dtype.name in ("float16", "bfloat16", "float32", "float64")
    unsigned = dtype.kind in "ub"
    fmask = (1 << (width - 1)) - 1 if is_float else 0
    xmask = -(1 << (width - 1)) if unsigned else 0
    offset = 1 << (width - 1)
    wmask = (1 << width) - 1
    spec = np.array([v % (1 << 64) for v in (fmask, xmask, offset, wmask, width // 8)],
                    dtype=np.uint64).view(np.int64)
    spec.flags.writeable = False
    return np.dtype(f"i{dtype.itemsize}"), spec, dtype.name == "bfloat16"


@numba.njit(cache=True, nogil=True, inline="always")
def _key(v, fmask, xmask):
    """The int64 key of one element given as a signed integer of its width."""
    v = np.int64(v)
    return v ^ ((v >> np.int64(63)) & fmask) ^ xmask


@numba.njit(cache=True, nogil=True, inline="always")
def _hit_mask(row, start, t, fmask, xmask):
    """Bit i set where key(row[start + i]) > t, for i < _BLOCK (vectorised)."""
    mask = np.uint64(0)
    for i in range(_BLOCK):
        mask |= np.uint64(_key(row[start + np.uint64(i)], fmask, xmask) > t) << np.uint64(i)
    return mask


@numba.njit(cache=True, nogil=True)
def _kth_largest_quick(keys, m, k, a):
    """(t, g) with t the k-th largest of keys[:m] (1 <= k <= m) and g the number of them > t.

    Quickselect with branch-free partitions: each round writes the keys of its range > pivot
    to the front and those < pivot to the back of the same range in the other half of `a`
    (capacity >= 2 m) and only counts the keys equal to it, so ties cost one round. A range
    that does not shrink fast enough (pathological pivots) is sorted instead."""
    for i in range(m):
        a[i] = keys[i]
    src = 0  # the range is a[src + lo : src + hi]
    lo, hi = 0, m
    rank = k - 1  # of t within the range, largest first
    above = 0  # keys outside the range that are > all of it
    rounds = 0
    while hi - lo > 16:
        rounds += 1
        if rounds > 60:  # pathological pivots (each round still drops >= 1 key): sort
            r = np.sort(a[src + lo:src + hi])
            t = r[r.shape[0] - 1 - rank]
            g = above
            for v in r:
                g += v > t
            return t, g
        x, y, z = a[src + lo], a[src + ((lo + hi) >> 1)], a[src + hi - 1]
        if x < y:
            x, y = y, x
        if y < z:
            y = z if x >= z else x  # median of three
        p = y
        dst = m - src  # the other half: 0 <-> m
        front = dst + lo
        back = dst + hi - 1
        for i in range(src + lo, src + hi):
            v = a[i]
            a[front] = v
            a[back] = v
            front += v > p
            back -= v < p
        greater = front - dst - lo
        equal = back + 1 - front
        src = dst
        if rank < greater:
            hi = lo + greater
        elif rank < greater + equal:
            return p, above + greater
        else:
            above += greater + equal
            rank -= greater + equal
            lo += greater + equal
    base = src + lo
    for i in range(base + 1, src + hi):  # insertion sort of the range, largest first
        v = a[i]
        j = i
        while j > base and a[j - 1] < v:
            a[j] = a[j - 1]
            j -= 1
        a[j] = v
    t = a[base + rank]
    g = above
    for i in range(base, src + hi):
        g += a[i] > t
    return t, g


@numba.njit(cache=True, nogil=True, inline="always")
def _pick_bucket(hist, rank, above):
    """The bucket (from the top) holding the entry of `rank` (0: the largest), its count, the
    rank within it and `above` plus the entries of the buckets above it."""
    b = 255
    c = hist[0, b] + hist[1, b]
    while c <= rank:
        rank -= c
        above += c
        b -= 1
        c = hist[0, b] + hist[1, b]
    return b, c, rank, above


@numba.njit(cache=True, nogil=True, inline="always")
def _byte_histogram(codes, count, shift, hist):
    """hist[0] + hist[1] = histogram of byte (code >> shift) & 0xFF over codes[:count] (two
    halves: runs of one bucket do not wait on one counter)."""
    hist[:, :] = 0
    sh = np.uint64(shift)
    for i in range(count >> 1):
        hist[0, (np.uint64(codes[2 * i]) >> sh) & np.uint64(0xFF)] += 1
        hist[1, (np.uint64(codes[2 * i + 1]) >> sh) & np.uint64(0xFF)] += 1
    if count & 1:
        hist[0, (np.uint64(codes[count - 1]) >> sh) & np.uint64(0xFF)] += 1


@numba.njit(cache=True, nogil=True)
def _kth_largest(keys, m, k, a, hist, offset, wmask):
    """(t, g) with t the k-th largest of keys[:m] (1 <= k <= m) and g the number of them > t.

    Few keys: _kth_largest_quick. Otherwise a radix select on the keys' unsigned order codes
    u = (key + offset) & wmask (the dtype's width): the bits that differ among the keys are
    found first (a vectorised OR / AND), then 8 of them at a time from the highest: a histogram
    of that byte picks the bucket of the k-th largest, whose codes are gathered (branch-free)
    into `a` (capacity >= m) for the next byte; equal keys end it. Two or three passes over a
    shrinking set on typical rows (about three times faster than the quickselect at 2000 keys),
    at most width / 8. hist: (2, 256) int64 scratch."""
    if m <= 96:
        return _kth_largest_quick(keys, m, k, a)
    lo_and = wmask
    hi_or = np.uint64(0)
    for i in range(m):
        u = (np.uint64(keys[i]) + offset) & wmask
        lo_and &= u
        hi_or |= u
    diff = hi_or ^ lo_and
    if diff == 0:  # all equal
        return keys[0], 0
    top = 63 - leading_zeros(diff)
    shift = top - 7 if top >= 7 else 0
    hist[:, :] = 0
    sh = np.uint64(shift)
    for i in range(m >> 1):
        hist[0, (((np.uint64(keys[2 * i]) + offset) & wmask) >> sh) & np.uint64(0xFF)] += 1
        hist[1, (((np.uint64(keys[2 * i + 1]) + offset) & wmask) >> sh) & np.uint64(0xFF)] += 1
    if m & 1:
        hist[0, (((np.uint64(keys[m - 1]) + offset) & wmask) >> sh) & np.uint64(0xFF)] += 1
    b, count, rank, above = _pick_bucket(hist, k - 1, 0)
    bucket = np.uint64(b)
    w = 0
    for i in range(m):
        u = (np.uint64(keys[i]) + offset) & wmask
        a[w] = np.int64(u)
        w += ((u >> sh) & np.uint64(0xFF)) == bucket
    while count > 1 and shift > 0:  # the bits above `shift` are the same for the candidates
        shift = shift - 8 if shift >= 8 else 0
        _byte_histogram(a, count, shift, hist)
        b, c, rank, above = _pick_bucket(hist, rank, above)
        if c != count:
            sh = np.uint64(shift)
            bucket = np.uint64(b)
            w = 0
            for i in range(count):
                v = a[i]
                a[w] = v
                w += ((np.uint64(v) >> sh) & np.uint64(0xFF)) == bucket
            count = c
    return np.int64(np.uint64(a[0]) - offset), above  # one candidate, or all equal


@numba.njit(cache=True, nogil=True)
def _compact(keys, cols, m, k, a, hist, offset, wmask):
    """Keeps the best k of the m (key, column) pairs in column order, in place: keys > t and
    the first k - g keys == t (t, g from _kth_largest). Returns t (m > k)."""
    t, g = _kth_largest(keys, m, k, a, hist, offset, wmask)
    ties = k - g
    w = 0
    for i in range(m):  # branch-free: every entry is copied, the kept ones advance w
        v = keys[i]
        tie = (v == t) & (ties > 0)
        keys[w] = v
        cols[w] = cols[i]
        w += (v > t) | tie
        ties -= tie
    return t


@numba.njit(cache=True, nogil=True)
def _select_range(s, r, lo, hi, k, fmask, xmask, keys, cols, a, hist, offset, wmask):
    """See _select_pass: with the estimate, and once more without it where it failed."""
    m = _select_pass(s, r, lo, hi, k, fmask, xmask, keys, cols, a, hist, offset, wmask, True)
    if m < 0:
        m = _select_pass(s, r, lo, hi, k, fmask, xmask, keys, cols, a, hist, offset, wmask,
                         False)
    return m


@numba.njit(cache=True, nogil=True)
def _select_pass(s, r, lo, hi, k, fmask, xmask, keys, cols, a, hist, offset, wmask,
                 estimate):
    """The best min(k, hi - lo) (key, column) pairs of columns [lo, hi) of row r, left in
    keys/cols in column order; returns their number, or -1 where the estimate failed (below).
    keys, cols: buffers of capacity cap >= k + 2 * _BLOCK (or >= hi - lo); a: 2 cap.

    The buffer is first filled with the range's first cap columns and compacted. With
    `estimate`, that prefix also estimates the range's k-th best: its q-th best with q a few
    standard deviations above k cap / (hi - lo), so that about q (hi - lo) / cap > k columns
    pass. The screen then starts at that estimate instead of rising to it from the prefix's
    k-th best (fewer hits and compactions where k is not small against the range). Columns
    below the estimate are only skipped safely if the final k-th best is not below it; where
    it is (the prefix was not typical of the range, e.g. a descending row), -1 is returned
    and the range is to be selected again without the estimate.

    Columns are indexed as unsigned integers in the hot loops: Numba wraps negative indices,
    and a check it cannot drop keeps LLVM from vectorising the screen."""
    cap = keys.shape[0]
    row = s[r]
    first = min(hi - lo, cap)
    for i in range(first):
        j = np.uint64(lo + i)
        keys[i] = _key(row[j], fmask, xmask)
        cols[i] = j
    if first <= k:
        return first
    t = _compact(keys, cols, first, k, a, hist, offset, wmask)
    if first == hi - lo:
        return k
    floor = np.int64(-9223372036854775808)  # the estimate: no column below it enters
    if estimate:
        mean = k * first / (hi - lo)  # the expected rank in the prefix of the range's k-th
        if mean >= 8.0:
            q = int(mean + 3.0 * np.sqrt(mean)) + 2
            if q < k:  # the prefix's q-th best is the q-th best of its best k
                floor, _ = _kth_largest(keys, k, q, a, hist, offset, wmask)
                t = max(t, floor)
    m = k
    begin = lo + first
    blocks = (hi - begin) // _BLOCK
    for b in range(blocks + 1):
        start = np.uint64(begin + b * _BLOCK)
        if b < blocks:
            hit = 0
            for i in range(_BLOCK):  # a fixed trip count: vectorised
                hit |= _key(row[start + np.uint64(i)], fmask, xmask) > t
            if hit == 0:
                continue
            mask = _hit_mask(row, start, t, fmask, xmask)
            while mask != 0:  # one step per hit
                j = start + np.uint64(trailing_zeros(mask))
                mask &= mask - np.uint64(1)
                keys[m] = _key(row[j], fmask, xmask)
                cols[m] = j
                m += 1
        else:
            for i in range(hi - begin - blocks * _BLOCK):  # the shorter last block
                j = start + np.uint64(i)
                v = _key(row[j], fmask, xmask)
                keys[m] = v  # branch-free append: the slot is overwritten unless taken
                cols[m] = j
                m += v > t
        if m >= 2 * k or m > cap - _BLOCK:
            # compacting at 2k entries keeps t within k insertions of the exact k-th best
            # (so blocks stop hitting early) at O(1) amortised work per insertion
            t = max(_compact(keys, cols, m, k, a, hist, offset, wmask), floor)
            m = k
    if m > k:
        last = _compact(keys, cols, m, k, a, hist, offset, wmask)
    else:
        last = keys[0]
        for i in range(1, k):
            last = min(last, keys[i])
    if last < floor:  # fewer than k columns at or above the estimate
        return -1
    return k


@numba.njit(cache=True, nogil=True, inline="always")
def _insert(keys, cols, p, v, j):
    """Puts (v, j) into the sorted keys/cols[:p + 1] (slot p free), after the entries with
    keys >= v (they have lower columns: ties stay in column order)."""
    while p > 0 and keys[p - 1] < v:
        keys[p] = keys[p - 1]
        cols[p] = cols[p - 1]
        p -= 1
    keys[p] = v
    cols[p] = j
    return p


@numba.njit(cache=True, nogil=True)
def _insert_range(s, r, lo, hi, k, fmask, xmask, keys, cols):
    """_select_range for small k: a sorted buffer of the best k so far (largest first), so the
    threshold t (its last key) is always exact; a column enters with key > t by insertion.
    Leaves the best min(k, hi - lo) sorted (ties in column order); returns their number, or
    -1 once the insertions have moved more than 8 (hi - lo) + 4 k^2 entries (a row in
    ascending order makes every column an insertion at the front, O(k) each: the caller then
    selects the range by compaction instead, O(1) amortised per column; a random row takes
    about k (1 + ln((hi - lo) / k)) insertions)."""
    row = s[r]
    first = min(hi - lo, k)
    for i in range(first):
        j = np.uint64(lo + i)
        _insert(keys, cols, i, _key(row[j], fmask, xmask), j)
    if first < k or first == hi - lo:
        return first
    t = keys[k - 1]
    budget = 8 * (hi - lo) + 4 * k * k
    begin = lo + k
    blocks = (hi - begin) // _BLOCK
    for b in range(blocks + 1):
        start = np.uint64(begin + b * _BLOCK)
        if b < blocks:
            hit = 0
            for i in range(_BLOCK):  # a fixed trip count: vectorised
                hit |= _key(row[start + np.uint64(i)], fmask, xmask) > t
            if hit == 0:
                continue
            mask = _hit_mask(row, start, t, fmask, xmask)
            while mask != 0:  # one step per hit of the block's t (t only rises: re-check)
                j = start + np.uint64(trailing_zeros(mask))
                mask &= mask - np.uint64(1)
                v = _key(row[j], fmask, xmask)
                if v > t:
                    budget -= k - _insert(keys, cols, k - 1, v, j)
                    t = keys[k - 1]
            if budget < 0:
                return -1
        else:
            for i in range(hi - begin - blocks * _BLOCK):
                j = start + np.uint64(i)
                v = _key(row[j], fmask, xmask)
                if v > t:
                    _insert(keys, cols, k - 1, v, j)
                    t = keys[k - 1]
    return k


@numba.njit(cache=True, nogil=True)
def _sort_desc(keys, cols, m, offset, wmask, digits, ukeys, ucols, tmp_keys, tmp_cols, counts):
    """Stable sort of the first m pairs by key, descending; returns the cols array (cols or
    ucols) holding the sorted columns. Keys are of `digits` bytes: the descending unsigned key
    is wmask - ((key + offset) & wmask)."""
    if m <= _INSERTION_MAX:
        for i in range(1, m):
            v = keys[i]
            c = cols[i]
            j = i
            while j > 0 and keys[j - 1] < v:
                keys[j] = keys[j - 1]
                cols[j] = cols[j - 1]
                j -= 1
            keys[j] = v
            cols[j] = c
        return cols
    counts[:digits, :] = 0
    for i in range(m):
        u = wmask - ((np.uint64(keys[i]) + offset) & wmask)
        ukeys[i] = u
        ucols[i] = cols[i]
        for d in range(digits):
            counts[d, (u >> np.uint64(8 * d)) & np.uint64(0xFF)] += 1
    src_k, src_c, dst_k, dst_c = ukeys, ucols, tmp_keys, tmp_cols
    for d in range(digits):
        shift = np.uint64(8 * d)
        if counts[d, (src_k[0] >> shift) & np.uint64(0xFF)] == m:
            continue  # one digit value among all: the pass would move nothing
        total = 0
        for b in range(256):
            c = counts[d, b]
            counts[d, b] = total
            total += c
        for i in range(m):
            u = src_k[i]
            b = (u >> shift) & np.uint64(0xFF)
            p = counts[d, b]
            counts[d, b] = p + 1
            dst_k[p] = u
            dst_c[p] = src_c[i]
        src_k, src_c, dst_k, dst_c = dst_k, dst_c, src_k, src_c
    return src_c


@numba.njit(cache=True, nogil=True)
def _emit(s, r, cols, m, out_indices, out_values):
    for i in range(m):
        c = cols[i]
        out_indices[r, i] = c
        out_values[r, i] = s[r, c]


@row_parallel
def _top_k_tasks(groups, s, spec, k, chunks, cap, out_indices, out_values, cand_keys, cand_cols,
                 cand_counts):
    """Tasks = rows x chunks (column ranges), split over `groups` groups (the threaded kernel
    runs them in parallel). chunks == 1: each row's top-k is written to out_indices /
    out_values (the raw bits); chunks > 1: each range's best k (ties in column order) goes to
    cand_* [task] for _merge_chunks. spec: see key_params."""
    fmask, xmask = spec[0], spec[1]
    offset, wmask, digits = np.uint64(spec[2]), np.uint64(spec[3]), spec[4]
    rows, n = s.shape
    tasks = rows * chunks
    num_groups = groups
    for g in numba.prange(num_groups):
        wide = np.empty(3 * cap, dtype=np.int64)  # scratch of the group (few allocations)
        keys, a = wide[:cap], wide[cap:]
        ukeys_all = np.empty(2 * cap, dtype=np.uint64)
        ukeys, tmp_keys = ukeys_all[:cap], ukeys_all[cap:]
        cols_all = np.empty(3 * cap, dtype=np.int32)
        cols, ucols, tmp_cols = cols_all[:cap], cols_all[cap:2 * cap], cols_all[2 * cap:]
        counts = np.empty((8, 256), dtype=np.int64)
        hist = counts[:2]  # the selection's histograms (never in use with the sort's)
        for task in range(tasks * g // num_groups, tasks * (g + 1) // num_groups):
            r = task // chunks
            c = task % chunks
            lo = n * c // chunks
            hi = n * (c + 1) // chunks
            m = -1
            if k <= INSERTION_K:
                m = _insert_range(s, r, lo, hi, k, fmask, xmask, keys, cols)
            in_order = m >= 0  # sorted by key already; else in column order
            if m < 0:
                m = _select_range(s, r, lo, hi, k, fmask, xmask, keys, cols, a, hist, offset,
                                  wmask)
            if chunks == 1:
                if in_order:
                    sorted_cols = cols
                else:
                    sorted_cols = _sort_desc(keys, cols, m, offset, wmask, digits, ukeys,
                                             ucols, tmp_keys, tmp_cols, counts)
                _emit(s, r, sorted_cols, m, out_indices, out_values)
            else:
                cand_counts[task] = m
                for i in range(m):
                    cand_keys[task, i] = keys[i]
                    cand_cols[task, i] = cols[i]


@numba.njit(cache=True, nogil=True)
def _merge_chunks(s, spec, k, chunks, cand_keys, cand_cols, cand_counts, out_indices,
                  out_values):
    """Each row's top-k from the best k of each of its column ranges (ties in column order)."""
    offset, wmask, digits = np.uint64(spec[2]), np.uint64(spec[3]), spec[4]
    rows = s.shape[0]
    cap = chunks * k
    keys = np.empty(cap, dtype=np.int64)
    cols = np.empty(cap, dtype=np.int32)
    a = np.empty(2 * cap, dtype=np.int64)
    ukeys = np.empty(cap, dtype=np.uint64)
    ucols = np.empty(cap, dtype=np.int32)
    tmp_keys = np.empty(cap, dtype=np.uint64)
    tmp_cols = np.empty(cap, dtype=np.int32)
    counts = np.empty((8, 256), dtype=np.int64)
    hist = counts[:2]
    for r in range(rows):
        m = 0
        for c in range(chunks):
            task = r * chunks + c
            for i in range(cand_counts[task]):
                keys[m] = cand_keys[task, i]
                cols[m] = cand_cols[task, i]
                m += 1
        if m > k:
            _compact(keys, cols, m, k, a, hist, offset, wmask)
            m = k
        sorted_cols = _sort_desc(keys, cols, m, offset, wmask, digits, ukeys, ucols, tmp_keys,
                                 tmp_cols, counts)
        _emit(s, r, sorted_cols, m, out_indices, out_values)


# Rows at least this long are split over threads when there are fewer rows than threads. One
# thread screens a row at memory speed (2^20 float32 in ~0.1 ms on the 2-core machine), so
# shorter rows gain less than waking the pool and merging costs (measured: 2^17-2^18 slower
# split, on a machine whose other core was busy).
SPLIT_MIN_N = 1 << 20


def _chunks_per_row(num_rows: int, n: int, k: int) -> int:
    """Split rows only when there are fewer rows than threads and each piece stays long."""
    threads = num_threads()
    if num_rows >= threads or n < SPLIT_MIN_N:
        return 1
    return max(1, min(-(-threads // num_rows), n // max(8 * k, 4096)))


def _canonical_bfloat16(s: np.ndarray) -> np.ndarray:
    """bfloat16 bits (as int16) with every NaN made the quiet NaN of its sign; `s` itself when
    it has no NaN."""
    abs_mask, inf_bits, sign, nan_bits = _CANONICAL_NAN["bfloat16"]
    b = s.view(np.uint16)
    nan = (b & abs_mask) > inf_bits
    if not nan.any():
        return s
    b = b.copy()
    b[nan] = (b[nan] & sign) | nan_bits
    return b.view(np.int16)


def top_k_rows(rows: np.ndarray, k: int, *, out=None) -> tuple[np.ndarray, np.ndarray]:
    """(values, int32 indices) of the k largest entries of each row (C-contiguous 2-D),
    largest first; written into `out` = (values, indices), each (rows, k) C-contiguous, when
    given (and `out` returned)."""
    num_rows, n = rows.shape
    if out is None:
        values = np.empty((num_rows, k), dtype=rows.dtype)
        indices = np.empty((num_rows, k), dtype=np.int32)
        result = values, indices
    else:
        values, indices = out
        result = out
    if k == 0 or num_rows == 0:
        return result
    view, spec, bfloat16 = key_params(rows.dtype)
    s = rows.view(view)
    if bfloat16 and n > 1:
        s = _canonical_bfloat16(s)
    chunks = _chunks_per_row(num_rows, n, k)
    out_values = values.view(view)
    if chunks == 1:
        groups = min(num_rows, 4 * num_threads()) if rows.size >= PARALLEL_MIN_ELEMENTS else 1
        kernel = _top_k_tasks.parallel if groups > 1 else _top_k_tasks.serial
        kernel(groups, s, spec, k, 1, min(n, 2 * k + 2 * _BLOCK), indices, out_values,
               _NO_KEYS, _NO_COLS, _NO_COUNTS)
        return result
    tasks = num_rows * chunks
    cand_keys = np.empty((tasks, k), dtype=np.int64)
    cand_cols = np.empty((tasks, k), dtype=np.int32)
    cand_counts = np.empty(tasks, dtype=np.int64)
    _top_k_tasks.parallel(tasks, s, spec, k, chunks, min(-(-n // chunks), 2 * k + 2 * _BLOCK),
                          indices, out_values, cand_keys, cand_cols, cand_counts)
    _merge_chunks(s, spec, k, chunks, cand_keys, cand_cols, cand_counts, indices, out_values)
    return result


# the candidate arrays of a call without column ranges (never written)
_NO_KEYS = np.empty((0, 0), dtype=np.int64)
_NO_COLS = np.empty((0, 0), dtype=np.int32)
_NO_COUNTS = np.empty(0, dtype=np.int64)
