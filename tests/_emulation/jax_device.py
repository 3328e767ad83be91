"""Device platforms that stand in for the GPU under the JAX binding's GPU branch, with JAX on the
CPU: the branch itself (`sortgrad/bindings/jax/_call.py`: `_device_call`, the measured scratch
output, the workspace carving, `out=` into XLA's buffers, the stream and backend passed to the
kernel API, vmap batching) runs unchanged; only the platform methods that touch a real GPU
(`_device.py`: wrap, stream, scope, zeros, release) are replaced:

- `EmulatedCupy(emulator)`: XLA's host buffers viewed as `EmulatedDeviceArray` (a NumPy
  subclass the kernel API treats as a CuPy array: `sortgrad.kernels._backends.array_kind` says
  "cupy" for it), the CuPy modules' launches on the CUDA host emulator
  (`cuda_host.Emulator.installed()`), `stream=` an `EmulatedStream` (launches run in order).
- `SimulatedNumba()`: the buffers wrapped zero-copy as Numba CUDA simulator device arrays, the
  Numba modules on the simulator, `stream=` a simulator stream.

Use: `with sortgrad.bindings.jax._call.emulate_device(platform): ...` around the tracing of the
functions under test (the route is part of the compiled-program cache key).
"""

from __future__ import annotations

import contextlib

import numpy as np

from _backends import EmulatedStream  # tests/_backends.py: the emulated backend's stream
from sortgrad.kernels import _backends


class EmulatedDeviceArray(np.ndarray):
    """Host memory standing for CuPy device memory (the emulated CuPy backend's arrays)."""


def _as_device(a):
    return np.asarray(a).view(EmulatedDeviceArray)


@contextlib.contextmanager
def _cupy_kind_for_emulated_arrays():
    """Within the block the kernel API routes `EmulatedDeviceArray`s to backend "cupy" and takes
    the emulator for a CuPy device."""
    kind, require = _backends.array_kind, _backends.require_device

    def array_kind(x):
        return "cupy" if isinstance(x, EmulatedDeviceArray) else kind(x)

    def require_device(backend):
        if backend != "cupy":
            require(backend)

    _backends.array_kind, _backends.require_device = array_kind, require_device
    try:
        yield
    finally:
        _backends.array_kind, _backends.require_device = kind, require


class EmulatedCupy:
    """The CuPy backend on the host emulator, as a device platform of the JAX binding."""

    backend = "cupy"

    def __init__(self, emulator):
        self.emulator = emulator
        self.streams: list = []  # every stream handed to a pass (tests check they reach kernels)

    def unavailable(self):
        return None

    def wrap(self, buffer):
        return _as_device(buffer)

    def stream(self, ctx, device):
        stream = EmulatedStream()
        self.streams.append(stream)
        return stream

    @contextlib.contextmanager
    def scope(self, device):
        assert device == 0
        with self.emulator.installed(), _cupy_kind_for_emulated_arrays():
            yield

    def current_device(self):
        return 0

    def zeros(self, shape, dtype):
        return _as_device(np.zeros(shape, dtype))

    def release(self):
        pass


class SimulatedNumba:
    """The Numba CUDA backend on Numba's CUDA simulator, as a device platform of the JAX
    binding (needs NUMBA_ENABLE_CUDASIM=1, which tests/conftest.py sets without a GPU)."""

    backend = "numba"

    def __init__(self):
        self.streams: list = []

    def unavailable(self):
        from numba.core import config
        return None if config.ENABLE_CUDASIM else "Numba's CUDA simulator is off"

    def wrap(self, buffer):
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        return FakeCUDAArray(np.asarray(buffer))

    def stream(self, ctx, device):
        from numba import cuda
        stream = cuda.stream()
        self.streams.append(stream)
        return stream

    def scope(self, device):
        assert device == 0
        return contextlib.nullcontext()

    def current_device(self):
        return 0

    def zeros(self, shape, dtype):
        from numba import cuda
        return cuda.to_device(np.zeros(shape, dtype))

    def release(self):
        pass
