"""sort, argsort and top_k as JAX ops with exact gradients (inverse-permutation scatter)."""

from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from ... import kernels
from ..._validate import check_bool, check_k, check_key_dtype, is_float_dtype
from ._args import array_and_axis, as_jax_array
from ._call import device_dependent, kernel_call, staged_call
from ._sharding import rowwise
from ._linear import LinearOp, apply_linear, integer_tangent

__all__ = ["sort", "argsort", "top_k"]


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


# --- kernel functions (one per callback pass; cached: one object per static arguments) --------

@lru_cache(maxsize=None)
def _sort_kernel(descending: bool):
    """Values and perm of every row; descending is the ascending sort reversed, as
    `jnp.sort(descending=True)`."""
    def run(x, *, out=None, **route):
        return tuple(kernels.segmented_sort(x, reverse=descending, out=out, **route))
    return run


@lru_cache(maxsize=None)
def _argsort_kernel(descending: bool):
    def run(x, *, out=None, **route):
        return (kernels.segmented_argsort(x, descending=descending,
                                          out=None if out is None else out[0], **route),)
    return run


@lru_cache(maxsize=None)
def _top_k_kernel(k: int):
    def run(x, *, out=None, **route):
        return kernels.top_k(x, k, out=out, **route)
    return run


@lru_cache(maxsize=None)
def _scatter_kernel(n: int):
    def run(values, perm, *, out=None, **route):
        return (kernels.permutation_scatter(values, perm, n, out=None if out is None else out[0],
                                            **route),)
    return run


def _scatter(g, perm, n: int):
    (dx,) = kernel_call(_scatter_kernel(n), [_spec(g.shape[:-1] + (n,), g.dtype)], g, perm)
    return dx


def _gather(perm, dx):
    """The tangent of sorted / top-k values: dx at the positions they came from."""
    return (jnp.take_along_axis(dx, perm, axis=-1),)


@lru_cache(maxsize=None)
def _gather_op(n: int) -> LinearOp:
    """dx -> dx[..., perm] (a gather); transpose: the inverse-permutation scatter kernel."""
    return LinearOp(f"gather_{n}", _gather, lambda perm, g: (_scatter(g, perm, n),))


def _gathered_tangent(perm, dx):
    return apply_linear(_gather_op(dx.shape[-1]), (perm,), (dx,))[0]


# --- differentiable cores on the last axis ---------------------------------------------------

def _keyed(call, x, *static):
    """call(x, *static) -> (values, indices). bfloat16 off the CPU: the device kernels have no
    bfloat16 arrays (CuPy has no such dtype), so they order the exact float32 upcast (the same
    order, ties, NaN and -0.0 placement: bfloat16 is the top half of a float32) and the values
    are gathered from x. Its NaNs are first made the canonical NaN of their sign, as XLA:CPU
    (and the CPU kernels) do for bfloat16: the values come back with those bits, and lax.top_k's
    order ties the NaNs of one sign (the float32 totalOrder would order them by payload)."""
    if x.dtype != jnp.bfloat16:
        return call(x, *static)

    def upcast(x):
        x = _canonical_bfloat16_nans(x)
        _, indices = call(x.astype(jnp.float32), *static)
        return jnp.take_along_axis(x, indices, axis=-1), indices
    return device_dependent(lambda x: tuple(call(x, *static)), upcast, x)


def _canonical_bfloat16_nans(x):
    """bfloat16 x with every NaN replaced by the quiet NaN of its sign (0x7FC0 | sign), in rows
    of more than one element (XLA:CPU does not sort one-element rows: they keep their bits)."""
    if x.shape[-1] <= 1:
        return x
    b = jax.lax.bitcast_convert_type(x, jnp.uint16)
    b = jnp.where((b & 0x7FFF) > 0x7F80, (b & 0x8000) | 0x7FC0, b)
    return jax.lax.bitcast_convert_type(b, jnp.bfloat16)


