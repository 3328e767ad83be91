"""CuPy backend of the soft ops (soft rank, soft sort, soft top-k mask) and their VJPs, per row.

Each function is a composition of kernels launched on one stream (the math and the semantics
are those of `_cpu.py`, the reference; every intermediate is float64, outputs of x's dtype;
soft.cu's header describes the kernels, the exact-limit forms and the units):

  forward:  `soft_keys` (total-order keys from the bits, the direction `_cpu.py` sorts in)
            -> segmented sort of the keys (`segmented_sort._cupy.sort_rows` as unsigned
               integers; the sorted keys go to the values output, viewed as unsigned, the
               permutation to the perm output)
            -> `soft_fwd_prep`: the isotonic inputs in float64 (the row's units), the sorted
               signed input, a per-row flag (non-finite; fallback / huge)
            -> `isotonic._cupy.isotonic_rows` (block ids written to the block_ids output; tie
               keys as `_device_plan.tie_keys`)
            -> `soft_extents` (each block's start) -> `soft_mid` -> `isotonic._cupy.
               isotonic_vjp_rows` (the block sums: L2 block means or KL softmaxes)
            -> `soft_finish`: the values, block-relative and clipped (scattered through perm
               for rank and mask), NaN rows (block ids 0)
            -> `soft_fallback` (rank and mask): one thread per row redoes the rows whose
               x / eps leaves the fast path.
  backward: [`soft_extents` (KL rank: s relative to each block)] -> `soft_vjp_prep` (the
            cotangent gathered through perm, KL: the sorted scaled input) ->
            `isotonic._cupy.isotonic_vjp_rows` (L2: block mean; KL: block softmax-weighted
            sum) -> `soft_finish` (scatter through perm, scale, NaN rows).

Scratch (from CuPy's pool on the launch stream, sizes from the shapes only): forward 5 float64
(6 for the KL sort) and 2 integer (rows, n) arrays (the keys, the block starts), one float64
row of n and one int32 per row; backward 3 float64 (rows, n) arrays (4 for KL; one fewer for
float64 input, whose grad_w goes to the dx output it precedes), the block starts for KL rank,
one int32 per row; plus what the sort and isotonic kernels take. Nothing synchronises with
the host.

CuPy is reached only through `.._cuda.cupy_loader` (`xp`, `stream_scope`, `launch`), so the
tests run this module on the host emulator; it imports without CuPy (the compile test reads
CUDA_SOURCES).
"""

from __future__ import annotations

import numpy as np

from .._cuda import cupy_loader as _loader
from . import _device_plan
from ._device_plan import (BLOCK_SUMS_KL, FALLBACK_KIND, PREP_RANK_KL, PREP_SORT_KL,
                           VJP_RANK_KL, tie_keys)

PACKAGE = "sortgrad.kernels.soft"
SOURCE = "soft.cu"
DTYPES = ("float32", "float64")

# Mirrors of soft.cu's constants.
BLOCK = 256
STAGE = 2048  # BLOCK * ITEMS: rows of n <= STAGE are staged in shared memory, STAGE // n a block

_CTYPE = {"float32": "float", "float64": "double"}
_KERNELS = ("soft_keys", "soft_fwd_prep", "soft_vjp_prep", "soft_finish", "soft_fallback")
_UNTEMPLATED = ("soft_extents", "soft_mid")
_KEY_DTYPE = {"float32": np.uint32, "float64": np.uint64}
MAX_FLAT_GRID = 1 << 16  # blocks of the grid-stride kernels


def _expression(kernel: str, dtype: str | None) -> str:
    if dtype is None:
        return f"sg_soft::{kernel}"
    return f"sg_soft::{kernel}<{_CTYPE[dtype]}>"


CUDA_SOURCES = {SOURCE: tuple(_expression(k, d) for k in _KERNELS for d in DTYPES)
                + tuple(_expression(k, None) for k in _UNTEMPLATED)}


