"""The GPU side of the binding: XLA's device buffers as arrays of a kernel backend, XLA's stream.

A *device platform* is what a callback pass needs to run the kernel API on XLA's buffers:
- `backend`: the kernel backend it routes to ("cupy" or "numba");
- `unavailable()`: why it cannot run in this process (None when it can);
- `wrap(buffer)`: a zero-copy array of the backend over an XLA buffer (shape and dtype of the
  buffer; nothing is synchronised);
- `stream(ctx, device)`: the launch stream for the kernel API, from the callback's context;
- `scope(device)`: a context manager making the device (its number) current;
- `current_device()`, `zeros(shape, dtype)`, `release()`: the current device, a new
  zero-filled device array and the return of cached memory to the driver (the trace-time
  measuring run of scratch sizes: JAX holds most of the GPU, the measuring run's memory must
  not stay in a pool afterwards).
`CupyPlatform` and `NumbaPlatform` are the real ones; the tests plug in emulated ones.

Backend choice: CuPy by default; Numba CUDA on request -- `set_gpu_backend("numba")`, the
`gpu_backend(...)` context manager or SORTGRAD_GPU_BACKEND=numba (read when a function is
traced; per thread / async context). With the default and no CuPy, one warning names the pip
extra and the ops take the host path; an explicitly chosen backend that is missing raises
ImportError naming the extra.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import threading
import warnings

import numpy as np

from ...kernels import GPU_EXTRA, device_unavailable

GPU_BACKENDS = ("cupy", "numba")
# dtypes the device kernels have no keys for (yet): passes touching them run on the host
NO_DEVICE_KEYS = ("bfloat16",)
NUMBA_EXTRA = "pip install numba-cuda (or sortgrad[cuda12] / sortgrad[cuda13])"
_DLPACK_CUDA = 2  # DLDeviceType kDLCUDA

_DEFAULT_CHOICE = os.environ.get("SORTGRAD_GPU_BACKEND") or None
if _DEFAULT_CHOICE not in (None, *GPU_BACKENDS):
    raise ValueError(f"SORTGRAD_GPU_BACKEND must be one of {GPU_BACKENDS}, got "
                     f"{_DEFAULT_CHOICE!r}")
_choice = contextvars.ContextVar("sortgrad_gpu_backend", default=_DEFAULT_CHOICE)


def _checked(name):
    if name not in (None, *GPU_BACKENDS):
        raise ValueError(f"gpu backend must be None or one of {GPU_BACKENDS}, got {name!r}")
    return name


def set_gpu_backend(name: str | None) -> None:
    """The kernel backend JAX ops traced from now on in this thread (context) use on GPU
    buffers: "cupy", "numba", or None (the default: CuPy, or the host path with one warning
    where CuPy is missing)."""
    _choice.set(_checked(name))


def get_gpu_backend() -> str | None:
    return _choice.get()


@contextlib.contextmanager
def gpu_backend(name: str | None):
    """Context manager: functions traced inside (this thread / context) use `name`."""
    token = _choice.set(_checked(name))
    try:
        yield
    finally:
        _choice.reset(token)


def _cuda_ptr(buffer) -> int:
    """The device pointer of an XLA buffer, which must be row-major (dims of size 1 aside)."""
    interface = buffer.__cuda_array_interface__
    strides = interface.get("strides")
    if strides is not None:
        shape, step = tuple(buffer.shape), np.dtype(buffer.dtype).itemsize
        for dim, stride in zip(reversed(shape), reversed(tuple(strides))):
            if dim > 1 and stride != step:
                raise ValueError("sortgrad's GPU passes need row-major XLA buffers")
            step *= dim
    return int(interface["data"][0])


def _stream_handle(ctx) -> int:
    stream = ctx.stream
    return int(stream() if callable(stream) else stream)


def device_of(buffer) -> int:
    """The device number of an XLA buffer (from its DLPack device)."""
    return int(buffer.__dlpack_device__()[1])


class CupyPlatform:
    backend = "cupy"

    def unavailable(self) -> str | None:
        return device_unavailable("cupy")

    def wrap(self, buffer):
        import cupy
        shape, dtype = tuple(buffer.shape), np.dtype(buffer.dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        memory = cupy.cuda.UnownedMemory(_cuda_ptr(buffer), nbytes, buffer, device_of(buffer))
        return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0))

    def stream(self, ctx, device: int):
        import cupy
        return cupy.cuda.ExternalStream(_stream_handle(ctx), device)

    def scope(self, device: int):
        import cupy
        return cupy.cuda.Device(device)

    def current_device(self) -> int:
        import cupy
        return int(cupy.cuda.runtime.getDevice())

    def zeros(self, shape, dtype):
        import cupy
        return cupy.zeros(shape, dtype)

    def release(self):
        import cupy
        cupy.get_default_memory_pool().free_all_blocks()  # cudaFree waits for the device


class NumbaPlatform:
    backend = "numba"

    def unavailable(self) -> str | None:
        return device_unavailable("numba")

    def wrap(self, buffer):
        from numba import cuda
        return cuda.from_cuda_array_interface(buffer.__cuda_array_interface__, owner=buffer,
                                              sync=False)

    def stream(self, ctx, device: int):
        from numba import cuda
        return cuda.external_stream(_stream_handle(ctx))

    def scope(self, device: int):
        from numba import cuda
        return cuda.gpus[device]

    def current_device(self) -> int:
        from numba import cuda
        return int(cuda.get_current_device().id)

    def zeros(self, shape, dtype):
        from numba import cuda
        a = cuda.device_array(shape, dtype)
        a.copy_to_device(np.zeros(shape, dtype))
        return a

    def release(self):
        from numba import cuda
        pending = getattr(cuda.current_context(), "deallocations", None)
        if pending is not None:
            pending.clear()  # free what Numba deferred


PLATFORMS = {"cupy": CupyPlatform(), "numba": NumbaPlatform()}
_warned = set()
_warn_lock = threading.Lock()


def warn_once(key, message: str) -> None:
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


@functools.lru_cache(maxsize=None)
def _jax_has_gpu() -> bool:
    import jax
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def gpu_platform():
    """The platform GPU passes run on (trace time), or None for the host path: no GPU visible
    to JAX (the GPU branch is then never run), or no CuPy with the default choice (warned
    once). An explicitly chosen backend that cannot run raises ImportError."""
    if not _jax_has_gpu():
        return None
    choice = _choice.get()
    name = choice or "cupy"
    platform = PLATFORMS[name]
    reason = platform.unavailable()
    if reason is None:
        return platform
    if choice is not None:
        extra = GPU_EXTRA if name == "cupy" else NUMBA_EXTRA
        raise ImportError(f"sortgrad gpu backend {name!r} cannot run: {reason} ({extra})")
    warn_once(("no-cupy", reason),
              f"sortgrad runs its JAX ops on the host on this GPU machine: {reason}. For the "
              f"GPU kernels: pip install \"sortgrad[cuda13]\" (or sortgrad[cuda12]), or "
              f"sortgrad.set_gpu_backend(\"numba\") with numba-cuda")
    return None


def on_cuda(buffers) -> bool:
    return all(b.__dlpack_device__()[0] == _DLPACK_CUDA for b in buffers)
