"""Numba CUDA backend of the decreasing isotonic regression (PAV) and its VJP, per row.

Same results as `_cpu.py` (the reference): pooling on value(left) <= value(right) (equal
neighbours pool: the pooled side of a kink; with the soft ops' tie `keys`, equal blocks whose
keys are all tied stay apart, `_cpu.pools`), the running-min clamp of block values, KL on
linear sums when the row's spread of
exponents is below `LINEAR_KL_SPREAD` and on max-shifted log-sum-exp accumulators otherwise,
block sums accumulated in float64 for float32 and float64 input alike.

Launch mapping (both kernels). A row is handled by a *group* of G threads, G a power of two
picked from the row length n (about `CHUNK` elements per thread, at most one block); a block
of `BLOCK` threads holds BLOCK / G rows. Thread `lane` of the group owns the contiguous chunk
[lane * C, lane * C + C) of its row, C = ceil(n / G). Work arrays of the rows of a block live
in shared memory when they fit in `SHARED_BYTES`, else in a global scratch buffer of n entries
per group slot, the grid capped so that it stays under `SCRATCH_BYTES` and blocks striding
over the rows. Every thread of a block takes part in every barrier; threads of an idle group
(the rows past the end) see a row of length 0.

Forward (`isotonic_rows`):
  1. KL: a group reduction gives the row's min and max of s and of w (the spread picks the
     linear or the shifted accumulators, uniformly for the row).
  2. Coalesced staging: entry i of the work arrays gets element i's accumulator (L2: s - w;
     KL linear: exp(s - max s), exp(w - max w); KL shifted: (s, 1), (w, 1)).
  3. Each thread runs PAV on its chunk. Blocks are stored *at their start position*:
     `cnt[a]` = length of the block starting at a (0 where no live block starts), the
     accumulators at a, and `head[b - 1] = a` at its last entry, so the block below a block
     starting at a is found at head[a - 1]. Pooling never moves data: the left block absorbs
     the right one and the right one's count becomes 0.
  4. Tree merge of adjacent chunks (log2 G levels, a barrier each): the right stack's blocks
     are pushed onto the left stack from the bottom up, pooling as PAV does, until one does
     not pool (the rest of the right stack is then already in order: the test depends on the
     two neighbouring blocks only). Pooling the
     blocks of sub-PAVs and pooling again is exact: the final blocks are unions of sub-blocks.
  5. Each thread turns the blocks starting in its chunk into values, then a group scan gives
     every thread the number of blocks and the minimum block value left of its chunk: block
     id = prefix count of block starts, solution = running min of block values (the clamp).
     The results are written in place and copied out coalesced.
  The sequential work of one merge is the number of blocks it pools (amortised O(n) per row
  over all merges), plus O(1).

VJP (`isotonic_vjp_rows`): blocks are maximal runs of equal `block_ids` (as on the CPU; ids
are never used as indices, so any int32 values are memory-safe). With shared work arrays the
row's g, ids (and s, w for KL) are first staged there with coalesced loads. Each thread
reduces the run segments of its chunk (L2: sum of g; KL: sum of g and online max-shifted sums
of exp(s), exp(w)); a segmented group scan carries the partial run that enters each chunk; the
thread holding a run's last entry writes the run's factors at the run's start position; a
coalesced pass writes grad_s, grad_w (KL: exp(x - max_B) rounded to the output dtype, then
times sum_B(g) / z_B, as the CPU).

Group scans and reductions are Hillis-Steele / tree passes over a shared array with a block
barrier per step (a group may be narrower or wider than a warp, and the same code runs on the
simulator, which has no shuffles).

Streams: every kernel is launched on `stream` (None: the current stream of the input's
library, see `numba_support.resolve_stream`) and nothing synchronises. Outputs (unless given
in `out`) and scratch come from `numba_support.empty` (CuPy's pool for CuPy input).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda

from .._cuda import numba_support as ns
from ._cpu import LINEAR_KL_SPREAD

DTYPES = ("float32", "float64")

# Launch constants (module level so that tests can lower them to exercise multi-chunk and
# multi-group merges at small n under the simulator).
BLOCK = 256              # threads per block, a power of two (clamped to the device limit)
CHUNK = 8                # elements per thread a group aims at (G = next pow2 of n / CHUNK)
SHARED_BYTES = 36 * 1024  # shared-memory budget of a block's work arrays (+ scans < 48 KiB)
SCRATCH_BYTES = 256 * 2**20  # global scratch cap for rows that do not fit in shared memory

# Bytes of work storage per row element: float64 accumulators and int32 arrays.
# L2: sum; KL: (sum a, sum b, s - w of a singleton) or (max s, sum s, max w, sum w)
_FWD_FLOATS = {"l2": 1, "kl": 4}
_FWD_INTS = 2                      # count at block starts, start at block ends


def _vjp_entry(regularization: str, staged: bool):
    """(float64, int32) work entries per row element of the VJP: the per-run factors (L2: block
    mean; KL: max s, factor s, max w, factor w) and each entry's run start, plus, when staged
    in shared memory, copies of g (and s, w for KL) and of the ids."""
    floats, ints = (1, 1) if regularization == "l2" else (4, 1)
    if staged:
        floats += 1 if regularization == "l2" else 3
        ints += 1
    return floats, ints


_KERNELS: dict = {}  # (op, dtype, regularization, shared?, block, capacity) -> kernel


# --- device helpers (no builtin min/max: Numba's CUDA target cannot compile their overloads) --

@cuda.jit(device=True)
def _fmin(a, b):
    """min as Numba's CPU builtin computes it: b only if b < a."""
    return b if b < a else a


