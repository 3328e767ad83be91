"""Where an array lives, which backend runs it, and the protocol every backend module follows.

Registry: `REGISTRY[op][backend]` names the module `sortgrad.kernels.<op>.<module>` that
implements `op` on `backend`; it is the only list of ops and backends in the package (the CUDA
compile test, the loaders and the test fixtures read it). A new op is one line here; a new
backend is one entry per op.

Row-function protocol (what each backend module implements):
- functions named `<name>_rows` working on C-contiguous 2-D arrays (rows, n) of the backend's
  array kind (NumPy for "cpu", CuPy for "cupy", Numba device arrays for "numba"); 1-row shared
  operands are (1, n);
- a module-level `DTYPES` (dtype names the module takes as data, None for any NumPy dtype; the
  public kernel converts or rejects anything else before calling it);
- keyword `out=None`: the result arrays to write (one array for a single result, a tuple for
  several), C-contiguous, of the result shapes and dtypes; the function writes them and returns
  them. With `out=None` the module allocates (device modules on the launch stream);
- keyword `stream=None` on device modules: the stream to launch on (None: the current stream);
  nothing synchronises with the host;
- arguments are already validated by the op's `__init__.py` (shapes, dtypes, k, strength):
  row functions do no checking of their own beyond what memory safety needs.
"""

from __future__ import annotations

import functools
import importlib
import math

import numpy as np

from ._plans import step
from ._rows import as_rows

BACKENDS = ("cpu", "cupy", "numba")
DEVICE_BACKENDS = ("cupy", "numba")
GPU_EXTRA = "install sortgrad[cuda12] or sortgrad[cuda13] (the CuPy build matching your CUDA)"

_STANDARD = {"cpu": "_cpu", "cupy": "_cupy", "numba": "_numba_cuda"}

# op -> backend -> module under sortgrad.kernels.<op>
REGISTRY = {
    "segmented_sort": _STANDARD,
    "top_k": _STANDARD,
    "permutation": _STANDARD,
    "isotonic": _STANDARD,
    "soft": _STANDARD,
}
OPS = tuple(REGISTRY)


def module_name(op: str, backend: str) -> str:
    return f"sortgrad.kernels.{op}.{REGISTRY[op][backend]}"


@functools.lru_cache(maxsize=None)
def backend_module(op: str, backend: str):
    """The module implementing `op` on `backend` (imported on first use, then cached)."""
    if backend not in REGISTRY.get(op, {}):
        raise NotImplementedError(f"backend={backend!r} has no {op} kernel in this build")
    name = module_name(op, backend)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if not err.name or not name.startswith(err.name):
            raise  # a dependency of the module is missing: that error says which
        raise NotImplementedError(f"backend={backend!r} has no {op} kernel in this build") from None


# --- where an array lives -----------------------------------------------------------------------

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
    if backend is None and all(type(a) is np.ndarray or a is None for a in arrays):
        return "cpu"  # the common case, decided without looking further
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
    require_device(backend)
    return backend


_READY: set = set()  # device backends found able to run (checked once per process)


def require_device(backend: str) -> None:
    """Raises unless the device backend can run here: ImportError naming the pip extra when its
    library is missing, RuntimeError without a GPU (Numba: or its simulator)."""
    if backend in _READY:
        return
    _check_device(backend)
    _READY.add(backend)


def device_unavailable(backend: str) -> str | None:
    """Why the device backend cannot run here (the message `require_device` raises), or None."""
    try:
        require_device(backend)
    except (ImportError, RuntimeError) as err:
        return str(err)
    return None


def _check_device(backend: str) -> None:
    if backend == "cupy":
        try:
            import cupy
        except ImportError as err:
            raise ImportError(f"backend='cupy' needs CuPy and a CUDA GPU: {GPU_EXTRA}") from err
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception:  # CuPy raises its own CUDARuntimeError without a driver
            count = 0
        if count == 0:
            raise RuntimeError(f"backend='cupy' needs a CUDA GPU and driver; none was found "
                               f"({GPU_EXTRA})")
        return
    try:
        from numba import cuda
    except ImportError as err:  # pragma: no cover - numba is a core dependency
        raise ImportError("backend='numba' needs numba with its CUDA target "
                          "(pip install numba-cuda)") from err
    if not cuda.is_available():
        raise RuntimeError("backend='numba' needs a CUDA GPU and driver, or Numba's CUDA "
                           "simulator (NUMBA_ENABLE_CUDASIM=1); none was found")


# --- arrays as the backend takes them ------------------------------------------------------------

def shape_of(x) -> tuple:
    """The shape as a tuple (the simulator's shape objects refuse negative indices)."""
    return tuple(x.shape)


def as_backend_array(x, name: str, backend: str):
    """`x` as an array of `backend`: a NumPy array (no copy where possible) for "cpu"; for the
    device backends a checked device array (on the device, C-contiguous; other
    `__cuda_array_interface__` objects wrapped without a copy). Raises TypeError / ValueError
    naming `name`."""
    if backend == "cpu":
        return np.asarray(x)
    kind = array_kind(x)
    if kind == "host":
        raise TypeError(f"{name} is a host array ({type(x).__name__}); backend={backend!r} takes "
                        "device arrays (cupy.asarray(x) or numba.cuda.to_device(x))")
    if backend == "cupy" and kind != "cupy":
        import cupy
        x = cupy.asarray(x)  # zero-copy view of any __cuda_array_interface__ object
    elif backend == "numba" and kind == "cuda":
        from numba import cuda
        x = cuda.as_cuda_array(x)
    if not is_c_contiguous(x):
        raise ValueError(f"{name} must be C-contiguous on backend={backend!r} (copy it with "
                         "cupy.ascontiguousarray or .copy())")
    return x


