"""CuPy backend of segmented sort: the CUDA C kernels of segmented_sort.cu.

Contract: as `_cpu.sort_rows` / `_cpu.sort_segments` (stable, the order of `jnp.sort`, values
bit-exact, int32 permutation; `sort_rows(..., reverse=True)`: each sorted row read backwards,
`jnp.sort(descending=True)` for descending=False), on C-contiguous CuPy arrays, launched on
`stream` (None: the current stream), results written into `out` when given (else allocated on
that stream). No synchronisation: the host reads only shapes and the (host) CSR offsets.

reverse=True costs no extra pass: the kernels sort by the key of the opposite direction with
the columns counted from the row's end (n - 1 - col) and map the columns back when writing, so
equal keys come out in decreasing column order (see segmented_sort.cu).

Launch mapping (TILE = 2048 items = 256 threads x 8 items; see segmented_sort.cu):
- rows of n <= 2048: `sg_sort_small`, 2048 / tile rows per block, tile = max(8, 2^ceil(log2 n));
- rows of n > 2048: `sg_sort_tiles` (one block per 2048-tile) and ceil(log2(tiles)) passes of
  `sg_merge_pass` (one block per 2048 outputs), through two item scratch buffers;
- ragged segments: binned on the host by length -- one `sg_sort_small` launch per tile size,
  one tiles + merge sequence per merge-pass count -- with the segment ids uploaded once.
This module also serves top-k (mode MODE_TOPK, only the first `out_cols` entries written).
"""

from __future__ import annotations

import numpy as np

from .._cuda import cupy_loader as _loader

PACKAGE = "sortgrad.kernels.segmented_sort"
SOURCE = "segmented_sort.cu"

C_BITS, bits, row_batches = _loader.C_BITS, _loader.bits, _loader.row_batches

CUDA_SOURCES = {
    SOURCE: tuple(f"sg_{kernel}<{c}>" for kernel in ("sort_small", "sort_tiles", "merge_pass")
                  for c in C_BITS.values()),
}

DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "float16", "int32", "uint32", "float32",
          "int64", "uint64", "float64")

# key modes and dtype kinds, as in sortgrad_common.cuh
MODE_SORT_ASC, MODE_SORT_DESC, MODE_TOPK = 0, 1, 2
THREADS = 256
TILE_ITEMS = 2048
LOG2_TILE_ITEMS = 11
MIN_LOG2_TILE = 3  # at least one thread's 8 items per segment


def kind_of(dtype) -> int:
    """KIND_FLOAT (2), KIND_SIGNED (1) or KIND_UNSIGNED (0; bool too)."""
    kind = np.dtype(dtype).kind
    return 2 if kind == "f" else 1 if kind == "i" else 0


def _ceil_log2(x: int) -> int:
    return max(0, int(x) - 1).bit_length()


def _item_words(itemsize: int) -> int:
    """u64 words of one composite item: (key << 32 | column) or (u64 key, u32 column, pad)."""
    return 1 if itemsize <= 4 else 2


def _launch(kernel: str, itemsize: int, grid: int, args) -> None:
    _loader.launch(PACKAGE, SOURCE, f"sg_{kernel}<{C_BITS[itemsize]}>", grid, THREADS, args)


