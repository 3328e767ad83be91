"""Soft sort, soft rank and the soft top-k mask as compositions of the kernels (Blondel et al.
2020): sort -> isotonic regression -> permutation scatter, and their VJPs.

All functions take rows (rows, n) and work in float64 internally (the sort runs on the input
itself, in its own dtype: dividing by eps > 0 or negating does not change which permutation
sorts a row, only the tie order, and tied entries always end up in one pooled block).
Residuals are the int32 sorting permutation `perm` and the int32 `block_ids` of the pooled
blocks; nothing is recomputed with tolerances. Rows containing NaN or +-inf give NaN in every
output (and gradient) entry of that row only.

Conventions: rho = (n, n-1, ..., 1); "sorted" is descending; isotonic problems are decreasing.
"""

from __future__ import annotations

import numpy as np

from .isotonic import isotonic_regression, isotonic_regression_vjp
from .permutation import permutation_scatter
from .segmented_sort import segmented_sort


def _rho(n: int) -> np.ndarray:
    return np.arange(n, 0, -1, dtype=np.float64)


def _poison_nonfinite_rows(x: np.ndarray, *outs: np.ndarray) -> None:
    bad = ~np.isfinite(x).all(axis=-1)
    if bad.any():
        for out in outs:
            out[bad] = np.nan


def _gather(a: np.ndarray, perm: np.ndarray) -> np.ndarray:
    return np.take_along_axis(a, perm, axis=-1)


def _sort_desc_for(x: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(perm, s): perm sorts z = scale * x descending, s = z[perm] in float64."""
    _, perm = segmented_sort(x, descending=scale > 0)
    return perm, _gather(x, perm).astype(np.float64) * scale


# --- soft rank ------------------------------------------------------------------------------

def soft_rank_fwd(x, eps: float, regularization: str, descending: bool):
    """Ranks in [1, n] (rank 1 = smallest when ascending) -> (ranks, perm, block_ids)."""
    n = x.shape[-1]
    scale = (-1.0 if descending else 1.0) / eps
    perm, s = _sort_desc_for(x, scale)
    if regularization == "l2":
        v, blocks = isotonic_regression(s, _rho(n), regularization="l2")
        r_sorted = s - v
    else:
        v, blocks = isotonic_regression(s, np.log(_rho(n)), regularization="kl")
        r_sorted = np.exp(s - v)
    ranks = permutation_scatter(r_sorted.astype(x.dtype), perm, n)
    _poison_nonfinite_rows(x, ranks)
    return ranks, perm, blocks


def soft_rank_bwd(g, x, ranks, perm, blocks, eps: float, regularization: str, descending: bool):
    n = x.shape[-1]
    scale = (-1.0 if descending else 1.0) / eps
    g_s = _gather(g, perm).astype(np.float64)
    if regularization == "l2":
        pooled, _ = isotonic_regression_vjp(g_s, g_s, _rho(n), blocks, regularization="l2")
        u = g_s - pooled
    else:
        s = _gather(x, perm).astype(np.float64) * scale
        a = _gather(ranks, perm).astype(np.float64) * g_s
        pooled, _ = isotonic_regression_vjp(a, s, np.log(_rho(n)), blocks, regularization="kl")
        u = a - pooled
    dx = permutation_scatter((u * scale).astype(x.dtype), perm, n)
    _poison_nonfinite_rows(x, dx)
    return dx


# --- soft sort ------------------------------------------------------------------------------

def soft_sort_fwd(x, eps: float, regularization: str, descending: bool):
    """Soft sorted values (sorted order) -> (values, perm, block_ids).

    Descending is primary: out = rho/eps - PAV(rho/eps, s) with s the values sorted descending;
    ascending is -soft_sort_desc(-x).
    """
    n = x.shape[-1]
    sign = 1.0 if descending else -1.0
    perm, s = _sort_desc_for(x, sign)
    theta = _rho(n) / eps
    v, blocks = isotonic_regression(np.broadcast_to(theta, s.shape), s,
                                    regularization=regularization)
    out = (sign * (theta - v)).astype(x.dtype)
    _poison_nonfinite_rows(x, out)
    return out, perm, blocks


def soft_sort_bwd(g, x, perm, blocks, eps: float, regularization: str, descending: bool):
    """d out / d s is the isotonic VJP w.r.t. its second argument (the sorted values), taken
    with cotangent -g (out = theta - v); the two sign flips of the ascending case cancel."""
    n = x.shape[-1]
    sign = 1.0 if descending else -1.0
    s = _gather(x, perm).astype(np.float64) * sign
    theta = np.broadcast_to(_rho(n) / eps, s.shape)
    _, grad_s = isotonic_regression_vjp(-g.astype(np.float64), theta, s, blocks,
                                        regularization=regularization)
    dx = permutation_scatter(grad_s.astype(x.dtype), perm, n)
    _poison_nonfinite_rows(x, dx)
    return dx


# --- soft top-k mask ------------------------------------------------------------------------

def soft_top_k_mask_fwd(x, k: int, eps: float):
    """Projection of x/eps onto the permutahedron of (1,...,1,0,...,0) with k ones (L2)."""
    n = x.shape[-1]
    perm, s = _sort_desc_for(x, 1.0 / eps)
    w = (np.arange(n) < k).astype(np.float64)
    v, blocks = isotonic_regression(s, w, regularization="l2")
    mask = permutation_scatter(np.clip(s - v, 0.0, 1.0).astype(x.dtype), perm, n)
    _poison_nonfinite_rows(x, mask)
    return mask, perm, blocks


def soft_top_k_mask_bwd(g, x, perm, blocks, eps: float):
    n = x.shape[-1]
    g_s = _gather(g, perm).astype(np.float64)
    pooled, _ = isotonic_regression_vjp(g_s, g_s, g_s, blocks, regularization="l2")
    dx = permutation_scatter(((g_s - pooled) / eps).astype(x.dtype), perm, n)
    _poison_nonfinite_rows(x, dx)
    return dx