@cuda.jit(device=True)
def _fmax(a, b):
    return b if b > a else a


@cuda.jit(device=True)
def _lse_merge(m1, s1, m2, s2):
    """Pools two log-sum-exp accumulators (max, sum of exp(x - max)); as `_cpu._lse_merge`."""
    if m1 >= m2:
        return m1, s1 + s2 * math.exp(m2 - m1)
    return m2, s2 + s1 * math.exp(m1 - m2)


@cuda.jit(device=True)
def _lse_add(m, z, x):
    """Adds exp(x) to the accumulator (m, z); (anything, 0) is the empty accumulator."""
    if z == 0.0:
        return x, 1.0
    if x > m:
        return x, z * math.exp(m - x) + 1.0
    return m, z + math.exp(x - m)


@cuda.jit(device=True)
def _lse_join(m1, z1, m2, z2):
    """(m1, z1) then (m2, z2), either possibly empty."""
    if z2 == 0.0:
        return m1, z1
    if z1 == 0.0:
        return m2, z2
    return _lse_merge(m1, z1, m2, z2)


# --- launch configuration -----------------------------------------------------------------

def _config(n: int, shared_entry: tuple, scan_floats: int):
    """Launch shape for rows of length n >= 1.

    Returns (block, log2 G, chunk C, rows per block R, shared?, capacity): G threads per row,
    chunk = ceil(n / G), capacity = the shared work entries per block (compile-time constant).
    """
    limits = ns.device_limits()
    max_threads, max_shared = limits.max_threads_per_block, limits.max_shared_memory_per_block
    block = 1
    while block * 2 <= min(BLOCK, max_threads):
        block *= 2
    bytes_per_entry = 8 * shared_entry[0] + 4 * shared_entry[1]  # (float64s, int32s)
    scan_bytes = block * (8 * scan_floats + 4)
    capacity = max(1, min(SHARED_BYTES, max_shared - scan_bytes) // bytes_per_entry)
    target = -(-n // max(1, CHUNK))
    g = 1
    while g < target and g < block:
        g *= 2
    r = block // g
    shared = n <= capacity
    if shared:  # fewer rows per block, more threads per row, until the rows fit
        while r > 1 and r * n > capacity:
            r //= 2
        g = block // r
    chunk = -(-n // g)
    return block, g.bit_length() - 1, chunk, r, shared, capacity


# --- forward kernel -------------------------------------------------------------------------

def _forward_body(kl: bool, out_type):
    """The per-row PAV of one group as a device function (see the module docstring)."""

    @cuda.jit(device=True)
    def lse_value(fa, p):
        # as _cpu.kl_value: (max s - max w) + (log z_s - log z_w)
        return (fa[0, p] - fa[2, p]) + (math.log(fa[1, p]) - math.log(fa[3, p]))

    @cuda.jit(device=True)
    def violates(fa, ia, base, p, q, linear, keys, row, use_keys):
        """Whether the block at p pools with its right neighbour at q, as `_cpu.pools`:
        value(p) < value(q), or equal values (KL linear: equal products of sums, two
        singletons by their exact values), unless
        `use_keys` and the keys over both blocks are tied (keys[row, p] == keys[row, last
        entry of q's block])."""
        if kl:
            if linear and ia[0, base + p] == 1 and ia[0, base + q] == 1:
                vl = fa[2, base + p]  # two singletons: their exact values s - w, as _cpu
                vr = fa[2, base + q]
            elif linear:
                vl = fa[0, base + p] * fa[1, base + q]
                vr = fa[0, base + q] * fa[1, base + p]
            else:
                vl = lse_value(fa, base + p)
                vr = lse_value(fa, base + q)
        else:
            vl = fa[0, base + p] / ia[0, base + p]
            vr = fa[0, base + q] / ia[0, base + q]
        if vl < vr:
            return True
        if vl == vr:
            if not use_keys:
                return True
            return keys[row, p] != keys[row, q + ia[0, base + q] - 1]
        return False

    @cuda.jit(device=True)
    def pool(fa, ia, base, p, q, linear):
        """The block at p absorbs its right neighbour at q (q's count becomes 0)."""
        ia[0, base + p] += ia[0, base + q]
        ia[0, base + q] = 0
        if kl and not linear:
            fa[0, base + p], fa[1, base + p] = _lse_merge(fa[0, base + p], fa[1, base + p],
                                                          fa[0, base + q], fa[1, base + q])
            fa[2, base + p], fa[3, base + p] = _lse_merge(fa[2, base + p], fa[3, base + p],
                                                          fa[2, base + q], fa[3, base + q])
        else:
            fa[0, base + p] += fa[0, base + q]
            if kl:
                fa[1, base + p] += fa[1, base + q]

    @cuda.jit(device=True)
    def pool_left(fa, ia, base, lo, top, linear, keys, row, use_keys):
        """Pools the block at `top` with the blocks below it while they pool; returns its
        start. Blocks below `lo` are out of reach (another thread's range)."""
        while top > lo:
            p = ia[1, base + top - 1]
            if not violates(fa, ia, base, p, top, linear, keys, row, use_keys):
                break
            pool(fa, ia, base, p, top, linear)
            top = p
        return top

    @cuda.jit(device=True)
    def block_value(fa, ia, base, a, smax, wmax, linear):
        """Value of the (final) block starting at a, as `_cpu` computes it, in float64."""
        c = ia[0, base + a]
        if kl:
            if c == 1:  # a singleton's value is s - w: no logs, no rounding
                if linear:
                    return fa[2, base + a]
                return fa[0, base + a] - fa[2, base + a]  # its untouched (s, 1, w, 1)
            if linear:
                return ((smax - wmax)
                        + (math.log(fa[0, base + a]) - math.log(fa[1, base + a])))
            return lse_value(fa, base + a)
        return fa[0, base + a] / c

    @cuda.jit(device=True)
    def body(s, w, sol, blk, row, wr, m, g, lane, tid, chunk, fa, ia, base, sh_f, sh_i, keys,
             use_keys):
        """PAV of row `row` (length m; 0 for an idle group) by the group's g threads; `keys`
        (rows, n) are read only when `use_keys`."""
        inf = math.inf
        linear = False
        smax = 0.0
        wmax = 0.0
        if kl:
            # 1. spread of the row: max/min of s and w (NaNs skipped, as the CPU's max/min do)
            smax, smin, wmax, wmin = -inf, inf, -inf, inf
            for i in range(lane, m, g):
                x = float(s[row, i])
                y = float(w[wr, i])
                smax, smin = _fmax(smax, x), _fmin(smin, x)
                wmax, wmin = _fmax(wmax, y), _fmin(wmin, y)
            sh_f[0, tid], sh_f[1, tid], sh_f[2, tid], sh_f[3, tid] = smax, smin, wmax, wmin
            cuda.syncthreads()
            half = g >> 1
            while half > 0:
                if lane < half:
                    sh_f[0, tid] = _fmax(sh_f[0, tid], sh_f[0, tid + half])
                    sh_f[1, tid] = _fmin(sh_f[1, tid], sh_f[1, tid + half])
                    sh_f[2, tid] = _fmax(sh_f[2, tid], sh_f[2, tid + half])
                    sh_f[3, tid] = _fmin(sh_f[3, tid], sh_f[3, tid + half])
                cuda.syncthreads()
                half >>= 1
            first = tid - lane
            smax, smin, wmax, wmin = sh_f[0, first], sh_f[1, first], sh_f[2, first], sh_f[3, first]
            linear = (smax - smin) + (wmax - wmin) < LINEAR_KL_SPREAD
            cuda.syncthreads()  # sh_f is reused below

        # 2. coalesced staging of each element's accumulator at its own position
        for i in range(lane, m, g):
            if kl:
                x = float(s[row, i])
                y = float(w[wr, i])
                if linear:
                    fa[0, base + i] = math.exp(x - smax)
                    fa[1, base + i] = math.exp(y - wmax)
                    fa[2, base + i] = x - y  # the value if i stays a singleton
                else:
                    fa[0, base + i] = x
                    fa[1, base + i] = 1.0
                    fa[2, base + i] = y
                    fa[3, base + i] = 1.0
            else:
                fa[0, base + i] = float(s[row, i]) - float(w[wr, i])
        cuda.syncthreads()

        # 3. PAV on the thread's chunk [lo, hi)
        lo = lane * chunk
        hi = lo + chunk
        if hi > m:
            hi = m
        for i in range(lo, hi):
            ia[0, base + i] = 1
            top = pool_left(fa, ia, base, lo, i, linear, keys, row, use_keys)
            ia[1, base + top + ia[0, base + top] - 1] = top
        cuda.syncthreads()

        # 4. tree merge: at level `step`, lane l (a multiple of 2 step) joins the ranges
        #    [l C, (l + step) C) and [(l + step) C, (l + 2 step) C), both already pooled.
        step = 1
        while step < g:
            if lane % (2 * step) == 0:
                mid = lo + step * chunk
                end = lo + 2 * step * chunk
                if end > m:
                    end = m
                if mid < end:
                    top = ia[1, base + mid - 1]  # top of the left stack
                    nxt = mid                     # bottom of the right stack
                    while nxt < end and violates(fa, ia, base, top, nxt, linear, keys, row,
                                                 use_keys):
                        after = nxt + ia[0, base + nxt]
                        pool(fa, ia, base, top, nxt, linear)
                        nxt = after
                        top = pool_left(fa, ia, base, lo, top, linear, keys, row, use_keys)
                    ia[1, base + top + ia[0, base + top] - 1] = top
            cuda.syncthreads()
            step *= 2

        # 5. block values of the blocks starting in the chunk (stored at their start), their
        #    number and minimum; a group scan of (count, min) over the lanes.
        count = 0
        low = inf
        for i in range(lo, hi):
            if ia[0, base + i] > 0:
                v = block_value(fa, ia, base, i, smax, wmax, linear)
                fa[0, base + i] = v
                count += 1
                low = _fmin(low, v)
        sh_i[0, tid] = count
        sh_f[0, tid] = low
        cuda.syncthreads()
        off = 1
        while off < g:
            left_count = 0
            left_low = inf
            if lane >= off:
                left_count = sh_i[0, tid - off]
                left_low = sh_f[0, tid - off]
            cuda.syncthreads()
            if lane >= off:
                count += left_count
                low = _fmin(left_low, low)
                sh_i[0, tid] = count
                sh_f[0, tid] = low
            cuda.syncthreads()
            off *= 2
        blocks = 0
        running = inf
        if lane > 0:
            blocks = sh_i[0, tid - 1]
            running = sh_f[0, tid - 1]
        # the solution is the running min of block values (the clamp of _cpu._fill_blocks),
        # the block id the number of block starts so far minus one; written in place.
        for i in range(lo, hi):
            if ia[0, base + i] > 0:
                running = _fmin(running, fa[0, base + i])
                blocks += 1
            fa[0, base + i] = running
            ia[1, base + i] = blocks - 1
        cuda.syncthreads()

        # 6. coalesced copy-out
        for i in range(lane, m, g):
            sol[row, i] = out_type(fa[0, base + i])
            blk[row, i] = ia[1, base + i]

    return body


def _forward_kernel(dtype: str, regularization: str, shared: bool, block: int, capacity: int):
    key = ("fwd", dtype, regularization, shared, block, capacity)
    kernel = _KERNELS.get(key)
    if kernel is not None:
        return kernel
    kl = regularization == "kl"
    body = _forward_body(kl, numba.float32 if dtype == "float32" else numba.float64)
    floats = _FWD_FLOATS[regularization]
    scan_floats = 4 if kl else 1

    if shared:
        @cuda.jit
        def kernel(s, w, sol, blk, rows, n, log_g, chunk, w_shared, fa_g, ia_g, keys,
                   use_keys):
            tid = cuda.threadIdx.x
            g = 1 << log_g
            lane = tid & (g - 1)
            group = tid >> log_g
            row = cuda.blockIdx.x * (block >> log_g) + group
            m = n if row < rows else 0
            wr = 0 if w_shared else row
            sh_f = cuda.shared.array((scan_floats, block), numba.float64)
            sh_i = cuda.shared.array((1, block), numba.int32)
            fa = cuda.shared.array((floats, capacity), numba.float64)
            ia = cuda.shared.array((_FWD_INTS, capacity), numba.int32)
            body(s, w, sol, blk, row, wr, m, g, lane, tid, chunk, fa, ia, group * n, sh_f, sh_i,
                 keys, use_keys)
    else:
        @cuda.jit
        def kernel(s, w, sol, blk, rows, n, log_g, chunk, w_shared, fa_g, ia_g, keys,
                   use_keys):
            tid = cuda.threadIdx.x
            g = 1 << log_g
            lane = tid & (g - 1)
            group = tid >> log_g
            per_block = block >> log_g
            sh_f = cuda.shared.array((scan_floats, block), numba.float64)
            sh_i = cuda.shared.array((1, block), numba.int32)
            base = (cuda.blockIdx.x * per_block + group) * n  # this group's scratch slot
            first = cuda.blockIdx.x * per_block
            while first < rows:  # block-uniform: grid-stride over row groups
                row = first + group
                m = n if row < rows else 0
                wr = 0 if w_shared else row
                body(s, w, sol, blk, row, wr, m, g, lane, tid, chunk, fa_g, ia_g, base, sh_f,
                     sh_i, keys, use_keys)
                cuda.syncthreads()  # the slot and the scan arrays are reused
                first += cuda.gridDim.x * per_block

    _KERNELS[key] = kernel
    return kernel


# --- VJP kernel -----------------------------------------------------------------------------

def _vjp_body(kl: bool, staged: bool, out_type):
    """The per-row VJP of one group as a device function (see the module docstring).

    Work arrays: fa[0] (L2: block mean) or fa[0:4] (KL: max s, sum g / z_s, max w,
    sum g / z_w), written at each run's start; ia[0, i] = start of i's run. `staged` (shared
    memory): the row's g (and s, w for KL) and ids are first copied in coalesced, to
    fa[4 if kl else 1:] and ia[1], and the chunk walks read them there.
    """
    t = 4 if kl else 1  # first staged float row

    @cuda.jit(device=True)
    def g_at(gr, row, fa, base, i):
        if staged:
            return fa[t, base + i]
        return float(gr[row, i])

    @cuda.jit(device=True)
    def s_at(s, row, fa, base, i):
        if staged:
            return fa[t + 1, base + i]
        return float(s[row, i])

    @cuda.jit(device=True)
    def w_at(w, wr, fa, base, i):
        if staged:
            return fa[t + 2, base + i]
        return float(w[wr, i])

    @cuda.jit(device=True)
    def id_at(bid, row, ia, base, i):
        if staged:
            return ia[1, base + i]
        return bid[row, i]

    @cuda.jit(device=True)
    def body(gr, s, w, bid, grad_s, grad_w, row, wr, m, g, lane, tid, chunk, fa, ia, base,
             sh_f, sh_i):
        inf = math.inf
        if staged:  # coalesced copy-in
            for i in range(lane, m, g):
                fa[t, base + i] = float(gr[row, i])
                if kl:
                    fa[t + 1, base + i] = float(s[row, i])
                    fa[t + 2, base + i] = float(w[wr, i])
                ia[1, base + i] = bid[row, i]
            cuda.syncthreads()
        lo = lane * chunk
        hi = lo + chunk
        if hi > m:
            hi = m
        # 1. the chunk's trailing run segment: (its start or -1, sum g, lse(s), lse(w))
        last = -1
        total = 0.0
        ms, zs, mw, zw = -inf, 0.0, -inf, 0.0
        before = 0  # the id left of the chunk (unused for lo == 0)
        if lo > 0 and lo < m:
            before = id_at(bid, row, ia, base, lo - 1)
        previous = before
        for i in range(lo, hi):
            current = id_at(bid, row, ia, base, i)
            if i == 0 or current != previous:
                last = i
                total = 0.0
                ms, zs, mw, zw = -inf, 0.0, -inf, 0.0
            previous = current
            total += g_at(gr, row, fa, base, i)
            if kl:
                ms, zs = _lse_add(ms, zs, s_at(s, row, fa, base, i))
                mw, zw = _lse_add(mw, zw, w_at(w, wr, fa, base, i))
        # 2. segmented inclusive scan over the lanes: a range that holds a run start keeps
        #    its own sums, else it continues the sums of the range on its left.
        sh_i[0, tid] = last
        sh_f[0, tid] = total
        if kl:
            sh_f[1, tid], sh_f[2, tid], sh_f[3, tid], sh_f[4, tid] = ms, zs, mw, zw
        cuda.syncthreads()
        off = 1
        while off < g:
            left_last = -1
            left_total = 0.0
            lms, lzs, lmw, lzw = -inf, 0.0, -inf, 0.0
            if lane >= off:
                left_last = sh_i[0, tid - off]
                left_total = sh_f[0, tid - off]
                if kl:
                    lms, lzs = sh_f[1, tid - off], sh_f[2, tid - off]
                    lmw, lzw = sh_f[3, tid - off], sh_f[4, tid - off]
            cuda.syncthreads()
            if lane >= off and last < 0:
                last = left_last
                total = left_total + total
                if kl:
                    ms, zs = _lse_join(lms, lzs, ms, zs)
                    mw, zw = _lse_join(lmw, lzw, mw, zw)
                sh_i[0, tid] = last
                sh_f[0, tid] = total
                if kl:
                    sh_f[1, tid], sh_f[2, tid], sh_f[3, tid], sh_f[4, tid] = ms, zs, mw, zw
            cuda.syncthreads()
            off *= 2
        # 3. walk the chunk again from the carried partial run (lane - 1's inclusive state);
        #    the thread holding a run's last entry writes the run's factors at the run's start.
        start = -1
        total = 0.0
        ms, zs, mw, zw = -inf, 0.0, -inf, 0.0
        if lane > 0:
            start = sh_i[0, tid - 1]
            total = sh_f[0, tid - 1]
            if kl:
                ms, zs = sh_f[1, tid - 1], sh_f[2, tid - 1]
                mw, zw = sh_f[3, tid - 1], sh_f[4, tid - 1]
        previous = before
        current = 0
        if lo < m:
            current = id_at(bid, row, ia, base, lo)
        for i in range(lo, hi):
            if i == 0 or current != previous:
                start = i
                total = 0.0
                ms, zs, mw, zw = -inf, 0.0, -inf, 0.0
            total += g_at(gr, row, fa, base, i)
            if kl:
                ms, zs = _lse_add(ms, zs, s_at(s, row, fa, base, i))
                mw, zw = _lse_add(mw, zw, w_at(w, wr, fa, base, i))
            ia[0, base + i] = start
            previous = current
            if i + 1 < m:
                current = id_at(bid, row, ia, base, i + 1)
            if i + 1 == m or current != previous:  # i ends its run
                if kl:  # softmax(x_B) * sum_B(g) = exp(x - max) * (sum_B(g) / z)
                    fa[0, base + start] = ms
                    fa[1, base + start] = total / zs
                    fa[2, base + start] = mw
                    fa[3, base + start] = total / zw
                else:
                    fa[0, base + start] = total / (i - start + 1)
        cuda.syncthreads()
        # 4. coalesced output
        for i in range(lane, m, g):
            a = base + ia[0, base + i]
            if kl:
                # as _cpu.block_softmax_row: exp rounded to the output dtype, then scaled
                es = out_type(math.exp(s_at(s, row, fa, base, i) - fa[0, a]))
                ew = out_type(math.exp(w_at(w, wr, fa, base, i) - fa[2, a]))
                grad_s[row, i] = out_type(es * fa[1, a])
                grad_w[row, i] = -out_type(ew * fa[3, a])
            else:
                v = out_type(fa[0, a])
                grad_s[row, i] = v
                grad_w[row, i] = -v

    return body


def _vjp_kernel(dtype: str, regularization: str, shared: bool, block: int, capacity: int):
    key = ("vjp", dtype, regularization, shared, block, capacity)
    kernel = _KERNELS.get(key)
    if kernel is not None:
        return kernel
    kl = regularization == "kl"
    body = _vjp_body(kl, shared, numba.float32 if dtype == "float32" else numba.float64)
    floats, ints = _vjp_entry(regularization, shared)
    scan_floats = 5 if kl else 1

    if shared:
        @cuda.jit
        def kernel(gr, s, w, bid, grad_s, grad_w, rows, n, log_g, chunk, w_shared, fa_g, ia_g):
            tid = cuda.threadIdx.x
            g = 1 << log_g
            lane = tid & (g - 1)
            group = tid >> log_g
            row = cuda.blockIdx.x * (block >> log_g) + group
            m = n if row < rows else 0
            wr = 0 if w_shared else row
            sh_f = cuda.shared.array((scan_floats, block), numba.float64)
            sh_i = cuda.shared.array((1, block), numba.int32)
            fa = cuda.shared.array((floats, capacity), numba.float64)
            ia = cuda.shared.array((ints, capacity), numba.int32)
            body(gr, s, w, bid, grad_s, grad_w, row, wr, m, g, lane, tid, chunk, fa, ia,
                 group * n, sh_f, sh_i)
    else:
        @cuda.jit
        def kernel(gr, s, w, bid, grad_s, grad_w, rows, n, log_g, chunk, w_shared, fa_g, ia_g):
            tid = cuda.threadIdx.x
            g = 1 << log_g
            lane = tid & (g - 1)
            group = tid >> log_g
            per_block = block >> log_g
            sh_f = cuda.shared.array((scan_floats, block), numba.float64)
            sh_i = cuda.shared.array((1, block), numba.int32)
            base = (cuda.blockIdx.x * per_block + group) * n  # this group's scratch slot
            first = cuda.blockIdx.x * per_block
            while first < rows:  # block-uniform: grid-stride over row groups
                row = first + group
                m = n if row < rows else 0
                wr = 0 if w_shared else row
                body(gr, s, w, bid, grad_s, grad_w, row, wr, m, g, lane, tid, chunk, fa_g,
                     ia_g, base, sh_f, sh_i)
                cuda.syncthreads()  # the slot and the scan arrays are reused
                first += cuda.gridDim.x * per_block

    _KERNELS[key] = kernel
    return kernel


def _grid_and_scratch(shared: bool, entry: tuple, rows: int, n: int, r: int, kind: str,
                      stream):
    """Blocks to launch and the global work arrays ((float64 rows, slots n), (int32 rows,
    slots n); 1-entry placeholders when the work arrays live in shared memory).

    Shared memory: one block per R rows. Global scratch: one slot of n entries per group of a
    resident block, so the grid is capped by `SCRATCH_BYTES` and blocks stride over the rows.
    No initialisation: every entry a kernel reads was written by it first.
    """
    blocks = -(-rows // r)
    if shared:
        size = 1
    else:
        per_block = r * n * (8 * entry[0] + 4 * entry[1])
        blocks = max(1, min(blocks, SCRATCH_BYTES // per_block))
        size = blocks * r * n
    return blocks, (ns.empty((entry[0], size), np.float64, kind, stream),
                    ns.empty((entry[1], size), np.int32, kind, stream))


# --- the backend interface -----------------------------------------------------------------

def _outputs(out, shape, dtypes, kind, stream):
    """(Numba arrays to write, the pair to return): `out` as given, or new arrays of the
    input's kind."""
    if out is not None:
        return ns.out_views(out), tuple(out)
    new = tuple(ns.empty(shape, dtype, kind, stream) for dtype in dtypes)
    return new, tuple(ns.like_input(a, kind) for a in new)


def isotonic_rows(s, w, regularization: str, *, out=None, stream=None, keys=None):
    """Decreasing isotonic regression of each row, as `_cpu.isotonic_rows`.

    s: C-contiguous (rows, n) float32/float64 device array; w: s's dtype, (rows, n) or (1, n)
    shared by every row; regularization "l2" or "kl". Returns (solution of s's dtype, int32
    block ids numbering the pooled runs 0, 1, ... from the left): the arrays given in `out`
    (written directly by the kernel) or new device arrays of s's kind, computed on `stream`
    without synchronising. `keys` (the soft ops only): (rows, n) sorted input values of s's
    dtype; equal neighbouring blocks whose keys are all tied then stay apart (`_cpu.pools`).
    None: every equality pools.
    """
    s_dev, kind = ns.as_device(s)
    w_dev, _ = ns.as_device(w)
    keys_dev = s_dev if keys is None else ns.as_device(keys)[0]
    if keys is not None and (tuple(keys_dev.shape) != tuple(s_dev.shape)
                             or keys_dev.dtype != s_dev.dtype):
        raise ValueError(f"keys must have the shape and dtype of s {tuple(s_dev.shape)} "
                         f"{s_dev.dtype}, got {tuple(keys_dev.shape)} {keys_dev.dtype}")
    rows, n = (int(d) for d in s_dev.shape)
    dtype = np.dtype(s_dev.dtype)
    stream = ns.resolve_stream(stream, s)
    (sol, blk), result = _outputs(out, (rows, n), (dtype, np.int32), kind, stream)
    if rows and n:
        floats = _FWD_FLOATS[regularization]
        scan_floats = 4 if regularization == "kl" else 1
        block, log_g, chunk, r, shared, capacity = _config(n, (floats, _FWD_INTS), scan_floats)
        kernel = _forward_kernel(dtype.name, regularization, shared, block, capacity)
        grid, (fa, ia) = _grid_and_scratch(shared, (floats, _FWD_INTS), rows, n, r, kind,
                                           stream)
        kernel[grid, block, stream](s_dev, w_dev, sol, blk, rows, n, log_g, chunk,
                                    int(w_dev.shape[0]) == 1, fa, ia, keys_dev,
                                    keys is not None)
    return result


def isotonic_vjp_rows(g, s, w, block_ids, regularization: str, *, out=None, stream=None):
    """VJP of `isotonic_rows`, as `_cpu.isotonic_vjp_rows`: (grad_s, grad_w), both (rows, n)
    of g's dtype (the arrays given in `out`, written directly, or new ones). Blocks are the
    maximal runs of equal `block_ids` (s and w are read for KL only)."""
    g_dev, kind = ns.as_device(g)
    s_dev, _ = ns.as_device(s)
    w_dev, _ = ns.as_device(w)
    b_dev, _ = ns.as_device(block_ids)
    rows, n = (int(d) for d in g_dev.shape)
    dtype = np.dtype(g_dev.dtype)
    stream = ns.resolve_stream(stream, g)
    (grad_s, grad_w), result = _outputs(out, (rows, n), (dtype, dtype), kind, stream)
    if rows and n:
        scan_floats = 5 if regularization == "kl" else 1
        block, log_g, chunk, r, shared, capacity = _config(
            n, _vjp_entry(regularization, True), scan_floats)
        kernel = _vjp_kernel(dtype.name, regularization, shared, block, capacity)
        grid, (fa, ia) = _grid_and_scratch(shared, _vjp_entry(regularization, shared), rows, n,
                                           r, kind, stream)
        kernel[grid, block, stream](g_dev, s_dev, w_dev, b_dev, grad_s, grad_w, rows, n, log_g,
                                    chunk, int(w_dev.shape[0]) == 1, fa, ia)
    return result
