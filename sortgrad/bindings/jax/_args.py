"""The JAX side of argument checking: arrays become `jax.Array`s, then the framework-free
rules of `sortgrad._validate` apply (each rule lives there once)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..._validate import check_axis, check_ndim, float_compute_dtype


def as_jax_array(x, name: str = "x"):
    """`x` as a JAX array with at least one dimension (a JAX array, tracers included, as is:
    jnp.asarray costs ~10 us per eager call even when it has nothing to do)."""
    if not isinstance(x, jax.Array):
        x = jnp.asarray(x)
    check_ndim(x.shape, name)
    return x


def array_and_axis(x, axis, name: str = "x"):
    """(jax array, non-negative axis), checked."""
    x = as_jax_array(x, name)
    return x, check_axis(x.shape, axis)


def compute_dtype(x, name: str = "x", op: str = "soft ops"):
    """The float dtype ops that differentiate x compute in (16-bit floats: float32)."""
    return jnp.dtype(float_compute_dtype(x.dtype, name, op))


def soft_input(x, axis, name: str = "x"):
    """(x, axis) for the soft ops: axis=None flattens x (axis 0 of the result); integer and
    bool x are promoted to float as `jnp.quantile` promotes them (float32, float64 for 64-bit
    integers under x64)."""
    if axis is None:
        x, axis = jnp.ravel(as_jax_array(x, name)), 0
    x, axis = array_and_axis(x, axis, name)
    if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
        wide = x.dtype.itemsize == 8
        x = x.astype(jax.dtypes.canonicalize_dtype(np.float64 if wide else np.float32))
    return x, axis