def rows_of(x, backend: str, dtype=None):
    """(rows, n) C-contiguous view of `x` with n = its last dim (also n = 0). On the CPU a copy
    is made where `x` is not C-contiguous or not of `dtype`; device arrays are already checked
    and must have `dtype` (the public kernel rejects other dtypes first)."""
    if backend == "cpu":
        return as_rows(x, dtype)
    shape = shape_of(x)
    return x.reshape(math.prod(shape[:-1]), shape[-1])


def is_c_contiguous(x) -> bool:
    flags = getattr(x, "flags", None)
    if flags is not None:
        try:
            return bool(flags["C_CONTIGUOUS"])
        except (KeyError, TypeError):
            contiguous = getattr(flags, "c_contiguous", None)
            if contiguous is not None:
                return bool(contiguous)
    if hasattr(x, "is_c_contiguous"):
        return bool(x.is_c_contiguous())
    strides = x.__cuda_array_interface__.get("strides")
    if strides is None:
        return True
    expected, step = [], np.dtype(x.dtype).itemsize
    for dim in reversed(shape_of(x)):
        expected.append(step)
        step *= dim
    return tuple(reversed(expected)) == tuple(strides) or math.prod(shape_of(x)) <= 1


def to_host(x) -> np.ndarray:
    """A NumPy copy of a host or device array (synchronises for device arrays)."""
    kind = array_kind(x)
    if kind == "host":
        return np.asarray(x)
    if kind == "cupy":
        return x.get()
    if kind == "numba":
        return x.copy_to_host()
    from numba import cuda
    return cuda.as_cuda_array(x).copy_to_host()


@functools.lru_cache(maxsize=None)
def _takes_dtype(op: str, backend: str, dtype) -> bool:
    dtypes = backend_module(op, backend).DTYPES
    return dtypes is None or np.dtype(dtype).name in dtypes


def check_data_dtype(x, name: str, backend: str, op: str) -> None:
    """`x`'s dtype is one the backend module of `op` takes (its `DTYPES`)."""
    if not _takes_dtype(op, backend, x.dtype):
        raise TypeError(f"{name} has dtype {np.dtype(x.dtype)}; backend={backend!r} takes "
                        f"{', '.join(backend_module(op, backend).DTYPES)}")


def output_rows(out, specs, backend: str):
    """The caller's `out` (one array, or a tuple matching `specs`) checked against `specs`, a
    list of (name, shape, dtype), and returned as a tuple of (rows, last dim) views; None when
    `out` is None. Each must be an array of the backend's kind, C-contiguous, of the exact
    shape and dtype (results are written there, nothing is converted)."""
    if out is None:
        return None
    arrays = (out,) if len(specs) == 1 and not isinstance(out, (tuple, list)) else tuple(out)
    if len(arrays) != len(specs):
        raise ValueError(f"out must hold {len(specs)} arrays "
                         f"({', '.join(name for name, _, _ in specs)}), got {len(arrays)}")
    views = []
    for array, (name, shape, dtype) in zip(arrays, specs):
        if backend == "cpu":
            right_kind = isinstance(array, np.ndarray)
            writable = right_kind and array.flags.c_contiguous and array.flags.writeable
        else:
            right_kind = array_kind(array) != "host" and hasattr(array, "shape")
            writable = right_kind and is_c_contiguous(array)
        if not right_kind:
            raise TypeError(f"out ({name}) must be an array of backend={backend!r}, got "
                            f"{type(array).__name__}")
        if shape_of(array) != tuple(shape) or array.dtype != dtype:
            raise ValueError(f"out ({name}) must have shape {tuple(shape)} and dtype "
                             f"{np.dtype(dtype)}, got {shape_of(array)} {np.dtype(array.dtype)}")
        if not writable:
            raise ValueError(f"out ({name}) must be C-contiguous and writeable")
        views.append(array.reshape(math.prod(shape[:-1]), shape[-1]) if len(shape) else array)
    return tuple(views)


def call_rows(op: str, function: str, backend: str, stream, *args, out=None, **options):
    """`sortgrad.kernels.<op>.<module of backend>.<function>(*args, out=out, **options
    [, stream=stream])`: the one place a public kernel hands validated rows to a backend (a
    step of a call plan, `_plans.py`)."""
    fn = getattr(backend_module(op, backend), function)
    if backend == "cpu":
        return step(fn, *args, out=out, **options)
    return fn(*args, out=out, stream=stream, **options)


def shaped(results, shapes, out):
    """The caller's `out` when given, else each result reshaped to its shape."""
    if out is not None:
        return out
    if isinstance(results, tuple):
        return tuple(r.reshape(shape) for r, shape in zip(results, shapes))
    return results.reshape(shapes[0])
