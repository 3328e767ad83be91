"""Soft rank, soft sort and the soft top-k mask (Blondel et al. 2020) on rows, with VJPs.

Each forward is a composition: a sort of every row, an isotonic regression (PAV) of the sorted
row against rho = (n, ..., 1) (or the k-hot vector of the mask), and a scatter back through the
sorting permutation. On the CPU the three steps are one fused Numba pass per row (`_cpu.py`);
device backends compose the sort, isotonic and permutation kernels with small fused
elementwise kernels (`_cupy.py`, `_numba_cuda.py`).

Contract shared by every function here:
- x: float array (..., n) (float32/float64; on the CPU 16-bit floats are computed in float32);
  leading dims are batch dims; each row is independent.
- eps = regularization_strength: finite, > 0. regularization: "l2" or "kl" (the mask is L2).
- Outputs of the forwards: (values, perm, block_ids): values of x's compute dtype and shape;
  perm (int32) the permutation that sorts each row (descending for the isotonic problem) and
  block_ids (int32) the pooled blocks of the isotonic solution, numbered 0, 1, ... in sorted
  order. perm and block_ids are the residuals the VJPs take; which of several tied entries
  comes first in perm is unspecified (tied entries always get identical values).
- Kinks (DESIGN.md): where the isotonic solution changes its block structure (e.g. integer
  data at eps = 1) the VJPs give the *pooled* side: PAV pools neighbouring blocks of exactly
  equal value. Except: two equal blocks over tied sorted inputs (every input value in both
  tied) stay apart, as no perturbation of x makes them violate (the sort re-orders ties): e.g.
  a mask saturated at 1 or 0 over tied entries has a zero gradient there. The tie test reads
  the sorted inputs the op perturbs: x/eps for the mask, the (signed) sorted x for the soft
  sort; soft rank never needs it (tied inputs always pool there).
- A row holding NaN or +-inf gives NaN in every value and gradient entry of that row only
  (its block_ids are 0).
- Computed in float64 internally on the CPU. `out=` takes the result arrays to write (a tuple
  for the forwards, one array for the VJPs), returned as given; `backend`/`stream` as every
  kernel (the backend follows the array).
"""

from __future__ import annotations

import numpy as np

from ..._validate import (check_bool, check_index_dtype, check_k, check_regularization,
                          check_rows, check_same_shape, check_strength, float_compute_dtype)
from .._backends import (as_backend_array, call_rows, check_data_dtype,
                         output_rows, resolve_backend, rows_of, shape_of, shaped)

__all__ = ["soft_rank", "soft_rank_vjp", "soft_sort", "soft_sort_vjp", "soft_top_k_mask",
           "soft_top_k_mask_vjp"]


def _data(x, name: str, backend: str, dtype=None):
    """(rows, compute dtype) of a float array: on the CPU converted to `dtype` (default: x's
    compute dtype, float32 for 16-bit floats); device arrays must already have a dtype the
    module takes, equal to `dtype` when one is given (nothing is converted on a device)."""
    compute = float_compute_dtype(x.dtype, name, "soft ops")
    if backend == "cpu":
        dtype = compute if dtype is None else dtype
        return rows_of(x, backend, dtype), dtype
    check_data_dtype(x, name, backend, "soft")
    if dtype is not None and np.dtype(x.dtype) != dtype:
        raise TypeError(f"{name} must have the dtype of x ({dtype}) on backend={backend!r}, got "
                        f"{x.dtype}")
    return rows_of(x, backend), np.dtype(x.dtype)


def _forward(function: str, x, static: tuple, out, backend, stream):
    backend = resolve_backend([x], backend)
    x = as_backend_array(x, "x", backend)
    shape = shape_of(x)
    check_rows(shape, "x")
    rows, dtype = _data(x, "x", backend)
    if function == "soft_top_k_mask_rows":
        static = (check_k(static[0], shape[-1]),) + static[1:]
    outs = output_rows(out, [("values", shape, dtype), ("perm", shape, np.int32),
                             ("block_ids", shape, np.int32)], backend)
    results = call_rows("soft", function, backend, stream, rows, *static, out=outs)
    return shaped(results, [shape] * 3, out)


