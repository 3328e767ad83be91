"""Device scratch memory carved from a caller's buffer, and measuring how much a call takes.

Every device backend module allocates its outputs and scratch in exactly one way per array kind
-- `cupy_loader.xp().empty` in the CuPy modules, `numba_support.empty` in the Numba modules --
and both go through `allocate`, which consults the *workspace* of the calling thread:

- no workspace (the default): the backend's own allocator (CuPy's pool, Numba's allocator);
- `use(buffer)`: a bump allocator over `buffer`, a 1-D uint8 device array of the backend's kind
  (e.g. an XLA output buffer the JAX binding requested as scratch). Every allocation starts on
  an `ALIGNMENT`-byte boundary and lives until the block ends (nothing is reused, so memory
  still read by a queued kernel is never handed out again). An allocation that does not fit
  goes to the backend's allocator and is counted in `overflow_bytes`;
- `measuring()`: allocations go to the backend's allocator and are counted: `.bytes` is the
  size of a buffer with which `use` serves the same sequence of calls without overflow.

The sizes a row function allocates depend only on the shapes, dtypes and static arguments of
the call (and the device's multiprocessor count), never on the data, so a measured size holds
for every call of the same signature on the same kind of device.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

ALIGNMENT = 256  # bytes: what cudaMalloc guarantees, enough for every vector load

_local = threading.local()


def aligned(nbytes: int) -> int:
    return -(-int(nbytes) // ALIGNMENT) * ALIGNMENT


class Workspace:
    """A thread's allocation policy (see the module docstring). `buffer` None: measuring."""

    def __init__(self, buffer=None):
        self.buffer = buffer
        self.capacity = 0 if buffer is None else int(buffer.shape[0])
        self.bytes = 0            # measuring: aligned bytes requested so far
        self.offset = 0           # use: next free byte of the buffer
        self.overflow_bytes = 0   # use: bytes served by the backend's allocator instead

    def allocate(self, shape, dtype, fallback):
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(d) for d in shape)
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if self.buffer is None:
            self.bytes += aligned(nbytes)
            return fallback(shape, dtype)
        start = self.offset
        if start + nbytes > self.capacity:
            self.overflow_bytes += nbytes
            return fallback(shape, dtype)
        self.offset = start + aligned(nbytes)
        return self.buffer[start:start + nbytes].view(dtype).reshape(shape)


def active() -> Workspace | None:
    """The calling thread's workspace (None: allocate normally)."""
    return getattr(_local, "workspace", None)


def allocate(shape, dtype, fallback):
    """A new uninitialised array: from the active workspace when there is one, else
    `fallback(shape, dtype)` (the backend's allocator)."""
    workspace = getattr(_local, "workspace", None)
    if workspace is None:
        return fallback(shape, dtype)
    return workspace.allocate(shape, dtype, fallback)


@contextlib.contextmanager
def _installed(workspace: Workspace):
    previous = getattr(_local, "workspace", None)
    _local.workspace = workspace
    try:
        yield workspace
    finally:
        _local.workspace = previous


def use(buffer):
    """Context manager: device allocations of this thread are carved from `buffer` (1-D uint8,
    C-contiguous, of the backend's array kind); yields the `Workspace`."""
    if len(buffer.shape) != 1 or np.dtype(buffer.dtype) != np.uint8:
        raise ValueError("a workspace buffer is a 1-D uint8 array")
    return _installed(Workspace(buffer))


def measuring():
    """Context manager: device allocations of this thread are counted (and made normally);
    yields the `Workspace` whose `.bytes` is the buffer size `use` needs."""
    return _installed(Workspace())
