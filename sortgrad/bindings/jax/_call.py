"""Running a kernel of the public kernel API inside a JAX program: one callback per op pass.

A pass is a *kernel function* `fn(*arrays, out=None)`: it calls `sortgrad.kernels` on the
arrays it is handed and writes its results into `out` (a tuple of arrays of the result specs)
or, with `out=None`, returns them as a tuple. The arrays it gets follow the buffers: NumPy
views on the CPU (CuPy views on the GPU: the next step, see `_gpu_branch`), so the kernel API
picks the backend from them; nothing here selects an algorithm.

Callback modes:
- "buffer" (default): `jax.experimental.buffer_callback` hands the pass XLA's own buffers;
  the pass writes its results straight into XLA's output buffers (no allocation, no copy).
  The platform is read from the buffers (their DLPack device).
- "pure": `jax.pure_callback`, the portable path (JAX copies arguments and results).
Choose with `set_callback_mode`, the `callback_mode` context manager, or the environment
variable SORTGRAD_CALLBACK=pure|buffer. The mode is read when a function is traced: a jitted
function keeps the mode it was compiled with.

Both use vmap_method="expand_dims": under vmap a pass gets the whole batch in one call, as
extra leading dims (size 1 for arguments that are not batched); `_broadcast_batch` gives every
argument the full batch shape before the kernels see them. Inputs are never written.
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

MODES = ("buffer", "pure")
_mode = os.environ.get("SORTGRAD_CALLBACK", "buffer")
if _mode not in MODES:
    raise ValueError(f"SORTGRAD_CALLBACK must be one of {MODES}, got {_mode!r}")


def set_callback_mode(mode: str) -> None:
    """Selects how the ops call their kernels: "buffer" (default) or "pure" (portable)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"callback mode must be one of {MODES}, got {mode!r}")
    _mode = mode


def get_callback_mode() -> str:
    return _mode


@contextlib.contextmanager
def callback_mode(mode: str):
    """Context manager: functions traced inside use `mode`."""
    previous = get_callback_mode()
    set_callback_mode(mode)
    try:
        yield
    finally:
        set_callback_mode(previous)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _staged(impl, x, mode: str, static: tuple):
    with callback_mode(mode):
        return impl(x, *static)


def staged_call(impl, x, *static):
    """impl(x, *static), compiled once per (impl, static arguments, callback mode, x's type).

    Every public op runs its body through this after validating its arguments, so that an
    eager call reuses a compiled program instead of tracing and compiling the callbacks again
    (a host callback is a new function object per trace, which defeats JAX's op-by-op cache).
    Inside an outer `jit`/`grad`/`vmap` this is a nested jit: traced with the caller, no cost
    at run time. `impl` must be a module-level function; `static` hashable (ints, floats,
    strings, bools, tuples of them).
    """
    return _staged(impl, x, _mode, tuple(static))


def _broadcast_batch(arrays):
    """Every array with the broadcast leading dims of all (vmap's expand_dims gives unbatched
    arguments size-1 dims); each keeps its last dim."""
    batch = arrays[0].shape[:-1]
    if all(a.shape[:-1] == batch for a in arrays):
        return arrays
    batch = np.broadcast_shapes(*[a.shape[:-1] for a in arrays])
    return [np.broadcast_to(a, batch + a.shape[-1:]) for a in arrays]


_DLPACK_CPU = 1  # DLDeviceType kDLCPU


def _on_host(buffers) -> bool:
    """Whether XLA's buffers live in host memory. Read from DLPack's device tag: cheap on every
    platform (`__cuda_array_interface__` and `ctx.stream` raise an XLA error on the CPU, which
    costs tens of microseconds per call)."""
    return all(b.__dlpack_device__()[0] == _DLPACK_CPU for b in buffers)


def _gpu_branch(ctx, outs, buffers):
    raise NotImplementedError(
        "sortgrad's JAX ops do not run on GPU buffers in buffer mode yet (the CuPy branch of "
        "the binding is the next step); use sortgrad.set_callback_mode('pure') to run them on "
        "the host")


def kernel_call(kernel_fn, result_specs, *args):
    """kernel_fn(*arrays, out=...) as a JAX op with `result_specs` (ShapeDtypeStructs)."""
    result_specs = tuple(result_specs)
    if _mode == "buffer" and jax.default_backend() == "cpu":
        def buffer_kernel(ctx, outs, *buffers):
            if not _on_host((*buffers, *outs)):
                _gpu_branch(ctx, outs, buffers)
            arrays = _broadcast_batch([np.asarray(b) for b in buffers])
            kernel_fn(*arrays, out=tuple(np.asarray(o) for o in outs))
        return buffer_callback(buffer_kernel, result_specs, vmap_method="expand_dims")(*args)

    def pure_kernel(*arrays):
        results = kernel_fn(*_broadcast_batch([np.asarray(a) for a in arrays]), out=None)
        return tuple(np.asarray(r) for r in results)
    # A non-CPU default backend takes this host path until the GPU branch of buffer mode lands.
    return jax.pure_callback(pure_kernel, result_specs, *args, vmap_method="expand_dims")
