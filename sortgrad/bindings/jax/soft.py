"""Soft sort, soft rank, soft top-k mask and soft quantiles as JAX ops (Blondel et al. 2020).

Each core is a `jax.custom_jvp` over the last axis returning (values, perm, block_ids): its
forward runs the kernel API (`sortgrad.kernels.soft_*`) through one callback, and its tangent
is a linear map of the residuals -- the input, the int32 sorting permutation and the int32
block ids of the isotonic solution (plus the output for ranks) -- bound with `_linear` so
that reverse mode runs the op's VJP kernel (one callback) and forward mode the map itself
(`_soft_tangents`). Every order of forward and reverse mode follows.
"""

from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from ... import kernels
from ..._validate import (check_bool, check_k, check_quantiles, check_regularization,
                          check_strength)
from ._args import compute_dtype, soft_input
from . import _soft_tangents as tangents
from . import _softness
from ._sharding import Layout
from ._call import kernel_call, staged_call
from ._sharding import rowwise
from ._linear import LinearOp, apply_linear, integer_tangent

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


@lru_cache(maxsize=None)
def _vjp_map(name: str, static: tuple, options: tuple):
    """(x, *residuals, g) -> (dx,): the VJP kernel as the map a LinearOp applies."""
    def run(x, *rest):
        *residuals, g = rest
        return (_vjp_call(name, g, x, residuals, static, options),)
    return run


def _with_tangent(core, op, x, dx, static, values_are_residual=False):
    """The JVP rule shared by the cores: the primal from `core` itself (so every order of
    differentiation runs one forward callback), the tangent `op` applied to dx given the
    residuals (x, [values,] perm, block_ids)."""
    values, perm, blocks = core(x, *static)
    residuals = (x, values, perm, blocks) if values_are_residual else (x, perm, blocks)
    (dv,) = apply_linear(op, residuals, (dx,))
    return (values, perm, blocks), (dv, integer_tangent(perm), integer_tangent(blocks))


# --- soft rank --------------------------------------------------------------------------------

def _rank_options(regularization, descending):
    return (("regularization", regularization), ("descending", descending))


@lru_cache(maxsize=None)
def _rank_op(eps, regularization, descending) -> LinearOp:
    kernel = _vjp_map("soft_rank_vjp", (eps,), _rank_options(regularization, descending))
    if regularization == "l2":  # symmetric: the VJP kernel is also the tangent map
        return LinearOp("rank_l2", kernel, kernel)
    jvp = partial(tangents.rank_kl_jvp, eps, descending)
    return LinearOp("rank_kl", jvp, kernel, jvp, partial(tangents.rank_kl_vjp, eps, descending))


@partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _soft_rank_last(x, eps, regularization, descending):
    """(ranks, perm, block_ids) of the rows of x."""
    return _forward_call("soft_rank", x, (eps,), _rank_options(regularization, descending))


@_soft_rank_last.defjvp
def _soft_rank_last_jvp(eps, regularization, descending, primals, tangents):
    return _with_tangent(_soft_rank_last, _rank_op(eps, regularization, descending),
                         primals[0], tangents[0], (eps, regularization, descending), True)


# --- soft sort --------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _sort_op(eps, regularization, descending) -> LinearOp:
    kernel = _vjp_map("soft_sort_vjp", (eps,), _rank_options(regularization, descending))
    if regularization == "l2":
        return LinearOp("sort_l2", tangents.sort_l2_jvp, kernel)
    jvp = partial(tangents.sort_kl_jvp, descending)
    return LinearOp("sort_kl", jvp, kernel, jvp, partial(tangents.sort_kl_vjp, descending))


@partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _soft_sort_last(x, eps, regularization, descending):
    """(values in sorted order, perm, block_ids) of the rows of x."""
    return _forward_call("soft_sort", x, (eps,), _rank_options(regularization, descending))


@_soft_sort_last.defjvp
def _soft_sort_last_jvp(eps, regularization, descending, primals, tangents):
    return _with_tangent(_soft_sort_last, _sort_op(eps, regularization, descending),
                         primals[0], tangents[0], (eps, regularization, descending))


# --- soft top-k mask --------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _mask_op(eps) -> LinearOp:
    kernel = _vjp_map("soft_top_k_mask_vjp", (eps,), ())
    return LinearOp("mask", kernel, kernel)  # symmetric, as the L2 soft rank


@partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _soft_mask_last(x, k, eps):
    """(mask, perm, block_ids) of the rows of x."""
    return _forward_call("soft_top_k_mask", x, (k, eps))


