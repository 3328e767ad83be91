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


def array_kind(x) -> str:
    """Where an array lives: "cupy" (CuPy), "numba" (Numba device array, simulator included),
    "cuda" (another object with `__cuda_array_interface__`, e.g. a torch CUDA tensor) or "host"
    (NumPy and anything else `np.asarray` takes)."""
    module = type(x).__module__
    if module.startswith("cupy"):
        return "cupy"
    if module.startswith("numba.cuda"):
        return "numba"
    if hasattr(x, "__cuda_array_interface__"):
        return "cuda"
    return "host"


def _cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(arrays, backend: str | None) -> str:
    """The backend follows the arrays (NumPy -> "cpu", CuPy -> "cupy", Numba device arrays ->
    "numba"; other `__cuda_array_interface__` objects -> "cupy" when CuPy is installed, else
    "numba") unless one is named. An explicit backend that cannot run raises (ImportError
    naming the pip extra, or RuntimeError without a GPU); it never falls back silently.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    kinds = {array_kind(a) for a in arrays if a is not None}
    if backend is None:
        if "cupy" in kinds:
            backend = "cupy"
        elif "numba" in kinds:
            backend = "numba"
        elif "cuda" in kinds:
            backend = "cupy" if _cupy_available() else "numba"
        else:
            backend = "cpu"
    if backend == "cpu":
        if kinds - {"host"}:
            raise TypeError("backend='cpu' takes host (NumPy) arrays; got a device array "
                            "(copy it to the host first, e.g. .get() or .copy_to_host())")
        return backend
    if backend == "cupy":
        try:
            import cupy
        except ImportError as err:
            raise ImportError(f"backend='cupy' needs CuPy and a CUDA GPU: {_GPU_EXTRA}") from err
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception:  # CuPy raises its own CUDARuntimeError without a driver
            count = 0
        if count == 0:
            raise RuntimeError(f"backend='cupy' needs a CUDA GPU and driver; none was found "
                               f"({_GPU_EXTRA})")
        return backend
    try:
        from numba import cuda
    except ImportError as err:  # pragma: no cover - numba is a core dependency
        raise ImportError("backend='numba' needs numba with its CUDA target "
                          "(pip install numba-cuda)") from err
    if not cuda.is_available():
        raise RuntimeError("backend='numba' needs a CUDA GPU and driver, or Numba's CUDA "
                           "simulator (NUMBA_ENABLE_CUDASIM=1); none was found")
    return backend


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
