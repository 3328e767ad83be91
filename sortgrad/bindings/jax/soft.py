"""Soft sort, soft rank, soft top-k mask and soft quantiles as JAX ops (Blondel et al. 2020).

Each core is a `jax.custom_vjp` over the last axis whose forward and backward run the kernel
API (`sortgrad.kernels.soft_*`) through one callback per pass. Residuals: the input, the int32
sorting permutation and the int32 block ids of the isotonic solution (plus the output for KL
ranks).
"""

from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from ... import kernels
from ..._validate import check_k, check_quantiles, check_regularization, check_strength
from ._args import array_and_axis, compute_dtype
from ._call import kernel_call, staged_call

__all__ = ["soft_rank", "soft_sort", "soft_top_k_mask", "soft_quantile"]


def _forward_specs(x):
    return [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape, np.int32),
            jax.ShapeDtypeStruct(x.shape, np.int32)]


@lru_cache(maxsize=None)
def _forward_kernel(name: str, static: tuple, options: tuple):
    """The pass `kernels.<name>(x, *static, out=..., **options)` -> (values, perm, block_ids)."""
    kernel, options = getattr(kernels, name), dict(options)

    def run(x, *, out=None, **route):
        return tuple(kernel(x, *static, out=out, **options, **route))
    return run


@lru_cache(maxsize=None)
def _vjp_kernel(name: str, static: tuple, options: tuple):
    """The pass `kernels.<name>(g, x, *residuals, *static, out=..., **options)` -> (dx,)."""
    kernel, options = getattr(kernels, name), dict(options)

    def run(*arrays, out=None, **route):
        return (kernel(*arrays, *static, out=None if out is None else out[0], **options,
                       **route),)
    return run


def _forward_call(name, x, static, options=()):
    return kernel_call(_forward_kernel(name, tuple(static), tuple(options)), _forward_specs(x), x)


def _vjp_call(name, g, x, residuals, static, options=()):
    (dx,) = kernel_call(_vjp_kernel(name, tuple(static), tuple(options)),
                        [jax.ShapeDtypeStruct(x.shape, x.dtype)], g, x, *residuals)
    return dx


# --- soft rank --------------------------------------------------------------------------------

def _rank_call(x, eps, regularization, descending):
    return _forward_call("soft_rank", x, (eps,),
                         (("regularization", regularization), ("descending", descending)))


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _soft_rank_last(x, eps, regularization, descending):
    return _rank_call(x, eps, regularization, descending)[0]


def _soft_rank_last_fwd(x, eps, regularization, descending):
    ranks, perm, blocks = _rank_call(x, eps, regularization, descending)
    return ranks, (x, ranks, perm, blocks)


def _soft_rank_last_bwd(eps, regularization, descending, residuals, g):
    x, ranks, perm, blocks = residuals
    return (_vjp_call("soft_rank_vjp", g, x, (ranks, perm, blocks), (eps,),
                      (("regularization", regularization), ("descending", descending))),)


_soft_rank_last.defvjp(_soft_rank_last_fwd, _soft_rank_last_bwd)


# --- soft sort --------------------------------------------------------------------------------

def _sort_call(x, eps, regularization, descending):
    return _forward_call("soft_sort", x, (eps,),
                         (("regularization", regularization), ("descending", descending)))


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _soft_sort_last(x, eps, regularization, descending):
    return _sort_call(x, eps, regularization, descending)[0]


def _soft_sort_last_fwd(x, eps, regularization, descending):
    values, perm, blocks = _sort_call(x, eps, regularization, descending)
    return values, (x, perm, blocks)


def _soft_sort_last_bwd(eps, regularization, descending, residuals, g):
    x, perm, blocks = residuals
    return (_vjp_call("soft_sort_vjp", g, x, (perm, blocks), (eps,),
                      (("regularization", regularization), ("descending", descending))),)


_soft_sort_last.defvjp(_soft_sort_last_fwd, _soft_sort_last_bwd)


# --- soft top-k mask --------------------------------------------------------------------------

@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _soft_mask_last(x, k, eps):
    return _forward_call("soft_top_k_mask", x, (k, eps))[0]


def _soft_mask_last_fwd(x, k, eps):
    mask, perm, blocks = _forward_call("soft_top_k_mask", x, (k, eps))
    return mask, (x, perm, blocks)


def _soft_mask_last_bwd(k, eps, residuals, g):
    x, perm, blocks = residuals
    return (_vjp_call("soft_top_k_mask_vjp", g, x, (perm, blocks), (eps,)),)


_soft_mask_last.defvjp(_soft_mask_last_fwd, _soft_mask_last_bwd)


# --- public ops -------------------------------------------------------------------------------

def _apply_on_axis(core, x, axis, *static):
    """Runs core(x_last, *static) with `axis` moved last and 16-bit floats in float32."""
    x, axis = array_and_axis(x, axis)
    compute_dtype(x)
    return staged_call(_on_axis_impl, x, core, axis, *static)


