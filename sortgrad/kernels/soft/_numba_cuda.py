"""Numba CUDA backend of the soft ops (soft rank, soft sort, soft top-k mask) and their VJPs.

Same compositions as `_cupy.py`, with the Numba CUDA modules of the other ops (the math and the
semantics are those of `_cpu.py`, the reference; soft.cu's header describes the exact-limit
forms and the units, which these kernels share; every intermediate is float64, outputs of x's
dtype):

  forward:  keys kernel (total-order keys from the bits, the direction `_cpu.py` sorts in)
            -> `segmented_sort._numba_cuda.sort_rows` of the keys as unsigned integers (into
               the values output, viewed as unsigned) -> decode kernel (the keys back into
               the sorted values, in place)
            -> prep kernel: the isotonic inputs in float64 (the row's units), the sorted signed
               input, a per-row flag (bit 0: non-finite; bit 1: rank / mask fallback, soft
               sort |x| > HUGE)
            -> `isotonic._numba_cuda.isotonic_rows` (tie keys as `_device_plan.tie_keys`)
            -> extents kernel (each block's start) -> mid kernel -> `isotonic._numba_cuda.
               isotonic_vjp_rows` (the block sums: L2 block means or KL softmaxes)
            -> finish kernel: the values, block-relative and clipped (scattered through perm
               for rank and mask), block ids (0 on NaN rows), NaN rows
            -> fallback kernel (rank and mask): one thread per row redoes the rows whose
               x / eps leaves the fast path (`_cpu._segmented`).
  backward: [extents kernel (KL rank: s relative to each block)] -> prep kernel (the cotangent
            gathered through perm; KL: the sorted scaled input) ->
            `isotonic._numba_cuda.isotonic_vjp_rows` (L2: block mean; KL: block
            softmax-weighted sum) -> finish kernel (scatter through perm, scale, NaN rows).

Launch mapping of the prep and finish kernels (blocks of BLOCK threads, STAGE = BLOCK * ITEMS):
rows of n <= STAGE go STAGE // n whole rows to a block (a flat, coalesced index over them) and
gather / scatter through a shared-memory stage of the block's rows; longer rows go one row to
a block with direct gathers / scatters in global memory. The keys, decode, extents and mid
kernels are flat grid-stride loops; the fallback kernel takes one thread per row. The
constants are module level so that tests can lower them (the simulator runs every thread as a
Python thread).

Scratch from `numba_support.empty` (CuPy's pool for CuPy input; sizes from the shapes only):
forward 5 float64 (6 for the KL sort) and 2 integer (rows, n) arrays, one float64 row and one
int32 per row; backward 3 float64 (rows, n) arrays (4 for KL; one fewer for float64 input,
whose unused grad_w goes to the dx output it precedes), the block starts for KL rank, one
int32 per row; plus what the sort and isotonic kernels take. Everything is launched on
`stream` (None: the current stream of the input's library, `numba_support.resolve_stream`);
nothing synchronises with the host.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
from numba import cuda

from .._cuda import numba_support as ns
from . import _device_plan
from ._device_plan import (BLOCK_SUMS_KL, FALLBACK_KIND, FB_MASK, FB_RANK_KL, FB_RANK_L2,
                           FIN_MASK, FIN_RANK_KL, FIN_RANK_L2, FIN_SORT, FIN_SORT_KL,
                           FIN_VJP_RANK, PREP_MASK, PREP_RANK_KL, PREP_RANK_L2, PREP_SORT_KL,
                           PREP_SORT_L2, VJP_RANK_KL, VJP_RANK_L2, VJP_SORT_KL, tie_keys)

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

FAST_SCALE = 2.0 ** 40   # rank / mask fast path: |s| <= this at both row ends (soft.cu)
HUGE = 2.0 ** 900        # the soft sort's ordinary units: |x|, n / eps below this
DOWN = 2.0 ** -128       # the soft sort's scale where |x| > HUGE
SUM_DOWN = 2.0 ** -64    # block means of x where |x| > HUGE: no overflow


@cuda.jit(device=True)
def _dabs(v):
    return -v if v < 0.0 else v


@cuda.jit(device=True)
def _clip(v, lo, hi):
    """min(max(v, lo), hi) as the CPU computes it."""
    if v < lo:
        return lo
    if v > hi:
        return hi
    return v


@cuda.jit(device=True)
def _relative(xs, base, eps):
    """(xs - base) / eps without overflowing where the quotient is finite (_cpu._relative)."""
    d = xs - base
    if math.isfinite(d):
        return d / eps
    return ((0.5 * xs - 0.5 * base) / eps) * 2.0


@cuda.jit(device=True)
def _relative_scaled(xs, base, inv_eps):
    d = xs - base
    if math.isfinite(d):
        return d * inv_eps
    return ((0.5 * xs - 0.5 * base) * inv_eps) * 2.0


@cuda.jit(device=True)
def _over_eps(v, eps, inv_eps):
    """v / eps through 1 / eps where that is finite (_cpu._over_eps)."""
    if math.isfinite(inv_eps):
        return v * inv_eps
    return v / eps


@cuda.jit(device=True)
def _extent(ids, start_of, off, n, i):
    """The extent (p, q) of the block of entry i of the row at flat offset `off` (start_of:
    the extents kernel's block starts)."""
    bid = ids[off + i]
    ok = bid >= 0 and bid < n
    p = i
    if ok:
        p = start_of[off + bid]
    q = n
    if ok and bid != ids[off + n - 1] and bid + 1 < n:
        q = start_of[off + bid + 1]
    if p < 0 or p > i:  # memory safety only
        p = i
    if q <= i or q > n:
        q = n
    return p, q


@functools.lru_cache(maxsize=None)
def _keys_kernel(width: int):
    """keys[q] = the IEEE total-order key of the raw bits bits[q] (complemented when
    descending), as soft.cu's soft_keys: bits only, no float arithmetic."""
    sign = np.uint64(1 << (width - 1))
    ones = np.uint64((1 << width) - 1)
    zero = np.uint64(0)

    @cuda.jit
    def kernel(bits, keys, descending):
        q = cuda.grid(1)
        stride = cuda.gridsize(1)
        while q < bits.shape[0]:
            b = np.uint64(bits[q])
            if (b & sign) != zero:
                key = b ^ ones
            else:
                key = b | sign
            if descending:
                key = key ^ ones
            keys[q] = key
            q += stride

    return kernel


@functools.lru_cache(maxsize=None)
def _decode_kernel(width: int):
    """In place: the sorted keys of `_keys_kernel` back into the raw bits of the values."""
    sign = np.uint64(1 << (width - 1))
    ones = np.uint64((1 << width) - 1)
    zero = np.uint64(0)

    @cuda.jit
    def kernel(keys, descending):
        q = cuda.grid(1)
        stride = cuda.gridsize(1)
        while q < keys.shape[0]:
            k = np.uint64(keys[q])
            if descending:
                k = k ^ ones
            if (k & sign) != zero:
                b = k ^ sign
            else:
                b = k ^ ones
            keys[q] = b
            q += stride

    return kernel


@functools.lru_cache(maxsize=None)
def _fwd_prep_kernel(mode: int, block: int, stage: int):
    """Sorted values -> a (the isotonic s-argument, in the row's units), b (sign * x_sorted),
    wrow (the shared w-argument row) and flag[row] (bit 0: a non-finite entry; bit 1: rank /
    mask: the fallback, soft sort: |x| > HUGE)."""
    sort = mode in (PREP_SORT_L2, PREP_SORT_KL)

    @cuda.jit
    def kernel(sorted_, a, b, wrow, flag, rows, n, rpb, sign, scale, eps, inv_eps, k):
        bad = cuda.shared.array(stage, numba.int32)
        tid = cuda.threadIdx.x
        r0 = np.int64(cuda.blockIdx.x) * rpb
        nr = rows - r0
        if nr > rpb:
            nr = rpb
        total = nr * n
        off = r0 * n
        tiny_eps = not (np.float64(n) * inv_eps <= HUGE)
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
        for q in range(tid, nr, block):  # bit 1 from the row's ends (the row is sorted)
            first = sign * np.float64(sorted_[off + q * n])
            last = sign * np.float64(sorted_[off + q * n + n - 1])
            f = 0
            if sort:
                if not (_dabs(first) <= HUGE and _dabs(last) <= HUGE):
                    f = 2
            else:
                s0 = first * _dabs(scale)
                s1 = last * _dabs(scale)
                if not (_dabs(s0) <= FAST_SCALE and _dabs(s1) <= FAST_SCALE):
                    f = 2
            bad[q] = f
        cuda.syncthreads()
        for p in range(tid, total, block):
            lr = p // n
            i = p - lr * n
            x = np.float64(sorted_[off + p])
            huge = (bad[lr] & 2) != 0
            if not math.isfinite(x):
                bad[lr] = 3 if huge else 1  # every writer of the row writes the same value
            xs = sign * x
            if mode == PREP_SORT_L2:
                if tiny_eps:
                    av = np.float64(n - i) - eps * xs
                elif huge:
                    av = np.float64(n - i) * (inv_eps * DOWN) - xs * DOWN
                else:
                    av = np.float64(n - i) * inv_eps - xs
            elif mode == PREP_SORT_KL:
                if huge or tiny_eps:
                    av = -(np.float64(i) / eps)
                else:
                    av = np.float64(n - i) * inv_eps
            else:
                av = x * scale
            a[off + p] = av
            b[off + p] = xs
        cuda.syncthreads()
        for q in range(tid, nr, block):
            flag[r0 + q] = bad[q]

    return kernel


@cuda.jit
def _extents_kernel(ids, start_of, n):
    """start_of[row * n + id] = the first position of the block `id` of the row."""
    q = cuda.grid(1)
    stride = cuda.gridsize(1)
    while q < ids.shape[0]:
        i = q % n
        bid = ids[q]
        if (i == 0 or ids[q - 1] != bid) and bid >= 0 and bid < n:
            start_of[q - i + bid] = i
        q += stride


@functools.lru_cache(maxsize=None)
def _mid_kernel(mode: int):
    """g, the block sums' input (soft.cu's soft_mid): rank L2 / mask s_i - s_p; KL rank rho;
    L2 sort x_i - x_p (|x| > HUGE: x_i 2^-64); KL sort 1, with the softmax sums' arguments
    s2 = x_i - x_p and w2 = -(i - p) / eps (one kernel, one order: the logs cancel exactly
    where x_i - x_p == -(i - p) / eps, as on the CPU)."""
    most_negative = -float(np.finfo(np.float64).max)

    @cuda.jit
    def kernel(a, b, ids, start_of, flag, g, s2, w2, n, eps, inv_eps):
        q = cuda.grid(1)
        stride = cuda.gridsize(1)
        while q < ids.shape[0]:
            i = q % n
            off = q - i
            p, _ = _extent(ids, start_of, off, n, i)
            if mode == PREP_RANK_L2 or mode == PREP_MASK:
                v = a[q] - a[off + p]
            elif mode == PREP_RANK_KL:
                v = np.float64(n - i)
            elif mode == PREP_SORT_L2:
                if flag[q // n] & 2:
                    v = b[q] * SUM_DOWN
                else:
                    v = b[q] - b[off + p]
            else:
                v = 1.0
                d = b[q] - b[off + p]
                if not math.isfinite(d):  # past the range: exp gives 0 (-inf would make
                    d = most_negative    # exp(-inf - -inf) = NaN in the max-shifted sums)
                s2[q] = d
                w2[q] = -_over_eps(np.float64(i - p), eps, inv_eps)
            if not math.isfinite(v):  # fallback and non-finite rows: anything finite
                v = 0.0
            g[q] = v
            q += stride

    return kernel


@functools.lru_cache(maxsize=None)
def _vjp_prep_kernel(mode: int, block: int, items: int):
    """Cotangent and residuals -> a (the isotonic VJP's cotangent: g[perm], KL rank times
    ranks[perm]; sort: g), s (KL rank: (x[perm] - x[perm[p]]) * scale over each block B = [p,
    q), start_of the block starts; KL sort: scale * x[perm]) and flag[row]."""
    stage_len = block * items
    rank = mode in (VJP_RANK_L2, VJP_RANK_KL)
    kl = mode in (VJP_RANK_KL, VJP_SORT_KL)
    rank_kl = mode == VJP_RANK_KL
    nan = math.nan

    @cuda.jit
    def kernel(g, x, ranks, perm, ids, start_of, a, s, flag, rows, n, rpb, scale):
        stage = cuda.shared.array(stage_len, numba.float64)
        bad = cuda.shared.array(stage_len, numba.int32)
        lr = cuda.local.array(items, numba.int64)
        src = cuda.local.array(items, numba.int64)
        srcp = cuda.local.array(items, numba.int64)
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
        sign = -1.0 if scale < 0.0 else 1.0
        inv_eps = scale * sign
        for q in range(tid, nr, block):
            bad[q] = 0
        cuda.syncthreads()
        for base in range(0, total, stage_len):  # one chunk when staged
            for c in range(items):
                p = base + tid + c * block
                lr[c] = -1
                src[c] = -1
                srcp[c] = -1
                sv[c] = 0.0
                av[c] = 0.0
                if p < total:
                    row = p // n
                    lr[c] = row
                    t = perm[off + p]
                    if t >= 0 and t < n:  # out-of-range entries read as NaN (memory safety)
                        src[c] = row * n + t
                    if rank_kl:
                        bp, _ = _extent(ids, start_of, off + row * n, n, p - row * n)
                        tp = perm[off + row * n + bp]
                        if tp >= 0 and tp < n:
                            srcp[c] = row * n + tp
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
                    if rank_kl:  # softmax(s_B) is shift-free: s relative to the block start
                        xp_ = nan
                        if srcp[c] >= 0:
                            if staged:
                                xp_ = stage[srcp[c]]
                            else:
                                xp_ = np.float64(x[off + srcp[c]])
                        sv[c] = _relative_scaled(sign * xv, sign * xp_, inv_eps)
                    else:
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
                        v = sv[c]
                        if not math.isfinite(v):  # NaN rows: finite, unused
                            v = 0.0
                        s[off + p] = v
        cuda.syncthreads()
        for q in range(tid, nr, block):
            flag[r0 + q] = bad[q]

    return kernel


@functools.lru_cache(maxsize=None)
def _finish_kernel(dtype_name: str, mode: int, block: int, stage_len: int):
    """out from a (prep's s-argument or the VJP prep's cotangent), b (the sorted signed input),
    t (the block sums or the isotonic VJP), the block ids and their starts (forward), as
    soft.cu's soft_finish: scattered through perm except for the soft sort; ids_out = ids_in,
    0 on non-finite rows (with `write_ids`); a non-finite row is NaN at every position (written
    without perm); rank and mask rows of the fallback are left to the fallback kernel."""
    out_t = numba.from_dtype(np.dtype(dtype_name))
    sorted_order = mode in (FIN_SORT, FIN_SORT_KL)
    scatter = not sorted_order
    forward = mode <= FIN_SORT or mode == FIN_SORT_KL
    fallback_rows = mode in (FIN_RANK_L2, FIN_RANK_KL, FIN_MASK)
    nan = math.nan

    @cuda.jit
    def kernel(a, b, t, perm, flag, start_of, out, ids_in, ids_out, write_ids, rows, n, rpb,
               scale, eps, inv_eps, k):
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
            ro = off + lr * n
            f = flag[r0 + lr]
            if f & 1:
                if write_ids:
                    ids_out[off + p] = 0
                if staged and scatter:
                    stage[p] = nan
                else:
                    out[off + p] = nan
                continue
            if write_ids:
                ids_out[off + p] = ids_in[off + p]
            if fallback_rows and f & 2:
                if staged:
                    stage[p] = nan  # the fallback kernel writes the row
                continue
            bp = i
            bq = i + 1
            if forward:
                bp, bq = _extent(ids_in, start_of, ro, n, i)
            cnt = bq - bp
            if mode == FIN_RANK_L2 or mode == FIN_MASK:
                if mode == FIN_RANK_L2:
                    mw = np.float64(n) - 0.5 * np.float64(bp + bq - 1)
                    lo = 1.0
                    hi = np.float64(n)
                else:
                    top = bq if bq < k else k
                    ones = top - bp if top > bp else 0
                    mw = np.float64(ones) / np.float64(cnt)
                    lo = 0.0
                    hi = 1.0
                if cnt == 1:
                    v = _clip(mw, lo, hi)
                else:
                    v = _clip(((a[off + p] - a[ro + bp]) - t[off + p]) + mw, lo, hi) + 0.0
            elif mode == FIN_RANK_KL:
                if cnt == 1:
                    v = np.float64(n - i)
                else:
                    v = _clip(t[off + p], 1.0, np.float64(n))
            elif mode == FIN_SORT:
                if cnt == 1:
                    v = scale * b[off + p]
                else:
                    if f & 2:
                        mean = t[off + p] * (1.0 / SUM_DOWN)
                    else:
                        mean = b[ro + bp] + t[off + p]
                    centre = 0.5 * np.float64(bp + bq - 1)
                    v = scale * _clip(mean + _over_eps(centre - np.float64(i), eps, inv_eps),
                                      b[ro + n - 1], b[ro]) + 0.0
            elif mode == FIN_SORT_KL:
                if cnt == 1:
                    v = scale * b[off + p]
                else:
                    # t_p = softmax(x_B)_p |B| = |B| / z, z = sum exp(x_B - x_p); a_p (the
                    # block sums' grad_w) = -|B| / zt, zt = sum_j exp(-j / eps)
                    z = np.float64(cnt) / t[ro + bp]
                    zt = np.float64(cnt) / -a[ro + bp]
                    lse = b[ro + bp] + math.log(z)
                    v = scale * (lse + (-_over_eps(np.float64(i - bp), eps, inv_eps)
                                        - math.log(zt))) + 0.0
            elif mode == FIN_VJP_RANK:
                v = (a[off + p] - t[off + p]) * scale
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


@cuda.jit(device=True)
def _kl_rho_value(ms, zs, n, p, q):
    """KL block value of [p, q) against w = log rho (max log(n - p), max-shifted sum
    sum(rho_B) / (n - p)), as soft.cu's kl_rho_value."""
    if q - p == 1:
        return ms - math.log(np.float64(n - p))
    rp = np.float64(n - p)
    sum_rho = np.float64(q - p) * (np.float64(n) - 0.5 * np.float64(p + q - 1))
    return (ms - math.log(rp)) + (math.log(zs) - math.log(sum_rho / rp))


@cuda.jit(device=True)
def _put(out, perm, off, n, i, v):
    dst = perm[off + i]
    if dst >= 0 and dst < n:  # memory safety only
        out[off + dst] = v


@functools.lru_cache(maxsize=None)
def _fallback_kernel(kind: int):
    """One thread per row whose flag is exactly 2 (rank / mask outside the fast path), as
    soft.cu's soft_fallback and `_cpu._segmented`: segments at the gaps no block can cross,
    each segment's PAV on s = (x - x_a) / eps (over a), outputs per block. Scratch: the stack's
    sums (st0; KL max s) and KL's shifted sums (st1) at the segment's slots, the counts in ids
    (block ids written over them right to left)."""

    @cuda.jit
    def kernel(xs, s, st0, st1, perm, flag, out, ids, rows, n, k, eps):
        row = cuda.grid(1)
        if row >= rows or flag[row] != 2:
            return
        off = np.int64(row) * n
        if kind == FB_RANK_L2:
            gap = np.float64(n) + 1.0
        elif kind == FB_RANK_KL:
            gap = math.log(np.float64(n)) + 1.0
        else:
            gap = 2.0
        a = 0
        nb = 0
        while a < n:
            e = a + 1
            while e < n and not ((xs[off + e - 1] - xs[off + e]) / eps > gap):
                e += 1
            for i in range(a, e):
                s[off + i] = _relative(xs[off + i], xs[off + a], eps)
            top = -1
            start = a
            for i in range(a, e):
                top += 1
                if kind == FB_RANK_KL:
                    st0[off + a + top] = s[off + i]
                    st1[off + a + top] = 1.0
                else:
                    if kind == FB_RANK_L2:
                        w = np.float64(n - i)
                    else:
                        w = 1.0 if i < k else 0.0
                    st0[off + a + top] = s[off + i] - w
                ids[off + a + top] = 1
                start = i
                while top > 0:
                    cb = ids[off + a + top - 1]
                    ct = ids[off + a + top]
                    bs = start - cb
                    if kind == FB_RANK_KL:
                        vb = _kl_rho_value(st0[off + a + top - 1], st1[off + a + top - 1], n,
                                           bs, start)
                        vt = _kl_rho_value(st0[off + a + top], st1[off + a + top], n, start,
                                           i + 1)
                    else:
                        vb = st0[off + a + top - 1] / np.float64(cb)
                        vt = st0[off + a + top] / np.float64(ct)
                    pool = vb < vt
                    if vb == vt:  # tie keys (mask): the sorted x
                        pool = kind != FB_MASK or xs[off + bs] != xs[off + i]
                    if not pool:
                        break
                    if kind == FB_RANK_KL:
                        m1 = st0[off + a + top - 1]
                        z1 = st1[off + a + top - 1]
                        m2 = st0[off + a + top]
                        z2 = st1[off + a + top]
                        if m1 >= m2:
                            st1[off + a + top - 1] = z1 + z2 * math.exp(m2 - m1)
                        else:
                            st0[off + a + top - 1] = m2
                            st1[off + a + top - 1] = z2 + z1 * math.exp(m1 - m2)
                    else:
                        st0[off + a + top - 1] += st0[off + a + top]
                    ids[off + a + top - 1] = cb + ct
                    start = bs
                    top -= 1
            stop = e
            for j in range(top, -1, -1):  # block ids, right to left
                c = ids[off + a + j]
                for i in range(stop - c, stop):
                    ids[off + i] = nb + j
                stop -= c
            p = a
            while p < e:
                q = p + 1
                while q < e and ids[off + q] == ids[off + p]:
                    q += 1
                cnt = q - p
                if kind == FB_RANK_KL:
                    sum_rho = np.float64(cnt) * (np.float64(n) - 0.5 * np.float64(p + q - 1))
                    if cnt == 1:
                        _put(out, perm, off, n, p, sum_rho)
                    else:
                        m = s[off + p]
                        for i in range(p, q):
                            if s[off + i] > m:
                                m = s[off + i]
                        z = 0.0
                        for i in range(p, q):
                            z += math.exp(s[off + i] - m)
                        factor = sum_rho / z
                        for i in range(p, q):
                            _put(out, perm, off, n, i,
                                 _clip(math.exp(s[off + i] - m) * factor, 1.0, np.float64(n)))
                else:
                    if kind == FB_RANK_L2:
                        mw = np.float64(n) - 0.5 * np.float64(p + q - 1)
                        lo = 1.0
                        hi = np.float64(n)
                    else:
                        top_k = q if q < k else k
                        ones = top_k - p if top_k > p else 0
                        mw = np.float64(ones) / np.float64(cnt)
                        lo = 0.0
                        hi = 1.0
                    if cnt == 1:
                        _put(out, perm, off, n, p, _clip(mw, lo, hi))
                    else:
                        total = 0.0
                        for i in range(p, q):
                            total += s[off + i] - s[off + p]
                        md = total / np.float64(cnt)
                        for i in range(p, q):
                            _put(out, perm, off, n, i,
                                 _clip(((s[off + i] - s[off + p]) - md) + mw, lo, hi) + 0.0)
                p = q
            nb += top + 1
            a = e

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
             regularization: str, sign: float, eps: float, k: int = 0):
    """keys -> sort -> decode -> prep -> isotonic -> block sums -> finish [-> fallback];
    returns (values, perm, block_ids)."""
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
    eps = float(eps)
    inv_eps = 1.0 / eps
    scale = sign / eps  # rank / mask: s = scale * x_sorted
    block, _, stage = _config()
    grid, rpb = _geometry(rows, n, stage)
    total = rows * n
    flat_grid = ns.grid_for(total, block)
    width = dtype.itemsize * 8
    desc = bool(descending_sort)
    keys = ns.empty((rows, n), ns.uint_dtype(dtype), kind, stream_)
    _keys_kernel(width)[flat_grid, block, stream_](ns.bits_view(ns.flat(x_dev)), ns.flat(keys),
                                                   desc)
    # the sorted keys (then values) are only read by prep: the values output holds them
    sorted_bits = ns.bits_view(values)
    _sort().sort_rows(keys, False, out=(sorted_bits, perm), stream=stream_)
    _decode_kernel(width)[flat_grid, block, stream_](ns.flat(sorted_bits), desc)
    a = ns.empty((rows, n), np.float64, kind, stream_)
    b = ns.empty((rows, n), np.float64, kind, stream_)
    wrow = ns.empty((1, n), np.float64, kind, stream_)
    flag = ns.empty((rows,), np.int32, kind, stream_)
    _fwd_prep_kernel(prep_mode, block, stage)[grid, block, stream_](
        ns.flat(values), ns.flat(a), ns.flat(b), ns.flat(wrow), flag, rows, n, rpb,
        float(sign), float(scale), eps, inv_eps, int(k))
    sol = ns.empty((rows, n), np.float64, kind, stream_)
    w = b if prep_mode == PREP_SORT_KL else wrow
    _isotonic().isotonic_rows(a, w, regularization, out=(sol, block_ids), stream=stream_,
                              keys=tie_keys(prep_mode, a, b))
    # the block sums of the exact-limit forms (soft.cu); sol is free again
    start_of = ns.empty((rows, n), np.int32, kind, stream_)
    _extents_kernel[flat_grid, block, stream_](ns.flat(block_ids), ns.flat(start_of), n)
    g = ns.empty((rows, n), np.float64, kind, stream_)
    sort_kl = prep_mode == PREP_SORT_KL
    # KL sort: the softmax sums' s- and w-arguments, relative to each block (a is free)
    s2 = ns.empty((rows, n), np.float64, kind, stream_) if sort_kl else g
    w2 = a if sort_kl else g
    _mid_kernel(prep_mode)[flat_grid, block, stream_](
        ns.flat(a), ns.flat(b), ns.flat(block_ids), ns.flat(start_of), flag, ns.flat(g),
        ns.flat(s2), ns.flat(w2), n, eps, inv_eps)
    t = ns.empty((rows, n), np.float64, kind, stream_)
    s_arg, w_arg = (s2, w2) if sort_kl else (a, a) if prep_mode == PREP_RANK_KL else (b, b)
    _isotonic().isotonic_vjp_rows(g, s_arg, w_arg, block_ids,
                                  "kl" if prep_mode in BLOCK_SUMS_KL else "l2",
                                  out=(t, sol), stream=stream_)
    _finish_kernel(dtype.name, fin_mode, block, stage)[grid, block, stream_](
        ns.flat(sol if sort_kl else a), ns.flat(b), ns.flat(t), ns.flat(perm), flag,
        ns.flat(start_of), ns.flat(values), ns.flat(block_ids), ns.flat(block_ids), True, rows,
        n, rpb, float(sign), eps, inv_eps, int(k))
    if prep_mode in FALLBACK_KIND:
        _fallback_kernel(FALLBACK_KIND[prep_mode])[-(-rows // block), block, stream_](
            ns.flat(b), ns.flat(a), ns.flat(sol), ns.flat(t), ns.flat(perm), flag,
            ns.flat(values), ns.flat(block_ids), rows, n, int(k), eps)
    return tuple(out)


# --- backward ---------------------------------------------------------------------------------

def _backward(g, x, ranks, perm, block_ids, out, stream, vjp_mode: int, fin_mode: int,
              regularization: str, scale: float):
    """[extents ->] prep -> isotonic VJP -> finish; returns dx."""
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
    start_of = ids_dev  # read for VJP_RANK_KL only
    if vjp_mode == VJP_RANK_KL:
        start_of = ns.empty((rows, n), np.int32, kind, stream_)
        _extents_kernel[ns.grid_for(rows * n, block), block, stream_](
            ns.flat(ids_dev), ns.flat(start_of), n)
    _vjp_prep_kernel(vjp_mode, block, items)[grid, block, stream_](
        ns.flat(g_dev), ns.flat(x_dev), ns.flat(ranks_dev), ns.flat(perm_dev), ns.flat(ids_dev),
        ns.flat(start_of), ns.flat(a), ns.flat(s), flag, rows, n, rpb, float(scale))
    grad_s = ns.empty((rows, n), np.float64, kind, stream_)
    # grad_w is not used; for float64 the dx output (written last) holds it
    grad_w = dx if dtype == np.float64 else ns.empty((rows, n), np.float64, kind, stream_)
    _isotonic().isotonic_vjp_rows(a, s, s, ids_dev, regularization, out=(grad_s, grad_w),
                                  stream=stream_)
    _finish_kernel(dtype.name, fin_mode, block, stage)[grid, block, stream_](
        ns.flat(a), ns.flat(a), ns.flat(grad_s), ns.flat(perm_dev), flag, ns.flat(ids_dev),
        ns.flat(dx), ns.flat(ids_dev), ns.flat(ids_dev), False, rows, n, rpb, float(scale),
        1.0, 1.0, 0)
    return out


# --- compilation check --------------------------------------------------------------------------

def ptx_cases(dtypes=("float32", "float64")):
    """(dispatcher, signature) pairs of every kernel for `numba_support.compile_ptx_cases`."""
    from numba import types as nt
    block, items, stage = _config()
    f64, i32, i64, b1 = nt.float64[::1], nt.int32[::1], nt.int64, nt.boolean
    d = nt.float64
    cases = [(_extents_kernel, (i32, i32, i64))]
    for mode in range(5):
        cases.append((_mid_kernel(mode), (f64, f64, i32, i32, i32, f64, f64, f64, i64, d, d)))
    for fb in (FB_RANK_L2, FB_RANK_KL, FB_MASK):
        for name in dtypes:
            t = numba.from_dtype(np.dtype(name))[::1]
            cases.append((_fallback_kernel(fb),
                          (f64, f64, f64, f64, i32, i32, t, i32, i64, i64, i64, d)))
    for name in dtypes:
        t = numba.from_dtype(np.dtype(name))[::1]
        u = numba.from_dtype(ns.uint_dtype(name))[::1]
        width = np.dtype(name).itemsize * 8
        cases.append((_keys_kernel(width), (u, u, b1)))
        cases.append((_decode_kernel(width), (u, b1)))
        for mode in range(5):
            cases.append((_fwd_prep_kernel(mode, block, stage),
                          (t, f64, f64, f64, i32, i64, i64, i64, d, d, d, d, i64)))
        for mode in range(4):
            cases.append((_vjp_prep_kernel(mode, block, items),
                          (t, t, t, i32, i32, i32, f64, f64, i32, i64, i64, i64, d)))
        for mode in range(7):
            cases.append((_finish_kernel(name, mode, block, stage),
                          (f64, f64, f64, i32, i32, i32, t, i32, i32, b1, i64, i64, i64, d, d,
                           d, i64)))
    return cases


(soft_rank_rows, soft_sort_rows, soft_top_k_mask_rows, soft_rank_vjp_rows, soft_sort_vjp_rows,
 soft_top_k_mask_vjp_rows) = _device_plan.row_functions(_forward, _backward)
