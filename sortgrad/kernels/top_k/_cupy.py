"""CuPy backend of top-k: the CUDA C kernels of top_k.cu (and segmented_sort.cu).

Contract: as `_cpu.top_k_rows` -- the k largest entries of each row in IEEE totalOrder, largest
first, ties to the lower index, values bit-exact, int32 indices -- on a C-contiguous (rows, n)
CuPy array, launched on `stream` (None: the current stream), without synchronising; results
written into `out` when given.

Launch mapping (256-thread blocks):
- n <= 256, or n <= 2048 with k > 32: the segmented-sort kernel sorts whole rows in one block
  (several rows per block) and writes only the first k entries;
- k <= 32: `sg_topk_filter`, warp-level filtering; one block per row, or, when there are fewer
  rows than ~4 blocks per multiprocessor, `chunks` blocks per row that write k candidates each,
  reduced by a second launch of the same kernel;
- 32 < k <= 2048: `sg_topk_radix`, radix select, ordered collection, sort of the k survivors;
  one block per row, or chunks and a reduction as for the filter;
- k > 2048: the segmented sort (tiles + merge passes), only the first k entries written.
"""

from __future__ import annotations

import numpy as np

from .._cuda import cupy_loader as _loader
from ..segmented_sort import _cupy as _sort

PACKAGE = "sortgrad.kernels.top_k"
SOURCE = "top_k.cu"

CUDA_SOURCES = {
    SOURCE: tuple(f"sg_topk_{kernel}<{c}>" for kernel in ("filter", "radix")
                  for c in _loader.C_BITS.values()),
}

DTYPES = _sort.DTYPES

THREADS = 256
FILTER_MAX_K = 32
RADIX_MAX_K = 2048
REGISTER_ROW = 256  # rows sorted in registers and shuffles alone
BLOCK_ROW = _sort.TILE_ITEMS  # rows sorted by one block
MIN_CHUNK = 8192  # elements per block when a row is split (>= RADIX_MAX_K)


def _launch(kernel: str, itemsize: int, grid: int, args) -> None:
    _loader.launch(PACKAGE, SOURCE, f"sg_topk_{kernel}<{_loader.C_BITS[itemsize]}>", grid,
                   THREADS, args)


def _select(kernel: str, xb, vb, indices, k: int, kind: int) -> None:
    """`sg_topk_filter` or `sg_topk_radix` over rows of xb (rows, n). One block per row, or,
    with fewer rows than ~4 blocks per multiprocessor, `chunks` blocks per row (at least
    MIN_CHUNK >= k elements each, all but the last full, starts 16-byte aligned) that write k
    sorted candidate items each, reduced by a second launch of the same kernel on them."""
    xp = _loader.xp()
    rows, n = xb.shape
    itemsize = xb.dtype.itemsize
    target_blocks = 4 * _loader.multiprocessor_count()
    chunks = 1
    if rows < target_blocks:
        chunks = max(1, min(-(-target_blocks // rows), n // MIN_CHUNK))
    chunk_len = -(-n // chunks)
    chunk_len = -(-chunk_len // 16) * 16  # chunks start 16-byte aligned (vector loads)
    chunks = -(-n // chunk_len)  # every chunk non-empty
    unused = indices  # pointer parameters that are not read in this mode
    if chunks == 1:
        _launch(kernel, itemsize, rows,
                (xb, np.int64(n), unused, np.int32(0), np.int64(n), np.int32(1),
                 np.int64(chunk_len), np.int32(k), np.int32(kind), unused, np.int32(0), vb,
                 indices))
        return
    words = rows * chunks * k * (1 if itemsize <= 4 else 2)
    candidates = xp.empty(words, dtype=np.uint64)
    _launch(kernel, itemsize, rows * chunks,
            (xb, np.int64(n), unused, np.int32(0), np.int64(n), np.int32(chunks),
             np.int64(chunk_len), np.int32(k), np.int32(kind), candidates, np.int32(1), vb,
             indices))
    n_in = chunks * k
    _launch(kernel, itemsize, rows,
            (xb, np.int64(n), candidates, np.int32(1), np.int64(n_in), np.int32(1),
             np.int64(n_in), np.int32(k), np.int32(kind), candidates, np.int32(0), vb, indices))


def top_k_rows(x, k: int, *, out=None, stream=None):
    """(values, int32 indices), both (rows, k), of a C-contiguous (rows, n) CuPy array. `out`:
    (values, indices) to write (returned); the kernels write them directly (the candidates of
    split rows go through a scratch buffer)."""
    xp = _loader.xp()
    rows, n = x.shape
    with _loader.stream_scope(stream, like=x):
        if out is None:
            out = (xp.empty((rows, k), dtype=x.dtype), xp.empty((rows, k), dtype=np.int32))
        values, indices = out
        if rows == 0 or k == 0:
            return values, indices
        kind = _sort.kind_of(x.dtype)
        if n <= REGISTER_ROW or (n <= BLOCK_ROW and k > FILTER_MAX_K) or k > RADIX_MAX_K:
            _sort.sort_rows_into(x, values, indices, _sort.MODE_TOPK, k)
            return values, indices
        for r0, r1 in _loader.row_batches(rows):
            xb, vb, ib = _loader.bits(x[r0:r1]), _loader.bits(values[r0:r1]), indices[r0:r1]
            _select("filter" if k <= FILTER_MAX_K else "radix", xb, vb, ib, k, kind)
    return values, indices
