"""CuPy backend of the soft ops (soft rank, soft sort, soft top-k mask) and their VJPs, per row.

Each function is a composition of kernels launched on one stream (the math and the semantics
are those of `_cpu.py`, the reference; every intermediate is float64, outputs of x's dtype):

  forward:  segmented sort (`segmented_sort._cupy.sort_rows`, the direction `_cpu.py` sorts in;
            its values go to the values output, its permutation to the perm output)
            -> `soft_fwd_prep` (soft.cu): the isotonic inputs in float64 and a per-row "all
               finite" flag
            -> `isotonic._cupy.isotonic_rows` (block ids written to the block_ids output; tie
               keys as `_device_plan.tie_keys`: equal tied blocks of the mask / soft sort stay
               apart, every other equality pools)
            -> `soft_finish` (soft.cu): the values (scattered through perm for rank and mask),
               NaN rows (block ids 0).
  backward: `soft_vjp_prep` (the cotangent gathered through perm, KL: the sorted scaled input)
            -> `isotonic._cupy.isotonic_vjp_rows` (L2: block mean; KL: block softmax-weighted
               sum) -> `soft_finish` (scatter through perm, scale, NaN rows).

Scratch (from CuPy's pool on the launch stream): forward 2 float64 (rows, n) arrays (3 for the
soft sort: sign * x_sorted, the tie keys and the KL w-argument), one float64 row of n and one
int32 per row; backward 3 float64 (rows, n) arrays (4 for KL; one fewer for float64 input,
whose grad_w goes to the dx output it precedes) and one int32 per row; plus what the sort and
isotonic kernels take. Nothing synchronises with the host.

KL soft rank runs the isotonic KL kernel on every row (the CPU takes a linear path for rows of
small spread, `LINEAR_KL_SPREAD`): values agree to float64 rounding.

CuPy is reached only through `.._cuda.cupy_loader` (`xp`, `stream_scope`, `launch`), so the
tests run this module on the host emulator; it imports without CuPy (the compile test reads
CUDA_SOURCES).
"""

from __future__ import annotations

import numpy as np

from .._cuda import cupy_loader as _loader
from . import _device_plan
from ._device_plan import PREP_SORT_KL, PREP_WITH_B, tie_keys

PACKAGE = "sortgrad.kernels.soft"
SOURCE = "soft.cu"
DTYPES = ("float32", "float64")

# Mirrors of soft.cu's constants.
BLOCK = 256
STAGE = 2048  # BLOCK * ITEMS: rows of n <= STAGE are staged in shared memory, STAGE // n a block

_CTYPE = {"float32": "float", "float64": "double"}
_KERNELS = ("soft_fwd_prep", "soft_vjp_prep", "soft_finish")


def _expression(kernel: str, dtype: str) -> str:
    return f"sg_soft::{kernel}<{_CTYPE[dtype]}>"


CUDA_SOURCES = {SOURCE: tuple(_expression(k, d) for k in _KERNELS for d in DTYPES)}


def _launch(kernel: str, dtype: str, grid: int, args) -> None:
    _loader.launch(PACKAGE, SOURCE, _expression(kernel, dtype), grid, BLOCK, args)


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
             regularization: str, scale: float, inv_eps: float = 0.0, k: int = 0):
    """sort -> prep -> isotonic -> finish; returns (values, perm, block_ids)."""
    xp = _loader.xp()
    rows, n = (int(d) for d in x.shape)
    dtype = _dtype_name(x)
    with _loader.stream_scope(stream, like=x):
        if out is None:
            out = (xp.empty((rows, n), dtype=x.dtype), xp.empty((rows, n), dtype=np.int32),
                   xp.empty((rows, n), dtype=np.int32))
        values, perm, block_ids = out
        if rows == 0 or n == 0:
            return values, perm, block_ids
        grid, rpb = _geometry(rows, n)
        # the sorted values are only read by prep: the values output holds them meanwhile
        _sort().sort_rows(x, descending_sort, out=(values, perm), stream=stream)
        a = xp.empty((rows, n), dtype=np.float64)
        b = xp.empty((rows, n), dtype=np.float64) if prep_mode in PREP_WITH_B else a
        wrow = xp.empty((1, n), dtype=np.float64)
        flag = xp.empty((rows,), dtype=np.int32)
        _launch("soft_fwd_prep", dtype, grid,
                (values, a, b, wrow, flag, np.int32(rows), np.int32(n), np.int32(rpb),
                 np.int32(prep_mode), np.float64(scale), np.float64(inv_eps), np.int32(k)))
        sol = xp.empty((rows, n), dtype=np.float64)
        w = b if prep_mode == PREP_SORT_KL else wrow
        _isotonic().isotonic_rows(a, w, regularization, out=(sol, block_ids), stream=stream,
                                  keys=tie_keys(prep_mode, a, b))
        _launch("soft_finish", dtype, grid,
                (a, sol, perm, flag, values, block_ids, np.int32(1), np.int32(rows),
                 np.int32(n), np.int32(rpb), np.int32(fin_mode), np.float64(scale),
                 np.float64(inv_eps)))
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
        _launch("soft_vjp_prep", dtype, grid,
                (g, x, x if ranks is None else ranks, perm, a, s, flag, np.int32(rows),
                 np.int32(n), np.int32(rpb), np.int32(vjp_mode), np.float64(scale)))
        grad_s = xp.empty((rows, n), dtype=np.float64)
        # grad_w is not used; for float64 the dx output (written last) holds it
        grad_w = dx if dtype == "float64" else xp.empty((rows, n), dtype=np.float64)
        _isotonic().isotonic_vjp_rows(a, s, s, block_ids, regularization, out=(grad_s, grad_w),
                                      stream=stream)
        _launch("soft_finish", dtype, grid,
                (a, grad_s, perm, flag, dx, block_ids, np.int32(0), np.int32(rows),
                 np.int32(n), np.int32(rpb), np.int32(fin_mode), np.float64(scale),
                 np.float64(0.0)))
    return dx


(soft_rank_rows, soft_sort_rows, soft_top_k_mask_rows, soft_rank_vjp_rows, soft_sort_vjp_rows,
 soft_top_k_mask_vjp_rows) = _device_plan.row_functions(_forward, _backward)
