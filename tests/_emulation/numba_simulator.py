"""Test-only patch of Numba's CUDA simulator: static `cuda.shared.array` made thread-safe.

The simulator runs a block's threads as Python threads and identifies a static shared array by
the (file, line) of its `cuda.shared.array` call; `FakeCUDAShared.array` looks the block's
dict of allocations up and inserts a new array in two steps, so a thread switch between them
(likely with a short `sys.setswitchinterval`, as the tests use) gave two threads different
"shared" arrays, and a kernel silently computed on private copies.

`install()` replaces `FakeCUDAShared.array` by one whose lookup-or-create is atomic (same key,
same semantics otherwise; dynamic shared memory, shape 0, is delegated unchanged). Call it once
after NUMBA_ENABLE_CUDASIM is set and before any kernel runs (tests/conftest.py); it is
idempotent, does nothing when the simulator is off, and returns whether the patch is active.
`install()` also makes the simulator's per-call swap of the `cuda` module in a device
function's globals read those globals atomically (see `_install_atomic_module_swap`).
The package itself never patches Numba (nothing the wheel ships may patch a third-party module).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import traceback

import numpy as np


def _new_shared_array(shape, dtype):
    """Storage of one simulated static shared array (a seam for the thread-safety test)."""
    return np.empty(shape, dtype)


def installed() -> bool:
    """Whether the simulator's shared arrays are patched in this process."""
    try:
        from numba.cuda.simulator import kernelapi
    except ImportError:
        return False
    return bool(getattr(kernelapi.FakeCUDAShared.array, "_sortgrad_thread_safe", False))


def install() -> bool:
    """Patches the simulator (see the module docstring); False when it is not enabled."""
    from numba.core import config

    if not config.ENABLE_CUDASIM:
        return False
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    shared_class = kernelapi.FakeCUDAShared
    if getattr(shared_class.array, "_sortgrad_thread_safe", False):
        return True
    original = shared_class.array
    lock = threading.Lock()

    def array(self, shape, dtype):
        if shape == 0:
            return original(self, shape, dtype)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = traceback.extract_stack(sys._getframe(1), limit=1)[-1][0:2]
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = _new_shared_array(shape, dtype)
                self._allocations[caller] = res
        return res

    array._sortgrad_thread_safe = True
    shared_class.array = array
    _install_atomic_module_swap(kernelapi)
    return True


def _install_atomic_module_swap(kernelapi) -> None:
    """The simulator swaps the `cuda` module in a device function's globals on every call,
    reading the globals with a generator that other simulated threads can interleave with
    ("dictionary changed size during iteration", seen in CI). Here the globals are read in one
    `list(...)` (a single C-level iteration, atomic under the GIL); the swap is otherwise the
    same."""
    from numba.cuda.simulator import kernel as simulator_kernel

    @contextlib.contextmanager
    def swapped_cuda_module(fn, fake_cuda_module):
        from numba import cuda
        fn_globals = fn.__globals__
        original = {k: v for k, v in list(fn_globals.items()) if v is cuda}
        fn_globals.update({k: fake_cuda_module for k in original})
        try:
            yield
        finally:
            fn_globals.update(original)

    kernelapi.swapped_cuda_module = swapped_cuda_module
    simulator_kernel.swapped_cuda_module = swapped_cuda_module
