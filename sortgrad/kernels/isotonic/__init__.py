"""Isotonic regression (decreasing, pool adjacent violators) and its VJP, per row."""

from __future__ import annotations

import numpy as np

from .._common import as_rows, check_index_array, check_row_length, resolve_backend
from . import _cpu
from .. import _device

REGULARIZATIONS = ("l2", "kl")


def check_regularization(regularization) -> str:
    if regularization not in REGULARIZATIONS:
        raise ValueError(f"regularization must be 'l2' or 'kl', got {regularization!r}")
    return regularization


def _compute_dtype(*arrays) -> np.dtype:
    for a in arrays:
        if not (a.dtype.kind == "f" or a.dtype.name == "bfloat16"):
            raise TypeError(f"isotonic regression takes floating-point arrays, got {a.dtype}")
    return np.result_type(np.float32, *[a.dtype for a in arrays if a.dtype.kind == "f"])


def _rows(a: np.ndarray, dtype, n: int) -> np.ndarray:
    return as_rows(a, dtype)


def _check_w(s: np.ndarray, w: np.ndarray) -> None:
    if s.ndim == 0:
        raise ValueError("s must have at least one dimension")
    if w.shape != s.shape and w.shape != s.shape[-1:]:
        raise ValueError(f"w must have the shape of s {s.shape} or of one row "
                         f"{s.shape[-1:]}, got {w.shape}")


def isotonic_regression(s, w, *, regularization: str = "l2", backend: str | None = None,
                        stream=None):
    """Decreasing isotonic regression of each row (last axis), by pool adjacent violators.

    Solves, per row, for v with v_1 >= v_2 >= ... >= v_n:
      "l2": minimise 1/2 ||v - (s - w)||^2; a block B of pooled entries takes mean(s_B - w_B).
      "kl": minimise <exp(s - v), 1> + <exp(w), v>; a block takes logsumexp(s_B) - logsumexp(w_B).

    Args:
      s: float array (..., n). float16/bfloat16 are computed in float32.
      w: float array of s's shape, or of shape (n,) shared by every row.
      regularization: "l2" or "kl".

    Returns:
      (solution, block_ids): solution in s's float dtype (float32 for 16-bit input), block_ids
      int32 numbering the pooled runs of each row 0, 1, ... from the left. Sums are accumulated
      in float64. Only strict violations are pooled: equal neighbours stay separate blocks (same
      solution; the finest block partition, which sets the VJP at ties). A NaN in a row makes that row's
      solution unspecified (it never affects other rows). The inputs are never modified.

    Device backends ("cupy", "numba"; `stream` selects the stream, None the current one) take
    C-contiguous float32/float64 device arrays (cast 16-bit input first), w of s's dtype.
    """
    check_regularization(regularization)
    backend = resolve_backend([s, w], backend)
    if backend != "cpu":
        return _device.isotonic_regression(s, w, regularization, backend, stream)
    s, w = np.asarray(s), np.asarray(w)
    _check_w(s, w)
    dtype = _compute_dtype(s, w)
    n = s.shape[-1]
    check_row_length(n, "s")
    sol, blocks = _cpu.isotonic_rows(_rows(s, dtype, n), _rows(w, dtype, n), regularization)
    return sol.reshape(s.shape), blocks.reshape(s.shape)


def isotonic_regression_vjp(cotangent, s, w, block_ids, *, regularization: str = "l2",
                            backend: str | None = None, stream=None):
    """VJP of `isotonic_regression` at (s, w) with the block ids it returned.

    Within each block B: "l2": grad_s = mean_B(g), grad_w = -mean_B(g); "kl":
    grad_s = softmax(s_B) * sum_B(g), grad_w = -softmax(w_B) * sum_B(g) (max-shifted).

    Args:
      cotangent: float array (..., n), the cotangent of the solution.
      s, w: the forward inputs (w may be one shared row); only read for "kl".
      block_ids: int32 block ids from the forward pass, shape of cotangent.
    Returns: (grad_s, grad_w), both of the cotangent's shape and float dtype (float32 for
      16-bit input); grad_w is per row even when w was shared.
    """
    check_regularization(regularization)
    backend = resolve_backend([cotangent, s, w, block_ids], backend)
    if backend != "cpu":
        return _device.isotonic_regression_vjp(cotangent, s, w, block_ids, regularization,
                                               backend, stream)
    g, s, w = np.asarray(cotangent), np.asarray(s), np.asarray(w)
    blocks = check_index_array(block_ids, "block_ids")
    _check_w(s, w)
    if g.shape != s.shape or blocks.shape != s.shape:
        raise ValueError(f"cotangent {g.shape}, s {s.shape} and block_ids {blocks.shape} must "
                         "have the same shape")
    dtype = _compute_dtype(g, s, w)
    n = s.shape[-1]
    check_row_length(n, "s")
    grad_s, grad_w = _cpu.isotonic_vjp_rows(_rows(g, dtype, n), _rows(s, dtype, n),
                                            _rows(w, dtype, n),
                                            as_rows(blocks, np.int32),
                                            regularization)
    return grad_s.reshape(s.shape), grad_w.reshape(s.shape)