@_soft_mask_last.defjvp
def _soft_mask_last_jvp(k, eps, primals, tangents):
    return _with_tangent(_soft_mask_last, _mask_op(eps), primals[0], tangents[0], (k, eps))


# --- public ops -------------------------------------------------------------------------------

def _apply_on_axis(core, x, axis, *static):
    """Runs core(x_last, *static) with `axis` moved last and 16-bit floats in float32."""
    x, axis = soft_input(x, axis)
    compute_dtype(x)
    return staged_call(_on_axis_impl, x, core, axis, *static, layout=rowwise(x.ndim, axis))


def _on_axis_impl(x, core, axis, *static):
    if x.size == 0:
        return x
    out = core(jnp.moveaxis(x, axis, -1).astype(compute_dtype(x)), *static)[0]
    return jnp.moveaxis(out, -1, axis).astype(x.dtype)


_SOFT_DOC = """
    Args:
      x: array; float16/bfloat16 are computed in float32 and returned in their own dtype;
        integer and bool x are promoted to float as `jnp.quantile` does (float32; float64
        for 64-bit integers under x64). Any leading dims; `axis` (static) is the one operated
        on, None: the flattened array.
      regularization_strength: eps > 0, finite, absolute (in the units of x): a static float,
        or a JAX float scalar (may be traced under jit, grad, vmap: annealed without
        recompiling, differentiable; NaN out where it is not finite and > 0; not for the KL
        soft sort/quantile). As eps -> 0 the op becomes its hard counterpart; large eps
        flattens it. Its effect depends on the spread of the data and on n (the scale law
        below); give it, or `softness`, not both (ValueError).
      softness: s > 0, finite, scale-free: each row gets its own eps from its standard
        deviation and length by the op's law (below), so one s means the same relative
        softness on every row, at every n, under x -> a x + b. A static float or a JAX float
        scalar (traced: no recompiling per value; differentiable). Both None: the op's
        default softness (the KL soft sort/quantile: eps = 1.0). The result is the op at
        eps(x), differentiated through eps(x) (the row's standard deviation) too; a constant
        row gives the op's exact value with finite derivatives. x is rescaled in its compute
        dtype (float32 for float32 input), so values one ulp apart may tie.
      regularization: "l2" (quadratic) or "kl" (entropic).
      descending: static bool.

    Ties: tied inputs get identical outputs. Kinks: where the isotonic solution changes its
    block structure (e.g. integer data at eps = 1) the derivative is the one-sided derivative
    of the pooled side (the blocks merged), as fast-soft-sort and torchsort return: nonzero
    wherever either side is. A row (along `axis`) holding NaN or +-inf gives NaN for that whole
    row of the output and of every derivative; other rows are unaffected.
    Derivatives: exact, in every mode and order (jvp, jacfwd, grad, jacrev, hessian, under
    jit and vmap): the tangent map is linear given the sorting permutation and the pooled
    blocks; reverse mode runs the fused VJP kernel. Internally float64 on the CPU. Bad
    arguments raise ValueError/TypeError before anything runs.
    Sharded x (shard_map, explicit mesh axes, eager NamedSharding): each device runs its own
    rows, nothing gathered; a split `axis` is gathered first (README "Several devices").
"""


def soft_rank(x, *, axis: int | None = -1, regularization_strength: float | None = None,
              regularization: str = "l2", descending: bool = False,
              softness: float | None = None):
    """Soft ranks along `axis`, in [1, n]; rank 1 is the smallest (largest if descending).

    Projection of x/eps onto the permutahedron of (n, ..., 1) (Blondel et al. 2020); as eps
    -> 0, the ranks of `jnp.argsort(jnp.argsort(x)) + 1` (for distinct values).
    Scale law: op(c x, c eps) = op(x, eps). Softness s: eps = s * std(row) / n for "l2"
    (rank / n against the standardised row u is its CDF, with each part steeper than 1 / s
    inside a segment of slope 1 / s: a pooled block; default 4.0), eps = s * std(row) for
    "kl" (pools where density / CDF of u exceeds 1 / s: the low ranks first; default 1.0).
    """
    reg = check_regularization(regularization)
    desc = check_bool(descending, "descending")
    regularization_strength, softness = _softness.resolve(
        regularization_strength, softness, "rank", "soft_rank", reg)
    if softness is not None:
        return _with_softness("rank", x, axis, softness, (reg, desc))
    if _is_traced(regularization_strength):  # op(x, eps) = op(x / eps, 1)
        x, axis = soft_input(x, axis)
        return _rescaled(lambda v: soft_rank(v, axis=axis, regularization_strength=1.0,
                                             regularization=reg, descending=desc),
                         x, regularization_strength, -1)
    eps = check_strength(regularization_strength)
    return _apply_on_axis(_soft_rank_last, x, axis, eps, reg, desc)


