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
from ..isotonic._cpu import (LINEAR_KL_SPREAD, block_mean_row, block_softmax_row,
                             block_softmax_sum_row, no_keys, pav_kl_row, pav_l2_row,
                             pav_ratio_blocks)
from .._keys import key_spec
from ..segmented_sort._cpu import RADIX_MIN_N, argsort_rows_by_key
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
def _l2_block_out(s, block_row, a, b, n, k, perm_row, out_row, lo, hi):
    """out[perm[i]] = clip((s_i - s_p) - mean(s_B - s_p) + mean(w_B), lo, hi) for each block
    B = [p, q) in [a, b); w = rho (k < 0) or the k-hot vector."""
    p = a
    while p < b:
        q = _block_stop(block_row, p, b)
        cnt = q - p
        if k < 0:
            mw = n - 0.5 * (p + q - 1)
        else:
            mw = max(0, min(q, k) - p) / cnt
        if cnt == 1:
            out_row[perm_row[p]] = min(max(mw, lo), hi)
        else:
            base = s[p]
            total = 0.0
            for i in range(p, q):
                total += s[i] - base
            md = total / cnt
            for i in range(p, q):
                out_row[perm_row[i]] = min(max(((s[i] - base) - md) + mw, lo), hi)
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


# --- soft rank ------------------------------------------------------------------------------

@numba.njit(cache=True, nogil=True, inline="always")
def _rank_kl_linear(s, log_rho, perm_row, ranks_row, block_row):
    """KL ranks without logs: with e = exp(s - s_0) and rho, block B has
    r_i = exp(s_i - v_B) = e_i * sum(rho_B) / sum(e_B) (singletons compared as s - log rho)."""
    n = s.shape[0]
    e = np.empty(n, dtype=np.float64)
    rho = np.empty(n, dtype=np.float64)
    for i in range(n):
        e[i] = math.exp(s[i] - s[0])
        rho[i] = n - i
    sum_e = np.empty(n, dtype=np.float64)
    sum_rho = np.empty(n, dtype=np.float64)
    counts = np.empty(n, dtype=np.int64)
    top = pav_ratio_blocks(e, rho, s, log_rho, no_keys(), sum_e, sum_rho, counts)
    i = 0
    for k in range(top + 1):
        if counts[k] == 1:  # exactly rho_i
            ranks_row[perm_row[i]] = n - i
            block_row[i] = k
            i += 1
            continue
        factor = sum_rho[k] / sum_e[k]
        for _ in range(counts[k]):
            ranks_row[perm_row[i]] = min(max(e[i] * factor, 1.0), np.float64(n))
            block_row[i] = k
            i += 1


@row_parallel
def _rank_fwd(x, perm, sign, eps, kl, log_rho, ranks, blocks):
    """s = x[perm] / eps (signed); L2: r = s - PAV(s - rho); KL: r = exp(s - PAV_KL(s, log
    rho)), both written per block (see "exact limits"); ranks[perm] = r."""
    rows, n = x.shape
    scale = sign / eps
    for r in numba.prange(rows):
        s = np.empty(n, dtype=np.float64)
        y = np.empty(n, dtype=np.float64)
        sol = np.empty(n, dtype=np.float64)
        if not _sorted_row(x[r], perm[r], scale, s):
            _fill_nan(ranks[r])
            blocks[r, :] = 0
            continue
        if not _direct(s):
            _sorted_row(x[r], perm[r], sign, y)
            _segmented(y, eps, _RANK_KL if kl else _RANK_L2, 0, log_rho, perm[r], ranks[r],
                       blocks[r], s, sol, np.empty(n, dtype=np.float64))
        elif kl and s[0] - s[n - 1] < LINEAR_KL_SPREAD:
            _rank_kl_linear(s, log_rho, perm[r], ranks[r], blocks[r])
        elif kl:
            pav_kl_row(s, log_rho, no_keys(), sol, blocks[r])
            _kl_rank_block_out(s, blocks[r], 0, n, n, perm[r], ranks[r], y)
        else:
            for i in range(n):
                y[i] = s[i] - (n - i)
            pav_l2_row(y, no_keys(), sol, blocks[r])
            _l2_block_out(s, blocks[r], 0, n, n, -1, perm[r], ranks[r], 1.0, np.float64(n))


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
        s = np.empty(n, dtype=np.float64)
        a = np.empty(n, dtype=np.float64)
        pooled = np.empty(n, dtype=np.float64)
        if not _sorted_row(x[r], perm[r], scale, s):
            _fill_nan(dx[r])
            continue
        for i in range(n):
            a[i] = g[r, perm[r, i]]
        if kl:
            if not _direct(s):  # softmax is shift-free: s relative to each block
                _sorted_row(x[r], perm[r], sign, pooled)
                _block_relative(pooled, blocks[r], eps, s)
            for i in range(n):
                a[i] *= ranks[r, perm[r, i]]
            block_softmax_sum_row(a, s, blocks[r], pooled)
        else:
            block_mean_row(a, blocks[r], pooled)
        for i in range(n):
            dx[r, perm[r, i]] = (a[i] - pooled[i]) * scale


