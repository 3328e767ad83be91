"""Partial top-k of each row."""

from __future__ import annotations

import numpy as np

from ..._validate import check_k, check_key_dtype, check_rows
from .._backends import (as_backend_array, call_rows, check_data_dtype,
                         output_rows, resolve_backend, rows_of, shape_of, shaped)

__all__ = ["top_k"]


def top_k(x, k: int, *, out=None, backend: str | None = None, stream=None):
    """The k largest entries of each row (last axis), largest first.

    Args:
      x: array with at least one dimension, float16/bfloat16/float32/float64, integer or bool.
        Leading dims are batch dims.
      k: integer, 0 <= k <= x.shape[-1].
      out: optional (values, indices) arrays to write, shape x.shape[:-1] + (k,), x's dtype
        and int32, C-contiguous, of the backend's array kind; returned as given.
      backend: None (follow the array), "cpu", "cupy" or "numba".
      stream: device backends only: the CuPy stream (backend "cupy") or Numba stream (backend
        "numba") to launch on; None is the current stream. Ignored on the CPU.

    Returns:
      (values, indices), both of shape x.shape[:-1] + (k,): values with x's dtype and exact
      bits, indices int32 with values[..., i] = x[..., indices[..., i]] -- except bfloat16 NaNs,
      which come back as the quiet NaN of their sign (0x7FC0 | sign) from rows of more than one
      element, as `jax.lax.top_k` on XLA:CPU writes them.

    Order: as `jax.lax.top_k` on XLA:CPU -- IEEE totalOrder on floats (+NaN above +inf, -NaN
    below -inf, +0.0 above -0.0, the NaNs of one sign ordered by their payload bits), except
    bfloat16, which XLA compares through float32 and so ties all NaNs of one sign; equal
    entries are taken lowest index first. A small k is served without sorting the row. The
    input is never modified.
    """
    backend = resolve_backend([x], backend)
    x = as_backend_array(x, "x", backend)
    check_key_dtype(x.dtype, "x")
    check_data_dtype(x, "x", backend, "top_k")
    n = check_rows(shape_of(x), "x")
    k = check_k(k, n)
    out_shape = shape_of(x)[:-1] + (k,)
    outs = output_rows(out, [("values", out_shape, x.dtype), ("indices", out_shape, np.int32)],
                       backend)
    results = call_rows("top_k", "top_k_rows", backend, stream, rows_of(x, backend), k, out=outs)
    return shaped(results, [out_shape, out_shape], out)
