"""sort, argsort and top_k as JAX ops with exact gradients (inverse-permutation scatter)."""

from __future__ import annotations

from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np

from ... import kernels
from ..._validate import check_k, check_key_dtype, is_float_dtype
from ._args import array_and_axis
from ._call import device_dependent, kernel_call, staged_call

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


# --- differentiable cores on the last axis ---------------------------------------------------

def _keyed(call, x, *static):
    """call(x, *static) -> (values, indices). bfloat16 off the CPU: the device kernels have no
    bfloat16 arrays (CuPy has no such dtype), so they order the exact float32 upcast (the same
    order, ties, NaN and -0.0 placement: bfloat16 is the top half of a float32) and the values
    are gathered from x with their bits."""
    if x.dtype != jnp.bfloat16:
        return call(x, *static)

    def upcast(x):
        _, indices = call(x.astype(jnp.float32), *static)
        return jnp.take_along_axis(x, indices, axis=-1), indices
    return device_dependent(lambda x: tuple(call(x, *static)), upcast, x)


def _sort_call(x, descending):
    return _keyed(_sort_call_of, x, descending)


def _sort_call_of(x, descending):
    return kernel_call(_sort_kernel(descending),
                       [_spec(x.shape, x.dtype), _spec(x.shape, np.int32)], x)


def _sort_values_call(x, descending):
    """The sorted values only (the primal without a gradient; the perm output is dropped)."""
    return _sort_call(x, descending)[0]


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sort_last(x, descending):
    return _sort_values_call(x, descending)


def _sort_last_fwd(x, descending):
    values, perm = _sort_call(x, descending)
    return values, perm


def _sort_last_bwd(descending, perm, g):
    return (_scatter(g, perm, g.shape[-1]),)


_sort_last.defvjp(_sort_last_fwd, _sort_last_bwd)


def _top_k_call(x, k):
    return _keyed(_top_k_call_of, x, k)


def _top_k_call_of(x, k):
    shape = x.shape[:-1] + (k,)
    return kernel_call(_top_k_kernel(k), [_spec(shape, x.dtype), _spec(shape, np.int32)], x)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _top_k_last(x, k, n):
    return tuple(_top_k_call(x, k))


def _top_k_last_fwd(x, k, n):
    values, indices = _top_k_call(x, k)
    return (values, indices), indices


def _top_k_last_bwd(k, n, indices, cotangents):
    return (_scatter(cotangents[0], indices, n),)


_top_k_last.defvjp(_top_k_last_fwd, _top_k_last_bwd)


# --- public ops -------------------------------------------------------------------------------

def _prepare(x, axis):
    x, axis = array_and_axis(x, axis)
    check_key_dtype(x.dtype)
    return x, axis


def sort(x, *, axis: int = -1, descending: bool = False):
    """Sorts `x` along `axis`; the values, tie order and NaN placement of `jnp.sort`.

    Args:
      x: array (any leading dims), float16/bfloat16/float32/float64, integer or bool.
      axis: the axis to sort (static).
      descending: largest first (static). As `jnp.sort`, this is the ascending sort reversed.

    Returns: the sorted array, x's shape and dtype, values with their exact bits. -0.0, +0.0
      and subnormals compare equal (stable; float16 subnormals excepted, as in XLA); NaNs are
      last ascending, first descending.

    Gradient (floating x): exact -- the cotangent of output i goes to the position its value
    came from (the same as JAX's own gradient of jnp.sort). Integer x has no gradient.
    Works under jit, grad, vmap, jacrev.
    """
    x, axis = _prepare(x, axis)
    return staged_call(_sort_impl, x, axis, bool(descending))


def _sort_impl(x, axis, descending):
    if x.size == 0:
        return x
    xl = jnp.moveaxis(x, axis, -1)
    if is_float_dtype(x.dtype):
        out = _sort_last(xl, descending)
    else:
        out = _sort_values_call(jax.lax.stop_gradient(xl), descending)
    return jnp.moveaxis(out, -1, axis)


def argsort(x, *, axis: int = -1, descending: bool = False):
    """Indices that sort `x` along `axis`, int32; as `jnp.argsort(x, stable=True, ...)`.

    Stable in both directions (equal keys keep their original order, also when descending);
    -0.0 == +0.0 == subnormals (not float16's); NaNs last ascending, first descending.
    Integer output: no gradient.
    """
    x, axis = _prepare(x, axis)
    return staged_call(_argsort_impl, x, axis, bool(descending))


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
    """The k largest entries along `axis`, largest first: `(values, indices)`.

    Same results as `jax.lax.top_k` (ties to the lower index; IEEE totalOrder on floats, so
    +NaN is largest, -NaN smallest, +0.0 above -0.0). `0 <= k <= n` (static), else ValueError.
    `axis` of the outputs has length k; indices are int32.
    Gradient of `values` (floating x): exact, scattered back to `indices`; indices have none.
    """
    x, axis = _prepare(x, axis)
    k = check_k(k, x.shape[axis])
    return staged_call(_top_k_impl, x, k, axis)


def _top_k_impl(x, k, axis):
    xl = jnp.moveaxis(x, axis, -1)
    if k == 0 or x.size == 0:
        shape = xl.shape[:-1] + (k,)
        values, indices = jnp.zeros(shape, x.dtype), jnp.zeros(shape, jnp.int32)
    elif is_float_dtype(x.dtype):
        values, indices = _top_k_last(xl, k, xl.shape[-1])
    else:
        values, indices = _top_k_call(jax.lax.stop_gradient(xl), k)
    return jnp.moveaxis(values, -1, axis), jnp.moveaxis(indices, -1, axis)
