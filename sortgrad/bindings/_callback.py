"""Running a host kernel inside a JAX program: buffer_callback (primary) or pure_callback.

"buffer" (default): `jax.experimental.buffer_callback` hands the kernel XLA's own buffers
(writeable NumPy views on CPU) and the kernel's results are written straight into the output
buffers; no extra host copies. "pure": `jax.pure_callback`, the portable path (JAX copies the
arguments and results). Choose with `set_callback_mode`, the `callback_mode` context manager,
or the environment variable SORTGRAD_CALLBACK=pure|buffer. The mode is read when a function is
traced: a jitted function keeps the mode it was compiled with.

Both use vmap_method="expand_dims": under vmap the kernel gets the whole batch in one call, as
extra leading dims (size 1 for arguments that are not batched), which `batched_rows` folds
into rows.
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

from ..kernels._common import as_rows

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


def batched_rows(row_fn):
    """Lifts row_fn(*2-D arrays) -> tuple of 2-D arrays to arrays with any leading dims.

    The leading dims of all arguments broadcast together (vmap's expand_dims gives unbatched
    arguments size-1 dims); each argument becomes (rows, its last dim), contiguous.
    """
    def lifted(*arrays):
        batch = arrays[0].shape[:-1]
        if any(a.shape[:-1] != batch for a in arrays):
            batch = np.broadcast_shapes(*[a.shape[:-1] for a in arrays])
            arrays = [np.broadcast_to(a, batch + a.shape[-1:]) for a in arrays]
        rows = [as_rows(a) for a in arrays]
        return tuple(r.reshape(batch + r.shape[-1:]) for r in row_fn(*rows))
    return lifted


def _writable_rows(a: np.ndarray) -> bool:
    return a.flags.c_contiguous and a.flags.writeable


def host_call(host_fn, result_specs, *args, into=None):
    """host_fn(*numpy arrays) -> tuple of numpy arrays, as a JAX op with `result_specs`.

    into: optional into(outs, *numpy arrays) that writes the results straight into the output
    arrays `outs` (C-contiguous, of `result_specs`) instead of returning them: buffer mode uses
    it on XLA's own output buffers (no allocation, no copy); the other paths use host_fn.
    """
    result_specs = tuple(result_specs)
    if _mode == "buffer" and jax.default_backend() == "cpu":
        def buffer_kernel(ctx, outs, *buffers):
            arrays = [np.asarray(b) for b in buffers]
            targets = [np.asarray(o) for o in outs]
            if into is not None and all(_writable_rows(t) for t in targets):
                into(targets, *arrays)
                return
            for target, result in zip(targets, host_fn(*arrays)):
                np.copyto(target, result, casting="no")
        return buffer_callback(buffer_kernel, result_specs, vmap_method="expand_dims")(*args)

    def pure_kernel(*arrays):
        return tuple(host_fn(*[np.asarray(a) for a in arrays]))
    # Until the GPU kernels land, a GPU backend also takes this host path.
    return jax.pure_callback(pure_kernel, result_specs, *args, vmap_method="expand_dims")