def soft_sort(x, *, axis: int | None = -1, regularization_strength: float | None = None,
              regularization: str = "l2", descending: bool = False,
              softness: float | None = None):
    """Soft sorted values along `axis` (ascending unless `descending`).

    Projection of (n, ..., 1)/eps onto the permutahedron of x; as eps -> 0, `jnp.sort(x)`.
    The output sums to sum(x) for "l2". Scale law ("l2"): op(c x, eps / c) = c op(x, eps).
    Softness s ("l2" only): eps = s * n / std(row): the soft quantile function of the
    standardised row is the hard one, with each part steeper than 1 / s (density below s)
    inside a segment of slope 1 / s: the sparse tails pool first, the dense middle last
    (default 0.3). "kl" has no scale law: an absolute strength only (default 1.0).
    """
    reg = check_regularization(regularization)
    desc = check_bool(descending, "descending")
    regularization_strength, softness = _softness.resolve(
        regularization_strength, softness, "sort", "soft_sort", reg)
    if softness is not None:
        return _with_softness("sort", x, axis, softness, (desc,))
    if _is_traced(regularization_strength, "soft_sort", reg):  # op(x, eps) = op(eps x, 1) / eps
        x, axis = soft_input(x, axis)
        return _rescaled(lambda v: soft_sort(v, axis=axis, regularization_strength=1.0,
                                             descending=desc),
                         x, regularization_strength, 1)
    eps = check_strength(regularization_strength)
    return _apply_on_axis(_soft_sort_last, x, axis, eps, reg, desc)


def soft_top_k_mask(x, k: int, *, axis: int | None = -1,
                    regularization_strength: float | None = None,
                    softness: float | None = None):
    """Soft indicator of the k largest entries along `axis`: values in [0, 1] summing to k.

    The L2 projection of x/eps onto the permutahedron of (1, ..., 1, 0, ..., 0) with k ones,
    i.e. clip(x/eps - tau, 0, 1) with tau chosen so the row sums to k; as eps -> 0 it is 1 on
    the k largest entries. `0 <= k <= n` (static), else ValueError. Scale law: op(c x, c eps)
    = op(x, eps). Softness s: eps = s * std(row), entries within about s standard deviations
    of the k-th score get fractional weight (default 1.0; as `sortgrad.selection`'s
    standardised scores at strength s).
    """
    x, axis = soft_input(x, axis)
    k = check_k(k, x.shape[axis])
    regularization_strength, softness = _softness.resolve(
        regularization_strength, softness, "mask", "soft_top_k_mask")
    if softness is not None:
        return _with_softness("mask", x, axis, softness, (k,))
    if _is_traced(regularization_strength):  # op(x, eps) = op(x / eps, 1)
        return _rescaled(lambda v: soft_top_k_mask(v, k, axis=axis, regularization_strength=1.0),
                         x, regularization_strength, -1)
    eps = check_strength(regularization_strength)
    return _apply_on_axis(_soft_mask_last, x, axis, k, eps)


