"""Numba CUDA backend of the soft ops (soft rank, soft sort, soft top-k mask) and their VJPs.

Same compositions as `_cupy.py`, with the Numba CUDA modules of the other ops (the math and the
semantics are those of `_cpu.py`, the reference; every intermediate is float64, outputs of x's
dtype):

  forward:  `segmented_sort._numba_cuda.sort_rows` (the direction `_cpu.py` sorts in)
            -> prep kernel: the isotonic inputs in float64 and a per-row "all finite" flag
            -> `isotonic._numba_cuda.isotonic_rows` (tie keys as `_device_plan.tie_keys`)
            -> finish kernel: the values (scattered through perm for rank and mask), block ids
               (0 on NaN rows), NaN rows.
  backward: prep kernel (the cotangent gathered through perm; KL: the sorted scaled input)
            -> `isotonic._numba_cuda.isotonic_vjp_rows` (L2: block mean; KL: block
               softmax-weighted sum) -> finish kernel (scatter through perm, scale, NaN rows).

Launch mapping of the three kernels of this module (blocks of BLOCK threads, STAGE = BLOCK *
ITEMS): rows of n <= STAGE go STAGE // n whole rows to a block (a flat, coalesced index over
them) and gather / scatter through a shared-memory stage of the block's rows; longer rows go
one row to a block with direct gathers / scatters in global memory. The constants are module
level so that tests can lower them (the simulator runs every thread as a Python thread).

Scratch from `numba_support.empty` (CuPy's pool for CuPy input): forward 2 float64 (rows, n)
arrays (3 for the soft sort), one float64 row and one int32 per row; backward 3 float64 (rows,
n) arrays (4 for KL; one fewer for float64 input, whose unused grad_w goes to the dx output
it precedes) and one int32 per row; plus what the sort and isotonic kernels take. Everything is
launched on `stream` (None: the current stream of the input's library,
`numba_support.resolve_stream`); nothing synchronises with the host.

KL soft rank runs the isotonic module's KL path on every row (its own linear/shifted switch;
the CPU soft rank takes a linear path of its own for rows of small spread): values agree to
float64 rounding.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
from numba import cuda

from .._cuda import numba_support as ns
from . import _device_plan
from ._device_plan import (FIN_MASK, FIN_RANK_KL, FIN_RANK_L2, FIN_SORT, FIN_VJP_RANK,
                           PREP_MASK, PREP_RANK_KL, PREP_RANK_L2, PREP_SORT_KL,
                           PREP_SORT_L2, PREP_WITH_B, VJP_RANK_KL, VJP_RANK_L2, VJP_SORT_KL,
                           tie_keys)

DTYPES = ("float32", "float64")

BLOCK = 256   # threads per block (a multiple of 32, at most 1024)
ITEMS = 8     # entries per thread of a staged block; STAGE = BLOCK * ITEMS


def _config():
    block, items = int(BLOCK), int(ITEMS)
    if block % 32 or not 0 < block <= 1024 or items < 1:
        raise ValueError("BLOCK must be a multiple of 32, at most 1024; ITEMS at least 1")
    return block, items, block * items


def _geometry(rows: int, n: int, stage: int):
    """(grid, rows per block) for rows of n >= 1 entries."""
    rpb = stage // n if n <= stage else 1
    return -(-rows // rpb), rpb


# --- kernels ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _fwd_prep_kernel(mode: int, block: int, stage: int):
    """Sorted values -> a (the isotonic s-argument), b (sort: sign * x_sorted, the tie keys and
    for KL the per-row w-argument), wrow (the shared w-argument row) and flag[row] (1: a
    non-finite entry)."""

    @cuda.jit
    def kernel(sorted_, a, b, wrow, flag, rows, n, rpb, scale, inv_eps, k):
        bad = cuda.shared.array(stage, numba.int32)
        tid = cuda.threadIdx.x
        r0 = np.int64(cuda.blockIdx.x) * rpb
        nr = rows - r0
        if nr > rpb:
            nr = rpb
        total = nr * n
        off = r0 * n
        if mode != PREP_SORT_KL:
            for j in range(np.int64(cuda.blockIdx.x) * block + tid, n,
                           np.int64(cuda.gridDim.x) * block):
                w = 0.0
                if mode == PREP_RANK_L2:
                    w = np.float64(n - j)
                elif mode == PREP_RANK_KL:
                    w = math.log(np.float64(n - j))
                elif mode == PREP_MASK and j < k:
                    w = 1.0
                wrow[j] = w
        for q in range(tid, nr, block):
            bad[q] = 0
        cuda.syncthreads()
        for p in range(tid, total, block):
            lr = p // n
            i = p - lr * n
            x = np.float64(sorted_[off + p])
            if not math.isfinite(x):
                bad[lr] = 1
            theta = np.float64(n - i) * inv_eps
            if mode == PREP_SORT_L2:
                a[off + p] = theta - scale * x
                b[off + p] = scale * x
            elif mode == PREP_SORT_KL:
                a[off + p] = theta
                b[off + p] = scale * x
            else:
                a[off + p] = x * scale
        cuda.syncthreads()
        for q in range(tid, nr, block):
            flag[r0 + q] = bad[q]

    return kernel


@functools.lru_cache(maxsize=None)
def _vjp_prep_kernel(mode: int, block: int, items: int):
    """Cotangent and residuals -> a (the isotonic VJP's cotangent: g[perm], KL rank times
    ranks[perm]; sort: g), s (KL: scale * x[perm]) and flag[row]."""
    stage_len = block * items
    rank = mode in (VJP_RANK_L2, VJP_RANK_KL)
    kl = mode in (VJP_RANK_KL, VJP_SORT_KL)
    rank_kl = mode == VJP_RANK_KL
    nan = math.nan

    @cuda.jit
    def kernel(g, x, ranks, perm, a, s, flag, rows, n, rpb, scale):
        stage = cuda.shared.array(stage_len, numba.float64)
        bad = cuda.shared.array(stage_len, numba.int32)
        lr = cuda.local.array(items, numba.int64)
        src = cuda.local.array(items, numba.int64)
        sv = cuda.local.array(items, numba.float64)
        av = cuda.local.array(items, numba.float64)
        tid = cuda.threadIdx.x
        r0 = np.int64(cuda.blockIdx.x) * rpb
        nr = rows - r0
        if nr > rpb:
            nr = rpb
        total = nr * n
        off = r0 * n
        staged = n <= stage_len  # uniform; then total <= stage_len
        for q in range(tid, nr, block):
            bad[q] = 0
        cuda.syncthreads()
        for base in range(0, total, stage_len):  # one chunk when staged
            for c in range(items):
                p = base + tid + c * block
                lr[c] = -1
                src[c] = -1
                sv[c] = 0.0
                av[c] = 0.0
                if p < total:
                    row = p // n
                    lr[c] = row
                    t = perm[off + p]
                    if t >= 0 and t < n:  # out-of-range entries read as NaN (memory safety)
                        src[c] = row * n + t
            # x[perm]: the finite flag (and s for KL)
            if staged:
                cuda.syncthreads()
                for q in range(tid, total, block):
                    stage[q] = np.float64(x[off + q])
                cuda.syncthreads()
            for c in range(items):
                if lr[c] >= 0:
                    xv = nan
                    if src[c] >= 0:
                        if staged:
                            xv = stage[src[c]]
                        else:
                            xv = np.float64(x[off + src[c]])
                    if not math.isfinite(xv):
                        bad[lr[c]] = 1
                    sv[c] = xv * scale
            if rank:
                if staged:
                    cuda.syncthreads()
                    for q in range(tid, total, block):
                        stage[q] = np.float64(g[off + q])
                    cuda.syncthreads()
                for c in range(items):
                    if lr[c] >= 0 and src[c] >= 0:
                        if staged:
                            av[c] = stage[src[c]]
                        else:
                            av[c] = np.float64(g[off + src[c]])
                if rank_kl:
                    if staged:
                        cuda.syncthreads()
                        for q in range(tid, total, block):
                            stage[q] = np.float64(ranks[off + q])
                        cuda.syncthreads()
                    for c in range(items):
                        if lr[c] >= 0 and src[c] >= 0:
                            if staged:
                                av[c] *= stage[src[c]]
                            else:
                                av[c] *= np.float64(ranks[off + src[c]])
            for c in range(items):
                p = base + tid + c * block
                if lr[c] >= 0:
                    if rank:
                        a[off + p] = av[c]
                    else:
                        a[off + p] = np.float64(g[off + p])
                    if kl:
                        s[off + p] = sv[c]
        cuda.syncthreads()
        for q in range(tid, nr, block):
            flag[r0 + q] = bad[q]

    return kernel


@functools.lru_cache(maxsize=None)
def _finish_kernel(dtype_name: str, mode: int, block: int, stage_len: int):
    """out from a and t (the isotonic solution or VJP), scattered through perm except for
    FIN_SORT; ids_out = ids_in, 0 on flagged rows (with `write_ids`); a flagged row is NaN at
    every position (written without perm)."""
    out_t = numba.from_dtype(np.dtype(dtype_name))
    scatter = mode != FIN_SORT
    nan = math.nan

    @cuda.jit
    def kernel(a, t, perm, flag, out, ids_in, ids_out, write_ids, rows, n, rpb, scale,
               inv_eps):
        stage = cuda.shared.array(stage_len, out_t)
        tid = cuda.threadIdx.x
        r0 = np.int64(cuda.blockIdx.x) * rpb
        nr = rows - r0
        if nr > rpb:
            nr = rpb
        total = nr * n
        off = r0 * n
        staged = n <= stage_len
        for p in range(tid, total, block):
            lr = p // n
            i = p - lr * n
            if flag[r0 + lr] != 0:
                if write_ids:
                    ids_out[off + p] = 0
                if staged and scatter:
                    stage[p] = nan
                else:
                    out[off + p] = nan
                continue
            if write_ids:
                ids_out[off + p] = ids_in[off + p]
            d = a[off + p] - t[off + p]
            if mode == FIN_RANK_L2:
                v = d
            elif mode == FIN_RANK_KL:
                v = math.exp(d)
            elif mode == FIN_MASK:
                v = d
                if d < 0.0:
                    v = 0.0
                elif d > 1.0:
                    v = 1.0
            elif mode == FIN_SORT:
                v = scale * (np.float64(n - i) * inv_eps - t[off + p])
            elif mode == FIN_VJP_RANK:
                v = d * scale
            else:  # FIN_VJP_SORT
                v = t[off + p]
            if not scatter:
                out[off + p] = v
                continue
            dst = perm[off + p]
            if dst >= 0 and dst < n:  # memory safety only: perm is a permutation
                if staged:
                    stage[lr * n + dst] = v
                else:
                    out[off + lr * n + dst] = v
        if staged and scatter:  # uniform
            cuda.syncthreads()
            for q in range(tid, total, block):
                out[off + q] = stage[q]

    return kernel


# --- the other ops' modules -------------------------------------------------------------------

def _sort():
    from ..segmented_sort import _numba_cuda as sort_numba
    return sort_numba


def _isotonic():
    from ..isotonic import _numba_cuda as iso_numba
    return iso_numba


# --- forward ----------------------------------------------------------------------------------

def _forward(x, out, stream, descending_sort: bool, prep_mode: int, fin_mode: int,
             regularization: str, scale: float, inv_eps: float = 0.0, k: int = 0):
    """sort -> prep -> isotonic -> finish; returns (values, perm, block_ids)."""
    x_dev, kind = ns.as_device(x)
    rows, n = (int(d) for d in x_dev.shape)
    dtype = np.dtype(x_dev.dtype)
    stream_ = ns.resolve_stream(stream, x)
    if out is None:
        result = tuple(ns.empty((rows, n), d, kind, stream_) for d in (dtype, np.int32, np.int32))
        out = tuple(ns.like_input(r, kind) for r in result)
    values, perm, block_ids = (ns.as_device(o)[0] for o in out)
    if rows == 0 or n == 0:
        return tuple(out)
    block, _, stage = _config()
    grid, rpb = _geometry(rows, n, stage)
    # the sorted values are only read by prep: the values output holds them meanwhile
    _sort().sort_rows(x_dev, descending_sort, out=(values, perm), stream=stream_)
    a = ns.empty((rows, n), np.float64, kind, stream_)
    b = ns.empty((rows, n), np.float64, kind, stream_) if prep_mode in PREP_WITH_B else a
    wrow = ns.empty((1, n), np.float64, kind, stream_)
    flag = ns.empty((rows,), np.int32, kind, stream_)
    _fwd_prep_kernel(prep_mode, block, stage)[grid, block, stream_](
        ns.flat(values), ns.flat(a), ns.flat(b), ns.flat(wrow), flag, rows, n, rpb,
        float(scale), float(inv_eps), int(k))
    sol = ns.empty((rows, n), np.float64, kind, stream_)
    w = b if prep_mode == PREP_SORT_KL else wrow
    _isotonic().isotonic_rows(a, w, regularization, out=(sol, block_ids), stream=stream_,
                              keys=tie_keys(prep_mode, a, b))
    _finish_kernel(dtype.name, fin_mode, block, stage)[grid, block, stream_](
        ns.flat(a), ns.flat(sol), ns.flat(perm), flag, ns.flat(values), ns.flat(block_ids),
        ns.flat(block_ids), True, rows, n, rpb, float(scale), float(inv_eps))
    return tuple(out)


# --- backward ---------------------------------------------------------------------------------

def _backward(g, x, ranks, perm, block_ids, out, stream, vjp_mode: int, fin_mode: int,
              regularization: str, scale: float):
    """prep -> isotonic VJP -> finish; returns dx."""
    x_dev, kind = ns.as_device(x)
    rows, n = (int(d) for d in x_dev.shape)
    dtype = np.dtype(x_dev.dtype)
    stream_ = ns.resolve_stream(stream, x)
    if out is None:
        out = ns.like_input(ns.empty((rows, n), dtype, kind, stream_), kind)
    dx = ns.as_device(out)[0]
    if rows == 0 or n == 0:
        return out
    block, items, stage = _config()
    grid, rpb = _geometry(rows, n, stage)
    kl = regularization == "kl"
    g_dev, perm_dev, ids_dev = (ns.as_device(v)[0] for v in (g, perm, block_ids))
    ranks_dev = x_dev if ranks is None else ns.as_device(ranks)[0]
    a = ns.empty((rows, n), np.float64, kind, stream_)
    s = ns.empty((rows, n), np.float64, kind, stream_) if kl else a
    flag = ns.empty((rows,), np.int32, kind, stream_)
    _vjp_prep_kernel(vjp_mode, block, items)[grid, block, stream_](
        ns.flat(g_dev), ns.flat(x_dev), ns.flat(ranks_dev), ns.flat(perm_dev), ns.flat(a),
        ns.flat(s), flag, rows, n, rpb, float(scale))
    grad_s = ns.empty((rows, n), np.float64, kind, stream_)
    # grad_w is not used; for float64 the dx output (written last) holds it
    grad_w = dx if dtype == np.float64 else ns.empty((rows, n), np.float64, kind, stream_)
    _isotonic().isotonic_vjp_rows(a, s, s, ids_dev, regularization, out=(grad_s, grad_w),
                                  stream=stream_)
    _finish_kernel(dtype.name, fin_mode, block, stage)[grid, block, stream_](
        ns.flat(a), ns.flat(grad_s), ns.flat(perm_dev), flag, ns.flat(dx), ns.flat(ids_dev),
        ns.flat(ids_dev), False, rows, n, rpb, float(scale), 0.0)
    return out


# --- compilation check --------------------------------------------------------------------------

def ptx_cases(dtypes=("float32", "float64")):
    """(dispatcher, signature) pairs of every kernel for `numba_support.compile_ptx_cases`."""
    from numba import types as nt
    block, items, stage = _config()
    f64, i32, i64, b1 = nt.float64[::1], nt.int32[::1], nt.int64, nt.boolean
    cases = []
    for name in dtypes:
        t = numba.from_dtype(np.dtype(name))[::1]
        for mode in range(5):
            cases.append((_fwd_prep_kernel(mode, block, stage),
                          (t, f64, f64, f64, i32, i64, i64, i64, nt.float64, nt.float64, i64)))
        for mode in range(4):
            cases.append((_vjp_prep_kernel(mode, block, items),
                          (t, t, t, i32, f64, f64, i32, i64, i64, i64, nt.float64)))
        for mode in range(6):
            cases.append((_finish_kernel(name, mode, block, stage),
                          (f64, f64, i32, i32, t, i32, i32, b1, i64, i64, i64, nt.float64,
                           nt.float64)))
    return cases


(soft_rank_rows, soft_sort_rows, soft_top_k_mask_rows, soft_rank_vjp_rows, soft_sort_vjp_rows,
 soft_top_k_mask_vjp_rows) = _device_plan.row_functions(_forward, _backward)
