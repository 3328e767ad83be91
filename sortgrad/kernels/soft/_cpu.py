"""Soft sort, soft rank and the soft top-k mask (Blondel et al. 2020) on CPU rows: a stable
sort (`segmented_sort`), then one fused row-parallel Numba pass per op that runs the isotonic
regression (`pav_*_row`) and scatters the result back through the permutation.

All functions take C-contiguous rows (rows, n) of float32 or float64 and compute in float64.
The sort runs on x itself: scaling by 1/eps > 0 (and negating, by sorting the other way) does
not change which permutation sorts a row, only the order of ties, and tied entries always
end up in one pooled block (or in blocks of equal value), so every output is tie-order free.

Kinks (DESIGN.md): PAV pools equal neighbouring blocks (the pooled side), except two equal
blocks whose sorted input values are all tied (`isotonic._cpu.pools` with `keys`): no
perturbation of x makes those violate (the sort re-orders ties), so they are no kink. The keys
are the sorted input values the op perturbs, not the PAV's own arguments:
  - top-k mask: s = x[perm] / eps (PAV(s - w_k)); w_k has ties, so equal tied blocks occur in
    exact arithmetic (saturated at 1 or 0) and must keep the gradient 0.
  - soft sort: the sorted signed x (PAV(theta - s), PAV_KL(theta, s)); the PAV's s-argument
    theta - s (or theta) is never tied. In exact arithmetic tied x give strictly decreasing
    theta - s (no pooling); the keys keep it so where theta - s rounds to equal values.
  - soft rank: no keys. Tied s give strictly *increasing* s - rho (and s - log rho), a strict
    violation in exact arithmetic, so equal values over tied s can only come from rounding
    and must pool (tied entries then share one block, and the pooled gradient is right).
Residuals are the int32 sorting permutation `perm` and the int32 `block_ids` of the pooled
blocks; nothing is recomputed with tolerances. A row holding NaN or +-inf gives NaN in every
output (and gradient) entry of that row only.

Conventions: rho = (n, n-1, ..., 1); "sorted" is descending; isotonic problems are decreasing.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .._rows import map_row_chunks, row_parallel
from ..isotonic._cpu import (LINEAR_KL_SPREAD, _lse_merge, block_end, block_softmax_row,
                             block_softmax_sum_row, kl_value, no_keys, pav_kl_row, pav_l2_row,
                             pools)
from .._keys import key_of, key_spec, raw_bits, spec_tuple
from ..segmented_sort._cpu import RADIX_BITS, RADIX_MIN_N, argsort_rows_by_key, radix_passes
from ..._validate import COMPUTE_FLOAT_DTYPES

DTYPES = COMPUTE_FLOAT_DTYPES


@numba.njit(cache=True, nogil=True, inline="always")
def _sorted_row(x_row, perm_row, scale, out):
    """out = scale * x_row[perm_row] in float64; False if the row has a non-finite entry."""
    finite = True
    for i in range(out.shape[0]):
        v = np.float64(x_row[perm_row[i]])
        finite = finite and math.isfinite(v)
        out[i] = v * scale
    return finite


def _argsort(x, descending: bool, out):
    """Writes a permutation sorting each row into `out`; the order of ties is irrelevant here
    (see above), so short 64-bit rows take NumPy's vectorised (unstable) argsort without the
    stability pass; long rows take the radix sort of `argsort_rows_by_key`. The keys are in
    IEEE total order, not the sort order of `sort` (which folds subnormals into +0.0): the PAV
    needs the values themselves sorted, subnormals included (x / eps of a subnormal x need not
    be small); -0.0 and +0.0 are then ordered, which is harmless (equal values)."""
    if x.dtype.itemsize <= 4 or x.shape[-1] >= RADIX_MIN_N:
        return argsort_rows_by_key(x, key_spec(x.dtype, canonical=False, descending=descending),
                                   out=out)
    perm = out

    def chunk(start, stop):
        rows = x[start:stop]
        perm[start:stop] = np.argsort(-rows if descending else rows, axis=-1)

    map_row_chunks(chunk, x.shape[0], row_len=x.shape[1])
    return perm


def _sort_plan(x, descending: bool, perm):
    """(bits, spec, fused) for the forward kernels: long rows are sorted inside them (the
    fused sort, by the same total-order keys); short rows here, into perm."""
    spec = key_spec(x.dtype, canonical=False, descending=descending)
    if x.shape[-1] >= RADIX_MIN_N:
        return raw_bits(x), spec, True
    _argsort(x, descending, perm)
    return raw_bits(x), spec, False


@numba.njit(cache=True, nogil=True, inline="always")
def _row_finite(x_row):
    """Whether every entry of a row is finite (read in order: no gather)."""
    finite = True
    for i in range(x_row.shape[0]):
        finite = finite and math.isfinite(np.float64(x_row[i]))
    return finite


# --- the fused sort of long rows -------------------------------------------------------------
#
# Rows of at least RADIX_MIN_N elements are sorted inside the row kernels: the LSD radix sort
# of `segmented_sort` on the IEEE total-order keys (`_argsort` explains the order), whose
# sorted keys are decoded back into the values themselves (the key is a bijection of the
# bits), so the sorted row never has to be gathered through the permutation. Memory per row:
# one buffer of 2n keys, whose 8n bytes then hold s (float64) -- for float32 the keys fill it,
# for float64 s is its first half; the columns ping-pong between the row's perm and its
# block_ids (free until the PAV writes them). Short rows keep `_argsort` and a gather.


@numba.njit(cache=True, nogil=True, inline="always")
def _key_bits(key, descending, sign, all_ones):
    """The raw bits of the value whose total-order key (`_keys.key_of`, canonical=False) is
    `key`: the inverse of key = bits ^ (sign or all ones), complemented when descending."""
    k = np.uint64(key)
    if descending:
        k = k ^ all_ones
    if k & sign:
        return k ^ sign
    return k ^ all_ones


@numba.njit(cache=True, nogil=True, inline="always")
def _fused_sorted_row(bits_row, sp, scale, perm_row, cols_b):
    """Sorts one row (keys by `sp`), writes its permutation into perm_row (cols_b: scratch of
    n int32) and returns (s, finite): s = scale * x[perm] in float64 (a view of the key buffer),
    finite False if the row has a non-finite entry."""
    n = bits_row.shape[0]
    width = bits_row.itemsize * 8
    passes = (width + RADIX_BITS - 1) // RADIX_BITS
    buckets = 1 << RADIX_BITS
    mask = np.uint64(buckets - 1)
    kb = np.empty(2 * n, dtype=bits_row.dtype)
    keys_a = kb[:n]
    keys_b = kb[n:]
    counts = np.zeros((passes, buckets), dtype=np.int32)
    for j in range(n):
        key = key_of(bits_row[j], sp)
        keys_a[j] = key
        perm_row[j] = j
        for d in range(passes):
            counts[d, (key >> np.uint64(d * RADIX_BITS)) & mask] += 1
    in_b = radix_passes(keys_a, keys_b, perm_row, cols_b, counts)
    if in_b:
        for j in range(n):
            perm_row[j] = cols_b[j]
    descending = sp[2] != 0
    sign = sp[3]
    all_ones = sp[6]
    as32 = kb.view(np.float32)  # the decoded bits read as values (float32 rows)
    as64 = kb.view(np.float64)  # (float64 rows); also s
    s = as64[:n]
    off = n if in_b else 0
    finite = True
    # s overlaps the keys (float32: s_i is key slots 2i, 2i + 1): from keys_b forwards, from
    # keys_a backwards, every key is read before its slots are overwritten
    for t in range(n):
        i = t if in_b else n - 1 - t
        j = off + i
        kb[j] = _key_bits(kb[j], descending, sign, all_ones)
        v = np.float64(as32[j]) if width == 32 else as64[j]
        finite = finite and math.isfinite(v)
        s[i] = v * scale
    return s, finite


@numba.njit(cache=True, nogil=True, inline="always")
def _sorted_input(x, bits, sp, fused, r, scale, perm, blocks):
    """(s, finite) of row r: fused sort (perm written) or a gather through the given perm."""
    if fused:
        return _fused_sorted_row(bits[r], sp, scale, perm[r], blocks[r])
    n = x.shape[1]
    s = np.empty(n, dtype=np.float64)
    return s, _sorted_row(x[r], perm[r], scale, s)


@numba.njit(cache=True, nogil=True, inline="always")
def _fill_nan(row):
    for i in range(row.shape[0]):
        row[i] = np.nan


# --- exact limits (DESIGN.md, "Numerics") ----------------------------------------------------
#
# Every output is written per PAV block B = [p, q) (sorted order) relative to the block, so that
# nothing cancels: L2 rank r_i = (s_i - s_p) - mean(s_B - s_p) + mean(rho_B); mask m_i =
# clip((s_i - s_p) - mean(s_B - s_p) + mean(w_B), 0, 1); KL rank r_i = softmax(s_B)_i *
# sum(rho_B); L2 sort out_i = mean(x_B) + (rho_i - mean(rho_B)) / eps; KL sort out_i = lse(x_B)
# + log softmax(theta_B)_i. mean(rho_B), sum(rho_B) and mean(w_B) are exact closed forms, so a
# singleton block gives exactly rho_i, w_i, and (soft sort) the input value itself.
#
# Units. Ordinary rows (|x / eps| <= FAST_SCALE for rank and mask) run the PAV on s = x / eps
# directly. Other rows (x / eps huge or overflowing, or 1 / eps overflowing) are split into
# segments at the gaps of the sorted row that no block can cross (x_i - x_{i+1} > G * eps, G
# the spread of the anchors plus a margin: n + 1 for L2 ranks, log n + 1 for KL, 2 for the
# mask): the block values of an isotonic fit lie between the min and the max of the fitted
# y = s - w over the block, so the blocks left of such a gap stay above those right of it. Each
# segment runs its PAV on s relative to its first element, (x_i - x_a) / eps, which is bounded
# by G * (segment length): no overflow, and the anchors keep their full precision (a huge s
# would swallow rho or w_k). The soft sort picks its units instead (L2 PAV(rho/eps - s) =
# PAV(rho - eps s) / eps): rank units rho - eps * s when rho / eps is huge, x units scaled by
# 2^-128 when |x| is huge.

FAST_SCALE = 2.0 ** 40   # |s| below this: rho, w_k and ties survive s - w exactly enough
_HUGE = 2.0 ** 900       # the soft sort's fast path: |x| and n / eps below this
_DOWN = 2.0 ** -128      # the soft sort's scale for |x| above _HUGE (exact: a power of two)


@numba.njit(cache=True, nogil=True, inline="always")
def _block_stop(block_row, p, b):
    q = p + 1
    while q < b and block_row[q] == block_row[p]:
        q += 1
    return q


@numba.njit(cache=True, nogil=True, inline="always")
def _l2_one_block_out(s, p, q, n, k, perm_row, out_row, lo, hi):
    """out[perm[i]] = clip((s_i - s_p) - mean(s_B - s_p) + mean(w_B), lo, hi) for the block
    B = [p, q); w = rho (k < 0) or the k-hot vector; a singleton gets mean(w_B) exactly."""
    cnt = q - p
    if k < 0:
        mw = n - 0.5 * (p + q - 1)
    else:
        mw = max(0, min(q, k) - p) / cnt
    if cnt == 1:
        out_row[perm_row[p]] = min(max(mw, lo), hi)
        return
    base = s[p]
    total = 0.0
    for i in range(p, q):
        total += s[i] - base
    md = total / cnt
    for i in range(p, q):
        out_row[perm_row[i]] = min(max(((s[i] - base) - md) + mw, lo), hi)


@numba.njit(cache=True, nogil=True, inline="always")
def _l2_block_out(s, block_row, a, b, n, k, perm_row, out_row, lo, hi):
    """out[perm[i]] = clip((s_i - s_p) - mean(s_B - s_p) + mean(w_B), lo, hi) for each block
    B = [p, q) in [a, b); w = rho (k < 0) or the k-hot vector."""
    p = a
    while p < b:
        q = _block_stop(block_row, p, b)
        _l2_one_block_out(s, p, q, n, k, perm_row, out_row, lo, hi)
        p = q


@numba.njit(cache=True, nogil=True, inline="always")
def _kl_rank_block_out(s, block_row, a, b, n, perm_row, out_row, tmp):
    """KL ranks r_i = softmax(s_B)_i * sum(rho_B), clipped to [1, n], for the blocks in [a, b)."""
    p = a
    while p < b:
        q = _block_stop(block_row, p, b)
        sum_rho = (q - p) * (n - 0.5 * (p + q - 1))
        block_softmax_row(s, p, q, sum_rho, tmp)
        for i in range(p, q):
            out_row[perm_row[i]] = min(max(tmp[i], 1.0), np.float64(n))
        p = q


@numba.njit(cache=True, nogil=True, inline="always")
def _relative(xs, base, eps):
    """(xs - base) / eps without overflowing where the quotient is finite."""
    d = xs - base
    if math.isfinite(d):
        return d / eps
    return ((0.5 * xs - 0.5 * base) / eps) * 2.0


_RANK_L2, _RANK_KL, _MASK = 0, 1, 2


@numba.njit(cache=True, nogil=True, inline="always")
def _segmented(xs, eps, kind, k, log_rho, perm_row, out_row, block_row, s, y, sol):
    """Rank (L2, KL) or mask of one sorted row xs (signed x, descending) whose x / eps is too
    large for the direct path: independent segments (see above), PAV on (x - x_a) / eps."""
    n = xs.shape[0]
    if kind == _RANK_L2:
        gap = n + 1.0
    elif kind == _RANK_KL:
        gap = math.log(n) + 1.0
    else:
        gap = 2.0
    a = 0
    nb = 0
    while a < n:
        b = a + 1
        while b < n and not ((xs[b - 1] - xs[b]) / eps > gap):
            b += 1
        for i in range(a, b):
            s[i] = _relative(xs[i], xs[a], eps)
        if kind == _RANK_KL:
            pav_kl_row(s[a:b], log_rho[a:b], no_keys(), sol[a:b], block_row[a:b])
        else:
            for i in range(a, b):
                y[i] = s[i] - ((n - i) if kind == _RANK_L2 else (1.0 if i < k else 0.0))
            if kind == _RANK_L2:
                pav_l2_row(y[a:b], no_keys(), sol[a:b], block_row[a:b])
            else:  # tie keys: the sorted x (ties of x are ties of x / eps)
                pav_l2_row(y[a:b], xs[a:b], sol[a:b], block_row[a:b])
        for i in range(a, b):
            block_row[i] += nb
        nb = block_row[b - 1] + 1
        if kind == _RANK_KL:
            _kl_rank_block_out(s, block_row, a, b, n, perm_row, out_row, y)
        elif kind == _RANK_L2:
            _l2_block_out(s, block_row, a, b, n, -1, perm_row, out_row, 1.0, np.float64(n))
        else:
            _l2_block_out(s, block_row, a, b, n, k, perm_row, out_row, 0.0, 1.0)
        a = b


@numba.njit(cache=True, nogil=True, inline="always")
def _direct(s):
    """Whether a sorted scaled row runs the direct path (also False for inf / nan in s)."""
    n = s.shape[0]
    return abs(s[0]) <= FAST_SCALE and abs(s[n - 1]) <= FAST_SCALE


# --- the L2 PAV of the soft ops, fused ---------------------------------------------------------
#
# PAV(y) with y computed from s on the fly (y = s - rho, s - w_k, or the soft sort's units),
# the block lengths stacked in the row's block_ids buffer (stack index <= element index) and
# the block sums only for pooled blocks (a singleton's sum is its y, recomputed): no n-sized
# y, solution or value arrays, and a stack of singletons touches no memory beyond block_ids.
# The arithmetic is that of `isotonic._cpu.pav_l2_row` (the same sums in the same order, the
# value sum / count, the same pooling test), so the blocks are the same. The writers then walk
# the stack from the top block down, writing each block's outputs and its block ids (a block
# k starts at or after position k: the lengths not yet read are never overwritten).

_Y_RANK, _Y_MASK, _Y_SORT, _Y_SORT_TINY = 0, 1, 2, 3


@numba.njit(cache=True, nogil=True, inline="always")
def _y_at(s, i, n, mode, k, a1, a2):
    """y_i of the PAV: rank s - rho; mask s - w_k; sort rho * a1 - s * a2 (a1 = 1 / eps,
    a2 = 1; or both times 2^-128); sort with tiny eps rho - a1 * s (a1 = eps)."""
    if mode == _Y_RANK:
        return s[i] - (n - i)
    if mode == _Y_MASK:
        return s[i] - (1.0 if i < k else 0.0)
    if mode == _Y_SORT:
        return (n - i) * a1 - s[i] * a2
    return (n - i) - a1 * s[i]


@numba.njit(cache=True, nogil=True, inline="always")
def _pav_l2_stack(s, mode, k, a1, a2, keys, counts, sums):
    """Decreasing PAV of y(s) (`_y_at`); block lengths in counts[0..top], sums of the pooled
    blocks in sums; `keys` as in `isotonic._cpu.pools`. Returns top."""
    n = s.shape[0]
    top = -1
    for i in range(n):
        sm = _y_at(s, i, n, mode, k, a1, a2)
        c = 1
        v = sm
        start = i  # start of the block being pushed
        while top >= 0:
            cb = counts[top]
            below = start - cb
            if cb == 1:
                sb = _y_at(s, below, n, mode, k, a1, a2)
                vb = sb
            else:
                sb = sums[top]
                vb = sb / cb
            if not pools(vb, v, keys, below, i + 1):
                break
            sm = sb + sm
            c = cb + c
            v = sm / c
            start = below
            top -= 1
        top += 1
        counts[top] = c
        if c > 1:
            sums[top] = sm
    return top


@numba.njit(cache=True, nogil=True, inline="always")
def _l2_stack_out(s, top, counts, n, k, perm_row, out_row, lo, hi):
    """`_l2_block_out` over the blocks of `_pav_l2_stack`, from the top block down; turns the
    stack (counts) into the block ids."""
    q = n
    for b in range(top, -1, -1):
        p = q - counts[b]
        _l2_one_block_out(s, p, q, n, k, perm_row, out_row, lo, hi)
        for i in range(p, q):
            counts[i] = b
        q = p


# --- the KL PAVs of the soft ops, fused ----------------------------------------------------------
#
# As the L2 PAV above: the arguments on the fly, block lengths stacked in block_ids, the
# accumulators stored only for pooled blocks (a singleton's are its own entries), the
# arithmetic of `isotonic._cpu` (`pav_ratio_blocks`, `_pav_kl_shifted`) unchanged.

_KL_RANK, _KL_SORT, _KL_SORT_SHIFTED = 0, 1, 2


@numba.njit(cache=True, nogil=True, inline="always")
def _kl_args(s, log_rho, i, n, mode, eps, inv_eps):
    """(a_i, w_i) of the KL problem lse(a_B) - lse(w_B): rank (s, log rho); sort (theta, s),
    theta = rho / eps, or -(i / eps) (theta shifted by -rho_0 / eps)."""
    if mode == _KL_RANK:
        return s[i], log_rho[i]
    if mode == _KL_SORT:
        return (n - i) * inv_eps, s[i]
    return -(i / eps), s[i]


@numba.njit(cache=True, nogil=True, inline="always")
def _kl_spread(s, log_rho, n, mode, eps, inv_eps):
    """(max - min of a) + (max - min of w), as `isotonic._cpu.pav_kl_row` decides."""
    a_max, a_min, w_max, w_min = -np.inf, np.inf, -np.inf, np.inf
    for i in range(n):
        a, w = _kl_args(s, log_rho, i, n, mode, eps, inv_eps)
        a_max = max(a_max, a)
        a_min = min(a_min, a)
        w_max = max(w_max, w)
        w_min = min(w_min, w)
    return (a_max - a_min) + (w_max - w_min)


@numba.njit(cache=True, nogil=True, inline="always")
def _pav_kl_shifted_stack(s, log_rho, mode, eps, inv_eps, keys, counts, acc):
    """`isotonic._cpu._pav_kl_shifted` on `_kl_args`: block lengths in counts[0..top], the
    (max a, sum a, max w, sum w, value) of pooled blocks in acc[:, top]. Returns top."""
    n = s.shape[0]
    top = -1
    for i in range(n):
        a, w = _kl_args(s, log_rho, i, n, mode, eps, inv_eps)
        ma, za, mw, zw = a, 1.0, w, 1.0
        v = np.float64(a) - np.float64(w)
        c = 1
        start = i
        while top >= 0:
            cb = counts[top]
            below = start - cb
            if cb == 1:
                ab, wb = _kl_args(s, log_rho, below, n, mode, eps, inv_eps)
                mab, zab, mwb, zwb = ab, 1.0, wb, 1.0
                vb = np.float64(ab) - np.float64(wb)
            else:
                mab, zab, mwb, zwb, vb = (acc[0, top], acc[1, top], acc[2, top], acc[3, top],
                                          acc[4, top])
            if not pools(vb, v, keys, below, i + 1):
                break
            ma, za = _lse_merge(mab, zab, ma, za)
            mw, zw = _lse_merge(mwb, zwb, mw, zw)
            c = cb + c
            v = kl_value(ma, za, mw, zw)
            start = below
            top -= 1
        top += 1
        counts[top] = c
        if c > 1:
            acc[0, top] = ma
            acc[1, top] = za
            acc[2, top] = mw
            acc[3, top] = zw
            acc[4, top] = v
    return top


@numba.njit(cache=True, nogil=True, inline="always")
def _stack_to_blocks(top, counts, n):
    """Block ids from the stacked block lengths (in place, from the top block down)."""
    q = n
    for b in range(top, -1, -1):
        p = q - counts[b]
        for i in range(p, q):
            counts[i] = b
        q = p


# --- soft rank ------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True, inline="always")
def _rank_kl_linear(s, log_rho, perm_row, ranks_row, block_row):
    """KL ranks without logs: with e = exp(s - s_0) and rho, block B has
    r_i = exp(s_i - v_B) = e_i * sum(rho_B) / sum(e_B) (singletons compared as s - log rho).
    `isotonic._cpu.pav_ratio_blocks` fused: e_i and rho_i on the fly, block lengths stacked in
    block_row, the sums only of pooled blocks."""
    n = s.shape[0]
    sums = np.empty((2, n), dtype=np.float64)  # sum e, sum rho of pooled blocks
    counts = block_row
    s0 = s[0]
    top = -1
    for i in range(n):
        ea = math.exp(s[i] - s0)
        eb = np.float64(n - i)
        c = 1
        start = i
        while top >= 0:
            cb = counts[top]
            below = start - cb
            if cb == 1:
                sa = math.exp(s[below] - s0)
                sb = np.float64(n - below)
            else:
                sa = sums[0, top]
                sb = sums[1, top]
            if cb == 1 and c == 1:  # two singletons: their exact values s - log rho
                merge = pools(s[below] - log_rho[below], s[i] - log_rho[i], no_keys(), below,
                              i + 1)
            else:
                merge = pools(sa * eb, ea * sb, no_keys(), below, i + 1)
            if not merge:
                break
            ea = sa + ea
            eb = sb + eb
            c = cb + c
            start = below
            top -= 1
        top += 1
        counts[top] = c
        if c > 1:
            sums[0, top] = ea
            sums[1, top] = eb
    q = n
    for b in range(top, -1, -1):
        cnt = counts[b]
        p = q - cnt
        if cnt == 1:  # exactly rho_i
            ranks_row[perm_row[p]] = n - p
        else:
            factor = sums[1, b] / sums[0, b]
            for i in range(p, q):
                ranks_row[perm_row[i]] = min(max(math.exp(s[i] - s0) * factor, 1.0),
                                             np.float64(n))
        for i in range(p, q):
            counts[i] = b
        q = p


@row_parallel
def _rank_fwd(x, bits, spec, fused, perm, sign, eps, kl, log_rho, ranks, blocks):
    """s = x[perm] / eps (signed); L2: r = s - PAV(s - rho); KL: r = exp(s - PAV_KL(s, log
    rho)), both written per block (see "exact limits"); ranks[perm] = r. fused: each row is
    sorted here (perm written); else perm is given."""
    rows, n = x.shape
    scale = sign / eps
    sp = spec_tuple(spec)
    for r in numba.prange(rows):
        s, finite = _sorted_input(x, bits, sp, fused, r, scale, perm, blocks)
        if not finite:
            _fill_nan(ranks[r])
            blocks[r, :] = 0
            continue
        if not _direct(s):
            y = np.empty(n, dtype=np.float64)
            _sorted_row(x[r], perm[r], sign, y)
            _segmented(y, eps, _RANK_KL if kl else _RANK_L2, 0, log_rho, perm[r], ranks[r],
                       blocks[r], s, np.empty(n, dtype=np.float64),
                       np.empty(n, dtype=np.float64))
        elif kl and s[0] - s[n - 1] < LINEAR_KL_SPREAD:
            _rank_kl_linear(s, log_rho, perm[r], ranks[r], blocks[r])
        elif kl:  # the spread of s alone is past LINEAR_KL_SPREAD: the shifted PAV
            acc = np.empty((5, n), dtype=np.float64)
            top = _pav_kl_shifted_stack(s, log_rho, _KL_RANK, eps, 0.0, no_keys(), blocks[r],
                                        acc)
            _stack_to_blocks(top, blocks[r], n)
            _kl_rank_block_out(s, blocks[r], 0, n, n, perm[r], ranks[r], acc[0])
        else:
            sums = np.empty(n, dtype=np.float64)
            top = _pav_l2_stack(s, _Y_RANK, 0, 0.0, 0.0, no_keys(), blocks[r], sums)
            _l2_stack_out(s, top, blocks[r], n, -1, perm[r], ranks[r], 1.0, np.float64(n))


@numba.njit(cache=True, nogil=True, inline="always")
def _block_relative(xs, block_row, eps, out):
    """out_i = (xs_i - xs_p) / eps over each block [p, q): the KL softmax argument, shifted."""
    n = xs.shape[0]
    p = 0
    while p < n:
        q = _block_stop(block_row, p, n)
        for i in range(p, q):
            out[i] = _relative(xs[i], xs[p], eps)
        p = q


@row_parallel
def _rank_bwd(g, x, ranks, perm, blocks, sign, eps, kl, dx):
    """L2: u = g_s - blockmean(g_s); KL: a = r_s * g_s, u = a - softmax(s_B) * blocksum(a);
    dx[perm] = sign * u / eps."""
    rows, n = x.shape
    scale = sign / eps
    for r in numba.prange(rows):
        if not _row_finite(x[r]):
            _fill_nan(dx[r])
            continue
        if kl:
            s = np.empty(n, dtype=np.float64)
            a = np.empty(n, dtype=np.float64)
            pooled = np.empty(n, dtype=np.float64)
            _sorted_row(x[r], perm[r], scale, s)
            for i in range(n):
                a[i] = g[r, perm[r, i]]
            if not _direct(s):  # softmax is shift-free: s relative to each block
                _sorted_row(x[r], perm[r], sign, pooled)
                _block_relative(pooled, blocks[r], eps, s)
            for i in range(n):
                a[i] *= ranks[r, perm[r, i]]
            block_softmax_sum_row(a, s, blocks[r], pooled)
            for i in range(n):
                dx[r, perm[r, i]] = (a[i] - pooled[i]) * scale
            continue
        gs = np.empty(n, dtype=g.dtype)  # g in sorted order (exact in its own dtype)
        for i in range(n):
            gs[i] = g[r, perm[r, i]]
        p = 0
        while p < n:
            q = block_end(blocks[r], p)
            total = 0.0
            for i in range(p, q):
                total += np.float64(gs[i])
            mean = total / (q - p)
            for i in range(p, q):
                dx[r, perm[r, i]] = (np.float64(gs[i]) - mean) * scale
            p = q


_NO_LOG_RHO = np.empty(0, dtype=np.float64)


def _log_rho(n: int, kl: bool) -> np.ndarray:
    """log rho for the KL rank (read only by the KL paths: L2 gets an empty array)."""
    if not kl:
        return _NO_LOG_RHO
    out = np.arange(n, 0, -1, dtype=np.float64)
    return np.log(out, out=out)


def _outputs(x, out):
    """(values, perm, block_ids) to write: `out`, or new arrays (values of x's dtype)."""
    if out is not None:
        return out
    return (np.empty(x.shape, dtype=x.dtype), np.empty(x.shape, dtype=np.int32),
            np.empty(x.shape, dtype=np.int32))


def _grad_output(x, out):
    return np.empty(x.shape, dtype=x.dtype) if out is None else out


def soft_rank_rows(x, eps: float, regularization: str, descending: bool, *, out=None):
    """Ranks in [1, n] (rank 1 = smallest when ascending) -> (ranks, perm, block_ids)."""
    sign = -1.0 if descending else 1.0
    ranks, perm, blocks = _outputs(x, out)
    if x.size:
        bits, spec, fused = _sort_plan(x, sign > 0, perm)
        kl = regularization == "kl"
        _rank_fwd(x, bits, spec, fused, perm, sign, eps, kl, _log_rho(x.shape[1], kl), ranks,
                  blocks)
    return ranks, perm, blocks


def soft_rank_vjp_rows(g, x, ranks, perm, blocks, eps: float, regularization: str,
                       descending: bool, *, out=None):
    sign = -1.0 if descending else 1.0
    dx = _grad_output(x, out)
    if x.size:
        _rank_bwd(g, x, ranks, perm, blocks, sign, eps, regularization == "kl", dx)
    return dx


# --- soft sort ------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True, inline="always")
def _over_eps(v, eps, inv_eps, inv_finite):
    return v * inv_eps if inv_finite else v / eps


@numba.njit(cache=True, nogil=True, inline="always")
def _block_mean(s, p, q):
    """mean(s[p:q]) shifted by s[p]; scaled by a power of two where the shifted sum overflows."""
    base = s[p]
    total = 0.0
    for i in range(p, q):
        total += s[i] - base
    if math.isfinite(total):
        return base + total / (q - p)
    total = 0.0
    for i in range(p, q):
        total += s[i] * 2.0 ** -64
    return (total / (q - p)) * 2.0 ** 64


@numba.njit(cache=True, nogil=True, inline="always")
def _sort_l2_one_block_out(s, p, q, eps, inv_eps, inv_finite, sign, lo, hi, out_row):
    """The L2 soft sort of block [p, q): mean(s_B) + (centre_B - i)/eps clipped to [lo, hi],
    signed (+0.0 for a zero); a singleton keeps its input bits (sign * s_p)."""
    if q - p == 1:
        out_row[p] = sign * s[p]
        return
    mean = _block_mean(s, p, q)
    centre = 0.5 * (p + q - 1)
    for i in range(p, q):
        v = min(max(mean + _over_eps(centre - i, eps, inv_eps, inv_finite), lo), hi)
        out_row[i] = sign * v + 0.0


@numba.njit(cache=True, nogil=True, inline="always")
def _sort_l2_out(s, block_row, eps, inv_eps, sign, out_row):
    """out_i = sign * (mean(s_B) + (rho_i - mean(rho_B)) / eps), within [min s, max s]; a
    singleton block gives its input value itself (bits, sign of zero included), a pooled
    zero is +0.0."""
    n = s.shape[0]
    lo = s[n - 1]
    hi = s[0]
    inv_finite = math.isfinite(inv_eps)
    p = 0
    while p < n:
        q = _block_stop(block_row, p, n)
        _sort_l2_one_block_out(s, p, q, eps, inv_eps, inv_finite, sign, lo, hi, out_row)
        p = q


@numba.njit(cache=True, nogil=True, inline="always")
def _sort_l2_stack_out(s, top, counts, eps, inv_eps, sign, out_row):
    """`_sort_l2_out` over the blocks of `_pav_l2_stack` (from the top block down), turning the
    stack into the block ids."""
    n = s.shape[0]
    lo = s[n - 1]
    hi = s[0]
    inv_finite = math.isfinite(inv_eps)
    q = n
    for b in range(top, -1, -1):
        p = q - counts[b]
        _sort_l2_one_block_out(s, p, q, eps, inv_eps, inv_finite, sign, lo, hi, out_row)
        for i in range(p, q):
            counts[i] = b
        q = p


@numba.njit(cache=True, nogil=True, inline="always")
def _sort_kl_out(s, block_row, eps, inv_eps, sign, out_row):
    """out_i = sign * (lse(s_B) + log softmax(theta_B)_i), theta_i - theta_p = -(i - p) / eps;
    singletons and pooled zeros as in `_sort_l2_out`."""
    n = s.shape[0]
    inv_finite = math.isfinite(inv_eps)
    p = 0
    while p < n:
        q = _block_stop(block_row, p, n)
        if q - p == 1:
            out_row[p] = sign * s[p]
        else:
            z = 0.0
            zt = 0.0
            for i in range(p, q):
                z += math.exp(s[i] - s[p])
                zt += math.exp(-_over_eps(np.float64(i - p), eps, inv_eps, inv_finite))
            lse_s = s[p] + math.log(z)
            lt = math.log(zt)
            for i in range(p, q):
                v = lse_s + (-_over_eps(np.float64(i - p), eps, inv_eps, inv_finite) - lt)
                out_row[i] = sign * v + 0.0
        p = q


@row_parallel
def _sort_fwd(x, bits, spec, fused, perm, sign, eps, kl, out, blocks):
    """s = sign * x[perm] (descending), theta = rho / eps; L2: v = PAV(theta - s);
    KL: v = PAV_KL(theta, s); out = sign * (theta - v), in sorted order, written per block
    (see "exact limits"). The tie keys are s. Units: theta - s on ordinary rows; rho - eps * s
    where n / eps is huge; (theta - s) * 2^-128 where |x| is huge (L2; KL shifts theta by
    -rho_0 / eps there, which PAV_KL commutes with). fused: as `_rank_fwd`."""
    rows, n = x.shape
    inv_eps = 1.0 / eps
    tiny_eps = not (n * inv_eps <= _HUGE)
    sp = spec_tuple(spec)
    for r in numba.prange(rows):
        s, finite = _sorted_input(x, bits, sp, fused, r, sign, perm, blocks)
        if not finite:
            _fill_nan(out[r])
            blocks[r, :] = 0
            continue
        big = not (abs(s[0]) <= _HUGE and abs(s[n - 1]) <= _HUGE)
        if kl:
            mode = _KL_SORT_SHIFTED if big or tiny_eps else _KL_SORT
            if _kl_spread(s, s, n, mode, eps, inv_eps) < LINEAR_KL_SPREAD:
                y = np.empty(n, dtype=np.float64)
                for i in range(n):
                    y[i] = _kl_args(s, s, i, n, mode, eps, inv_eps)[0]
                pav_kl_row(y, s, s, y, blocks[r])  # the solution overwrites theta (read first)
            else:
                acc = np.empty((5, n), dtype=np.float64)
                top = _pav_kl_shifted_stack(s, s, mode, eps, inv_eps, s, blocks[r], acc)
                _stack_to_blocks(top, blocks[r], n)
            _sort_kl_out(s, blocks[r], eps, inv_eps, sign, out[r])
            continue
        if tiny_eps:
            mode, a1, a2 = _Y_SORT_TINY, eps, 0.0
        elif big:
            mode, a1, a2 = _Y_SORT, inv_eps * _DOWN, _DOWN
        else:
            mode, a1, a2 = _Y_SORT, inv_eps, 1.0
        sums = np.empty(n, dtype=np.float64)
        top = _pav_l2_stack(s, mode, 0, a1, a2, s, blocks[r], sums)
        _sort_l2_stack_out(s, top, blocks[r], eps, inv_eps, sign, out[r])


@row_parallel
def _sort_bwd(g, x, perm, blocks, sign, kl, dx):
    """d out / d x[perm]: L2 blockmean(g); KL softmax(s_B) * blocksum(g) with s the sorted
    (signed) input values. The two sign flips of the ascending case cancel."""
    rows, n = x.shape
    for r in numba.prange(rows):
        if not _row_finite(x[r]):
            _fill_nan(dx[r])
            continue
        if kl:
            s = np.empty(n, dtype=np.float64)
            pooled = np.empty(n, dtype=np.float64)
            _sorted_row(x[r], perm[r], sign, s)
            block_softmax_sum_row(g[r], s, blocks[r], pooled)
            for i in range(n):
                dx[r, perm[r, i]] = pooled[i]
            continue
        p = 0
        while p < n:
            q = block_end(blocks[r], p)
            total = 0.0
            for i in range(p, q):
                total += g[r, i]
            mean = total / (q - p)
            for i in range(p, q):
                dx[r, perm[r, i]] = mean
            p = q


def soft_sort_rows(x, eps: float, regularization: str, descending: bool, *, out=None):
    """Soft sorted values (in sorted order) -> (values, perm, block_ids).

    Descending is primary; ascending is -soft_sort_desc(-x).
    """
    sign = 1.0 if descending else -1.0
    values, perm, blocks = _outputs(x, out)
    if x.size:
        bits, spec, fused = _sort_plan(x, descending, perm)
        _sort_fwd(x, bits, spec, fused, perm, sign, eps, regularization == "kl", values, blocks)
    return values, perm, blocks


def soft_sort_vjp_rows(g, x, perm, blocks, eps: float, regularization: str, descending: bool,
                       *, out=None):
    sign = 1.0 if descending else -1.0
    dx = _grad_output(x, out)
    if x.size:
        _sort_bwd(g, x, perm, blocks, sign, regularization == "kl", dx)
    return dx


# --- soft top-k mask ------------------------------------------------------------------------

@row_parallel
def _mask_fwd(x, bits, spec, fused, perm, k, eps, mask, blocks):
    """s = x[perm] / eps (descending); v = PAV(s - w_k), w_k = (1,..,1,0,..,0) with k ones,
    tie keys s; mask[perm] = s - v per block (see "exact limits"), clipped to [0, 1]. fused: as
    `_rank_fwd`."""
    rows, n = x.shape
    inv_eps = 1.0 / eps
    sp = spec_tuple(spec)
    for r in numba.prange(rows):
        s, finite = _sorted_input(x, bits, sp, fused, r, inv_eps, perm, blocks)
        if not finite:
            _fill_nan(mask[r])
            blocks[r, :] = 0
            continue
        if not _direct(s):
            y = np.empty(n, dtype=np.float64)
            _sorted_row(x[r], perm[r], 1.0, y)
            _segmented(y, eps, _MASK, k, y, perm[r], mask[r], blocks[r], s,
                       np.empty(n, dtype=np.float64), np.empty(n, dtype=np.float64))
            continue
        sums = np.empty(n, dtype=np.float64)
        top = _pav_l2_stack(s, _Y_MASK, k, 0.0, 0.0, s, blocks[r], sums)
        _l2_stack_out(s, top, blocks[r], n, k, perm[r], mask[r], 0.0, 1.0)


def soft_top_k_mask_rows(x, k: int, eps: float, *, out=None):
    """Projection of x/eps onto the permutahedron of (1,...,1,0,...,0) with k ones (L2)."""
    mask, perm, blocks = _outputs(x, out)
    if x.size:
        bits, spec, fused = _sort_plan(x, True, perm)
        _mask_fwd(x, bits, spec, fused, perm, k, eps, mask, blocks)
    return mask, perm, blocks


def soft_top_k_mask_vjp_rows(g, x, perm, blocks, eps: float, *, out=None):
    """Same Jacobian as the L2 soft rank: dx[perm] = (g_s - blockmean(g_s)) / eps."""
    dx = _grad_output(x, out)
    if x.size:
        _rank_bwd(g, x, x, perm, blocks, 1.0, eps, False, dx)
    return dx