def soft_quantile(x, q, *, axis: int | None = -1, regularization_strength: float | None = None,
                  regularization: str = "l2", keepdims: bool = False,
                  softness: float | None = None):
    """Soft q-quantile(s) along `axis`: linear interpolation of the ascending soft sort at
    position q * (n - 1), as `jnp.quantile(..., method="linear")` does on the hard sort.

    q: a float in [0, 1] (the axis is reduced) or a 1-D sequence/array of them (the result
    gets a leading axis of len(q), as `jnp.quantile`). A static q (Python floats, NumPy) is
    checked (ValueError outside [0, 1]); a JAX array q may be traced (under jit, vmap, grad:
    the result is differentiable in q too) and is not checked: as `jnp.quantile`, values
    below 0 give the minimum, above 1 the maximum, NaN gives NaN. keepdims: keep `axis` with
    length 1 (as `jnp.quantile`). The row must not be empty. Strength and softness as
    `soft_sort` (softness "l2" only, default 0.3): a q where the data are dense (the median of
    unimodal data) stays the hard quantile (gradient on the 2 interpolated entries) until the
    softness passes that density, then the whole row pools (the soft median is the mean);
    quantiles in the sparser tails (q = 0.1, 0.9 of normal data at the default) pool first.
    """
    reg = check_regularization(regularization)
    x, axis = soft_input(x, axis)
    if x.shape[axis] == 0:
        raise ValueError("soft_quantile needs at least one element along axis")
    compute_dtype(x)
    regularization_strength, softness = _softness.resolve(
        regularization_strength, softness, "quantile", "soft_quantile", reg)
    if softness is not None:
        out = _with_softness("quantile", x, axis, softness, (), q)
        return jnp.expand_dims(out, axis + (out.ndim - x.ndim + 1)) if keepdims else out
    if _is_traced(regularization_strength, "soft_quantile", reg):  # as soft_sort
        return _rescaled(lambda v: soft_quantile(v, q, axis=axis, keepdims=keepdims,
                                                 regularization_strength=1.0),
                         x, regularization_strength, 1)
    eps = check_strength(regularization_strength)
    if isinstance(q, jax.Array):
        if q.ndim > 1:
            raise TypeError(f"q must be a scalar or 1-D, got shape {q.shape}")
        batch = tuple(d for d in range(x.ndim) if d != axis)
        ordered = staged_call(_ascending_soft_sort, x, axis, eps, reg,
                              layout=rowwise(x.ndim, axis, batch + (axis,)))
        out = _interpolate(ordered, jnp.asarray(q, ordered.dtype), x.dtype)
    else:
        quantiles = check_quantiles(q)
        batch = tuple(d for d in range(x.ndim) if d != axis)
        dims = batch if isinstance(quantiles, float) else (None,) + batch
        out = staged_call(_quantile_impl, x, axis, eps, reg, quantiles,
                          layout=rowwise(x.ndim, axis, dims))
    if keepdims:
        out = jnp.expand_dims(out, axis + (out.ndim - x.ndim + 1))
    return out


def _ascending_soft_sort(x, axis, eps, regularization):
    """The ascending soft sort of the rows along `axis`, moved last, in the compute dtype."""
    return _soft_sort_last(jnp.moveaxis(x, axis, -1).astype(compute_dtype(x)), eps,
                           regularization, False)[0]


def _interpolate(ordered, q, dtype):
    """Linear interpolation of the sorted rows at q * (n - 1), in the compute dtype, rounded to
    `dtype` once; q's dims lead the result. A static q (NumPy float64) places the positions
    in float64 at trace time; a JAX q at run time (clipped to [0, 1], NaN stays NaN)."""
    xp = np if isinstance(q, np.ndarray) else jnp
    n = ordered.shape[-1]
    pos = xp.clip(q, 0, 1) * (n - 1)
    lo = xp.clip(xp.floor(pos), 0, n - 1)
    frac = (pos - lo).astype(ordered.dtype)
    lo = lo.astype(np.int32)
    hi = xp.minimum(lo + 1, n - 1)
    out = jnp.take(ordered, lo, axis=-1) * (1 - frac) + jnp.take(ordered, hi, axis=-1) * frac
    return (out if np.ndim(q) == 0 else jnp.moveaxis(out, -1, 0)).astype(dtype)


def _quantile_impl(x, axis, eps, regularization, quantiles):
    """Static quantiles: the soft sort and the interpolation in the compute dtype (float32 for
    16-bit input), rounded to x's dtype once."""
    ordered = _ascending_soft_sort(x, axis, eps, regularization)
    return _interpolate(ordered, np.asarray(quantiles, dtype=np.float64), x.dtype)


def _is_traced(strength, op: str = "", regularization: str = "l2") -> bool:
    """Whether the strength is a JAX array (traced under jit/grad: no recompile per value, and
    differentiable). Rank and mask obey op(x, eps) = op(x / eps, 1), L2 sort and quantile
    op(x, eps) = op(eps x, 1) / eps; the KL soft sort has no such law."""
    if not isinstance(strength, jax.Array):
        return False
    if strength.ndim != 0 or not jnp.issubdtype(strength.dtype, jnp.floating):
        raise TypeError(f"a traced regularization_strength must be a float scalar, got "
                        f"{strength.dtype}{list(strength.shape)}")
    if regularization == "kl":
        raise TypeError(f"{op} with regularization='kl' needs a static regularization_strength "
                        "(a Python float): the KL soft sort has no scale law to trace it by")
    return True


