"""Inverse permutation and permutation scatter: the backward of sort and of top-k."""

from __future__ import annotations

import numpy as np

from ..._validate import (check_index_dtype, check_int, check_ndim, check_row_length,
                          check_rows, check_same_shape)
from .._backends import (as_backend_array, call_rows, check_data_dtype,
                         output_rows, resolve_backend, rows_of, shape_of, shaped)
from .._plans import step

__all__ = ["inverse_permutation", "permutation_scatter"]


def _index_rows(perm, name: str, n: int, backend: str):
    """`perm` as int32 rows. On the CPU entries outside [0, n) raise; device backends take
    int32 only and do not read entries (that would need a device pass): their kernels skip
    out-of-range entries, never writing out of bounds."""
    check_index_dtype(perm.dtype, name)
    if backend != "cpu":
        if np.dtype(perm.dtype) != np.int32:
            raise TypeError(f"{name} must be int32 on backend={backend!r}, got dtype {perm.dtype}")
        return rows_of(perm, backend)
    step(_check_in_range, perm, n, name)  # every call's entries (memory safety)
    return rows_of(perm, backend, np.int32)


def _check_in_range(perm, n: int, name: str) -> None:
    if perm.size and (perm.min() < 0 or perm.max() >= n):
        raise ValueError(f"{name} has entries outside [0, {n})")


def inverse_permutation(perm, *, out=None, backend: str | None = None, stream=None):
    """inv[..., perm[..., i]] = i for each row (last axis) of a permutation.

    Args:
      perm: integer array, each row a permutation of 0..n-1 (leading dims are batch dims).
        Entries outside [0, n) raise ValueError; repeated entries are not detected and give an
        unspecified (but memory-safe) result.
      out: optional int32 array of perm's shape to write (returned as given).
    Returns: int32 array of perm's shape. The input is never modified.

    Device backends ("cupy", "numba"; `stream` selects the stream, None the current one) take a
    C-contiguous int32 device array and do not check entries (that would need a device pass):
    out-of-range entries are skipped, never written.
    """
    backend = resolve_backend([perm], backend)
    perm = as_backend_array(perm, "perm", backend)
    shape = shape_of(perm)
    n = check_rows(shape, "perm")
    rows = _index_rows(perm, "perm", n, backend)
    outs = output_rows(out, [("inverse", shape, np.int32)], backend)
    result = call_rows("permutation", "inverse_rows", backend, stream, rows,
                       out=None if outs is None else outs[0])
    return shaped(result, [shape], out)


def permutation_scatter(values, perm, n: int, *, out=None, backend: str | None = None,
                        stream=None):
    """out[..., perm[..., i]] = values[..., i], zeros elsewhere: the backward of sort / top-k.

    Args:
      values: array of shape (..., m), any numeric dtype (device backends: their `DTYPES`).
      perm: integer array of the same shape, entries in [0, n), distinct within a row (for
        top-k: the indices it returned). Out-of-range entries raise ValueError; repeated
        entries are not detected (one of the values lands, which one is unspecified).
      n: length of the output rows, m <= n.
      out: optional array of shape (..., n) and values' dtype to write (returned as given).
    Returns: array of shape (..., n) with values' dtype. The inputs are never modified.

    Device backends ("cupy", "numba"; `stream` selects the stream, None the current one) take
    C-contiguous device arrays, perm int32, values of a dtype in the module's `DTYPES`; perm
    entries are not checked (that would need a device pass): out-of-range ones are skipped.
    """
    backend = resolve_backend([values, perm], backend)
    n = check_int(n, "n")
    values = as_backend_array(values, "values", backend)
    perm = as_backend_array(perm, "perm", backend)
    check_data_dtype(values, "values", backend, "permutation")
    check_same_shape({"values": shape_of(values), "perm": shape_of(perm)})
    check_ndim(shape_of(values), "values")
    m = shape_of(values)[-1]
    if not m <= n:
        raise ValueError(f"n = {n} is smaller than the row length m = {m} of values")
    check_row_length(n, "n")
    rows = _index_rows(perm, "perm", n, backend)
    out_shape = shape_of(values)[:-1] + (n,)
    outs = output_rows(out, [("out", out_shape, values.dtype)], backend)
    result = call_rows("permutation", "scatter_rows", backend, stream, rows_of(values, backend),
                       rows, n, out=None if outs is None else outs[0])
    return shaped(result, [out_shape], out)
