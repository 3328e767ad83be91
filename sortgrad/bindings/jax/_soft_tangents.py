"""The soft ops' tangent maps in JAX's own ops (forward mode, and second order for KL).

Given the forward's residuals -- the int32 permutation `perm` that sorts each row (descending
for the isotonic problem) and the int32 `block_ids` of the pooled blocks, numbered 0, 1, ...
in sorted order -- each map is linear in the tangent (DESIGN.md section 4, the transposes of
the VJPs that the kernels compute):
- soft rank, L2:  J = scale P^T (I - M) P, symmetric: forward mode runs the VJP kernel.
- soft rank, KL:  J = scale P^T diag(r) (I - B diag(p)) P.
- soft sort, L2:  J = M P;  KL: J = B diag(p) P (output in sorted order).
- soft top-k mask: as the L2 soft rank, scale = 1/eps.
P gathers a row into sorted order, M is the block mean, B the block sum (both symmetric), p
the softmax of the sorted (scaled, signed) inputs within each block, r the sorted outputs.
Rows with a non-finite input give NaN tangents (multiplied in, so transposes keep them).
The KL maps are also what JAX differentiates for second derivatives (their weights p and r
depend on x).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..._validate import INT32_MAX

__all__ = ["rank_kl_jvp", "rank_kl_vjp", "sort_l2_jvp", "sort_kl_jvp", "sort_kl_vjp"]


def _gather(v, perm):
    return jnp.take_along_axis(v, perm, axis=-1)


def _scatter(v, perm):
    """out[..., perm[i]] = v[..., i] (perm is a permutation of every row)."""
    return jnp.put_along_axis(jnp.zeros_like(v), perm, v, axis=-1, inplace=False)


def _segments(block_ids):
    """Flat segment ids, one segment per (row, block), and their count (int32 ids: at most
    2^31 - 1 elements per call of a JAX-ops tangent map)."""
    n = block_ids.shape[-1]
    rows = math.prod(block_ids.shape[:-1])
    if rows * n > INT32_MAX:
        raise ValueError(f"forward-mode soft-op tangents take at most {INT32_MAX} elements "
                         f"per call, got {rows * n}: split the batch")
    offsets = (jnp.arange(rows, dtype=jnp.int32) * n).reshape(block_ids.shape[:-1] + (1,))
    return (block_ids + offsets).reshape(-1), rows * n


def _block_sum(v, block_ids):
    """Each entry replaced by the sum over its block."""
    ids, count = _segments(block_ids)
    sums = jax.ops.segment_sum(v.reshape(-1), ids, num_segments=count, indices_are_sorted=True)
    return sums[ids].reshape(v.shape)


def _block_softmax(s, block_ids):
    """softmax of s within each block (max-shifted)."""
    ids, count = _segments(block_ids)
    flat = s.reshape(-1)
    top = jax.lax.stop_gradient(
        jax.ops.segment_max(flat, ids, num_segments=count, indices_are_sorted=True))
    e = jnp.exp(flat - top[ids])
    z = jax.ops.segment_sum(e, ids, num_segments=count, indices_are_sorted=True)
    return (e / z[ids]).reshape(s.shape)


def _nan_rows(x):
    """1 on rows of finite x, NaN on the others: the factor every tangent is multiplied by."""
    finite = jnp.all(jnp.isfinite(x), axis=-1, keepdims=True)
    return jnp.where(finite, jnp.asarray(1, x.dtype), jnp.asarray(np.nan, x.dtype))


def _rank_scale(eps: float, descending: bool) -> float:
    return (-1.0 if descending else 1.0) / eps


def _sort_sign(descending: bool) -> float:
    return 1.0 if descending else -1.0


def rank_kl_jvp(eps, descending, x, ranks, perm, block_ids, dx):
    scale = _rank_scale(eps, descending)
    p = _block_softmax(scale * _gather(x, perm), block_ids)
    t = _gather(dx, perm)
    u = t - _block_sum(p * t, block_ids)
    return (_scatter(scale * _gather(ranks, perm) * u, perm) * _nan_rows(x),)


def rank_kl_vjp(eps, descending, x, ranks, perm, block_ids, g):
    scale = _rank_scale(eps, descending)
    p = _block_softmax(scale * _gather(x, perm), block_ids)
    a = _gather(ranks, perm) * _gather(g, perm)
    u = a - p * _block_sum(a, block_ids)
    return (_scatter(scale * u, perm) * _nan_rows(x),)


def sort_l2_jvp(x, perm, block_ids, dx):
    t = _gather(dx, perm)
    counts = _block_sum(jnp.ones_like(t), block_ids)
    return (_block_sum(t, block_ids) / counts * _nan_rows(x),)


def sort_kl_jvp(descending, x, perm, block_ids, dx):
    p = _block_softmax(_sort_sign(descending) * _gather(x, perm), block_ids)
    return (_block_sum(p * _gather(dx, perm), block_ids) * _nan_rows(x),)


def sort_kl_vjp(descending, x, perm, block_ids, g):
    p = _block_softmax(_sort_sign(descending) * _gather(x, perm), block_ids)
    return (_scatter(p * _block_sum(g, block_ids), perm) * _nan_rows(x),)