def _rescaled(op, x, strength, power: int):
    """The op at strength 1 on rescaled x, in the compute dtype: op(x / eps) for rank and mask
    (power -1), op(eps x) / eps for sort and quantile (power 1). A strength that is not finite
    and > 0 gives NaN."""
    dtype = compute_dtype(x)
    eps = strength.astype(dtype)
    eps = jnp.where((eps > 0) & jnp.isfinite(eps), eps, jnp.asarray(jnp.nan, dtype))
    xc = x.astype(dtype)
    out = op(xc / eps) if power < 0 else op(xc * eps) / eps
    return out.astype(x.dtype)


def _with_softness(op: str, x, axis, softness, options: tuple, q=None):
    """The op at each row's strength for `softness` (`_softness`: the law of every op, in one
    place): one staged program (an eager call compiles once per shape, whatever the
    softness), operands x, the softness as an array (never a static: no recompiling per
    value) and a JAX q. Returns what the op returns (the quantile without keepdims)."""
    x, axis = soft_input(x, axis)
    dtype = compute_dtype(x)
    if op == "quantile" and isinstance(q, jax.Array) and q.ndim > 1:
        raise TypeError(f"q must be a scalar or 1-D, got shape {q.shape}")
    if op != "quantile" and x.shape[axis] == 0:  # nothing to scale (no row has a spread)
        return (soft_sort(x, axis=axis, regularization_strength=1.0, descending=options[0])
                if op == "sort" else _unit_op(op, x, axis, options))
    key = _softness.law_key(op, options[0] if op == "rank" else "l2")
    dims = tuple(range(x.ndim))
    operands, operand_dims, results = (x, jnp.asarray(softness, dtype)), (dims, ()), dims
    if op == "quantile":
        if isinstance(q, jax.Array):
            operands, operand_dims = operands + (q,), operand_dims + ((None,) * q.ndim,)
            vector = q.ndim == 1
        else:
            options = (check_quantiles(q),)
            vector = not isinstance(options[0], float)
        results = ((None,) if vector else ()) + tuple(d for d in dims if d != axis)
    return staged_call(_softness_impl, operands, op, axis, key, options,
                       layout=Layout(axis, operand_dims, results))


def _unit_op(op: str, y, axis, options):
    """Rank or mask at strength 1 on y."""
    if op == "rank":
        return soft_rank(y, axis=axis, regularization_strength=1.0, regularization=options[0],
                         descending=options[1])
    return soft_top_k_mask(y, options[0], axis=axis, regularization_strength=1.0)


def _softness_impl(operands, op, axis, key, options):
    """op(x) at softness: the op at strength 1 on rows y rescaled by the law (`_softness`), in
    the compute dtype, rounded to x's dtype once. Rank and mask: op(y). Sort and quantile, in
    the units of x: sort(x) + m * (soft_sort(y) - sort(y)) / eps_u, the same function as
    m * soft_sort(y) / eps_u, but an unpooled value is the input value itself (the soft sort
    returns y_i there), so the result lies in [min, max] and becomes sort(x) exactly; the
    quantile interpolates that."""
    x, softness, *q = operands
    xc = x.astype(compute_dtype(x))
    u, m1, m2 = _softness.unit_rows(xc, axis)
    if op in ("rank", "mask"):
        return _unit_op(op, _softness.law(u, softness, key, axis)[0], axis, options).astype(
            x.dtype)
    descending = op == "sort" and options[0]

    def hard(v):
        v = jnp.sort(v, axis=axis)
        return jnp.flip(v, axis) if descending else v

    def correction(u, s):  # scale-free: in the units of u
        y, eps_u = _softness.law(u, s, key, axis)
        soft = soft_sort(y, axis=axis, regularization_strength=1.0, descending=descending)
        return (soft - hard(y)) / eps_u
    s_row = jnp.broadcast_to(jnp.asarray(softness, xc.dtype), m1.shape)
    ordered = hard(xc) + _softness.homogeneous(correction, xc, m1, m2, s_row)
    if op == "sort":
        return ordered.astype(x.dtype)
    levels = jnp.asarray(q[0], xc.dtype) if q else np.asarray(options[0], dtype=np.float64)
    return _interpolate(jnp.moveaxis(ordered, axis, -1), levels, x.dtype)


def _append_doc(fn, *drop: str) -> None:
    doc = _SOFT_DOC
    for line in drop:
        doc = "\n".join(row for row in doc.split("\n") if not row.strip().startswith(line))
    fn.__doc__ += doc


_append_doc(soft_rank)
_append_doc(soft_sort)
_append_doc(soft_top_k_mask, "regularization:", "descending:")
_append_doc(soft_quantile, "descending:")
