"""CPU pool-adjacent-violators for the decreasing isotonic problem, one row per thread.

Invariant of the block stack while scanning a row left to right: block values decrease
strictly from bottom to top. A new element is pushed as its own block; while the block below
the top has a value <= the top's, the two are pooled (`pools`). Equality pools too: the
solution is the same either way, but at a kink (a merge threshold, e.g. integer data at
regularization strength 1) pooling equal neighbours gives the derivative of the *pooled* side,
the one that is nonzero wherever either one-sided derivative is (DESIGN.md, "Kinks"); keeping
them apart gave the unpooled side, often exactly zero. The blocks are then the maximal runs of
equal solution values (in exact arithmetic, whatever the order of the merges).

One exception, for the soft ops only (which sort their input first and pass the sorted input
values as `keys`): two equal neighbouring blocks B1 (below) and B2 stay apart when every sorted
input value in B1 and B2 is tied (keys[start of B1] == keys[end of B2 - 1]; the row is sorted
descending, so that is the whole run). No perturbation of the input can make such blocks
violate (the sort re-orders ties), so they are not a kink and pooling them would give a wrong
derivative (a soft top-k mask saturated at 1 or 0 over tied inputs has gradient 0, not a block
mean). The public isotonic regression passes no keys (an empty array): every equality pools.
Float comparisons are exact (no tolerances). Block sums are accumulated in float64. Blocks are
contiguous runs, numbered 0, 1, ... from the left of the row (int32 block ids).

The `*_row` functions work on one row and are inlined into the row-parallel kernels here and
into the fused soft-op kernels of `sortgrad.kernels.soft`.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .._rows import row_parallel
from ..._validate import COMPUTE_FLOAT_DTYPES

DTYPES = COMPUTE_FLOAT_DTYPES


@numba.njit(cache=True, nogil=True, inline="always")
def no_keys():
    """The `keys` argument that turns the soft-op tie exception off (every equality pools)."""
    return np.empty(0, dtype=np.float64)


@numba.njit(cache=True, nogil=True, inline="always")
def pools(below, top, keys, start, stop):
    """Whether PAV pools the block [start, m) (value `below`) with the block [m, stop) above it
    (value `top`): on a violation below < top and on equality below == top (the pooled side of
    a kink), except, when `keys` (the sorted input values) are given, at equality of blocks
    whose keys are all tied: keys[start] == keys[stop - 1] (see the module docstring)."""
    if below < top:
        return True
    if below == top:
        return keys.shape[0] == 0 or keys[start] != keys[stop - 1]
    return False


@numba.njit(cache=True, nogil=True, inline="always")
def _fill_blocks(counts, values, top, sol_row, block_row):
    """Writes each block's value over its run, clamped to the running min from the left. The
    stacks compare the values they store, so their blocks come out strictly decreasing (or equal,
    where the tie exception keeps them apart) and the min changes nothing there; the KL linear
    path compares products of sums but writes values recomputed through logs, which can round
    1 ulp out of order: the running min restores the non-increasing solution."""
    i = 0
    previous = np.inf
    for b in range(top + 1):
        value = min(values[b], previous)
        previous = value
        for _ in range(counts[b]):
            sol_row[i] = value
            block_row[i] = b
            i += 1


@numba.njit(cache=True, nogil=True, inline="always")
def pav_l2_row(y, keys, sol_row, block_row):
    """Decreasing isotonic fit of y (block value: mean of y_B); `keys` as in `pools`."""
    n = y.shape[0]
    sums = np.empty(n, dtype=np.float64)
    counts = np.empty(n, dtype=np.int64)
    values = np.empty(n, dtype=np.float64)
    top = -1
    for i in range(n):
        top += 1
        sums[top] = y[i]
        counts[top] = 1
        values[top] = y[i]
        start = i  # start of the top block
        while top > 0 and pools(values[top - 1], values[top], keys,
                                start - counts[top - 1], i + 1):
            start -= counts[top - 1]
            sums[top - 1] += sums[top]
            counts[top - 1] += counts[top]
            values[top - 1] = sums[top - 1] / counts[top - 1]
            top -= 1
    _fill_blocks(counts, values, top, sol_row, block_row)


@numba.njit(cache=True, nogil=True, inline="always")
def _lse_merge(m1, s1, m2, s2):
    """Pools two log-sum-exp accumulators (max, sum of exp(x - max))."""
    if m1 >= m2:
        return m1, s1 + s2 * math.exp(m2 - m1)
    return m2, s2 + s1 * math.exp(m1 - m2)


@numba.njit(cache=True, nogil=True, inline="always")
def kl_value(m_s, z_s, m_w, z_w):
    """A KL block value lse(s_B) - lse(w_B) from max-shifted sums (m, z = sum exp(x - m)), as
    (m_s - m_w) + (log z_s - log z_w): the large terms cancel first, so a block whose s are its
    w shifted by a constant c (the soft sort on evenly spaced data: theta_B = s_B + c) gets the
    value c exactly and equal neighbours of that kind compare equal (a kink pools)."""
    return (m_s - m_w) + (math.log(z_s) - math.log(z_w))


# Below this spread of exponents (max - min of s plus that of w), exp(x - max) of every entry
# and the products of two block sums stay normal doubles, so PAV can run on plain sums.
LINEAR_KL_SPREAD = 600.0


@numba.njit(cache=True, nogil=True, inline="always")
def _ratio_pools(sum_a, sum_b, counts, top, s, w, keys, start, stop):
    """The pooling test of `pav_ratio_blocks` for the blocks top - 1 = [start, .) and
    top = [., stop): two singletons by their exact values s - w (the values written, which the
    products of exponentials may no longer tell apart: equal products would pool them),
    otherwise value(B1) <= value(B2) as sum_a1 * sum_b2 <= sum_a2 * sum_b1."""
    if counts[top - 1] == 1 and counts[top] == 1:
        return pools(np.float64(s[start]) - np.float64(w[start]),
                     np.float64(s[stop - 1]) - np.float64(w[stop - 1]), keys, start, stop)
    return pools(sum_a[top - 1] * sum_b[top], sum_a[top] * sum_b[top - 1], keys, start, stop)


@numba.njit(cache=True, nogil=True, inline="always")
def pav_ratio_blocks(a, b, s, w, keys, sum_a, sum_b, counts):
    """Decreasing PAV on positive weights a = exp(s - max s), b = exp(w - max w), block value
    log(sum a_B / sum b_B) (+ the max difference).

    The pooling test value(B1) <= value(B2) is sum_a1 * sum_b2 <= sum_a2 * sum_b1 (no logs; the
    products are compared exactly, equality pools, `keys` as in `pools`), between two singletons
    s1 - w1 <= s2 - w2, and pooling is addition. Fills the stack arrays; returns the index of
    the top block.
    """
    top = -1
    for i in range(a.shape[0]):
        top += 1
        sum_a[top] = a[i]
        sum_b[top] = b[i]
        counts[top] = 1
        start = i  # start of the top block
        while top > 0 and _ratio_pools(sum_a, sum_b, counts, top, s, w, keys,
                                       start - counts[top - 1], i + 1):
            start -= counts[top - 1]
            sum_a[top - 1] += sum_a[top]
            sum_b[top - 1] += sum_b[top]
            counts[top - 1] += counts[top]
            top -= 1
    return top


@numba.njit(cache=True, nogil=True, inline="always")
def _pav_kl_linear(s, w, keys, s_max, w_max, sol_row, block_row):
    """KL PAV on a = exp(s - s_max), b = exp(w - w_max)."""
    n = s.shape[0]
    a = np.empty(n, dtype=np.float64)
    b = np.empty(n, dtype=np.float64)
    for i in range(n):
        a[i] = math.exp(np.float64(s[i]) - s_max)
        b[i] = math.exp(np.float64(w[i]) - w_max)
    counts = np.empty(n, dtype=np.int64)
    top = pav_ratio_blocks(a, b, s, w, keys, a, b, counts)  # the stack overwrites read entries
    start = 0
    for k in range(top + 1):
        if counts[k] == 1:  # a singleton's value is s - w: no logs, no rounding
            a[k] = np.float64(s[start]) - np.float64(w[start])
        else:
            a[k] = (s_max - w_max) + (math.log(a[k]) - math.log(b[k]))  # see kl_value
        start += counts[k]
    _fill_blocks(counts, a, top, sol_row, block_row)


@numba.njit(cache=True, nogil=True, inline="always")
def _pav_kl_shifted(s, w, keys, sol_row, block_row):
    """KL PAV with a max-shifted log-sum-exp accumulator per block (any spread)."""
    n = s.shape[0]
    max_s = np.empty(n, dtype=np.float64)
    sum_s = np.empty(n, dtype=np.float64)
    max_w = np.empty(n, dtype=np.float64)
    sum_w = np.empty(n, dtype=np.float64)
    counts = np.empty(n, dtype=np.int64)
    values = np.empty(n, dtype=np.float64)
    top = -1
    for i in range(n):
        top += 1
        max_s[top] = s[i]
        sum_s[top] = 1.0
        max_w[top] = w[i]
        sum_w[top] = 1.0
        counts[top] = 1
        values[top] = np.float64(s[i]) - np.float64(w[i])
        start = i  # start of the top block
        while top > 0 and pools(values[top - 1], values[top], keys, start - counts[top - 1],
                                i + 1):
            b = top - 1
            start -= counts[b]
            max_s[b], sum_s[b] = _lse_merge(max_s[b], sum_s[b], max_s[top], sum_s[top])
            max_w[b], sum_w[b] = _lse_merge(max_w[b], sum_w[b], max_w[top], sum_w[top])
            counts[b] += counts[top]
            values[b] = kl_value(max_s[b], sum_s[b], max_w[b], sum_w[b])
            top = b
    _fill_blocks(counts, values, top, sol_row, block_row)


@numba.njit(cache=True, nogil=True, inline="always")
def pav_kl_row(s, w, keys, sol_row, block_row):
    """Decreasing isotonic fit, block value logsumexp(s_B) - logsumexp(w_B); `keys` as in
    `pools`."""
    s_max, s_min, w_max, w_min = -np.inf, np.inf, -np.inf, np.inf
    for i in range(s.shape[0]):
        s_max = max(s_max, np.float64(s[i]))
        s_min = min(s_min, np.float64(s[i]))
        w_max = max(w_max, np.float64(w[i]))
        w_min = min(w_min, np.float64(w[i]))
    if (s_max - s_min) + (w_max - w_min) < LINEAR_KL_SPREAD:
        _pav_kl_linear(s, w, keys, s_max, w_max, sol_row, block_row)
    else:  # also taken for non-finite input (the spread is then nan or inf)
        _pav_kl_shifted(s, w, keys, sol_row, block_row)


@numba.njit(cache=True, nogil=True, inline="always")
def block_end(block_row, a):
    """End (exclusive) of the block that starts at a."""
    n = block_row.shape[0]
    b = a + 1
    while b < n and block_row[b] == block_row[a]:
        b += 1
    return b


@numba.njit(cache=True, nogil=True, inline="always")
def block_mean_row(g, block_row, out):
    """out[i] = mean of g over the block of i."""
    n = g.shape[0]
    a = 0
    while a < n:
        b = block_end(block_row, a)
        total = 0.0
        for i in range(a, b):
            total += g[i]
        mean = total / (b - a)
        for i in range(a, b):
            out[i] = mean
        a = b


@numba.njit(cache=True, nogil=True, inline="always")
def block_softmax_row(x, a, b, scale, out):
    """out[a:b] = softmax(x[a:b]) * scale, max-shifted; one exp per entry."""
    if b - a == 1:
        out[a] = scale
        return
    m = -np.inf
    for i in range(a, b):
        m = max(m, np.float64(x[i]))
    z = 0.0
    for i in range(a, b):
        e = math.exp(np.float64(x[i]) - m)
        out[i] = e
        z += e
    factor = scale / z
    for i in range(a, b):
        out[i] *= factor


@numba.njit(cache=True, nogil=True, inline="always")
def block_softmax_sum_row(g, x, block_row, out):
    """out[i] = softmax(x_B)_i * sum(g_B) over the block B of i."""
    n = g.shape[0]
    a = 0
    while a < n:
        b = block_end(block_row, a)
        total = 0.0
        for i in range(a, b):
            total += g[i]
        block_softmax_row(x, a, b, total, out)
        a = b


@row_parallel
def _pav_l2(s, w, sol, blocks):
    rows, n = s.shape
    for r in numba.prange(rows):
        y = np.empty(n, dtype=np.float64)
        for i in range(n):
            y[i] = np.float64(s[r, i]) - np.float64(w[r, i])
        pav_l2_row(y, no_keys(), sol[r], blocks[r])


@row_parallel
def _pav_kl(s, w, sol, blocks):
    for r in numba.prange(s.shape[0]):
        pav_kl_row(s[r], w[r], no_keys(), sol[r], blocks[r])


@row_parallel
def _vjp_l2(g, blocks, grad_s, grad_w):
    """d mean(s_B - w_B): grad_s = blockmean(g), grad_w = -blockmean(g)."""
    rows, n = g.shape
    for r in numba.prange(rows):
        block_mean_row(g[r], blocks[r], grad_s[r])
        for i in range(n):
            grad_w[r, i] = -grad_s[r, i]


@row_parallel
def _vjp_kl(g, s, w, blocks, grad_s, grad_w):
    """d (lse(s_B) - lse(w_B)): grad_s = softmax(s_B) sum_B g, grad_w = -softmax(w_B) sum_B g."""
    rows, n = g.shape
    for r in numba.prange(rows):
        block_softmax_sum_row(g[r], s[r], blocks[r], grad_s[r])
        block_softmax_sum_row(g[r], w[r], blocks[r], grad_w[r])
        for i in range(n):
            grad_w[r, i] = -grad_w[r, i]


def isotonic_rows(s: np.ndarray, w: np.ndarray, regularization: str, *, out=None):
    """s (rows, n), w (rows or 1, n) -> (solution with s's dtype, int32 block ids)."""
    w = np.broadcast_to(w, s.shape)  # a shared row is read through a zero stride, not copied
    if out is None:
        out = np.empty(s.shape, dtype=s.dtype), np.empty(s.shape, dtype=np.int32)
    sol, blocks = out
    if s.size:
        (_pav_l2 if regularization == "l2" else _pav_kl)(s, w, sol, blocks)
    return sol, blocks


def isotonic_vjp_rows(g, s, w, blocks, regularization: str, *, out=None):
    """VJP of `isotonic_rows` -> (grad_s, grad_w), both (rows, n) of g's dtype."""
    w = np.broadcast_to(w, s.shape)
    if out is None:
        out = np.empty(g.shape, dtype=g.dtype), np.empty(g.shape, dtype=g.dtype)
    grad_s, grad_w = out
    if g.size:
        if regularization == "l2":
            _vjp_l2(g, blocks, grad_s, grad_w)
        else:
            _vjp_kl(g, s, w, blocks, grad_s, grad_w)
    return grad_s, grad_w