def _sort_call(x, descending):
    return _keyed(_sort_call_of, x, descending)


def _sort_call_of(x, descending):
    return kernel_call(_sort_kernel(descending),
                       [_spec(x.shape, x.dtype), _spec(x.shape, np.int32)], x)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _sort_last(x, descending):
    """(values, perm). Tangent: the gather of dx by perm; its transpose (reverse mode) is the
    scatter kernel. The rule calls `_sort_last` itself for the primal, so every order of
    differentiation runs the one forward callback."""
    return tuple(_sort_call(x, descending))


@_sort_last.defjvp
def _sort_last_jvp(descending, primals, tangents):
    values, perm = _sort_last(primals[0], descending)
    return (values, perm), (_gathered_tangent(perm, tangents[0]), integer_tangent(perm))


def _top_k_call(x, k):
    return _keyed(_top_k_call_of, x, k)


def _top_k_call_of(x, k):
    shape = x.shape[:-1] + (k,)
    return kernel_call(_top_k_kernel(k), [_spec(shape, x.dtype), _spec(shape, np.int32)], x)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _top_k_last(x, k):
    """(values, indices); tangent dx[indices], transposed by the scatter-add kernel."""
    return tuple(_top_k_call(x, k))


@_top_k_last.defjvp
def _top_k_last_jvp(k, primals, tangents):
    values, indices = _top_k_last(primals[0], k)
    return (values, indices), (_gathered_tangent(indices, tangents[0]), integer_tangent(indices))


# --- public ops -------------------------------------------------------------------------------

def _prepare(x, axis):
    """(x, axis) checked; axis=None flattens x (as jnp.sort) and sorts axis 0."""
    if axis is None:
        x = jnp.ravel(as_jax_array(x))
        axis = 0
    x, axis = array_and_axis(x, axis)
    if not jnp.iscomplexobj(x):
        check_key_dtype(x.dtype)
    return x, axis


def _complex(name):
    from . import multisort  # built on argsort: imported when first needed
    return getattr(multisort, name)


def sort(x, *, axis: int | None = -1, descending: bool = False):
    """Sorts `x` along `axis`; the values, tie order and NaN placement of `jnp.sort`.

    Args:
      x: array (any leading dims), float16/bfloat16/float32/float64, integer, bool, or
        complex (sorted lexicographically by real, then imaginary part, as `jnp.sort`).
      axis: the axis to sort (static); None sorts the flattened array (as `jnp.sort`).
      descending: largest first (static). As `jnp.sort`, this is the ascending sort reversed.

    Returns: the sorted array, x's shape and dtype, values with their exact bits (bfloat16
      NaNs excepted: the quiet NaN of their sign, 0x7FC0 | sign, as jnp.sort writes them on
      XLA:CPU). -0.0, +0.0 and subnormals compare equal (stable; float16 subnormals excepted,
      as in XLA); NaNs (any sign or payload) tie, last ascending, first descending.

    Derivatives (floating or complex x): exact -- the cotangent of output i goes to the
    position its value came from, the tangent is gathered from there (as JAX's own rules for
    jnp.sort); second derivatives are zero. Integer x has no gradient.
    Works under jit, vmap, grad, jvp, jacfwd, jacrev, hessian.
    Sharded x (shard_map, explicit mesh axes, eager NamedSharding): each device sorts its own
    rows, nothing gathered; a split `axis` is gathered first (README "Several devices").
    """
    x, axis = _prepare(x, axis)
    if jnp.iscomplexobj(x):
        return _complex("complex_sort")(x, axis=axis, descending=descending)
    return staged_call(_sort_impl, x, axis, check_bool(descending, "descending"),
                       layout=rowwise(x.ndim, axis))


def _sort_impl(x, axis, descending):
    if x.size == 0:
        return x
    xl = jnp.moveaxis(x, axis, -1)
    if is_float_dtype(x.dtype):
        out = _sort_last(xl, descending)[0]
    else:
        out = _sort_call(jax.lax.stop_gradient(xl), descending)[0]
    return jnp.moveaxis(out, -1, axis)


