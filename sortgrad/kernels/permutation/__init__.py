"""Inverse permutation and permutation scatter: the backward of sort and of top-k."""

from __future__ import annotations

import operator

import numpy as np

from .._common import (as_rows, check_index_array, check_indices_in_range, check_row_length,
                       resolve_backend)
from . import _cpu
from .. import _device


def inverse_permutation(perm, *, backend: str | None = None, stream=None):
    """inv[..., perm[..., i]] = i for each row (last axis) of a permutation.

    Args:
      perm: integer array, each row a permutation of 0..n-1 (leading dims are batch dims).
        Entries outside [0, n) raise ValueError; repeated entries are not detected and give an
        unspecified (but memory-safe) result.
    Returns: int32 array of perm's shape. The input is never modified.

    Device backends ("cupy", "numba"; `stream` selects the stream, None the current one) take a
    C-contiguous int32 device array and do not check entries (that would need a device pass):
    out-of-range entries are skipped, never written.
    """
    backend = resolve_backend([perm], backend)
    if backend != "cpu":
        return _device.inverse_permutation(perm, backend, stream)
    perm = check_index_array(perm, "perm")
    if perm.ndim == 0:
        raise ValueError("perm must have at least one dimension")
    n = perm.shape[-1]
    check_row_length(n, "perm")
    check_indices_in_range(perm, n, "perm")
    rows = as_rows(perm, np.int32)
    return _cpu.inverse_rows(rows).reshape(perm.shape)


def permutation_scatter(values, perm, n: int, *, backend: str | None = None, stream=None):
    """out[..., perm[..., i]] = values[..., i], zeros elsewhere: the backward of sort / top-k.

    Args:
      values: array of shape (..., m), any numeric dtype.
      perm: integer array of the same shape, entries in [0, n), distinct within a row (for
        top-k: the indices it returned). Out-of-range entries raise ValueError; repeated
        entries are not detected (one of the values lands, which one is unspecified).
      n: length of the output rows, m <= n.
    Returns: array of shape (..., n) with values' dtype. The inputs are never modified.

    Device backends ("cupy", "numba"; `stream` selects the stream, None the current one) take
    C-contiguous device arrays, perm int32, values of a dtype in the module's `DTYPES`; perm
    entries are not checked (that would need a device pass): out-of-range ones are skipped.
    """
    backend = resolve_backend([values, perm], backend)
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an integer, got {type(n).__name__}") from None
    if backend != "cpu":
        return _device.permutation_scatter(values, perm, n, backend, stream)
    values = np.asarray(values)
    perm = check_index_array(perm, "perm")
    if values.shape != perm.shape:
        raise ValueError(f"values and perm must have the same shape, got {values.shape} and "
                         f"{perm.shape}")
    if values.ndim == 0:
        raise ValueError("values must have at least one dimension")
    m = values.shape[-1]
    if not m <= n:
        raise ValueError(f"n = {n} is smaller than the row length m = {m} of values")
    check_row_length(n, "n")
    check_indices_in_range(perm, n, "perm")
    out = _cpu.scatter_rows(as_rows(values),
                            as_rows(perm, np.int32), n)
    return out.reshape(values.shape[:-1] + (n,))
