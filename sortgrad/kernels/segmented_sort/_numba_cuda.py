"""Numba CUDA segmented sort: bitonic tiles in shared memory, then co-rank merges in global memory.

Contract (the row-function protocol of `sortgrad.kernels._backends`; called by
`sortgrad.kernels.segmented_sort` after validation):
- `sort_rows(keys, descending, *, reverse=False, out=None, stream=None) -> (values, perm)`:
  keys a C-contiguous 2-D device array (rows, n); values of keys' dtype and shape, perm int32
  column indices; `reverse`: each sorted row read backwards (for descending=False,
  `jnp.sort(descending=True)`: largest first, NaNs first, equal keys in decreasing column
  order), as `_cpu.sort_rows`.
- `sort_segments(keys, offsets, descending, *, out=None, stream=None) -> (values, perm)`: keys
  1-D, offsets a validated host int64 CSR array; perm relative to each segment's start;
  elements past offsets[-1] are copied through with perm 0.
Results are bit-identical to the CPU backend: the order of `jnp.sort` (see `_keys.py`), stable
in both directions. They are written into `out` when given (device arrays of any kind, returned
as given), else into new arrays of the input's kind (CuPy in, CuPy out); all work is queued on
`stream` (None: the current stream) without synchronising.

Algorithm
- Every element is compared as the composite (key, index): key from
  `numba_support.key_function(dtype, "sort", descending)` (descending keys are complemented,
  so ascending composite order is the stable order in both directions), index its column.
  Composites are unique, so every network and merge is deterministic.
- Reversed rows (`reverse=True`, rows only): the key of the opposite direction and the index
  counted from the row's end, n - 1 - column; the final writes map it back. Sorting by
  (opposite key, n - 1 - column) is the stable sort read backwards, in the same passes.
- Tile sort (`_tile_kernel`): a block sorts SORT_TILE elements in shared memory with a bitonic
  network that sorts each aligned `slot` (a power of two) independently, so a block holds
  SORT_TILE // slot short segments (slot = next power of two >= the longest in the launch);
  padding is the sentinel (all-ones key, index INT32_MAX), which sorts after every element.
  Segments of at most SORT_TILE elements finish here: the kernel writes values (gathered by
  index from the input bits, so values keep their exact bits) and perm.
- Long segments: their tiles of SORT_TILE are sorted to (key, index) scratch, then
  ceil(log2(len / SORT_TILE)) merge passes (`_merge_kernel`) merge pairs of sorted runs of
  width w = SORT_TILE, 2 SORT_TILE, ... between two scratch buffers. Each thread produces
  MERGE_ITEMS consecutive outputs: it finds how many come from the left run by a binary search
  on the merge path (co-rank), then merges sequentially. The last pass writes values and perm.
- Ragged segments are binned on the host by length: lengths 0 and 1 need no work (a copy pass
  sets values = keys and perm = 0 everywhere first, which also covers the tail past the last
  offset); short segments go to one tile launch per power-of-two slot size; long ones are
  binned by their number of merge passes, so one long segment adds passes only to its bin and
  tiny segments share blocks.

Launch mapping: tile kernel one block per SORT_TILE elements (several segments per block when
short), SORT_THREADS threads each doing SORT_TILE / 2 / SORT_THREADS compare-exchanges per
step; merge kernel a grid-stride loop of threads over chunks of MERGE_ITEMS outputs.
The module constants are read at each call (tests lower them to reach the multi-tile and
multi-pass paths at small sizes); kernels are compiled per (dtype, order, direction,
constants, reverse) and cached.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import cuda

from .._cuda import numba_support as ns

DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
          "uint16", "uint32", "uint64", "bool")

SORT_TILE = 2048      # elements per block tile (power of two); rows up to this sort in one launch
SORT_THREADS = 256    # threads per tile block (multiple of 32; SORT_TILE // 2 keeps all busy)
MERGE_THREADS = 256   # threads per merge block
MERGE_ITEMS = 16      # consecutive outputs per merge thread

_INT32_MAX = np.int32(0x7FFFFFFF)


def _config():
    tile, threads = int(SORT_TILE), int(SORT_THREADS)
    if tile < 2 or tile & (tile - 1):
        raise ValueError(f"SORT_TILE must be a power of two >= 2, got {tile}")
    if threads % 32 or threads > 1024:
        raise ValueError("SORT_THREADS must be a multiple of 32, at most 1024")
    return tile, threads, int(MERGE_THREADS), int(MERGE_ITEMS)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# --- kernels ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tile_kernel(dtype_name: str, order: str, descending: bool, tile: int, threads: int,
                 reverse: bool = False):
    """Bitonic sort of shared-memory tiles; see the module docstring.

    Segment s of the launch: uniform mode (row_n >= 0): row r = s // tiles_per_row, tile
    t = s % tiles_per_row, start r*row_n + t*tile_len, length min(tile_len, row_n - t*tile_len),
    index base t*tile_len; table mode (row_n < 0): starts[s], lens[s], bases[s], segment s.
    final: write values/perm (at seg*out_stride + c, or start + c when out_stride < 0; only
    c < out_limit), else (key, index) to keys_out/idx_out at start + c.
    reverse (uniform mode only): the index is row_n - 1 - column (mapped back when writing).
    """
    key = ns.key_function(dtype_name, order, descending)
    storage = ns.key_storage_dtype(dtype_name)
    key_t = numba.from_dtype(storage)
    sentinel = ns.KEY_SENTINEL[storage]

    @cuda.jit(device=True, inline=True)
    def tile_desc(s, row_n, tile_len, tiles_per_row, starts, lens, bases):
        if row_n >= 0:
            r = s // tiles_per_row
            base = (s - r * tiles_per_row) * tile_len
            length = row_n - base
            if length > tile_len:
                length = tile_len
            return np.int64(r * row_n + base), np.int64(length), np.int64(base), np.int64(r)
        return np.int64(starts[s]), np.int64(lens[s]), np.int64(bases[s]), np.int64(s)

    @cuda.jit
    def kernel(bits, row_n, tile_len, tiles_per_row, starts, lens, bases, num_segs, slot,
               final, vals_out, perm_out, out_stride, out_limit, keys_out, idx_out):
        skeys = cuda.shared.array(tile, key_t)
        sidx = cuda.shared.array(tile, numba.int32)
        tid = cuda.threadIdx.x
        first = np.int64(cuda.blockIdx.x) * (tile // slot)
        for p in range(tid, tile, threads):
            s = first + p // slot
            c = p % slot
            k = sentinel
            ix = _INT32_MAX
            if s < num_segs:
                start, length, base, seg = tile_desc(s, row_n, tile_len, tiles_per_row,
                                                     starts, lens, bases)
                if c < length:
                    k = key(bits[start + c])
                    ix = base + c
                    if reverse:
                        ix = row_n - 1 - ix
            skeys[p] = k
            sidx[p] = ix
        cuda.syncthreads()
        ns.bitonic_sort_slots(skeys, sidx, tile, slot, tid, threads)
        for p in range(tid, tile, threads):
            s = first + p // slot
            c = p % slot
            if s < num_segs:
                start, length, base, seg = tile_desc(s, row_n, tile_len, tiles_per_row,
                                                     starts, lens, bases)
                if c < length:
                    if final:
                        if c < out_limit:
                            o = start + c
                            if out_stride >= 0:
                                o = seg * out_stride + c
                            ix = sidx[p]
                            if reverse:
                                ix = row_n - 1 - ix
                            vals_out[o] = bits[start - base + ix]
                            perm_out[o] = ix
                    else:
                        keys_out[start + c] = skeys[p]
                        idx_out[start + c] = sidx[p]

    return kernel


@functools.lru_cache(maxsize=None)
def _merge_kernel(items: int, reverse: bool = False):
    """One merge pass: runs [a0, a0+w) and [a0+w, a0+2w) of every segment, keys_in/idx_in ->
    keys_out/idx_out, or values/perm on the final pass (addressing as in the tile kernel).
    Positions t in [0, total) enumerate the segments of the launch back to back: uniform mode
    (row_n >= 0) segment t // row_n at t - seg*row_n... table mode: the segment found by binary
    search in the cumulative lengths `cum`, stored from starts[seg]. reverse: indices count
    from the segment's end (length - 1 - column); the final pass maps them back."""

    @cuda.jit(device=True, inline=True)
    def before(ka, ia, kb, ib):
        return ka < kb or (ka == kb and ia < ib)

    @cuda.jit
    def kernel(keys_in, idx_in, keys_out, idx_out, bits, width, final, vals_out, perm_out,
               out_stride, out_limit, row_n, starts, cum, num_segs, total):
        chunk = np.int64(cuda.grid(1))
        step = np.int64(cuda.gridsize(1))
        while chunk * items < total:
            t = chunk * items
            end = t + items
            if end > total:
                end = total
            while t < end:
                if row_n >= 0:
                    seg = t // row_n
                    c = t - seg * row_n
                    start = seg * row_n
                    length = row_n
                else:
                    lo = np.int64(0)
                    hi = np.int64(num_segs)
                    while hi - lo > 1:
                        mid = (lo + hi) // 2
                        if cum[mid] <= t:
                            lo = mid
                        else:
                            hi = mid
                    seg = lo
                    c = t - cum[seg]
                    start = np.int64(starts[seg])
                    length = cum[seg + 1] - cum[seg]
                a0 = c - c % (2 * width)
                a1 = a0 + width
                if a1 > length:
                    a1 = length
                b1 = a0 + 2 * width
                if b1 > length:
                    b1 = length
                la = a1 - a0
                lb = b1 - a1
                d = c - a0
                # co-rank: i outputs of the first d come from the left run
                lo = d - lb
                if lo < 0:
                    lo = 0
                hi = d
                if hi > la:
                    hi = la
                while lo < hi:
                    mid = (lo + hi) // 2
                    pb = start + a1 + d - 1 - mid
                    pa = start + a0 + mid
                    if before(keys_in[pb], idx_in[pb], keys_in[pa], idx_in[pa]):
                        hi = mid
                    else:
                        lo = mid + 1
                i = lo
                j = d - i
                stop = t + (b1 - c)
                if stop > end:
                    stop = end
                while t < stop:
                    pa = start + a0 + i
                    pb = start + a1 + j
                    take_left = i < la
                    if take_left and j < lb:
                        take_left = before(keys_in[pa], idx_in[pa], keys_in[pb], idx_in[pb])
                    if take_left:
                        src = pa
                        i += 1
                    else:
                        src = pb
                        j += 1
                    if final:
                        if c < out_limit:
                            o = start + c
                            if out_stride >= 0:
                                o = seg * out_stride + c
                            ix = idx_in[src]
                            if reverse:
                                ix = length - 1 - ix
                            vals_out[o] = bits[start + ix]
                            perm_out[o] = ix
                    else:
                        keys_out[start + c] = keys_in[src]
                        idx_out[start + c] = idx_in[src]
                    t += 1
                    c += 1
            chunk += step

    return kernel


