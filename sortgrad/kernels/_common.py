"""Shared plumbing of the kernel layer: backend choice, argument checks, row threading.

Nothing here knows an algorithm. Every public kernel validates its arguments with these helpers
before any work starts, so bad input fails with a ValueError/TypeError naming the argument.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

INT32_MAX = np.iinfo(np.int32).max
BACKENDS = ("cpu", "cupy", "numba")
_GPU_EXTRA = "install sortgrad[cuda12] or sortgrad[cuda13] (the CuPy build matching your CUDA)"


def _is_cupy_array(x) -> bool:
    return type(x).__module__.startswith("cupy")


def resolve_backend(arrays, backend: str | None) -> str:
    """The backend follows the arrays (NumPy -> "cpu", CuPy -> "cupy") unless one is named.

    An explicit backend that cannot run raises; it never falls back silently.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    on_gpu = [_is_cupy_array(a) for a in arrays if a is not None]
    if backend is None:
        backend = "cupy" if any(on_gpu) else "cpu"
    if backend == "cpu":
        if any(on_gpu):
            raise TypeError("backend='cpu' takes NumPy arrays; got a CuPy array (use .get())")
        return backend
    try:
        import cupy  # noqa: F401
    except ImportError as err:
        raise ImportError(f"backend={backend!r} needs CuPy and a CUDA GPU: {_GPU_EXTRA}") from err
    raise NotImplementedError(
        f"backend={backend!r}: the GPU kernels are not part of this build yet; use backend='cpu'"
    )


def as_float_or_int_array(x, name: str, *, allow_int: bool = True) -> np.ndarray:
    """Checks that `x` is an array of a supported key dtype and returns it as an ndarray."""
    x = np.asarray(x)
    kind = x.dtype.kind
    if kind == "f" or x.dtype.name == "bfloat16" or (allow_int and kind in "iub"):
        return x
    wanted = "a floating, integer or bool" if allow_int else "a floating-point"
    raise TypeError(f"{name} must be {wanted} array, got dtype {x.dtype}")


def as_rows(a, dtype=None) -> np.ndarray:
    """A C-contiguous (rows, n) view or copy of an array with n = a.shape[-1] (also n = 0)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])


def check_row_length(n: int, name: str) -> None:
    if n > INT32_MAX:
        raise ValueError(f"{name}: rows of {n} elements exceed the int32 index range")


def check_index_array(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    return a


def check_indices_in_range(idx: np.ndarray, n: int, name: str) -> None:
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"{name} has entries outside [0, {n})")


@functools.lru_cache(maxsize=None)
def num_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 64))


_POOL: ThreadPoolExecutor | None = None


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
