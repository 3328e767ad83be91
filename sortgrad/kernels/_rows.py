"""CPU plumbing of the kernel layer: rows views, the thread pool, row-parallel Numba kernels.

Nothing here knows an algorithm.

`row_parallel` compiles a Numba kernel twice -- threaded and serial -- and picks by its first
argument: serial below PARALLEL_MIN_ELEMENTS elements, and for a 2-D first argument of a single
row (the kernels' prange runs over the rows of their first argument: one row is one task). A
`parallel=True` kernel pays for waking its thread pool on every call (tens of microseconds;
~100 us with OMP_WAIT_POLICY=PASSIVE, where the pool sleeps between calls), which dominates small
inputs. A kernel that splits its work otherwise calls `.parallel` itself. Both are cached on
disk (the serial one under its own name, so the two never share a cache entry);
`_jit_cache.ensure_fresh` keeps that cache from serving code older than the sources.

Fork safety: Numba's threaded kernels run on GNU OpenMP where that is the threading layer, and
GNU OpenMP cannot run in a process forked from one that used it (the child aborts; a
`multiprocessing` fork pool then waits forever). A forked child therefore runs every kernel
serially and starts a fresh thread pool (the parent's threads do not exist there).
"""

from __future__ import annotations

import functools
import math
import os
import types
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

# Below this many elements in the first argument, one thread is faster than waking the pool.
PARALLEL_MIN_ELEMENTS = 1 << 15

def as_rows(a, dtype=None) -> np.ndarray:
    """A C-contiguous (rows, n) view or copy of an array with n = a.shape[-1] (also n = 0)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])


@functools.lru_cache(maxsize=None)
def num_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 64))


_POOL: ThreadPoolExecutor | None = None
_FORKED = False  # this process is a child forked from one that may have used the threaded kernels


def _after_fork_in_child() -> None:
    global _FORKED, _POOL
    _FORKED = True
    _POOL = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=num_threads(), thread_name_prefix="sortgrad")
    return _POOL


def map_row_chunks(fn, num_rows: int, *, min_rows_per_chunk: int = 8, min_work: int = 1 << 15,
                   row_len: int = 1) -> None:
    """Calls fn(start, stop) over contiguous row ranges, on all cores when the work is large.

    NumPy's sorts release the GIL, so threads give real parallelism for them.
    """
    threads = num_threads()
    if threads == 1 or num_rows < 2 * min_rows_per_chunk or num_rows * row_len < min_work:
        fn(0, num_rows)
        return
    chunks = min(threads, num_rows // min_rows_per_chunk)
    bounds = np.linspace(0, num_rows, chunks + 1).astype(np.int64)
    futures = [_pool().submit(fn, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    for f in futures:
        f.result()


def row_parallel(fn):
    parallel = numba.njit(parallel=True, cache=True, nogil=True)(fn)
    serial_fn = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                   fn.__defaults__, fn.__closure__)
    serial_fn.__qualname__ = fn.__qualname__ + "_serial"
    serial = numba.njit(cache=True, nogil=True)(serial_fn)

    @functools.wraps(fn)
    def call(*args):
        first = args[0]
        if (first.size >= PARALLEL_MIN_ELEMENTS and not (first.ndim == 2 and first.shape[0] == 1)
                and not _FORKED):
            return parallel(*args)
        return serial(*args)

    def threaded(*args):
        """The threaded kernel (serial in a forked child)."""
        return (serial if _FORKED else parallel)(*args)

    call.parallel = threaded
    call.serial = serial
    return call


# --- gathers (values move as raw bits, so every dtype takes the same compiled code) -------

@row_parallel
def _gather_rows(values, perm, out):
    rows, m = perm.shape
    for r in numba.prange(rows):
        for i in range(m):
            out[r, i] = values[r, perm[r, i]]


def bits_dtype(dtype):
    """The unsigned integer dtype of the same width (values move as bits), or None (e.g.
    complex128: 16 bytes; object dtypes)."""
    dtype = np.dtype(dtype)
    if dtype.itemsize not in (1, 2, 4, 8) or dtype.kind == "O" or (
            dtype.kind == "V" and dtype.name != "bfloat16"):
        return None
    return np.dtype(f"u{dtype.itemsize}")


def gather_rows(values: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """out[r, i] = values[r, perm[r, i]] (the values' exact bits)."""
    return gather_rows_into(values, perm, np.empty(perm.shape, dtype=values.dtype))


def gather_rows_into(values: np.ndarray, perm: np.ndarray, out: np.ndarray) -> np.ndarray:
    """gather_rows writing into `out` (C-contiguous, perm's shape, values' dtype); returns it."""
    if out.size:
        bits = bits_dtype(values.dtype)
        if bits is None:
            out[...] = np.take_along_axis(values, perm, axis=-1)
        else:
            _gather_rows(np.ascontiguousarray(values).view(bits), perm, out.view(bits))
    return out
