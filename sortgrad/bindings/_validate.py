"""Argument checks of the JAX ops, run at trace time before any kernel is staged."""

from __future__ import annotations

import math
import numbers
import operator

import jax.numpy as jnp
import numpy as np

from ..kernels._common import INT32_MAX

REGULARIZATIONS = ("l2", "kl")
_16_BIT_FLOATS = (jnp.float16, jnp.bfloat16)


def check_array(x, name: str = "x"):
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    return x


def check_axis(x, axis, name: str = "axis") -> int:
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(axis).__name__}") from None
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{name}={axis} is out of range for an array of {x.ndim} dims")
    n = x.shape[axis]
    if n > INT32_MAX:
        raise ValueError(f"x has {n} elements along axis {axis}: past the int32 index range")
    return axis % x.ndim


def is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def check_key_dtype(x, name: str = "x") -> None:
    if not (is_float(x.dtype) or jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_):
        raise TypeError(f"{name} must have a floating, integer or bool dtype, got {x.dtype}")


def float_compute_dtype(x, name: str = "x", op: str = "soft ops"):
    """Ops that differentiate their input take floating input; 16-bit floats are computed in
    float32."""
    if not is_float(x.dtype):
        raise TypeError(f"{name} must be a floating-point array for {op}, got {x.dtype} "
                        "(cast it, e.g. x.astype(jnp.float32))")
    return jnp.float32 if x.dtype in _16_BIT_FLOATS else x.dtype


def soft_compute_dtype(x, name: str = "x"):
    """Soft ops take floating input; 16-bit floats are computed in float32."""
    return float_compute_dtype(x, name, "soft ops")


def check_regularization(regularization) -> str:
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"regularization must be 'l2' or 'kl', got {regularization!r}")
    return regularization


def check_positive_float(value, name: str) -> float:
    """A static real scalar, finite and > 0, as a Python float."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray, np.generic)) \
            or np.ndim(value) != 0:
        raise TypeError(f"{name} must be a static Python float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_strength(strength) -> float:
    return check_positive_float(strength, "regularization_strength")


def check_k(k, n: int) -> int:
    if isinstance(k, bool):
        raise TypeError("k must be an integer, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be a static integer, got {type(k).__name__}") from None
    if not 0 <= k <= n:
        raise ValueError(f"k must satisfy 0 <= k <= n = {n}, got k = {k}")
    return k


def check_quantiles(q) -> tuple[float, ...] | float:
    """A float in [0, 1], or a 1-D sequence of them (returned as a tuple)."""
    arr = np.asarray(q)
    if arr.dtype.kind not in "fiu" or arr.ndim > 1:
        raise TypeError("q must be a static float or a 1-D sequence of floats")
    if not np.all((arr >= 0) & (arr <= 1)):
        raise ValueError(f"q must lie in [0, 1], got {q!r}")
    return float(arr) if arr.ndim == 0 else tuple(float(v) for v in arr)