@cuda.jit
def _copy_through_kernel(bits, vals_out, perm_out):
    """vals_out = bits, perm_out = 0 (segments of length 0/1 and the tail past the offsets)."""
    i = cuda.grid(1)
    step = cuda.gridsize(1)
    while i < bits.shape[0]:
        vals_out[i] = bits[i]
        perm_out[i] = 0
        i += step


# --- host side ----------------------------------------------------------------------------------

class _Scratch:
    """Two (key, index) ping-pong buffers of `size` elements, allocated on first use (from
    CuPy's pool when the input is a CuPy array, else by Numba)."""

    def __init__(self, size: int, storage, kind: str, stream):
        self.size, self.storage, self.kind, self.stream = size, storage, kind, stream
        self.buffers = None

    def get(self):
        if self.buffers is None:
            self.buffers = [(ns.empty(self.size, self.storage, self.kind, self.stream),
                             ns.empty(self.size, np.int32, self.kind, self.stream))
                            for _ in range(2)]
        return self.buffers


def sort_engine(bits, dtype, order: str, descending: bool, stream, *, vals_out, perm_out,
                row_n: int = -1, num_rows: int = 0, segments=None, out_stride: int = -1,
                out_limit: int = 2**62, kind: str = "numba", reverse: bool = False):
    """Sorts segments of the 1-D bits array `bits` (the input viewed as unsigned integers).

    Uniform rows: row_n >= 0 and num_rows rows of row_n elements. Table mode: `segments` =
    (host int64 starts, host int64 lengths), lengths >= 2. Final values/perm go to
    vals_out (bits dtype) / perm_out (int32) at row*out_stride + c (out_stride >= 0) or at
    start + c, columns c < out_limit only. Shared with the top-k fallback (order "total").
    reverse (uniform rows only): each row's sort read backwards, in the same passes (the key of
    the other direction, indices counted from the row's end).
    Scratch for long segments: 2 x (key, int32 index) of bits.size, allocated like `kind`.
    Table mode uploads one host table of segment descriptors on `stream` (from pageable
    memory the driver may wait for the stream's earlier work before copying).
    """
    dtype = np.dtype(dtype)
    reverse = bool(reverse)
    if reverse and segments is not None:
        raise ValueError("reverse applies to uniform rows, not to segments")
    tile, threads, merge_threads, items = _config()
    storage = ns.key_storage_dtype(dtype)
    limits = ns.device_limits()
    need = tile * (storage.itemsize + 4)
    if need > limits.max_shared_memory_per_block:
        raise ValueError(f"SORT_TILE={tile} needs {need} bytes of shared memory per block; the "
                         f"device has {limits.max_shared_memory_per_block}")
    tiler = _tile_kernel(dtype.name, order, bool(descending) != reverse, tile, threads, reverse)
    merger = _merge_kernel(items, reverse)
    scratch = _Scratch(int(bits.shape[0]), storage, kind, stream)
    dummy = ns.placeholder(np.int64)
    no_keys, no_idx = ns.placeholder(storage), ns.placeholder(np.int32)

    def launch_tiles(num_segs, slot, final, row_n_, tile_len, tiles_per_row, tables,
                     keys_out, idx_out):
        starts, lens, bases = tables
        blocks = -(-num_segs // (tile // slot))
        tiler[blocks, threads, stream](bits, row_n_, tile_len, tiles_per_row, starts, lens,
                                       bases, num_segs, slot, final, vals_out, perm_out,
                                       out_stride, out_limit, keys_out, idx_out)

    def launch_merges(passes, total, row_n_, starts, cum, num_segs):
        (ka, ia), (kb, ib) = scratch.get()
        width = tile
        for p in range(passes):
            final = p == passes - 1
            merger[ns.grid_for(-(-total // items), merge_threads, limits), merge_threads,
                   stream](ka, ia, kb, ib, bits, width, final, vals_out, perm_out, out_stride,
                           out_limit, row_n_, starts, cum, num_segs, total)
            ka, ia, kb, ib = kb, ib, ka, ia
            width *= 2

    if segments is None:
        if num_rows == 0 or row_n == 0:
            return
        if row_n <= tile:
            launch_tiles(num_rows, _next_pow2(row_n), True, row_n, row_n, 1,
                         (dummy, dummy, dummy), no_keys, no_idx)
            return
        tiles_per_row = -(-row_n // tile)
        (ka, ia), _ = scratch.get()
        launch_tiles(num_rows * tiles_per_row, tile, False, row_n, tile, tiles_per_row,
                     (dummy, dummy, dummy), ka, ia)
        launch_merges(int(tiles_per_row - 1).bit_length(), num_rows * row_n, row_n, dummy,
                      dummy, num_rows)
        return

    starts, lengths = segments
    short = lengths <= tile
    tables, plans = [], []   # host int64 pieces uploaded in one copy; launch plans reference them

    def add(a):
        offset = sum(t.shape[0] for t in tables)
        tables.append(np.ascontiguousarray(a, dtype=np.int64))
        return offset, a.shape[0]

    # Short segments: one launch per power-of-two slot.
    slots = np.array([_next_pow2(n) for n in lengths[short]], dtype=np.int64)
    for slot in np.unique(slots):
        sel = slots == slot
        s_starts, s_lens = starts[short][sel], lengths[short][sel]
        plans.append(("short", int(slot), add(s_starts), add(s_lens),
                      add(np.zeros(s_lens.shape[0], np.int64))))
    # Long segments: binned by their number of merge passes.
    long_starts, long_lens = starts[~short], lengths[~short]
    tiles_of = -(-long_lens // tile)
    passes_of = np.array([int(t - 1).bit_length() for t in tiles_of], dtype=np.int64)
    for passes in np.unique(passes_of):
        sel = passes_of == passes
        b_starts, b_lens, b_tiles = long_starts[sel], long_lens[sel], tiles_of[sel]
        seg_of_tile = np.repeat(np.arange(b_lens.shape[0]), b_tiles)
        tile_no = np.arange(seg_of_tile.shape[0]) - np.repeat(np.cumsum(b_tiles) - b_tiles,
                                                              b_tiles)
        t_bases = tile_no * tile
        t_starts = b_starts[seg_of_tile] + t_bases
        t_lens = np.minimum(tile, b_lens[seg_of_tile] - t_bases)
        cum = np.concatenate([[0], np.cumsum(b_lens)])
        plans.append(("long", int(passes), add(t_starts), add(t_lens), add(t_bases),
                      add(b_starts), add(cum), int(b_lens.shape[0]), int(cum[-1])))
    if not plans:
        return
    table = ns.to_device(np.concatenate(tables), stream)

    def piece(ref):
        offset, size = ref
        return table[offset:offset + max(size, 1)]

    for plan in plans:
        if plan[0] == "short":
            _, slot, s_ref, l_ref, b_ref = plan
            launch_tiles(s_ref[1], slot, True, -1, 0, 1,
                         (piece(s_ref), piece(l_ref), piece(b_ref)), no_keys, no_idx)
        else:
            _, passes, ts_ref, tl_ref, tb_ref, st_ref, cum_ref, num_segs, total = plan
            (ka, ia), _ = scratch.get()
            launch_tiles(ts_ref[1], tile, False, -1, 0, 1,
                         (piece(ts_ref), piece(tl_ref), piece(tb_ref)), ka, ia)
            launch_merges(passes, total, -1, piece(st_ref), piece(cum_ref), num_segs)


# --- entry points -------------------------------------------------------------------------------

def _outputs(out, shape, dtype, kind, stream):
    """(values, perm) Numba arrays to write and the pair to return: `out` as given, or new
    arrays of the input's kind."""
    if out is not None:
        return ns.out_views(out), tuple(out)
    values, perm = ns.empty(shape, dtype, kind, stream), ns.empty(shape, np.int32, kind, stream)
    return (values, perm), (ns.like_input(values, kind), ns.like_input(perm, kind))


def sort_rows(keys, descending, *, reverse=False, out=None, stream=None):
    """Stable sort of each row of a C-contiguous 2-D device array -> (values, int32 perm);
    `reverse`: each sorted row read backwards (ties in decreasing column order), as
    `_cpu.sort_rows`. `out`: (values, perm) to write (returned); the kernels write them
    directly."""
    x, kind = ns.as_device(keys)
    stream_ = ns.resolve_stream(stream, keys)
    rows, n = (int(d) for d in x.shape)
    (values, perm), result = _outputs(out, (rows, n), x.dtype, kind, stream_)
    if rows * n:
        sort_engine(ns.bits_view(ns.flat(x)), x.dtype, "sort", descending, stream_,
                    vals_out=ns.bits_view(ns.flat(values)), perm_out=ns.flat(perm),
                    row_n=n, num_rows=rows, out_stride=n, kind=kind, reverse=reverse)
    return result


def sort_segments(keys, offsets, descending, *, out=None, stream=None):
    """Stable sort of each CSR segment of a 1-D device array -> (values, int32 perm relative to
    the segment start); elements past offsets[-1] are copied with perm 0. `offsets` is the
    validated host int64 array (binned here on the host; one table upload). `out`: (values,
    perm), 1-D of keys' size, to write (returned); the kernels write them directly."""
    x, kind = ns.as_device(keys)
    stream_ = ns.resolve_stream(stream, keys)
    size = int(x.shape[0])
    (values, perm), result = _outputs(out, size, x.dtype, kind, stream_)
    if size:
        bits, vals_bits = ns.bits_view(x), ns.bits_view(values)
        threads = 256 if not ns.SIMULATOR else 32
        _copy_through_kernel[ns.grid_for(size, threads), threads, stream_](bits, vals_bits, perm)
        offsets = np.asarray(offsets, dtype=np.int64)
        starts, lengths = offsets[:-1], np.diff(offsets)
        work = lengths >= 2
        if work.any():
            sort_engine(bits, x.dtype, "sort", descending, stream_, vals_out=vals_bits,
                        perm_out=perm, segments=(starts[work], lengths[work]), kind=kind)
    return result


def ptx_cases(dtypes=("float16", "float32", "float64", "int64")):
    """(dispatcher, signature) pairs of every kernel for `numba_support.compile_ptx_cases`,
    at the current constants (a GPU-free check that the kernels compile for the real target)."""
    from numba import types
    tile, threads, _, items = _config()
    i64, i64a, i32a = types.int64, types.int64[::1], types.int32[::1]
    cases = []
    for name in dtypes:
        bits_t = numba.from_dtype(ns.uint_dtype(name))[::1]
        keys_t = numba.from_dtype(ns.key_storage_dtype(name))[::1]
        for order in ns.ORDERS:
            for reverse in (False, True):
                kernel = _tile_kernel(name, order, reverse, tile, threads, reverse)
                cases.append((kernel, (bits_t, i64, i64, i64, i64a, i64a, i64a, i64, i64,
                                       types.boolean, bits_t, i32a, i64, i64, keys_t, i32a)))
        for reverse in (False, True):
            cases.append((_merge_kernel(items, reverse),
                          (keys_t, i32a, keys_t, i32a, bits_t, i64, types.boolean, bits_t,
                           i32a, i64, i64, i64, i64a, i64a, i64, i64)))
        cases.append((_copy_through_kernel, (bits_t, bits_t, i32a)))
    return cases
