"""CPU pool-adjacent-violators for the decreasing isotonic problem, one row per thread.

Invariant of the block stack while scanning a row left to right: block values are
non-increasing from bottom to top. A new element is pushed as its own block; while the block
below the top has a value < the top's (a strict violation), the two are pooled. Neighbours that
are merely equal stay separate blocks: the solution is the same either way, and the finest
partition is the one whose Jacobian is right where the solution is locally constant (e.g. a
soft top-k mask saturated at 0 over tied inputs has gradient 0, not a block mean). Block sums are accumulated in float64.
Blocks are contiguous runs, numbered 0, 1, ... from the left of the row (int32 block ids).

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
def _fill_blocks(counts, values, top, sol_row, block_row):
    """Writes each block's value over its run. Adjacent blocks that were left apart because
    their values are equal in exact arithmetic can round 1 ulp out of order; the running min
    restores the non-increasing solution."""
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
def pav_l2_row(y, sol_row, block_row):
    """Decreasing isotonic fit of y (block value: mean of y_B)."""
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
        while top > 0 and values[top - 1] < values[top]:
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


# Below this spread of exponents (max - min of s plus that of w), exp(x - max) of every entry
# and the products of two block sums stay normal doubles, so PAV can run on plain sums.
LINEAR_KL_SPREAD = 600.0


@numba.njit(cache=True, nogil=True, inline="always")
def pav_ratio_blocks(a, b, sum_a, sum_b, counts):
    """Decreasing PAV on positive weights, block value log(sum a_B / sum b_B).

    The violation test value(B1) < value(B2) is sum_a1 * sum_b2 < sum_a2 * sum_b1 (no logs), and
    pooling is addition. Fills the stack arrays; returns the index of the top block.
    """
    top = -1
    for i in range(a.shape[0]):
        top += 1
        sum_a[top] = a[i]
        sum_b[top] = b[i]
        counts[top] = 1
        while top > 0 and sum_a[top - 1] * sum_b[top] < sum_a[top] * sum_b[top - 1]:
            sum_a[top - 1] += sum_a[top]
            sum_b[top - 1] += sum_b[top]
            counts[top - 1] += counts[top]
            top -= 1
    return top


@numba.njit(cache=True, nogil=True, inline="always")
def _pav_kl_linear(s, w, s_max, w_max, sol_row, block_row):
    """KL PAV on a = exp(s - s_max), b = exp(w - w_max)."""
    n = s.shape[0]
    a = np.empty(n, dtype=np.float64)
    b = np.empty(n, dtype=np.float64)
    for i in range(n):
        a[i] = math.exp(np.float64(s[i]) - s_max)
        b[i] = math.exp(np.float64(w[i]) - w_max)
    counts = np.empty(n, dtype=np.int64)
    top = pav_ratio_blocks(a, b, a, b, counts)  # the stack overwrites entries already read
    start = 0
    for k in range(top + 1):
        if counts[k] == 1:  # a singleton's value is s - w: no logs, no rounding
            a[k] = np.float64(s[start]) - np.float64(w[start])
        else:
            a[k] = (math.log(a[k]) + s_max) - (math.log(b[k]) + w_max)
        start += counts[k]
    _fill_blocks(counts, a, top, sol_row, block_row)


@numba.njit(cache=True, nogil=True, inline="always")
def _pav_kl_shifted(s, w, sol_row, block_row):
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
        while top > 0 and values[top - 1] < values[top]:
            b = top - 1
            max_s[b], sum_s[b] = _lse_merge(max_s[b], sum_s[b], max_s[top], sum_s[top])
            max_w[b], sum_w[b] = _lse_merge(max_w[b], sum_w[b], max_w[top], sum_w[top])
            counts[b] += counts[top]
            values[b] = (max_s[b] + math.log(sum_s[b])) - (max_w[b] + math.log(sum_w[b]))
            top = b
    _fill_blocks(counts, values, top, sol_row, block_row)


@numba.njit(cache=True, nogil=True, inline="always")
def pav_kl_row(s, w, sol_row, block_row):
    """Decreasing isotonic fit, block value logsumexp(s_B) - logsumexp(w_B)."""
    s_max, s_min, w_max, w_min = -np.inf, np.inf, -np.inf, np.inf
    for i in range(s.shape[0]):
        s_max = max(s_max, np.float64(s[i]))
        s_min = min(s_min, np.float64(s[i]))
        w_max = max(w_max, np.float64(w[i]))
        w_min = min(w_min, np.float64(w[i]))
    if (s_max - s_min) + (w_max - w_min) < LINEAR_KL_SPREAD:
        _pav_kl_linear(s, w, s_max, w_max, sol_row, block_row)
    else:  # also taken for non-finite input (the spread is then nan or inf)
        _pav_kl_shifted(s, w, sol_row, block_row)


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
        pav_l2_row(y, sol[r], blocks[r])


@row_parallel
def _pav_kl(s, w, sol, blocks):
    for r in numba.prange(s.shape[0]):
        pav_kl_row(s[r], w[r], sol[r], blocks[r])


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
