"""Segmented sort: stable sort of the rows of an array or of ragged segments of a 1-D array.

Rows can also be sorted `reverse=True` (each sorted row read backwards: `jnp.sort(...,
descending=True)`), on every backend with bit-identical results; the device kernels do it in
the same passes as the forward sort.
"""

from __future__ import annotations

import numpy as np

from ..._validate import (check_index_dtype, check_key_dtype, check_ndim, check_row_length,
                          check_rows)
from .._backends import (as_backend_array, call_rows, check_data_dtype, output_rows,
                         resolve_backend, rows_of, shape_of, shaped, to_host)

__all__ = ["segmented_sort", "segmented_argsort"]


def _check_offsets(offsets, size: int) -> np.ndarray:
    """Validated CSR offsets as int64 on the host (a device array is copied: a sync)."""
    offsets = to_host(offsets)
    check_index_dtype(offsets.dtype, "offsets")
    if offsets.ndim != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must be a non-empty 1-D array, got shape {offsets.shape}")
    if offsets[0] != 0:
        raise ValueError(f"offsets must start at 0, got {offsets[0]}")
    if offsets.max() > size:
        raise ValueError(f"offsets overrun the array: an offset {offsets.max()} > size {size}")
    offsets = offsets.astype(np.int64)
    if np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must be non-decreasing")
    check_row_length(int(np.max(np.diff(offsets), initial=0)), "segments")
    return offsets


def segmented_sort(keys, offsets=None, *, descending: bool = False, reverse: bool = False,
                   out=None, backend: str | None = None, stream=None):
    """Stable sort of rows (or ragged segments), returning values and the permutation.

    Args:
      keys: float16/bfloat16/float32/float64, signed/unsigned integer or bool array. Without
        `offsets` every row along the last axis is sorted (leading dims are batch dims; a 1-D
        array is one row). With `offsets` it must be 1-D.
      offsets: optional CSR offsets, 1-D integer, starting at 0, non-decreasing, last entry at
        most `keys.size`; segment s is keys[offsets[s]:offsets[s+1]]. Elements past the last
        offset are copied through unsorted with perm 0.
      descending: largest first (stable: equal keys keep their order).
      reverse: each sorted row read backwards (rows only, not with `offsets`; every backend,
        bit-identical results): with descending=False this is `jnp.sort(..., descending=True)`
        -- largest first, NaNs first, and equal keys (also -0.0 and +0.0, NaNs of any payload)
        in decreasing original order, unlike `descending=True`, which keeps them in increasing
        order (as `jnp.argsort(..., stable=True, descending=True)`).
      out: optional (values, perm) arrays to write (keys' shape; keys' dtype and int32;
        C-contiguous, of the backend's array kind); returned as given.
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
    directions: equal keys keep their original order (reversed with `reverse=True`). Values
    keep their exact bits (NaN signs and payloads included), except bfloat16 NaNs: as
    `jnp.sort` on XLA:CPU (which sorts bfloat16 through float32) each becomes the quiet NaN of
    its sign, 0x7FC0 | sign, in every row or segment of more than one element.
    Rows longer than 2**31 - 1 are rejected. The input is never modified.

    Device backends take C-contiguous device arrays of the dtypes their module lists in
    `DTYPES`; `offsets` may be a host or device array and are read on the host (a device
    array of offsets is copied, which synchronises).
    """
    backend = resolve_backend([keys, offsets], backend)
    keys = as_backend_array(keys, "keys", backend)
    check_key_dtype(keys.dtype, "keys")
    check_data_dtype(keys, "keys", backend, "segmented_sort")
    check_ndim(shape_of(keys), "keys")
    shape = shape_of(keys)
    specs = [("values", shape, keys.dtype), ("perm", shape, np.int32)]
    outs = output_rows(out, specs, backend)
    if offsets is None:
        check_row_length(shape[-1], "keys")
        extra = {"reverse": True} if reverse else {}  # passed only when set
        results = call_rows("segmented_sort", "sort_rows", backend, stream,
                            rows_of(keys, backend), bool(descending), out=outs, **extra)
        return shaped(results, [shape, shape], out)
    if reverse:
        raise ValueError("reverse=True applies to rows, not to segments given by offsets")
    if len(shape) != 1:
        raise ValueError(f"keys must be 1-D when offsets are given, got shape {shape}")
    offsets = _check_offsets(offsets, shape[0])
    outs = None if outs is None else tuple(o.reshape(shape) for o in outs)
    results = call_rows("segmented_sort", "sort_segments", backend, stream,
                        keys, offsets, bool(descending), out=outs)
    return shaped(results, [shape, shape], out)


def segmented_argsort(keys, *, descending: bool = False, out=None, backend: str | None = None,
                      stream=None):
    """The permutation of `segmented_sort(keys, descending=descending)` alone (rows only), as
    `jnp.argsort(keys, stable=True, descending=descending)`: int32 of keys' shape, written into
    `out` when given. Same order, dtypes and checks as `segmented_sort`; on the CPU no values
    are gathered."""
    backend = resolve_backend([keys], backend)
    keys = as_backend_array(keys, "keys", backend)
    check_key_dtype(keys.dtype, "keys")
    check_data_dtype(keys, "keys", backend, "segmented_sort")
    shape = shape_of(keys)
    check_rows(shape, "keys")
    outs = output_rows(out, [("perm", shape, np.int32)], backend)
    if backend == "cpu":
        result = call_rows("segmented_sort", "argsort_rows", backend, stream,
                           rows_of(keys, backend), bool(descending),
                           out=None if outs is None else outs[0])
        return shaped(result, [shape], out)
    # device modules sort values and perm together; the values are scratch here
    values, perm = segmented_sort(keys, descending=descending, backend=backend, stream=stream)
    if out is None:
        return perm
    out[...] = perm
    return out
