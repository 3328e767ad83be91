"""CuPy backend of the decreasing isotonic regression (PAV) and its VJP, per row.

The kernels are CUDA C in `isotonic.cu` (compiled with NVRTC by `.._cuda.cupy_loader`); its
header comment describes the algorithms. Semantics are those of `_cpu.py`, the reference:
pooling on value(left) <= value(right) (equal neighbours pool: the pooled side of a kink; with
the soft ops' tie keys, equal blocks whose keys are all tied stay apart), float64 block
accumulators, the running-min clamp of block values, int32 block ids from 0 at the left of
each row. KL uses
max-shifted log-sum-exp accumulators for every row (the CPU switches to linear sums when a
row's spread of exponents allows): values agree to float64 rounding, block ids wherever no two
neighbouring block values tie to rounding.

Launch mapping (`plan`): rows of n <= BLOCK * ITEMS entries go to the `_small` kernels (a group
of G threads per row, G the smallest power of two with G * ITEMS >= n, BLOCK / G rows per
block, everything in shared memory); longer rows to the `_large` kernels (one block per row at a
time, tiles of BLOCK * ITEMS entries swept in order, a persistent grid of at most
`BLOCKS_PER_SM` blocks per SM and a global scratch buffer of n entries per block).

Everything is launched on `stream` (None: CuPy's current stream) and nothing synchronises with
the host: outputs (unless given in `out`) and scratch are allocated from CuPy's pool on that
stream, and the launch plan needs only shapes and the device's SM count (read once per device
and cached). CuPy is reached only through `cupy_loader` (`xp`, `stream_scope`, `launch`,
`multiprocessor_count`), so the tests run this module on the host emulator.

This module imports without CuPy (the compile test reads CUDA_SOURCES); CuPy is imported when
a kernel runs.
"""

from __future__ import annotations

import numpy as np

from .._cuda import cupy_loader as _loader

PACKAGE = "sortgrad.kernels.isotonic"
SOURCE = "isotonic.cu"
DTYPES = ("float32", "float64")

# Mirrors of the constants of isotonic.cu (static_asserts there pin the byte sizes).
BLOCK = 256                        # threads per block
ITEMS = {"l2": 8, "kl": 4}         # entries per thread; a tile is BLOCK * ITEMS entries
_FWD_ACC_BYTES = {"l2": 8, "kl": 32}    # forward scratch entry: block accumulators
_VJP_TOTAL_BYTES = {"l2": 8, "kl": 32}  # VJP scratch entry: run totals

BLOCKS_PER_SM = 4           # resident blocks the large kernels aim at per SM
SCRATCH_BUDGET = 1 << 30    # bytes of scratch the large kernels may take (at least one row)

_REG = {"l2": 0, "kl": 1}
_CTYPE = {"float32": "float", "float64": "double"}


def _expression(kernel: str, dtype: str, regularization: str) -> str:
    return f"sg_iso::isotonic_{kernel}<{_CTYPE[dtype]}, {_REG[regularization]}>"


CUDA_SOURCES = {
    SOURCE: tuple(_expression(kernel, dtype, reg)
                  for kernel in ("fwd_small", "fwd_large", "vjp_small", "vjp_large")
                  for dtype in DTYPES for reg in ("l2", "kl")),
}


