"""CuPy backend of the decreasing isotonic regression (PAV) and its VJP, per row.

The kernels are CUDA C in `isotonic.cu` (compiled with NVRTC by `.._cuda.cupy_loader`); its
header comment describes the algorithms. Semantics are those of `_cpu.py`, the reference:
strict-violation pooling (equal neighbouring blocks stay apart), float64 block accumulators,
the running-min clamp of block values, int32 block ids from 0 at the left of each row. KL uses
max-shifted log-sum-exp accumulators for every row (the CPU switches to linear sums when a
row's spread of exponents allows): values agree to float64 rounding, block ids wherever no two
neighbouring block values tie to rounding.

Launch mapping (`plan`): rows of n <= BLOCK * ITEMS entries go to the `_small` kernels (a group
of G threads per row, G the smallest power of two with G * ITEMS >= n, BLOCK / G rows per
block, everything in shared memory); longer rows to the `_large` kernels (one block per row at a
time, tiles of BLOCK * ITEMS entries swept in order, a persistent grid of at most
`BLOCKS_PER_SM` blocks per SM and a global scratch buffer of n entries per block).

Everything is launched on `stream` (None: CuPy's current stream) and nothing synchronises with
the host: outputs and scratch are allocated from CuPy's pool on that stream, and the launch
plan needs only shapes and the device's SM count (read once per device and cached).

This module imports without CuPy (the compile test reads CUDA_SOURCES); CuPy is imported when
a kernel runs.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

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
    "isotonic.cu": tuple(_expression(kernel, dtype, reg)
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


# --- CuPy plumbing ------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _kernel_on(device_id: int, name: str):
    from .._cuda import cupy_loader
    return cupy_loader.get_kernel(__package__, "isotonic.cu", name)


def _kernel(name: str):
    import cupy
    return _kernel_on(cupy.cuda.runtime.getDevice(), name)


@functools.lru_cache(maxsize=None)
def _sm_count(device_id: int) -> int:
    import cupy
    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def _stream_context(stream):
    """A context that makes `stream` CuPy's current stream: None (keep the current one), a CuPy
    stream, an object with a `ptr` or `handle` (e.g. a Numba stream), or a raw cudaStream_t."""
    if stream is None:
        return contextlib.nullcontext()
    import cupy
    if isinstance(stream, cupy.cuda.Stream) or isinstance(stream, cupy.cuda.ExternalStream):
        return stream
    for attr in ("ptr", "handle"):
        ptr = getattr(stream, attr, None)
        if ptr is not None:
            stream = getattr(ptr, "value", ptr)  # ctypes handles
            break
    return cupy.cuda.ExternalStream(int(stream))


class _CupyRuntime:
    """What the launch code needs from CuPy (the tests substitute a host emulation)."""

    def __init__(self):
        import cupy
        self.xp = cupy
        self.sm_count = _sm_count(cupy.cuda.runtime.getDevice())

    @staticmethod
    def kernel(name: str):
        return _kernel(name)


# --- the backend functions ----------------------------------------------------------------

def isotonic_rows(s, w, regularization: str, stream=None):
    """s (rows, n), w (rows, n) or (1, n) of s's dtype (float32/float64, C-contiguous CuPy
    arrays) -> (solution of s's dtype, int32 block ids), both (rows, n)."""
    with _stream_context(stream):
        return _isotonic_rows(_CupyRuntime(), s, w, regularization)


def isotonic_vjp_rows(g, s, w, block_ids, regularization: str, stream=None):
    """VJP of `isotonic_rows`: g, s (rows, n), w (rows or 1, n), block_ids int32 (rows, n) ->
    (grad_s, grad_w), both (rows, n) of g's dtype. s and w are read only for "kl"."""
    with _stream_context(stream):
        return _isotonic_vjp_rows(_CupyRuntime(), g, s, w, block_ids, regularization)


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


def _isotonic_rows(rt, s, w, regularization: str):
    _check_regularization(regularization)
    xp = rt.xp
    rows, n = (int(d) for d in s.shape)
    dtype = _dtype_name(s)
    solution = xp.empty((rows, n), dtype=s.dtype)
    block_ids = xp.empty((rows, n), dtype=np.int32)
    if rows == 0 or n == 0:
        return solution, block_ids
    _check_rows(rows)
    entry = _FWD_ACC_BYTES[regularization]
    kind, grid, extra = plan(rows, n, regularization, rt.sm_count, entry)
    common = (s, w, _w_stride(w, rows, n), solution, block_ids)
    if kind == "small":
        args = common + (np.int32(rows), np.int32(n), np.int32(extra))
    else:
        scratch = xp.empty((extra * n * entry // 8,), dtype=np.float64)
        args = common + (scratch, np.int32(rows), np.int32(n))
    rt.kernel(_expression(f"fwd_{kind}", dtype, regularization))((grid,), (BLOCK,), args)
    return solution, block_ids


def _isotonic_vjp_rows(rt, g, s, w, block_ids, regularization: str):
    _check_regularization(regularization)
    xp = rt.xp
    rows, n = (int(d) for d in g.shape)
    dtype = _dtype_name(g)
    grad_s = xp.empty((rows, n), dtype=g.dtype)
    grad_w = xp.empty((rows, n), dtype=g.dtype)
    if rows == 0 or n == 0:
        return grad_s, grad_w
    _check_rows(rows)
    entry = _VJP_TOTAL_BYTES[regularization]
    kind, grid, extra = plan(rows, n, regularization, rt.sm_count, entry)
    common = (g, s, w, _w_stride(w, rows, n), block_ids, grad_s, grad_w)
    if kind == "small":
        args = common + (np.int32(rows), np.int32(n), np.int32(extra))
    else:
        scratch = xp.empty((extra * n * entry // 8,), dtype=np.float64)
        args = common + (scratch, np.int32(rows), np.int32(n))
    rt.kernel(_expression(f"vjp_{kind}", dtype, regularization))((grid,), (BLOCK,), args)
    return grad_s, grad_w


def _check_rows(rows: int) -> None:
    if rows > np.iinfo(np.int32).max:
        raise ValueError(f"{rows} rows exceed the int32 range of the isotonic kernels")
