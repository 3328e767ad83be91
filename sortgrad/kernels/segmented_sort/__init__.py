"""Segmented sort: stable sort of the rows of an array or of ragged segments of a 1-D array."""

from __future__ import annotations

import numpy as np

from .._common import (as_rows, as_float_or_int_array, check_index_array, check_row_length,
                       resolve_backend)
from . import _cpu
from .. import _device


def _check_offsets(offsets, size: int) -> np.ndarray:
    """Validated CSR offsets as int64."""
    offsets = check_index_array(offsets, "offsets")
    if offsets.ndim != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must be a non-empty 1-D array, got shape {offsets.shape}")
    if offsets[0] != 0:
        raise ValueError(f"offsets must start at 0, got {offsets[0]}")
    if offsets.max() > size:
        raise ValueError(f"offsets overrun the array: an offset {offsets.max()} > size {size}")
    offsets = offsets.astype(np.int64)
    if np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must be non-decreasing")
    return offsets


def segmented_sort(keys, offsets=None, *, descending: bool = False, backend: str | None = None,
                   stream=None):
    """Stable sort of rows (or ragged segments), returning values and the permutation.

    Args:
      keys: float16/bfloat16/float32/float64, signed/unsigned integer or bool array. Without
        `offsets` every row along the last axis is sorted (leading dims are batch dims; a 1-D
        array is one row). With `offsets` it must be 1-D.
      offsets: optional CSR offsets, 1-D integer, starting at 0, non-decreasing, last entry at
        most `keys.size`; segment s is keys[offsets[s]:offsets[s+1]]. Elements past the last
        offset are copied through unsorted with perm 0.
      descending: largest first.
      backend: None (follow the array), "cpu", "cupy" or "numba".
      stream: device backends only: the CuPy stream (backend "cupy") or Numba stream (backend
        "numba") to launch on; None is the current stream. Ignored on the CPU.

    Returns:
      (values, perm): values has the dtype and shape of `keys`; perm is int32, the column (or
      position within the segment) each value came from: values[..., i] = keys[..., perm[..., i]].

    Order: that of `jnp.sort` on XLA:CPU -- -0.0, +0.0 and subnormal numbers compare equal
    (XLA compares with denormals-are-zero; float16 subnormals are kept, as XLA widens float16
    to float32), NaNs (any sign) compare equal to each other and above +inf (last when
    ascending, first when descending). Stable in both
    directions: equal keys keep their original order. Values keep their exact bits.
    Rows longer than 2**31 - 1 are rejected. The input is never modified.

    Device backends take C-contiguous device arrays of the dtypes their module lists in
    `DTYPES`; `offsets` may be a host or device array and are read on the host (a device
    array of offsets is copied, which synchronises).
    """
    backend = resolve_backend([keys, offsets], backend)
    if backend != "cpu":
        return _device.segmented_sort(keys, offsets, descending, backend, stream, _check_offsets)
    keys = as_float_or_int_array(keys, "keys")
    if offsets is None:
        if keys.ndim == 0:
            raise ValueError("keys must have at least one dimension")
        n = keys.shape[-1]
        check_row_length(n, "keys")
        values, perm = _cpu.sort_rows(as_rows(keys), bool(descending))
        return values.reshape(keys.shape), perm.reshape(keys.shape)
    if keys.ndim != 1:
        raise ValueError(f"keys must be 1-D when offsets are given, got shape {keys.shape}")
    offsets = _check_offsets(offsets, keys.shape[0])
    check_row_length(int(np.max(np.diff(offsets), initial=0)), "segments")
    end = int(offsets[-1])
    values = keys.copy()
    perm = np.zeros(keys.shape[0], dtype=np.int32)
    values[:end], perm[:end] = _cpu.sort_segments(keys[:end], offsets, bool(descending))
    return values, perm
