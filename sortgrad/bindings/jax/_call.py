"""Running a kernel of the public kernel API inside a JAX program: one callback per op pass.

A pass is a *kernel function* `fn(*arrays, out=None, **route)`: it calls `sortgrad.kernels` on
the arrays it is handed, passing `route` (the keywords `stream=` and `backend=` on GPU
buffers, nothing on the host) on to every kernel call, and writes its results into `out` (a
tuple of arrays of the result specs) or, with `out=None`, returns them as a tuple. Nothing
here selects an algorithm: the kernel API does, from the arrays and the backend.

Callback modes:
- "buffer" (default): `jax.experimental.buffer_callback` hands the pass XLA's own buffers and
  the pass writes its results straight into XLA's output buffers. Which buffers those are is
  decided where XLA lowers the program (`jax.lax.platform_dependent`, so from the platform the
  buffers live on, not from `jax.default_backend()`):
  - CPU: NumPy views of the buffers; the kernel API runs its CPU backend.
  - CUDA: zero-copy CuPy (or Numba) arrays over the device buffers, the buffer's device made
    current, every kernel launched on XLA's stream (`ctx.stream`); nothing synchronises,
    nothing is copied to the host. Scratch memory is one extra uint8 output of the callback
    (XLA allocates it; JAX preallocates most of the GPU, so CuPy's pool is not used): its size
    is measured once per pass signature at trace time (`_scratch_bytes`) and the kernels'
    allocations are carved from it (`sortgrad.kernels.use_scratch`). The device kernels have
    no bfloat16 arrays: the ops hand them float32 keys (`device_dependent`, `hard._keyed`), and
    a pass that still holds bfloat16 takes the host path. `_device.py`: the backend choice.
- "pure": `jax.pure_callback`, the portable path (JAX copies arguments and results to the host).
Choose with `set_callback_mode`, the `callback_mode` context manager, or the environment
variable SORTGRAD_CALLBACK=pure|buffer. The mode is read when a function is traced: a jitted
function keeps the mode it was compiled with. The mode (like the GPU backend choice) belongs to
the thread / async context (`contextvars`): one thread's setting never changes what another
traces.

Threads: buffer mode runs from any number of threads. Pure mode on the CPU hits a JAX limit:
`jax.pure_callback` uploads each callback argument to the CPU device again and waits for it;
an upload of 100 KiB or more is asynchronous, and with two or more CPU programs in flight
those waits never end (JAX 0.10; a plain `jax.pure_callback` hangs the same way). Eager calls
(`staged_call`) in pure mode therefore run one at a time, process-wide, each to completion;
programs the user compiles run as JAX runs them.

Errors: an exception raised inside a pass is re-raised as `KernelError` ("sortgrad <pass>:
<ExceptionType>: <message>", the original chained); JAX turns it into its
`jax.errors.JaxRuntimeError` (INTERNAL, the message and traceback in its text).

All callbacks use vmap_method="broadcast_all": under vmap a pass gets the whole batch in one
call, every argument with the full batch dims (XLA broadcasts unbatched ones). Inputs are
never written.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading

import jax
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

from ... import kernels
from . import _device, _sharding
from ._sharding import as_varying, varying_axes

MODES = ("buffer", "pure")
_DEFAULT_MODE = os.environ.get("SORTGRAD_CALLBACK", "buffer")
if _DEFAULT_MODE not in MODES:
    raise ValueError(f"SORTGRAD_CALLBACK must be one of {MODES}, got {_DEFAULT_MODE!r}")
# Per thread / async context: one thread's mode never changes what another thread traces.
_mode = contextvars.ContextVar("sortgrad_callback_mode", default=_DEFAULT_MODE)
_emulated = contextvars.ContextVar("sortgrad_emulated_device", default=None)


def set_callback_mode(mode: str) -> None:
    """Selects how the ops traced from now on in this thread (context) call their kernels:
    "buffer" (default) or "pure" (portable). Other threads keep theirs (new threads start
    from SORTGRAD_CALLBACK, else "buffer")."""
    if mode not in MODES:
        raise ValueError(f"callback mode must be one of {MODES}, got {mode!r}")
    _mode.set(mode)


def get_callback_mode() -> str:
    return _mode.get()


@contextlib.contextmanager
def callback_mode(mode: str):
    """Context manager: functions traced inside (in this thread / context) use `mode`."""
    if mode not in MODES:
        raise ValueError(f"callback mode must be one of {MODES}, got {mode!r}")
    token = _mode.set(mode)
    try:
        yield
    finally:
        _mode.reset(token)


@contextlib.contextmanager
def emulate_device(platform):
    """Context manager for tests: functions traced inside run their buffer-mode passes through
    the GPU branch on `platform` (an emulated device platform, see `_device.py`) whatever the
    platform XLA lowers for. None: no emulation."""
    token = _emulated.set(platform)
    try:
        yield
    finally:
        _emulated.reset(token)


def current_route() -> tuple:
    """What decides how passes traced now run: (callback mode, GPU backend choice, emulated
    device). Hashable: part of the key of every cached compiled program."""
    return (_mode.get(), _device.get_gpu_backend(), _emulated.get())


@contextlib.contextmanager
def routed(route: tuple):
    """Context manager: functions traced inside use `route` (from `current_route`)."""
    mode, gpu_backend, emulated = route
    with callback_mode(mode), _device.gpu_backend(gpu_backend), emulate_device(emulated):
        yield


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _staged(impl, x, route: tuple, static: tuple):
    with routed(route):
        return impl(x, *static)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _staged_sharded(impl, operands: tuple, route: tuple, static: tuple, plan: _sharding.Plan):
    def per_shard(*local):
        with routed(route):
            return impl(local if len(local) > 1 else local[0], *static)
    return _sharding.run_sharded(per_shard, operands, plan)


def staged_call(impl, x, *static, layout: _sharding.Layout):
    """impl(x, *static), compiled once per (impl, static arguments, callback mode, x's type).

    Every public op runs its body through this after validating its arguments, so that an
    eager call reuses a compiled program instead of tracing and compiling the callbacks again
    (a host callback is a new function object per trace, which defeats JAX's op-by-op cache).
    Inside an outer `jit`/`grad`/`vmap` this is a nested jit: traced with the caller, no cost
    at run time. `impl` must be a module-level function; `static` hashable (ints, floats,
    strings, bools, tuples of them). The callback mode, the GPU backend choice and an
    emulated device (tests) are part of the key. `x`: one array, or a tuple of operands.

    Sharded x (`layout` says which dims are rows): when its batch dims are split over mesh
    axes (explicit axes, or a concrete array's NamedSharding), impl runs inside `shard_map`
    over them: each device on its own rows, nothing gathered (`_sharding.plan`).
    """
    route = current_route()
    operands = x if isinstance(x, tuple) else (x,)
    traced = _traced(operands)
    sharded = _sharding.plan(operands, layout)
    if sharded is not None:
        run = functools.partial(_staged_sharded, impl, operands, route, tuple(static), sharded)
    else:
        if traced:
            _sharding.warn_if_unseen()
        run = functools.partial(_staged, impl, x, route, tuple(static))
    if route[0] != "pure" or traced:
        return run()
    # Pure mode: one eager program at a time, run to completion (see the module docstring).
    with _PURE_EAGER_LOCK:
        return jax.block_until_ready(run())


_PURE_EAGER_LOCK = threading.Lock()


def _traced(operands: tuple) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(operands))


class KernelError(RuntimeError):
    """An exception raised inside a pass, re-raised naming the pass (the original chained).
    The user sees it inside JAX's `jax.errors.JaxRuntimeError`."""


@functools.cache
def pass_name(kernel_fn) -> str:
    """A readable name for a pass: the kernel API functions it calls (e.g. "soft_rank",
    "soft_rank_vjp"; found in its closure or among the names its code uses), else its
    qualified name."""
    names = []
    for cell in getattr(kernel_fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if callable(value) and (getattr(value, "__module__", "") or "").startswith(
                "sortgrad.kernels"):
            names.append(getattr(value, "__name__", repr(value)))
    code = getattr(kernel_fn, "__code__", None)
    if not names and code is not None:
        names = [n for n in code.co_names if not n.startswith("_")
                 and callable(getattr(kernels, n, None)) and n != "kernels"]
    return "/".join(dict.fromkeys(names)) or getattr(kernel_fn, "__qualname__", repr(kernel_fn))


def _describe(arrays) -> str:
    return ", ".join(f"{np.dtype(a.dtype).name}{list(a.shape)}" for a in arrays)


def _run_pass(kernel_fn, arrays, **kwargs):
    """kernel_fn(*arrays, **kwargs); an exception it raises becomes a KernelError whose
    message starts "sortgrad <pass>: <ExceptionType>: <message>"."""
    try:
        return kernel_fn(*arrays, **kwargs)
    except Exception as exc:
        raise _kernel_error(kernel_fn, arrays, kwargs.get("out"), exc) from exc


def _kernel_error(kernel_fn, arrays, out, exc) -> KernelError:
    where = f"arguments {_describe(arrays)}"
    where += "; results allocated by the kernel" if out is None else \
        f"; results {_describe(out)}"
    return KernelError(f"sortgrad {pass_name(kernel_fn)}: {type(exc).__name__}: {exc} "
                       f"({where})")


def _spec_key(specs) -> tuple:
    return tuple((tuple(s.shape), np.dtype(s.dtype).name) for s in specs)


@functools.lru_cache(maxsize=4096)
def _scratch_bytes(platform, kernel_fn, arg_specs: tuple, result_specs: tuple) -> int:
    """Bytes of scratch `kernel_fn` allocates on `platform` for arguments and results of these
    (shape, dtype) specs: one measuring run on zero-filled device arrays (allocation sizes
    depend on shapes only; zeros are valid permutations and block ids for every pass)."""
    if platform.unavailable() is not None:
        return 0  # never run here (e.g. the GPU branch traced on a machine without one)
    with platform.scope(platform.current_device()):
        arrays = [platform.zeros(shape, dtype) for shape, dtype in arg_specs]
        results = tuple(platform.zeros(shape, dtype) for shape, dtype in result_specs)
        with kernels.measure_scratch() as measured:
            kernel_fn(*arrays, out=results, stream=None, backend=platform.backend)
        del arrays, results
        platform.release()
    return measured.bytes


def _device_call(platform, kernel_fn, result_specs, args):
    """The pass on `platform`: XLA's buffers wrapped, XLA's stream, scratch as an output."""
    arg_specs = _spec_key(args)
    scratch = _scratch_bytes(platform, kernel_fn, arg_specs, _spec_key(result_specs))
    count = len(result_specs)
    specs = result_specs + ((jax.ShapeDtypeStruct((scratch,), np.uint8),) if scratch else ())

    def device_pass(ctx, outs, *buffers):
        device = _device.device_of(outs[0])
        with platform.scope(device):
            stream = platform.stream(ctx, device)
            arrays = [platform.wrap(b) for b in buffers]
            results = tuple(platform.wrap(o) for o in outs[:count])
            with _scratch_workspace(platform, outs[count:]) as used:
                _run_pass(kernel_fn, arrays, out=results, stream=stream,
                          backend=platform.backend)
            if used is not None and used.overflow_bytes:
                _device.warn_once(("scratch", kernel_fn, arg_specs),
                                  f"a sortgrad GPU pass needed {used.overflow_bytes} bytes of "
                                  f"scratch beyond the {used.capacity} measured; they came "
                                  f"from the backend's memory pool")

    outputs = buffer_callback(device_pass, specs, vmap_method="broadcast_all")(*args)
    return tuple(outputs[:count])


def _scratch_workspace(platform, scratch_buffers):
    if not scratch_buffers:
        return contextlib.nullcontext()
    buffer = platform.wrap(scratch_buffers[0])
    return kernels.use_scratch(buffer.reshape(int(np.prod(buffer.shape))))


def _takes_device(args, result_specs) -> bool:
    return not any(np.dtype(a.dtype).name in _device.NO_DEVICE_KEYS
                   for a in (*args, *result_specs))


def _gpu_call(kernel_fn, result_specs, args, platform=None):
    """The CUDA branch: the pass on the GPU platform (or `platform`), or on the host where
    there is none or a dtype has no device keys."""
    platform = platform or _device.gpu_platform()
    if platform is None or not _takes_device(args, result_specs):
        return _pure_call(kernel_fn, result_specs, args)
    return _device_call(platform, kernel_fn, result_specs, args)


_UNRECORDED = object()


def _host_call(kernel_fn, result_specs, args):
    # One recorded call plan per argument signature (vmap re-binds the callback with batched
    # shapes): later calls replay it, without the kernel API's checks (`kernels.record_call`;
    # None: no plan, the normal call).
    plans = {}

    def host_pass(ctx, outs, *buffers):
        arrays = [np.asarray(b) for b in buffers]
        results = tuple(np.asarray(o) for o in outs)
        key = tuple(a.shape for a in arrays)
        plan = plans.get(key, _UNRECORDED)
        try:
            if plan is _UNRECORDED:
                plans[key] = kernels.record_call(kernel_fn, arrays, results)[1]
            elif plan is None:
                kernel_fn(*arrays, out=results)
            else:
                plan(arrays, results)
        except Exception as exc:
            raise _kernel_error(kernel_fn, arrays, results, exc) from exc
    return tuple(buffer_callback(host_pass, result_specs, vmap_method="broadcast_all")(*args))


def _pure_call(kernel_fn, result_specs, args):
    def host_function(*arrays):
        results = _run_pass(kernel_fn, [np.asarray(a) for a in arrays], out=None)
        return tuple(np.asarray(r) for r in results)
    return tuple(jax.pure_callback(host_function, result_specs, *args,
                                   vmap_method="broadcast_all"))


def device_dependent(host_fn, device_fn, *args):
    """host_fn(*args) where the passes run on the host (XLA on the CPU, the pure mode),
    device_fn(*args) where they run on a device (a GPU, or an emulated device in the tests).
    For the few ops whose device passes need other inputs (bfloat16 keys)."""
    if _mode.get() == "pure":
        return host_fn(*args)
    if _emulated.get() is not None:
        return device_fn(*args)
    return jax.lax.platform_dependent(*args, cpu=host_fn, default=device_fn)


def kernel_call(kernel_fn, result_specs, *args):
    """kernel_fn(*arrays, out=..., **route) as a JAX op with `result_specs`
    (ShapeDtypeStructs): a tuple of arrays. `kernel_fn` must be hashable and stable across
    traces (module-level, or from a cached factory): GPU scratch sizes are cached per pass."""
    result_specs = tuple(result_specs)
    # Inside shard_map the callback runs on each device's shard: its arguments and results
    # vary over the manual axes any argument varies over (a callback's results carry none).
    axes = varying_axes(*args)
    args = as_varying(args, axes)
    return as_varying(_dispatch(kernel_fn, result_specs, args), axes)


def _dispatch(kernel_fn, result_specs, args):
    if _mode.get() == "pure":
        return _pure_call(kernel_fn, result_specs, args)
    emulated = _emulated.get()
    if emulated is not None:
        return _gpu_call(kernel_fn, result_specs, args, emulated)
    return tuple(jax.lax.platform_dependent(
        *args,
        cpu=lambda *a: _host_call(kernel_fn, result_specs, a),
        cuda=lambda *a: _gpu_call(kernel_fn, result_specs, a),
        default=lambda *a: _pure_call(kernel_fn, result_specs, a)))