def _launch(kernel: str, dtype: str | None, grid: int, args) -> None:
    _loader.launch(PACKAGE, SOURCE, _expression(kernel, dtype), grid, BLOCK, args)


def _flat_grid(total: int) -> int:
    return max(1, min(MAX_FLAT_GRID, -(-total // BLOCK)))


def _geometry(rows: int, n: int):
    """(grid, rows per block) of the soft.cu kernels for rows of n >= 1 entries."""
    if rows > np.iinfo(np.int32).max or n > np.iinfo(np.int32).max:
        raise ValueError("the soft kernels take fewer than 2**31 rows and entries per row")
    rpb = STAGE // n if n <= STAGE else 1
    return -(-rows // rpb), rpb


def _sort():
    from ..segmented_sort import _cupy as sort_cupy
    return sort_cupy


def _isotonic():
    from ..isotonic import _cupy as iso_cupy
    return iso_cupy


def _dtype_name(x) -> str:
    name = np.dtype(x.dtype).name
    if name not in DTYPES:
        raise TypeError(f"the soft kernels take {', '.join(DTYPES)}, got {name}")
    return name


# --- forward ----------------------------------------------------------------------------------

def _forward(x, out, stream, descending_sort: bool, prep_mode: int, fin_mode: int,
             regularization: str, sign: float, eps: float, k: int = 0):
    """keys -> sort -> prep -> isotonic -> block sums -> finish [-> fallback]; returns
    (values, perm, block_ids)."""
    xp = _loader.xp()
    rows, n = (int(d) for d in x.shape)
    dtype = _dtype_name(x)
    eps = float(eps)
    inv_eps = 1.0 / eps
    scale = sign / eps  # rank / mask: s = scale * x_sorted
    with _loader.stream_scope(stream, like=x):
        if out is None:
            out = (xp.empty((rows, n), dtype=x.dtype), xp.empty((rows, n), dtype=np.int32),
                   xp.empty((rows, n), dtype=np.int32))
        values, perm, block_ids = out
        if rows == 0 or n == 0:
            return values, perm, block_ids
        grid, rpb = _geometry(rows, n)
        flat = _flat_grid(rows * n)
        keys = xp.empty((rows, n), dtype=_KEY_DTYPE[dtype])
        _launch("soft_keys", dtype, flat,
                (x, keys, np.int64(rows * n), np.int32(bool(descending_sort))))
        # the sorted keys are only read by prep: the values output holds them meanwhile
        sorted_keys = _loader.bits(values)
        _sort().sort_rows(keys, False, out=(sorted_keys, perm), stream=stream)
        a = xp.empty((rows, n), dtype=np.float64)
        b = xp.empty((rows, n), dtype=np.float64)
        wrow = xp.empty((1, n), dtype=np.float64)
        flag = xp.empty((rows,), dtype=np.int32)
        _launch("soft_fwd_prep", dtype, grid,
                (sorted_keys, np.int32(bool(descending_sort)), a, b, wrow, flag, np.int32(rows),
                 np.int32(n), np.int32(rpb), np.int32(prep_mode), np.float64(sign),
                 np.float64(scale), np.float64(eps), np.float64(inv_eps), np.int32(k)))
        sol = xp.empty((rows, n), dtype=np.float64)
        w = b if prep_mode == PREP_SORT_KL else wrow
        _isotonic().isotonic_rows(a, w, regularization, out=(sol, block_ids), stream=stream,
                                  keys=tie_keys(prep_mode, a, b))
        # the block sums of the exact-limit forms (soft.cu); sol is free again
        start_of = xp.empty((rows, n), dtype=np.int32)
        _launch("soft_extents", None, flat, (block_ids, start_of, np.int32(rows), np.int32(n)))
        g = xp.empty((rows, n), dtype=np.float64)
        sort_kl = prep_mode == PREP_SORT_KL
        # KL sort: the softmax sums' s- and w-arguments, relative to each block (a is free)
        s2 = xp.empty((rows, n), dtype=np.float64) if sort_kl else g
        w2 = a if sort_kl else g
        _launch("soft_mid", None, flat,
                (a, b, block_ids, start_of, flag, g, s2, w2, np.int32(rows), np.int32(n),
                 np.int32(prep_mode), np.float64(eps), np.float64(inv_eps)))
        t = xp.empty((rows, n), dtype=np.float64)
        kl_sums = prep_mode in BLOCK_SUMS_KL
        s_arg, w_arg = (s2, w2) if sort_kl else (a, a) if prep_mode == PREP_RANK_KL else (b, b)
        _isotonic().isotonic_vjp_rows(g, s_arg, w_arg, block_ids, "kl" if kl_sums else "l2",
                                      out=(t, sol), stream=stream)
        _launch("soft_finish", dtype, grid,
                (sol if sort_kl else a, b, t, perm, flag, start_of, values, block_ids,
                 np.int32(1), np.int32(rows),
                 np.int32(n), np.int32(rpb), np.int32(fin_mode), np.float64(sign),
                 np.float64(eps), np.float64(inv_eps), np.int32(k)))
        if prep_mode in FALLBACK_KIND:
            _launch("soft_fallback", dtype, -(-rows // BLOCK),
                    (b, a, sol, t, perm, flag, values, block_ids, np.int32(rows), np.int32(n),
                     np.int32(FALLBACK_KIND[prep_mode]), np.int32(k), np.float64(eps)))
    return values, perm, block_ids


# --- backward ---------------------------------------------------------------------------------

def _backward(g, x, ranks, perm, block_ids, out, stream, vjp_mode: int, fin_mode: int,
              regularization: str, scale: float):
    """prep -> isotonic VJP -> finish; returns dx."""
    xp = _loader.xp()
    rows, n = (int(d) for d in x.shape)
    dtype = _dtype_name(x)
    with _loader.stream_scope(stream, like=x):
        dx = xp.empty((rows, n), dtype=x.dtype) if out is None else out
        if rows == 0 or n == 0:
            return dx
        grid, rpb = _geometry(rows, n)
        kl = regularization == "kl"
        a = xp.empty((rows, n), dtype=np.float64)
        s = xp.empty((rows, n), dtype=np.float64) if kl else a
        flag = xp.empty((rows,), dtype=np.int32)
        start_of = block_ids  # read for VJP_RANK_KL only
        if vjp_mode == VJP_RANK_KL:
            start_of = xp.empty((rows, n), dtype=np.int32)
            _launch("soft_extents", None, _flat_grid(rows * n),
                    (block_ids, start_of, np.int32(rows), np.int32(n)))
        _launch("soft_vjp_prep", dtype, grid,
                (g, x, x if ranks is None else ranks, perm, block_ids, start_of, a, s, flag,
                 np.int32(rows), np.int32(n), np.int32(rpb), np.int32(vjp_mode),
                 np.float64(scale)))
        grad_s = xp.empty((rows, n), dtype=np.float64)
        # grad_w is not used; for float64 the dx output (written last) holds it
        grad_w = dx if dtype == "float64" else xp.empty((rows, n), dtype=np.float64)
        _isotonic().isotonic_vjp_rows(a, s, s, block_ids, regularization, out=(grad_s, grad_w),
                                      stream=stream)
        _launch("soft_finish", dtype, grid,
                (a, a, grad_s, perm, flag, block_ids, dx, block_ids, np.int32(0),
                 np.int32(rows), np.int32(n), np.int32(rpb), np.int32(fin_mode),
                 np.float64(scale), np.float64(1.0), np.float64(1.0), np.int32(0)))
    return dx


(soft_rank_rows, soft_sort_rows, soft_top_k_mask_rows, soft_rank_vjp_rows, soft_sort_vjp_rows,
 soft_top_k_mask_vjp_rows) = _device_plan.row_functions(_forward, _backward)
