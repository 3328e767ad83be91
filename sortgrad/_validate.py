"""Argument checks shared by every layer (kernels and bindings); framework-free.

Each rule lives here once, with one message. Checks look at Python values, shapes and dtypes
only (never at device data), so they cost nothing and run before any work is staged.
Errors are ValueError (bad value) or TypeError (bad type) and name the argument.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator

import numpy as np

INT32_MAX = int(np.iinfo(np.int32).max)
REGULARIZATIONS = ("l2", "kl")
# dtype names: what the sorts and top-k take as keys; what the float kernels compute in
KEY_DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
              "float16", "bfloat16", "float32", "float64")
COMPUTE_FLOAT_DTYPES = ("float32", "float64")
_16_BIT_FLOATS = ("float16", "bfloat16")


# --- dtypes (dtype predicates are cached: they run on every kernel call) -------------------------

@functools.lru_cache(maxsize=None)
def dtype_name(dtype) -> str:
    """np.dtype(dtype).name, cached (NumPy builds the name on every access: ~2 us)."""
    return np.dtype(dtype).name


@functools.lru_cache(maxsize=None)
def is_float_dtype(dtype) -> bool:
    """Floating point, bfloat16 included (ml_dtypes' bfloat16 has NumPy kind "V")."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.name == "bfloat16"


@functools.lru_cache(maxsize=None)
def is_key_dtype(dtype) -> bool:
    """A dtype the sorts and top-k take: floating, integer or bool."""
    return is_float_dtype(dtype) or np.dtype(dtype).kind in "iub"


def check_key_dtype(dtype, name: str = "x") -> None:
    if not is_key_dtype(dtype):
        raise TypeError(f"{name} must have a floating, integer or bool dtype, got "
                        f"{np.dtype(dtype)}")


@functools.lru_cache(maxsize=None)
def float_compute_dtype(dtype, name: str = "x", op: str = "soft ops") -> np.dtype:
    """Ops that differentiate their input take floating input; 16-bit floats are computed in
    float32. Returns the compute dtype."""
    dtype = np.dtype(dtype)
    if not is_float_dtype(dtype):
        raise TypeError(f"{name} must be a floating-point array for {op}, got {dtype} "
                        "(cast it, e.g. x.astype(float32))")
    return np.dtype(np.float32) if dtype.name in _16_BIT_FLOATS else dtype


def check_index_dtype(dtype, name: str) -> None:
    if np.dtype(dtype).kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {np.dtype(dtype)}")


# --- shapes and axes ------------------------------------------------------------------------------

def check_ndim(shape, name: str = "x") -> None:
    if len(shape) == 0:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")


def check_row_length(n: int, name: str) -> None:
    if n > INT32_MAX:
        raise ValueError(f"{name}: rows of {n} elements exceed the int32 index range")


def check_rows(shape, name: str = "x") -> int:
    """At least one dim, rows (the last dim) within the int32 index range; returns n."""
    check_ndim(shape, name)
    check_row_length(shape[-1], name)
    return shape[-1]


def check_axis(shape, axis, name: str = "axis") -> int:
    """`axis` of an array of `shape` as a non-negative int (rows along it within int32)."""
    if isinstance(axis, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(axis).__name__}") from None
    ndim = len(shape)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array of {ndim} dims")
    axis %= ndim
    check_row_length(shape[axis], f"x along axis {axis}")
    return axis


def check_same_shape(shapes: dict) -> None:
    """All named shapes equal (e.g. {"values": ..., "perm": ...})."""
    shapes = {name: tuple(shape) for name, shape in shapes.items()}
    first = next(iter(shapes.values()))
    if any(shape != first for shape in shapes.values()):
        listing = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{listing} must have the same shape")


# --- scalars --------------------------------------------------------------------------------------

def check_int(value, name: str) -> int:
    """A static Python integer (bool refused)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a static integer, got {type(value).__name__}") from None


def check_k(k, n: int) -> int:
    k = check_int(k, "k")
    if not 0 <= k <= n:
        raise ValueError(f"k must satisfy 0 <= k <= n = {n}, got k = {k}")
    return k


def check_regularization(regularization) -> str:
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"regularization must be 'l2' or 'kl', got {regularization!r}")
    return regularization


def check_positive_float(value, name: str) -> float:
    """A static real scalar, finite and > 0, as a Python float."""
    if type(value) is float and 0 < value < math.inf:  # the common case, without ABC checks
        return value
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray, np.generic)) \
            or np.ndim(value) != 0:
        raise TypeError(f"{name} must be a static Python float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def check_strength(strength) -> float:
    return check_positive_float(strength, "regularization_strength")


def check_quantiles(q) -> tuple[float, ...] | float:
    """A float in [0, 1], or a 1-D sequence of them (returned as a tuple)."""
    if type(q) is float and 0.0 <= q <= 1.0:  # the common case, without NumPy
        return q
    arr = np.asarray(q)
    if arr.dtype.kind not in "fiu" or arr.ndim > 1:
        raise TypeError("q must be a static float or a 1-D sequence of floats")
    if not np.all((arr >= 0) & (arr <= 1)):
        raise ValueError(f"q must lie in [0, 1], got {q!r}")
    return float(arr) if arr.ndim == 0 else tuple(float(v) for v in arr)


def check_positive_int(value, name: str) -> int:
    """A static Python integer >= 1."""
    value = check_int(value, name)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_bool(value, name: str) -> bool:
    """A static bool (Python or NumPy): "yes", None, 0/1 are rejected, not coerced."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_softness(softness) -> float:
    """A static softness (the scale-free strength of the soft ops): finite and > 0."""
    return check_positive_float(softness, "softness")


def check_one_strength(strength, softness) -> None:
    """At most one of regularization_strength (absolute) and softness (scale-free) is given."""
    if strength is not None and softness is not None:
        raise ValueError("give regularization_strength (absolute, in the units of x) or softness "
                         "(scale-free, relative to each row's spread), not both")


def check_traced_scalar(shape, dtype, name: str) -> None:
    """A strength or softness given as an array (traced under jit) is a float scalar."""
    if len(shape) != 0 or not is_float_dtype(dtype):
        raise TypeError(f"a traced {name} must be a float scalar, got "
                        f"{np.dtype(dtype)}{list(shape)}")
