"""Inverse permutation and permutation scatter: the backward of sort and of top-k."""

from __future__ import annotations

import operator

import numpy as np

from .._common import (as_rows, check_index_array, check_indices_in_range, check_row_length,
                       resolve_backend)
from . import _cpu


def inverse_permutation(perm, *, backend: str | None = None):
    """inv[..., perm[..., i]] = i for each row (last axis) of a permutation.

    Args:
      perm: integer array, each row a permutation of 0..n-1 (leading dims are batch dims).
        Entries outside [0, n) raise ValueError; repeated entries are not detected and give an
        unspecified (but memory-safe) result.
    Returns: int32 array of perm's shape. The input is never modified.
    """
    perm = check_index_array(perm, "perm")
    resolve_backend([perm], backend)
    if perm.ndim == 0:
        raise ValueError("perm must have at least one dimension")
    n = perm.shape[-1]
    check_row_length(n, "perm")
    check_indices_in_range(perm, n, "perm")
    rows = as_rows(perm, np.int32)
    return _cpu.inverse_rows(rows).reshape(perm.shape)


def permutation_scatter(values, perm, n: int, *, backend: str | None = None):
    """out[..., perm[..., i]] = values[..., i], zeros elsewhere: the backward of sort / top-k.

    Args:
      values: array of shape (..., m), any numeric dtype.
      perm: integer array of the same shape, entries in [0, n), distinct within a row (for
        top-k: the indices it returned). Out-of-range entries raise ValueError; repeated
        entries are not detected (one of the values lands, which one is unspecified).
      n: length of the output rows, m <= n.
    Returns: array of shape (..., n) with values' dtype. The inputs are never modified.
    """
    values = np.asarray(values)
    perm = check_index_array(perm, "perm")
    resolve_backend([values, perm], backend)
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an integer, got {type(n).__name__}") from None
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
