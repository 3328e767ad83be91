"""Isotonic regression (decreasing, pool adjacent violators) and its VJP, per row."""

from __future__ import annotations

import numpy as np

from ..._validate import (check_index_dtype, check_regularization, check_rows, check_same_shape,
                          float_compute_dtype)
from .._backends import (as_backend_array, call_rows, check_data_dtype,
                         output_rows, resolve_backend, rows_of, shape_of, shaped)

__all__ = ["isotonic_regression", "isotonic_regression_vjp"]


def _float_rows(arrays: dict, backend: str):
    """The named float arrays as rows of one compute dtype: on the CPU the widest of float32
    and their dtypes (16-bit input is computed in float32); device arrays must already share a
    dtype the module takes. Returns (dtype, {name: rows})."""
    for name, a in arrays.items():
        float_compute_dtype(a.dtype, name, "isotonic regression")
    if backend == "cpu":
        dtype = np.result_type(np.float32, *[float_compute_dtype(a.dtype) for a in arrays.values()])
    else:
        first = next(iter(arrays))
        dtype = np.dtype(arrays[first].dtype)
        for name, a in arrays.items():
            check_data_dtype(a, name, backend, "isotonic")
            if np.dtype(a.dtype) != dtype:
                raise TypeError(f"{name} must have the dtype of {first} ({dtype}) on "
                                f"backend={backend!r}, got {a.dtype}")
    return dtype, {name: rows_of(a, backend, dtype) for name, a in arrays.items()}


def _w_rows(w, s_shape, w_rows):
    """w is per row (s's shape) or one row shared by all (shape (n,)): (rows or 1, n)."""
    if shape_of(w) == tuple(s_shape):
        return w_rows
    if shape_of(w) == tuple(s_shape[-1:]):
        return w_rows.reshape(1, s_shape[-1])
    raise ValueError(f"w must have the shape of s {tuple(s_shape)} or of one row "
                     f"{tuple(s_shape[-1:])}, got {shape_of(w)}")


def isotonic_regression(s, w, *, regularization: str = "l2", out=None,
                        backend: str | None = None, stream=None):
    """Decreasing isotonic regression of each row (last axis), by pool adjacent violators.

    Solves, per row, for v with v_1 >= v_2 >= ... >= v_n:
      "l2": minimise 1/2 ||v - (s - w)||^2; a block B of pooled entries takes mean(s_B - w_B).
      "kl": minimise <exp(s - v), 1> + <exp(w), v>; a block takes logsumexp(s_B) - logsumexp(w_B).

    Args:
      s: float array (..., n). float16/bfloat16 are computed in float32.
      w: float array of s's shape, or of shape (n,) shared by every row.
      regularization: "l2" or "kl".
      out: optional (solution, block_ids) arrays to write (s's shape; the solution's dtype
        below and int32), returned as given.

    Returns:
      (solution, block_ids): solution in s's float dtype (float32 for 16-bit input), block_ids
      int32 numbering the pooled runs of each row 0, 1, ... from the left. Sums are accumulated
      in float64. Ties and kinks: neighbouring blocks pool on a violation and on exact equality
      of their values (KL: of the compared sums), so the blocks are the maximal runs of equal
      solution values. At a kink (where the block structure changes, e.g. integer data) the
      VJP is then that of the pooled side, nonzero wherever either one-sided derivative is
      (DESIGN.md "Kinks"). A NaN in a row makes that row's solution unspecified (it never
      affects other rows). The inputs are never modified.

    Device backends ("cupy", "numba"; `stream` selects the stream, None the current one) take
    C-contiguous float32/float64 device arrays (cast 16-bit input first), w of s's dtype.
    """
    check_regularization(regularization)
    backend = resolve_backend([s, w], backend)
    s, w = as_backend_array(s, "s", backend), as_backend_array(w, "w", backend)
    shape = shape_of(s)
    check_rows(shape, "s")
    dtype, rows = _float_rows({"s": s, "w": w}, backend)
    w_rows = _w_rows(w, shape, rows["w"])
    outs = output_rows(out, [("solution", shape, dtype), ("block_ids", shape, np.int32)], backend)
    results = call_rows("isotonic", "isotonic_rows", backend, stream, rows["s"], w_rows,
                        regularization, out=outs)
    return shaped(results, [shape, shape], out)


def isotonic_regression_vjp(cotangent, s, w, block_ids, *, regularization: str = "l2",
                            out=None, backend: str | None = None, stream=None):
    """VJP of `isotonic_regression` at (s, w) with the block ids it returned.

    Within each block B: "l2": grad_s = mean_B(g), grad_w = -mean_B(g); "kl":
    grad_s = softmax(s_B) * sum_B(g), grad_w = -softmax(w_B) * sum_B(g) (max-shifted).

    Args:
      cotangent: float array (..., n), the cotangent of the solution.
      s, w: the forward inputs (w may be one shared row); only read for "kl".
      block_ids: int32 block ids from the forward pass, shape of cotangent.
      out: optional (grad_s, grad_w) arrays to write, returned as given.
    Returns: (grad_s, grad_w), both of the cotangent's shape and float dtype (float32 for
      16-bit input); grad_w is per row even when w was shared.
    """
    check_regularization(regularization)
    backend = resolve_backend([cotangent, s, w, block_ids], backend)
    g = as_backend_array(cotangent, "cotangent", backend)
    s, w = as_backend_array(s, "s", backend), as_backend_array(w, "w", backend)
    blocks = as_backend_array(block_ids, "block_ids", backend)
    shape = shape_of(s)
    check_rows(shape, "s")
    check_index_dtype(blocks.dtype, "block_ids")
    if backend != "cpu" and np.dtype(blocks.dtype) != np.int32:
        raise TypeError(f"block_ids must be int32 on backend={backend!r}, got dtype "
                        f"{blocks.dtype}")
    check_same_shape({"cotangent": shape_of(g), "s": shape, "block_ids": shape_of(blocks)})
    dtype, rows = _float_rows({"cotangent": g, "s": s, "w": w}, backend)
    w_rows = _w_rows(w, shape, rows["w"])
    outs = output_rows(out, [("grad_s", shape, dtype), ("grad_w", shape, dtype)], backend)
    results = call_rows("isotonic", "isotonic_vjp_rows", backend, stream, rows["cotangent"],
                        rows["s"], w_rows, rows_of(blocks, backend, np.int32), regularization,
                        out=outs)
    return shaped(results, [shape, shape], out)