def _log_rho(n: int) -> np.ndarray:
    return np.log(np.arange(n, 0, -1, dtype=np.float64))


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
    _argsort(x, descending=sign > 0, out=perm)
    if x.size:
        _rank_fwd(x, perm, sign, eps, regularization == "kl", _log_rho(x.shape[1]), ranks,
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
        if q - p == 1:
            out_row[p] = sign * s[p]
        else:
            mean = _block_mean(s, p, q)
            centre = 0.5 * (p + q - 1)
            for i in range(p, q):
                v = min(max(mean + _over_eps(centre - i, eps, inv_eps, inv_finite), lo), hi)
                out_row[i] = sign * v + 0.0
        p = q


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
def _sort_fwd(x, perm, sign, eps, kl, out, blocks):
    """s = sign * x[perm] (descending), theta = rho / eps; L2: v = PAV(theta - s);
    KL: v = PAV_KL(theta, s); out = sign * (theta - v), in sorted order, written per block
    (see "exact limits"). The tie keys are s. Units: theta - s on ordinary rows; rho - eps * s
    where n / eps is huge; (theta - s) * 2^-128 where |x| is huge (L2; KL shifts theta by
    -rho_0 / eps there, which PAV_KL commutes with)."""
    rows, n = x.shape
    inv_eps = 1.0 / eps
    tiny_eps = not (n * inv_eps <= _HUGE)
    for r in numba.prange(rows):
        s = np.empty(n, dtype=np.float64)
        y = np.empty(n, dtype=np.float64)
        sol = np.empty(n, dtype=np.float64)
        if not _sorted_row(x[r], perm[r], sign, s):
            _fill_nan(out[r])
            blocks[r, :] = 0
            continue
        big = not (abs(s[0]) <= _HUGE and abs(s[n - 1]) <= _HUGE)
        if kl:
            if big or tiny_eps:
                for i in range(n):
                    y[i] = -(i / eps)
            else:
                for i in range(n):
                    y[i] = (n - i) * inv_eps
            pav_kl_row(y, s, s, sol, blocks[r])
            _sort_kl_out(s, blocks[r], eps, inv_eps, sign, out[r])
            continue
        if tiny_eps:
            for i in range(n):
                y[i] = (n - i) - eps * s[i]
        elif big:
            down = inv_eps * _DOWN
            for i in range(n):
                y[i] = (n - i) * down - s[i] * _DOWN
        else:
            for i in range(n):
                y[i] = (n - i) * inv_eps - s[i]
        pav_l2_row(y, s, sol, blocks[r])
        _sort_l2_out(s, blocks[r], eps, inv_eps, sign, out[r])


@row_parallel
def _sort_bwd(g, x, perm, blocks, sign, kl, dx):
    """d out / d x[perm]: L2 blockmean(g); KL softmax(s_B) * blocksum(g) with s the sorted
    (signed) input values. The two sign flips of the ascending case cancel."""
    rows, n = x.shape
    for r in numba.prange(rows):
        s = np.empty(n, dtype=np.float64)
        pooled = np.empty(n, dtype=np.float64)
        if not _sorted_row(x[r], perm[r], sign, s):
            _fill_nan(dx[r])
            continue
        if kl:
            block_softmax_sum_row(g[r], s, blocks[r], pooled)
        else:
            block_mean_row(g[r], blocks[r], pooled)
        for i in range(n):
            dx[r, perm[r, i]] = pooled[i]


def soft_sort_rows(x, eps: float, regularization: str, descending: bool, *, out=None):
    """Soft sorted values (in sorted order) -> (values, perm, block_ids).

    Descending is primary; ascending is -soft_sort_desc(-x).
    """
    sign = 1.0 if descending else -1.0
    values, perm, blocks = _outputs(x, out)
    _argsort(x, descending, out=perm)
    if x.size:
        _sort_fwd(x, perm, sign, eps, regularization == "kl", values, blocks)
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
def _mask_fwd(x, perm, k, eps, mask, blocks):
    """s = x[perm] / eps (descending); v = PAV(s - w_k), w_k = (1,..,1,0,..,0) with k ones,
    tie keys s; mask[perm] = s - v per block (see "exact limits"), clipped to [0, 1]."""
    rows, n = x.shape
    inv_eps = 1.0 / eps
    for r in numba.prange(rows):
        s = np.empty(n, dtype=np.float64)
        y = np.empty(n, dtype=np.float64)
        sol = np.empty(n, dtype=np.float64)
        if not _sorted_row(x[r], perm[r], inv_eps, s):
            _fill_nan(mask[r])
            blocks[r, :] = 0
            continue
        if not _direct(s):
            _sorted_row(x[r], perm[r], 1.0, y)
            _segmented(y, eps, _MASK, k, y, perm[r], mask[r], blocks[r], s, sol,
                       np.empty(n, dtype=np.float64))
            continue
        for i in range(n):
            y[i] = s[i] - (1.0 if i < k else 0.0)
        pav_l2_row(y, s, sol, blocks[r])
        _l2_block_out(s, blocks[r], 0, n, n, k, perm[r], mask[r], 0.0, 1.0)


def soft_top_k_mask_rows(x, k: int, eps: float, *, out=None):
    """Projection of x/eps onto the permutahedron of (1,...,1,0,...,0) with k ones (L2)."""
    mask, perm, blocks = _outputs(x, out)
    _argsort(x, descending=True, out=perm)
    if x.size:
        _mask_fwd(x, perm, k, eps, mask, blocks)
    return mask, perm, blocks


def soft_top_k_mask_vjp_rows(g, x, perm, blocks, eps: float, *, out=None):
    """Same Jacobian as the L2 soft rank: dx[perm] = (g_s - blockmean(g_s)) / eps."""
    dx = _grad_output(x, out)
    if x.size:
        _rank_bwd(g, x, x, perm, blocks, 1.0, eps, False, dx)
    return dx