def argsort(x, *, axis: int | None = -1, descending: bool = False, dtype=None):
    """Indices that sort `x` along `axis`; as `jnp.argsort(x, stable=True, ...)`.

    Stable in both directions (equal keys keep their original order, also when descending);
    -0.0 == +0.0 == subnormals (not float16's); NaNs last ascending, first descending.
    Complex keys are ordered as `jnp.argsort` orders them (real part, then imaginary).
    axis=None: indices into the flattened array. dtype: an integer dtype for the indices
    (default int32; int64 needs x64, as in JAX). Integer output: no gradient.
    Sharded x (shard_map, explicit mesh axes, eager NamedSharding): each device sorts its own
    rows, nothing gathered; a split `axis` is gathered first (README "Several devices").
    """
    if dtype is not None and not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"dtype must be an integer dtype, got {dtype!r}")
    x, axis = _prepare(x, axis)
    if jnp.iscomplexobj(x):
        indices = _complex("complex_argsort")(x, axis=axis, descending=descending)
    else:
        indices = staged_call(_argsort_impl, x, axis, check_bool(descending, "descending"),
                              layout=rowwise(x.ndim, axis))
    return indices if dtype is None else indices.astype(dtype)


def _argsort_impl(x, axis, descending):
    if x.size == 0:
        return jnp.zeros(x.shape, jnp.int32)
    xl = jax.lax.stop_gradient(jnp.moveaxis(x, axis, -1))
    return jnp.moveaxis(_argsort_call(xl, descending), -1, axis)


def _argsort_call(x, descending):
    def call(keys):
        return kernel_call(_argsort_kernel(descending), [_spec(keys.shape, np.int32)], keys)[0]
    if x.dtype != jnp.bfloat16:
        return call(x)
    return device_dependent(call, lambda x: call(x.astype(jnp.float32)), x)  # see _keyed


def top_k(x, k: int, *, axis: int = -1):
    """The k largest entries along `axis`, largest first: `[values, indices]`, a list, as
    `jax.lax.top_k` returns.

    Same results as `jax.lax.top_k` on XLA:CPU (ties to the lower index; IEEE totalOrder on
    floats, so +NaN is largest, -NaN smallest, +0.0 above -0.0, NaNs of one sign by payload --
    bfloat16's tie, and come back as the quiet NaN of their sign). `0 <= k <= n` (static),
    else ValueError.
    `axis` of the outputs has length k; indices are int32. Complex x: TypeError (as lax).
    Derivatives of `values` (floating x): exact -- cotangents scattered back to `indices`,
    tangents gathered from them; second derivatives zero; indices have none.
    Sharded x (shard_map, explicit mesh axes, eager NamedSharding): each device sorts its own
    rows, nothing gathered; a split `axis` is gathered first (README "Several devices").
    """
    if axis is None:
        raise TypeError("top_k needs an integer axis (lax.top_k has no axis=None)")
    x, axis = _prepare(x, axis)
    if jnp.iscomplexobj(x):
        raise TypeError(f"top_k takes floating, integer or bool x, got {x.dtype}")
    k = check_k(k, x.shape[axis])
    return staged_call(_top_k_impl, x, k, axis, layout=rowwise(x.ndim, axis))


def _top_k_impl(x, k, axis):
    xl = jnp.moveaxis(x, axis, -1)
    if k == 0 or x.size == 0:
        shape = xl.shape[:-1] + (k,)
        values, indices = jnp.zeros(shape, x.dtype), jnp.zeros(shape, jnp.int32)
    elif is_float_dtype(x.dtype):
        values, indices = _top_k_last(xl, k)
    else:
        values, indices = _top_k_call(jax.lax.stop_gradient(xl), k)
    return [jnp.moveaxis(values, -1, axis), jnp.moveaxis(indices, -1, axis)]