def _sort_small(kb, vb, perm, offsets, ids, ragged, count, row_len, out_cols, kind, mode,
                log2_tile, reverse=False):
    per_block = TILE_ITEMS >> log2_tile
    _launch("sort_small", kb.dtype.itemsize, -(-count // per_block),
            (kb, vb, perm, offsets, ids, np.int32(ragged), np.int32(count), np.int64(row_len),
             np.int32(out_cols), np.int32(kind), np.int32(mode), np.int32(reverse),
             np.int32(log2_tile)))


def _sort_long(kb, vb, perm, offsets, ids, ragged, count, row_len, max_len, out_cols, kind,
               mode, scratch, reverse=False):
    """Tiles + merge passes for `count` segments of at most max_len (> TILE_ITEMS) elements.
    `scratch`: two u64 buffers indexed like the keys (item words per element). `reverse`:
    items carry reversed columns (see segmented_sort.cu)."""
    itemsize = kb.dtype.itemsize
    tiles = -(-max_len // TILE_ITEMS)
    passes = _ceil_log2(tiles)
    grid = count * tiles
    _launch("sort_tiles", itemsize, grid,
            (kb, scratch[0], offsets, ids, np.int32(ragged), np.int32(count), np.int64(row_len),
             np.int32(tiles), np.int32(kind), np.int32(mode), np.int32(reverse)))
    for p in range(passes):
        _launch("merge_pass", itemsize, grid,
                (kb, scratch[p % 2], scratch[(p + 1) % 2], vb, perm, offsets, ids,
                 np.int32(ragged), np.int32(count), np.int64(row_len), np.int32(out_cols),
                 np.int32(reverse), np.int32(tiles), np.int32(LOG2_TILE_ITEMS + p),
                 np.int32(p == passes - 1)))


def _scratch(xp, elements: int, itemsize: int):
    words = elements * _item_words(itemsize)
    return [xp.empty(words, dtype=np.uint64) for _ in range(2)]


def sort_rows_into(keys, values, perm, mode: int, out_cols: int, reverse: bool = False
                   ) -> None:
    """Sorts each row of `keys` (rows, n) by the key of `mode` and writes the first out_cols
    entries of each sorted row to values/perm (rows, out_cols). Current stream; n >= 1.
    reverse (sort modes only): each row's sort read backwards, in the same passes (the key of
    the other direction, columns reversed in the items)."""
    xp = _loader.xp()
    n = keys.shape[1]
    kind = kind_of(keys.dtype)
    if reverse:
        mode = MODE_SORT_ASC if mode == MODE_SORT_DESC else MODE_SORT_DESC
    for r0, r1 in row_batches(keys.shape[0]):
        rows = r1 - r0
        kb, vb, pb = bits(keys[r0:r1]), bits(values[r0:r1]), perm[r0:r1]
        unused = pb  # offsets / segment ids are not read in row mode
        if n <= TILE_ITEMS:
            _sort_small(kb, vb, pb, unused, unused, 0, rows, n, out_cols, kind, mode,
                        max(MIN_LOG2_TILE, _ceil_log2(n)), reverse)
        else:
            _sort_long(kb, vb, pb, unused, unused, 0, rows, n, n, out_cols, kind, mode,
                       _scratch(xp, rows * n, kb.dtype.itemsize), reverse)


def sort_rows(keys, descending: bool, *, reverse: bool = False, out=None, stream=None):
    """Stable sort of each row of a C-contiguous (rows, n) CuPy array -> (values, int32 perm);
    `reverse`: each sorted row read backwards (ties in decreasing column order), as
    `_cpu.sort_rows`. `out`: (values, perm) to write (returned); the kernels write them
    directly."""
    xp = _loader.xp()
    rows, n = keys.shape
    with _loader.stream_scope(stream, like=keys):
        if out is None:
            out = (xp.empty((rows, n), dtype=keys.dtype), xp.empty((rows, n), dtype=np.int32))
        values, perm = out
        if rows and n:
            mode = MODE_SORT_DESC if descending else MODE_SORT_ASC
            sort_rows_into(keys, values, perm, mode, n, bool(reverse))
    return values, perm


def _ceil_log2_array(x: np.ndarray) -> np.ndarray:
    """ceil(log2(x)) for integers x >= 1 (exact: frexp of x - 1 < 2^53)."""
    return np.frexp((x - 1).astype(np.float64))[1].astype(np.int64)


def sort_segments(keys, offsets, descending: bool, *, out=None, stream=None):
    """Stable sort of each CSR segment of a 1-D CuPy array; `offsets` is a validated host int64
    array. perm is relative to the segment start; elements past offsets[-1] are copied through
    with perm 0. `out`: (values, perm), 1-D of keys' size, to write (returned); the kernels
    write them directly."""
    xp = _loader.xp()
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    size = keys.shape[0]
    end = int(offsets[-1])
    mode = MODE_SORT_DESC if descending else MODE_SORT_ASC
    with _loader.stream_scope(stream, like=keys):
        if out is None:
            out = (xp.empty(size, dtype=keys.dtype), xp.empty(size, dtype=np.int32))
        values, perm = out
        if end < size:
            bits(values)[end:] = bits(keys)[end:]
            perm[end:] = 0
        lens = np.diff(offsets)
        if end == 0:
            return values, perm
        # Bins: small segments by tile size, long ones by merge-pass count; empty ones need
        # nothing. One upload of all the segment ids, grouped by bin.
        small = (lens >= 1) & (lens <= TILE_ITEMS)
        long_ = lens > TILE_ITEMS
        log2_tiles = np.maximum(MIN_LOG2_TILE, _ceil_log2_array(np.maximum(lens, 1)))
        passes = _ceil_log2_array(np.maximum(-(-lens // TILE_ITEMS), 1))
        bins = []
        for lt in np.unique(log2_tiles[small]):
            ids = np.flatnonzero(small & (log2_tiles == lt))
            bins.append(("small", int(lt), ids))
        for p in np.unique(passes[long_]):
            ids = np.flatnonzero(long_ & (passes == p))
            bins.append(("long", int(lens[ids].max()), ids))
        if lens.shape[0] > np.iinfo(np.int32).max:
            raise ValueError("more than 2**31 - 1 segments")
        all_ids = np.concatenate([b[2] for b in bins]).astype(np.int32)
        ids_dev = xp.asarray(all_ids)
        offsets_dev = xp.asarray(offsets)
        kb, vb = bits(keys), bits(values)
        kind = kind_of(keys.dtype)
        scratch = None
        start = 0
        for what, param, ids in bins:
            count = ids.shape[0]
            group = ids_dev[start:start + count]
            start += count
            if what == "small":
                _sort_small(kb, vb, perm, offsets_dev, group, 1, count, 0, 0, kind, mode, param)
            else:
                if scratch is None:
                    scratch = _scratch(xp, end, kb.dtype.itemsize)
                _sort_long(kb, vb, perm, offsets_dev, group, 1, count, 0, param, 0, kind, mode,
                           scratch)
    return values, perm
