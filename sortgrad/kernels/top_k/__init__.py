"""Partial top-k of each row."""

from __future__ import annotations

import operator

import numpy as np

from .._common import as_rows, as_float_or_int_array, check_row_length, resolve_backend
from . import _cpu
from .. import _device


def check_k(k, n: int) -> int:
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an integer, got {type(k).__name__}") from None
    if not 0 <= k <= n:
        raise ValueError(f"k must satisfy 0 <= k <= n = {n}, got k = {k}")
    return k


def top_k(x, k: int, *, backend: str | None = None, stream=None):
    """The k largest entries of each row (last axis), largest first.

    Args:
      x: array with at least one dimension, float16/bfloat16/float32/float64, integer or bool.
        Leading dims are batch dims.
      k: integer, 0 <= k <= x.shape[-1].
      backend: None (follow the array), "cpu", "cupy" or "numba".
      stream: device backends only: the CuPy stream (backend "cupy") or Numba stream (backend
        "numba") to launch on; None is the current stream. Ignored on the CPU.

    Returns:
      (values, indices), both of shape x.shape[:-1] + (k,): values with x's dtype and exact
      bits, indices int32 with values[..., i] = x[..., indices[..., i]].

    Order: as `jax.lax.top_k` -- IEEE totalOrder on floats (+NaN above +inf, -NaN below -inf,
    +0.0 above -0.0); equal entries are taken lowest index first. A small k is served without
    sorting the row. The input is never modified.
    """
    backend = resolve_backend([x], backend)
    if backend != "cpu":
        return _device.top_k(x, k, backend, stream, check_k)
    x = as_float_or_int_array(x, "x")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension")
    n = x.shape[-1]
    check_row_length(n, "x")
    k = check_k(k, n)
    values, indices = _cpu.top_k_rows(as_rows(x), k)
    out_shape = x.shape[:-1] + (k,)
    return values.reshape(out_shape), indices.reshape(out_shape)