def plan(rows: int, n: int, regularization: str, sm_count: int, entry_bytes: int):
    """Launch plan for `rows` rows of `n >= 1` entries: ("small", grid, group) or
    ("large", grid, grid); for "large" the grid is also the number of scratch rows."""
    items = ITEMS[regularization]
    if n <= BLOCK * items:
        group = 1
        while group * items < n:
            group *= 2
        return "small", -(-rows // (BLOCK // group)), group
    blocks = min(rows, max(1, sm_count) * BLOCKS_PER_SM,
                 max(1, SCRATCH_BUDGET // (n * entry_bytes)))
    return "large", blocks, blocks


# --- the backend functions ----------------------------------------------------------------

def isotonic_rows(s, w, regularization: str, *, out=None, stream=None, keys=None):
    """s (rows, n), w (rows, n) or (1, n) of s's dtype (float32/float64, C-contiguous CuPy
    arrays) -> (solution of s's dtype, int32 block ids), both (rows, n). `out`: those two
    arrays to write (returned); the kernels write them directly. `keys` (the soft ops only):
    (rows, n) sorted input values of s's dtype; equal neighbouring blocks whose keys are all
    tied then stay apart (`_cpu.pools`). None: every equality pools."""
    _check_regularization(regularization)
    xp = _loader.xp()
    rows, n = (int(d) for d in s.shape)
    dtype = _dtype_name(s)
    with _loader.stream_scope(stream, like=s):
        if out is None:
            out = (xp.empty((rows, n), dtype=s.dtype), xp.empty((rows, n), dtype=np.int32))
        solution, block_ids = out
        if rows == 0 or n == 0:
            return solution, block_ids
        _check_rows(rows)
        entry = _FWD_ACC_BYTES[regularization]
        kind, grid, extra = plan(rows, n, regularization, _loader.multiprocessor_count(), entry)
        use_keys = keys is not None
        if use_keys and (tuple(keys.shape) != (rows, n) or keys.dtype != s.dtype):
            raise ValueError(f"keys must be ({rows}, {n}) of dtype {s.dtype}, got "
                             f"{tuple(keys.shape)} {keys.dtype}")
        common = (s, w, _w_stride(w, rows, n), keys if use_keys else s, np.int32(use_keys),
                  solution, block_ids)
        if kind == "small":
            args = common + (np.int32(rows), np.int32(n), np.int32(extra))
        else:
            scratch = xp.empty((extra * n * entry // 8,), dtype=np.float64)
            args = common + (scratch, np.int32(rows), np.int32(n))
        _launch(f"fwd_{kind}", dtype, regularization, grid, args)
    return solution, block_ids


def isotonic_vjp_rows(g, s, w, block_ids, regularization: str, *, out=None, stream=None):
    """VJP of `isotonic_rows`: g, s (rows, n), w (rows or 1, n), block_ids int32 (rows, n) ->
    (grad_s, grad_w), both (rows, n) of g's dtype. s and w are read only for "kl". `out`:
    (grad_s, grad_w) to write (returned); the kernels write them directly."""
    _check_regularization(regularization)
    xp = _loader.xp()
    rows, n = (int(d) for d in g.shape)
    dtype = _dtype_name(g)
    with _loader.stream_scope(stream, like=g):
        if out is None:
            out = (xp.empty((rows, n), dtype=g.dtype), xp.empty((rows, n), dtype=g.dtype))
        grad_s, grad_w = out
        if rows == 0 or n == 0:
            return grad_s, grad_w
        _check_rows(rows)
        entry = _VJP_TOTAL_BYTES[regularization]
        kind, grid, extra = plan(rows, n, regularization, _loader.multiprocessor_count(), entry)
        common = (g, s, w, _w_stride(w, rows, n), block_ids, grad_s, grad_w)
        if kind == "small":
            args = common + (np.int32(rows), np.int32(n), np.int32(extra))
        else:
            scratch = xp.empty((extra * n * entry // 8,), dtype=np.float64)
            args = common + (scratch, np.int32(rows), np.int32(n))
        _launch(f"vjp_{kind}", dtype, regularization, grid, args)
    return grad_s, grad_w


def _launch(kernel: str, dtype: str, regularization: str, grid: int, args) -> None:
    _loader.launch(PACKAGE, SOURCE, _expression(kernel, dtype, regularization), grid, BLOCK,
                   args)


def _check_regularization(regularization: str) -> None:
    if regularization not in _REG:
        raise ValueError(f"regularization must be 'l2' or 'kl', got {regularization!r}")


def _w_stride(w, rows: int, n: int) -> np.int64:
    """Row stride of w: 0 for one row shared by every row."""
    return np.int64(0 if w.shape[0] == 1 else n)


def _dtype_name(a) -> str:
    name = np.dtype(a.dtype).name
    if name not in DTYPES:
        raise TypeError(f"isotonic kernels take {', '.join(DTYPES)}, got {name}")
    return name


def _check_rows(rows: int) -> None:
    if rows > np.iinfo(np.int32).max:
        raise ValueError(f"{rows} rows exceed the int32 range of the isotonic kernels")