def _vjp(function: str, cotangent, x, residuals: dict, static: tuple, out, backend, stream):
    """residuals: {"ranks": float array} and/or {"perm": ..., "block_ids": ...} in call order."""
    backend = resolve_backend([cotangent, x, *residuals.values()], backend)
    g = as_backend_array(cotangent, "cotangent", backend)
    x = as_backend_array(x, "x", backend)
    shape = shape_of(x)
    check_rows(shape, "x")
    arrays = {name: as_backend_array(a, name, backend) for name, a in residuals.items()}
    check_same_shape({"cotangent": shape_of(g), "x": shape,
                      **{name: shape_of(a) for name, a in arrays.items()}})
    rows, dtype = _data(x, "x", backend)
    g_rows, _ = _data(g, "cotangent", backend, dtype)
    residual_rows = []
    for name, a in arrays.items():
        if name == "ranks":
            residual_rows.append(_data(a, name, backend, dtype)[0])
            continue
        check_index_dtype(a.dtype, name)
        if backend != "cpu" and np.dtype(a.dtype) != np.int32:
            raise TypeError(f"{name} must be int32 on backend={backend!r}, got dtype {a.dtype}")
        residual_rows.append(rows_of(a, backend, np.int32))
    outs = output_rows(out, [("dx", shape, dtype)], backend)
    result = call_rows("soft", function, backend, stream, g_rows, rows, *residual_rows, *static,
                       out=None if outs is None else outs[0])
    return shaped(result, [shape], out)


def soft_rank(x, regularization_strength: float = 1.0, *, regularization: str = "l2",
              descending: bool = False, out=None, backend: str | None = None, stream=None):
    """Soft ranks of each row in [1, n] (rank 1 = smallest; largest when `descending`):
    the projection of x/eps onto the permutahedron of (n, ..., 1). L2: r = s - PAV(s - rho);
    KL: r = exp(s - PAV_KL(s, log rho)), s = x/eps sorted descending.
    Returns (ranks, perm, block_ids) (see the module contract)."""
    eps = check_strength(regularization_strength)
    reg = check_regularization(regularization)
    return _forward("soft_rank_rows", x, (eps, reg, check_bool(descending, "descending")), out, backend, stream)


def soft_rank_vjp(cotangent, x, ranks, perm, block_ids, regularization_strength: float = 1.0, *,
                  regularization: str = "l2", descending: bool = False, out=None,
                  backend: str | None = None, stream=None):
    """VJP of `soft_rank` at x with its outputs: L2 dx[perm] = (g_s - blockmean(g_s)) / eps;
    KL a = r_s * g_s, dx[perm] = (a - softmax(s_B) * blocksum(a)) / eps. Returns dx."""
    eps = check_strength(regularization_strength)
    reg = check_regularization(regularization)
    return _vjp("soft_rank_vjp_rows", cotangent, x,
                {"ranks": ranks, "perm": perm, "block_ids": block_ids},
                (eps, reg, check_bool(descending, "descending")), out, backend, stream)


def soft_sort(x, regularization_strength: float = 1.0, *, regularization: str = "l2",
              descending: bool = False, out=None, backend: str | None = None, stream=None):
    """Soft sorted values of each row, in sorted order (ascending unless `descending`): the
    projection of rho/eps onto the permutahedron of x. Descending: L2 out = rho/eps -
    PAV(rho/eps - s), KL PAV_KL(rho/eps, s); ascending is -soft_sort_desc(-x).
    Returns (values, perm, block_ids) (see the module contract)."""
    eps = check_strength(regularization_strength)
    reg = check_regularization(regularization)
    return _forward("soft_sort_rows", x, (eps, reg, check_bool(descending, "descending")), out, backend, stream)


def soft_sort_vjp(cotangent, x, perm, block_ids, regularization_strength: float = 1.0, *,
                  regularization: str = "l2", descending: bool = False, out=None,
                  backend: str | None = None, stream=None):
    """VJP of `soft_sort`: L2 dx[perm] = blockmean(g); KL dx[perm] = softmax(s_B) *
    blocksum(g), s the sorted (signed) input values. Returns dx."""
    eps = check_strength(regularization_strength)
    reg = check_regularization(regularization)
    return _vjp("soft_sort_vjp_rows", cotangent, x, {"perm": perm, "block_ids": block_ids},
                (eps, reg, check_bool(descending, "descending")), out, backend, stream)


def soft_top_k_mask(x, k: int, regularization_strength: float = 1.0, *, out=None,
                    backend: str | None = None, stream=None):
    """Soft indicator of the k largest entries of each row: the L2 projection of x/eps onto
    the permutahedron of (1, ..., 1, 0, ..., 0) with k ones; values in [0, 1] summing to k.
    0 <= k <= n. Returns (mask, perm, block_ids) (see the module contract)."""
    eps = check_strength(regularization_strength)
    return _forward("soft_top_k_mask_rows", x, (k, eps), out, backend, stream)


def soft_top_k_mask_vjp(cotangent, x, perm, block_ids, regularization_strength: float = 1.0, *,
                        out=None, backend: str | None = None, stream=None):
    """VJP of `soft_top_k_mask`: dx[perm] = (g_s - blockmean(g_s)) / eps. Returns dx."""
    eps = check_strength(regularization_strength)
    return _vjp("soft_top_k_mask_vjp_rows", cotangent, x, {"perm": perm, "block_ids": block_ids},
                (eps,), out, backend, stream)