def _on_axis_impl(x, core, axis, *static):
    if x.size == 0:
        return x
    out = core(jnp.moveaxis(x, axis, -1).astype(compute_dtype(x)), *static)
    return jnp.moveaxis(out, -1, axis).astype(x.dtype)


_SOFT_DOC = """
    Args:
      x: floating array (float16/bfloat16 are computed in float32 and returned in their own
        dtype); any leading dims; `axis` (static) is the one operated on.
      regularization_strength: eps > 0, finite, a static float. Scale-dependent: as eps -> 0
        the op becomes its hard counterpart; large eps flattens it.
      regularization: "l2" (quadratic) or "kl" (entropic).
      descending: static bool.

    Ties: tied inputs get identical outputs. A row (along `axis`) holding NaN or +-inf gives
    NaN for that whole row of the output and of the gradient; other rows are unaffected.
    Works under jit, grad, vmap, jacrev; the gradient is exact (isotonic-regression VJP).
    Internally float64. Bad arguments raise ValueError/TypeError before anything runs.
"""


def soft_rank(x, *, axis: int = -1, regularization_strength: float = 1.0,
              regularization: str = "l2", descending: bool = False):
    """Soft ranks along `axis`, in [1, n]; rank 1 is the smallest (largest if descending).

    Projection of x/eps onto the permutahedron of (n, ..., 1) (Blondel et al. 2020); as eps
    -> 0, the ranks of `jnp.argsort(jnp.argsort(x)) + 1` (for distinct values).
    """
    eps = check_strength(regularization_strength)
    reg = check_regularization(regularization)
    return _apply_on_axis(_soft_rank_last, x, axis, eps, reg, bool(descending))


def soft_sort(x, *, axis: int = -1, regularization_strength: float = 1.0,
              regularization: str = "l2", descending: bool = False):
    """Soft sorted values along `axis` (ascending unless `descending`).

    Projection of (n, ..., 1)/eps onto the permutahedron of x; as eps -> 0, `jnp.sort(x)`.
    The output sums to sum(x) for "l2".
    """
    eps = check_strength(regularization_strength)
    reg = check_regularization(regularization)
    return _apply_on_axis(_soft_sort_last, x, axis, eps, reg, bool(descending))


def soft_top_k_mask(x, k: int, *, axis: int = -1, regularization_strength: float = 1.0):
    """Soft indicator of the k largest entries along `axis`: values in [0, 1] summing to k.

    The L2 projection of x/eps onto the permutahedron of (1, ..., 1, 0, ..., 0) with k ones,
    i.e. clip(x/eps - tau, 0, 1) with tau chosen so the row sums to k; as eps -> 0 it is 1 on
    the k largest entries. `0 <= k <= n` (static), else ValueError.
    """
    x, axis = array_and_axis(x, axis)
    k = check_k(k, x.shape[axis])
    eps = check_strength(regularization_strength)
    return _apply_on_axis(_soft_mask_last, x, axis, k, eps)


def soft_quantile(x, q, *, axis: int = -1, regularization_strength: float = 1.0,
                  regularization: str = "l2"):
    """Soft q-quantile(s) along `axis`: linear interpolation of the ascending soft sort at
    position q * (n - 1), as `jnp.quantile(..., method="linear")` does on the hard sort.

    q: a static float in [0, 1] (the axis is reduced), or a 1-D sequence of them (the result
    gets a leading axis of len(q), as `jnp.quantile`). The row must not be empty.
    """
    quantiles = check_quantiles(q)
    eps = check_strength(regularization_strength)
    reg = check_regularization(regularization)
    x, axis = array_and_axis(x, axis)
    if x.shape[axis] == 0:
        raise ValueError("soft_quantile needs at least one element along axis")
    compute_dtype(x)
    return staged_call(_quantile_impl, x, axis, eps, reg, quantiles)


def _quantile_impl(x, axis, eps, regularization, quantiles):
    """The soft sort and the interpolation in the compute dtype (float32 for 16-bit input),
    rounded to x's dtype once."""
    n = x.shape[axis]
    ordered = _soft_sort_last(jnp.moveaxis(x, axis, -1).astype(compute_dtype(x)), eps,
                              regularization, False)
    pos = np.asarray(quantiles, dtype=np.float64) * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    frac = (pos - lo).astype(ordered.dtype)
    out = (ordered[..., lo] * (1 - frac) + ordered[..., hi] * frac).astype(x.dtype)
    return out if np.ndim(pos) == 0 else jnp.moveaxis(out, -1, 0)


def _append_doc(fn, *drop: str) -> None:
    doc = _SOFT_DOC
    for line in drop:
        doc = "\n".join(row for row in doc.split("\n") if not row.strip().startswith(line))
    fn.__doc__ += doc


_append_doc(soft_rank)
_append_doc(soft_sort)
_append_doc(soft_top_k_mask, "regularization:", "descending:")
_append_doc(soft_quantile, "descending:")
