"""Numba CUDA top-k: radix select of the k-th key in shared memory, then a sort of the k survivors.

Contract (the row-function protocol of `sortgrad.kernels._backends`; called by
`sortgrad.kernels.top_k` after validation):
`top_k_rows(x, k, *, out=None, stream=None) -> (values, indices)`: x a C-contiguous 2-D device
array (rows, n), 0 <= k <= n; values (rows, k) of x's dtype with exact bits, indices int32; largest
first in IEEE totalOrder (-NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN), equal entries
lowest index first -- bit-identical to the CPU backend and `jax.lax.top_k`. Outputs are written
into `out` when given (returned as given), else new arrays of the input's kind; all work is
queued on `stream` without synchronising.

Algorithm (k <= TOPK_MAX_K; no sort of the row)
Keys are totalOrder keys complemented (`key_function(dtype, "total", descending=True)`), so the
best entries have the smallest keys and ties go to the lower position.
1. One block per row (or per chunk of a row, below). Rows of at most TOPK_CACHE_BYTES of keys
   are loaded once into shared memory; longer rows recompute keys from global memory per pass.
2. Radix select, 8 bits per pass from the top of the key: a shared-memory histogram of the
   digit over the elements matching the prefix found so far (shared atomics), a block scan of
   the 256 counts to find the digit holding the k-th smallest key. After width/8 passes the
   prefix is the k-th key K itself and `take` counts how many entries equal to K belong to the
   top k (the rest of the top k are the keys < K).
3. Collection in position order: chunks of blockDim entries, a block-wide exclusive scan of
   the (key < K, key == K) flags (packed in one int64) gives each survivor its slot; the first
   `take` entries equal to K are the lowest positions, as the order requires. The scan stops
   once all k are found.
4. The k survivors (key, position) are sorted in shared memory with the bitonic network
   (padded to a power of two with sentinels) and written out.
Long rows with few rows to spread over the device (rows < 2 x SMs, n >= 2 TOPK_SPLIT_CHUNK) are
split into chunks of at least k entries: stage 1 takes the top k of every chunk with the same
kernel, stage 2 the top k of each row's chunk winners (their original indices ride along; equal
keys of different chunks appear in chunk order, i.e. index order, so ties stay exact).
k > TOPK_MAX_K falls back to the full segmented sort in totalOrder, descending, writing only
the first k columns.

Launch mapping: one block of TOPK_THREADS threads per row (or chunk); grid = rows (x chunks).
Constants are read at each call (tests lower them); kernels are compiled per dtype and cached.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import cuda

from .._cuda import numba_support as ns
from ..segmented_sort import _numba_cuda as _sort

DTYPES = _sort.DTYPES

TOPK_THREADS = 256           # threads per block (multiple of 32)
TOPK_MAX_K = 1024            # largest k served by the radix select (power of two)
TOPK_CACHE_BYTES = 16384     # shared memory for caching a row's keys
TOPK_SPLIT_CHUNK = 16384     # chunk length when long rows are split over several blocks

_RADIX_BITS = 8
_BINS = 1 << _RADIX_BITS


def _config():
    threads, max_k = int(TOPK_THREADS), int(TOPK_MAX_K)
    if threads % 32 or threads > 1024:
        raise ValueError("TOPK_THREADS must be a multiple of 32, at most 1024")
    if max_k < 2 or max_k & (max_k - 1):
        raise ValueError("TOPK_MAX_K must be a power of two >= 2")
    return threads, max_k, int(TOPK_CACHE_BYTES), int(TOPK_SPLIT_CHUNK)


@functools.lru_cache(maxsize=None)
def _select_kernel(dtype_name: str, threads: int, max_k: int, cache_bytes: int):
    """Top k of each segment s of a launch: row r = s // segs_per_row, chunk
    c = s % segs_per_row covering positions [c*chunk_len, min(n, (c+1)*chunk_len)) of the row;
    writes out_bits/out_idx[s*k + t], t < k. Indices: idx_in[...] when has_idx, else the
    column. Requires k <= max_k and every segment at least k long."""
    key = ns.key_function(dtype_name, "total", True)
    storage = ns.key_storage_dtype(dtype_name)
    key_t = numba.from_dtype(storage)
    sentinel = ns.KEY_SENTINEL[storage]
    width = np.dtype(dtype_name).itemsize * 8
    cache_len = max(1, cache_bytes // storage.itemsize)
    bins_per_thread = -(-_BINS // threads)
    digit_mask = np.uint64(_BINS - 1)
    low32 = np.int64(0xFFFFFFFF)
    int32_max = np.int32(0x7FFFFFFF)

    @cuda.jit
    def kernel(bits, idx_in, has_idx, row_n, chunk_len, segs_per_row, k, out_bits, out_idx):
        cache = cuda.shared.array(cache_len, key_t)
        cand_keys = cuda.shared.array(max_k, key_t)
        cand_pos = cuda.shared.array(max_k, numba.int32)
        hist = cuda.shared.array(_BINS, numba.int32)
        chosen = cuda.shared.array(2, numba.int64)
        scratch = cuda.shared.array(threads, numba.int64)
        warp_totals = cuda.shared.array(32, numba.int64)
        tid = cuda.threadIdx.x
        s = np.int64(cuda.blockIdx.x)
        r = s // segs_per_row
        lo = (s - r * segs_per_row) * chunk_len
        length = row_n - lo
        if length > chunk_len:
            length = chunk_len
        seg_start = r * row_n + lo
        cached = length <= cache_len
        if cached:
            for j in range(tid, length, threads):
                cache[j] = key(bits[seg_start + j])
        cuda.syncthreads()

        # 2. Radix select of the k-th smallest key, most significant digit first.
        prefix = np.uint64(0)
        mask = np.uint64(0)
        take = np.int64(k)
        shift = width - _RADIX_BITS
        while shift >= 0:
            for b in range(tid, _BINS, threads):
                hist[b] = 0
            cuda.syncthreads()
            for j in range(tid, length, threads):
                if cached:
                    kj = np.uint64(cache[j])
                else:
                    kj = key(bits[seg_start + j])
                if (kj & mask) == prefix:
                    cuda.atomic.add(hist, np.int64((kj >> np.uint64(shift)) & digit_mask), 1)
            cuda.syncthreads()
            first_bin = tid * bins_per_thread
            local = np.int64(0)
            for b in range(first_bin, first_bin + bins_per_thread):
                if b < _BINS:
                    local += hist[b]
            before, total = ns.block_exclusive_sum(local, tid, threads, scratch, warp_totals)
            if before < take and take <= before + local:
                acc = before
                for b in range(first_bin, first_bin + bins_per_thread):
                    if b < _BINS:
                        if acc < take and take <= acc + hist[b]:
                            chosen[0] = b
                            chosen[1] = take - acc
                        acc += hist[b]
            cuda.syncthreads()
            digit = np.uint64(chosen[0])
            take = chosen[1]
            prefix |= digit << np.uint64(shift)
            mask |= digit_mask << np.uint64(shift)
            shift -= _RADIX_BITS
            cuda.syncthreads()
        threshold = prefix
        num_less = k - take

        # 3. Collect the survivors in position order.
        found_less = np.int64(0)
        found_equal = np.int64(0)
        base = np.int64(0)
        while base < length:
            j = base + tid
            flags = np.int64(0)
            kj = np.uint64(sentinel)
            if j < length:
                if cached:
                    kj = np.uint64(cache[j])
                else:
                    kj = key(bits[seg_start + j])
                if kj < threshold:
                    flags = np.int64(1)
                elif kj == threshold:
                    flags = np.int64(1) << np.int64(32)
            before, total = ns.block_exclusive_sum(flags, tid, threads, scratch, warp_totals)
            if flags == 1:
                slot = found_less + (before & low32)
                cand_keys[slot] = kj
                cand_pos[slot] = j
            elif flags != 0:
                q = found_equal + (before >> np.int64(32))
                if q < take:
                    cand_keys[num_less + q] = kj
                    cand_pos[num_less + q] = j
            found_less += total & low32
            found_equal += total >> np.int64(32)
            base += threads
            if found_less >= num_less and found_equal >= take:
                break

        # 4. Sort the k survivors (padded to a power of two) and write them out.
        padded = 1
        while padded < k:
            padded *= 2
        for t in range(k + tid, padded, threads):
            cand_keys[t] = sentinel
            cand_pos[t] = int32_max
        cuda.syncthreads()
        ns.bitonic_sort_slots(cand_keys, cand_pos, padded, padded, tid, threads)
        for t in range(tid, k, threads):
            src = seg_start + cand_pos[t]
            out_bits[s * k + t] = bits[src]
            if has_idx:
                out_idx[s * k + t] = idx_in[src]
            else:
                out_idx[s * k + t] = lo + cand_pos[t]

    return kernel


def _chunks(rows: int, n: int, k: int, split_chunk: int, sm_count: int) -> int:
    """Chunks per row: 1 unless there are few rows and each is long; every chunk >= k long."""
    if rows >= 2 * sm_count or n < 2 * split_chunk:
        return 1
    chunks = min(-(-n // split_chunk), -(-2 * sm_count // rows), n // max(k, 1))
    while chunks > 1:
        chunk_len = -(-n // chunks)
        if n - (chunks - 1) * chunk_len >= k:
            break
        chunks -= 1
    return max(chunks, 1)


def top_k_rows(x, k, *, out=None, stream=None):
    """(values, int32 indices) of the k largest entries of each row, largest first. `out`:
    (values, indices) to write (returned); the kernels write them directly (split rows go
    through candidate scratch buffers first)."""
    a, kind = ns.as_device(x)
    stream_ = ns.resolve_stream(stream, x)
    rows, n = (int(d) for d in a.shape)
    k = int(k)
    if out is None:
        values = ns.empty((rows, k), a.dtype, kind, stream_)
        indices = ns.empty((rows, k), np.int32, kind, stream_)
        result = ns.like_input(values, kind), ns.like_input(indices, kind)
    else:
        (values, indices), result = ns.out_views(out), tuple(out)
    if rows == 0 or k == 0:
        return result
    threads, max_k, cache_bytes, split_chunk = _config()
    bits = ns.bits_view(ns.flat(a))
    vals_bits, idx_flat = ns.bits_view(ns.flat(values)), ns.flat(indices)
    if k > max_k:
        _sort.sort_engine(bits, a.dtype, "total", True, stream_, vals_out=vals_bits,
                          perm_out=idx_flat, row_n=n, num_rows=rows, out_stride=k, out_limit=k,
                          kind=kind)
        return result
    kernel = _select_kernel(np.dtype(a.dtype).name, threads, max_k, cache_bytes)
    no_idx = ns.placeholder(np.int32)
    limits = ns.device_limits()
    chunks = _chunks(rows, n, k, split_chunk, limits.multiprocessor_count)
    if chunks == 1:
        kernel[rows, threads, stream_](bits, no_idx, False, n, n, 1, k, vals_bits, idx_flat)
    else:
        chunk_len = -(-n // chunks)
        cand_bits = ns.empty(rows * chunks * k, vals_bits.dtype, kind, stream_)
        cand_idx = ns.empty(rows * chunks * k, np.int32, kind, stream_)
        kernel[rows * chunks, threads, stream_](bits, no_idx, False, n, chunk_len, chunks, k,
                                                cand_bits, cand_idx)
        m = chunks * k
        kernel[rows, threads, stream_](cand_bits, cand_idx, True, m, m, 1, k, vals_bits,
                                       idx_flat)
    return result


def ptx_cases(dtypes=("float16", "float32", "float64", "int64")):
    """(dispatcher, signature) pairs for `numba_support.compile_ptx_cases`."""
    from numba import types
    threads, max_k, cache_bytes, _ = _config()
    i64, i32a = types.int64, types.int32[::1]
    cases = []
    for name in dtypes:
        bits_t = numba.from_dtype(ns.uint_dtype(name))[::1]
        cases.append((_select_kernel(name, threads, max_k, cache_bytes),
                      (bits_t, i32a, types.boolean, i64, i64, i64, i64, bits_t, i32a)))
    return cases
