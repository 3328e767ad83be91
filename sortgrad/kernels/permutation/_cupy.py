"""CuPy backend of the inverse permutation and the permutation scatter (permutation.cu).

Contract: as `_cpu.inverse_rows` / `_cpu.scatter_rows` on C-contiguous CuPy arrays (perm int32,
rows along the last axis), launched on `stream` (None: the current stream), without
synchronising; results written into `out` when given. perm entries are not checked: entries
outside [0, n) are skipped (never written), repeated entries leave an unspecified one of the
values.

Launch mapping (256-thread blocks): rows of n * itemsize <= 32 KiB go through shared memory,
about 4096 output entries per block (several short rows per block), with coalesced reads and
writes (`sg_scatter_staged`); longer rows scatter straight to global memory over a grid-stride
loop (`sg_scatter_direct`), into an output zeroed first by a memset (scatter) or left
uninitialised (inverse: a valid permutation writes every entry).
"""

from __future__ import annotations

import numpy as np

from .._cuda import cupy_loader as _loader
from .._cuda.cupy_loader import C_BITS, bits, row_batches

PACKAGE = "sortgrad.kernels.permutation"
SOURCE = "permutation.cu"

CUDA_SOURCES = {
    SOURCE: tuple(f"sg_scatter_{kernel}<{c}, 0>" for kernel in ("staged", "direct")
                  for c in C_BITS.values())
    + tuple(f"sg_scatter_{kernel}<unsigned int, 1>" for kernel in ("staged", "direct")),
}

DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "float16", "int32", "uint32", "float32",
          "int64", "uint64", "float64")

THREADS = 256
STAGE_BYTES = 32768
STAGE_TARGET = 4096  # output entries per block in the staged kernel
MAX_GRID = 1 << 20


def _scatter(values_bits, perm, out_bits, n: int, iota: int) -> None:
    """out_bits (rows, n) = scatter of values_bits (rows, m) by perm; the direct path expects
    out_bits already zeroed when iota == 0."""
    rows, m = perm.shape
    itemsize = out_bits.dtype.itemsize
    expression = f"<{C_BITS[itemsize]}, {iota}>"
    if _staged(n, itemsize):
        rows_per_block = max(1, min(STAGE_BYTES // itemsize // n, STAGE_TARGET // n))
        for r0, r1 in row_batches(rows):  # the kernel numbers rows with int32
            grid = -(-(r1 - r0) // rows_per_block)
            _loader.launch(PACKAGE, SOURCE, "sg_scatter_staged" + expression, grid, THREADS,
                           (values_bits[r0:r1], perm[r0:r1], out_bits[r0:r1], np.int32(r1 - r0),
                            np.int32(m), np.int32(n), np.int32(rows_per_block)))
    else:
        total = rows * m
        grid = max(1, min(-(-total // THREADS), MAX_GRID))
        _loader.launch(PACKAGE, SOURCE, "sg_scatter_direct" + expression, grid, THREADS,
                       (values_bits, perm, out_bits, np.int64(total), np.int32(m), np.int32(n)))


def _staged(n: int, itemsize: int) -> bool:
    return n * itemsize <= STAGE_BYTES


def scatter_rows(values, perm, n: int, *, out=None, stream=None):
    """out (rows, n) of values' dtype: out[r, perm[r, i]] = values[r, i], zeros elsewhere.
    `out`: the array to write (returned); the kernels write it directly (zeroed first where
    the kernel does not write every entry)."""
    xp = _loader.xp()
    rows, m = perm.shape
    n = int(n)
    with _loader.stream_scope(stream, like=perm):
        writes_all = bool(rows and n and m and _staged(n, values.dtype.itemsize))
        if out is None:  # the staged kernel writes every entry
            out = (xp.empty if writes_all else xp.zeros)((rows, n), dtype=values.dtype)
        elif not writes_all:
            out.fill(0)
        if rows and n and m:
            _scatter(bits(values), perm, bits(out), n, 0)
    return out


def inverse_rows(perm, *, out=None, stream=None):
    """inv (rows, n) int32 with inv[r, perm[r, i]] = i. `out`: the array to write (returned);
    the kernels write it directly."""
    xp = _loader.xp()
    rows, n = perm.shape
    with _loader.stream_scope(stream, like=perm):
        inv = xp.empty((rows, n), dtype=np.int32) if out is None else out
        if rows and n:
            _scatter(perm, perm, inv.view(np.uint32), n, 1)
    return inv
