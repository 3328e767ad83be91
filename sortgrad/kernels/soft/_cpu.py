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
from ..isotonic._cpu import (LINEAR_KL_SPREAD, block_mean_row, block_softmax_sum_row,
                             no_keys, pav_kl_row, pav_l2_row, pav_ratio_blocks)
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
    stability pass; long rows take the radix sort of `argsort_rows_by_key`."""
    if x.dtype.itemsize <= 4 or x.shape[-1] >= RADIX_MIN_N:
        return argsort_rows_by_key(x, key_spec(x.dtype, canonical=True, descending=descending),
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
        factor = sum_rho[k] / sum_e[k]
        for _ in range(counts[k]):
            ranks_row[perm_row[i]] = e[i] * factor
            block_row[i] = k
            i += 1


@row_parallel
def _rank_fwd(x, perm, scale, kl, log_rho, ranks, blocks):
    """s = scale * x[perm]; L2: r = s - PAV(s - rho); KL: r = exp(s - PAV_KL(s, log rho));
    ranks[perm] = r."""
    rows, n = x.shape
    for r in numba.prange(rows):
        s = np.empty(n, dtype=np.float64)
        y = np.empty(n, dtype=np.float64)
        sol = np.empty(n, dtype=np.float64)
        if not _sorted_row(x[r], perm[r], scale, s):
            _fill_nan(ranks[r])
            blocks[r, :] = 0
            continue
        if kl and s[0] - s[n - 1] < LINEAR_KL_SPREAD:
            _rank_kl_linear(s, log_rho, perm[r], ranks[r], blocks[r])
        elif kl:
            pav_kl_row(s, log_rho, no_keys(), sol, blocks[r])
            for i in range(n):
                ranks[r, perm[r, i]] = math.exp(s[i] - sol[i])
        else:
            for i in range(n):
                y[i] = s[i] - (n - i)
            pav_l2_row(y, no_keys(), sol, blocks[r])
            for i in range(n):
                ranks[r, perm[r, i]] = s[i] - sol[i]


@row_parallel
def _rank_bwd(g, x, ranks, perm, blocks, scale, kl, dx):
    """L2: u = g_s - blockmean(g_s); KL: a = r_s * g_s, u = a - softmax(s_B) * blocksum(a);
    dx[perm] = scale * u."""
    rows, n = x.shape
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
    scale = (-1.0 if descending else 1.0) / eps
    ranks, perm, blocks = _outputs(x, out)
    _argsort(x, descending=scale > 0, out=perm)
    if x.size:
        _rank_fwd(x, perm, scale, regularization == "kl", _log_rho(x.shape[1]), ranks, blocks)
    return ranks, perm, blocks


def soft_rank_vjp_rows(g, x, ranks, perm, blocks, eps: float, regularization: str,
                       descending: bool, *, out=None):
    scale = (-1.0 if descending else 1.0) / eps
    dx = _grad_output(x, out)
    if x.size:
        _rank_bwd(g, x, ranks, perm, blocks, scale, regularization == "kl", dx)
    return dx


# --- soft sort ------------------------------------------------------------------------------

@row_parallel
def _sort_fwd(x, perm, sign, inv_eps, kl, out, blocks):
    """s = sign * x[perm] (descending), theta = rho / eps; L2: v = PAV(theta - s);
    KL: v = PAV_KL(theta, s); out = sign * (theta - v), in sorted order. The tie keys are s."""
    rows, n = x.shape
    for r in numba.prange(rows):
        s = np.empty(n, dtype=np.float64)
        theta = np.empty(n, dtype=np.float64)
        y = np.empty(n, dtype=np.float64)
        sol = np.empty(n, dtype=np.float64)
        if not _sorted_row(x[r], perm[r], sign, s):
            _fill_nan(out[r])
            blocks[r, :] = 0
            continue
        for i in range(n):
            theta[i] = (n - i) * inv_eps
        if kl:
            pav_kl_row(theta, s, s, sol, blocks[r])
        else:
            for i in range(n):
                y[i] = theta[i] - s[i]
            pav_l2_row(y, s, sol, blocks[r])
        for i in range(n):
            out[r, i] = sign * (theta[i] - sol[i])


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
        _sort_fwd(x, perm, sign, 1.0 / eps, regularization == "kl", values, blocks)
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
def _mask_fwd(x, perm, k, inv_eps, mask, blocks):
    """s = x[perm] / eps (descending); v = PAV(s - w_k), w_k = (1,..,1,0,..,0) with k ones,
    tie keys s; mask[perm] = s - v (in [0, 1]; clipped against rounding)."""
    rows, n = x.shape
    for r in numba.prange(rows):
        s = np.empty(n, dtype=np.float64)
        y = np.empty(n, dtype=np.float64)
        sol = np.empty(n, dtype=np.float64)
        if not _sorted_row(x[r], perm[r], inv_eps, s):
            _fill_nan(mask[r])
            blocks[r, :] = 0
            continue
        for i in range(n):
            y[i] = s[i] - (1.0 if i < k else 0.0)
        pav_l2_row(y, s, sol, blocks[r])
        for i in range(n):
            mask[r, perm[r, i]] = min(max(s[i] - sol[i], 0.0), 1.0)


def soft_top_k_mask_rows(x, k: int, eps: float, *, out=None):
    """Projection of x/eps onto the permutahedron of (1,...,1,0,...,0) with k ones (L2)."""
    mask, perm, blocks = _outputs(x, out)
    _argsort(x, descending=True, out=perm)
    if x.size:
        _mask_fwd(x, perm, k, 1.0 / eps, mask, blocks)
    return mask, perm, blocks


def soft_top_k_mask_vjp_rows(g, x, perm, blocks, eps: float, *, out=None):
    """Same Jacobian as the L2 soft rank: dx[perm] = (g_s - blockmean(g_s)) / eps."""
    dx = _grad_output(x, out)
    if x.size:
        _rank_bwd(g, x, x, perm, blocks, 1.0 / eps, False, dx)
    return dx
