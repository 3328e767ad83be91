"""CuPy module loader: the package's CUDA C sources compiled with NVRTC, cached per device.

Contract (shared by every op's `_cupy.py` and by tests/kernels/test_cuda_compile.py):
- each op package `sortgrad.kernels.<op>` ships `.cu` files as package data, and its `_cupy.py`
  declares at module level (importable without CuPy)
  `CUDA_SOURCES = {"file.cu": ("name_expression", ...)}` listing every template
  instantiation it launches;
- `get_module(package, filename, name_expressions)` compiles a file once per device with
  `cupy.RawModule(code=..., options=compile_options(), name_expressions=...)`;
  `get_kernel(package, filename, name_expression)` looks the expression up in that module
  (the file's full instantiation list comes from the package's CUDA_SOURCES);
- `compile_options(arch)` are exactly the options the NVRTC compile test uses (the test adds
  the architecture, `-Werror=all-warnings` and the options CuPy itself appends,
  `CUPY_IMPLICIT_OPTIONS`);
- `xp()`, `stream_scope(stream, like)`, `launch(...)` and `multiprocessor_count()` are the only
  ways every op's `_cupy.py` reaches CuPy (one stream coercer, one launch path); the op modules
  allocate only with `xp().empty`, which serves the thread's workspace (`workspace.py`: scratch
  carved from a caller's buffer) when one is active. The hooks `array_module()`,
  `stream_scope`, `launch` and `multiprocessor_count` can be swapped for the host emulator
  (tests/_emulation/cuda_host.py, not shipped);
- the op packages are those of `sortgrad.kernels._backends.REGISTRY` with a "cupy" module
  (`OP_PACKAGES`); a package whose `_cupy.py` does not exist yet is skipped.

Headers: the shared `.cuh` files live next to this module (`#include "sortgrad_common.cuh"`);
CUB/Thrust/libcu++ come from the CCCL copy bundled with CuPy (found without importing CuPy,
so the compile test runs on machines without a GPU). No CUDA toolkit headers are needed:
kernels treat 16-bit floats as raw bits and include no `cuda_fp16.h`.

CuPy's on-disk kernel cache is keyed on the source text and options only, not on the headers
it includes, so the code handed to NVRTC starts with a comment carrying a digest of our
`.cuh` files: editing a header recompiles.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.resources
import importlib.util
import os
import threading

from .. import _backends
from . import workspace

# package -> module name of its CuPy backend, for every op of the registry that has one
_CUPY_MODULES = {f"sortgrad.kernels.{op}": _backends.module_name(op, "cupy")
                 for op, backends in _backends.REGISTRY.items() if "cupy" in backends}
OP_PACKAGES = tuple(_CUPY_MODULES)

# Options CuPy's RawModule appends to ours when it calls NVRTC (CuPy 13/14): the compile test
# adds them too, so it compiles what a GPU run compiles. CuPy also adds -arch and, with
# NVRTC >= 12.8, --pch (neither changes the language).
CUPY_IMPLICIT_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")

_CUDA_DIR = os.path.dirname(os.path.abspath(__file__))
_lock = threading.Lock()
_modules: dict = {}  # (device, package, filename) -> RawModule
_kernels: dict = {}  # (device, package, filename, name_expression) -> RawKernel


def source_text(package: str, filename: str) -> str:
    """The text of `filename` shipped in `package` (e.g. "sortgrad.kernels.top_k")."""
    return importlib.resources.files(package).joinpath(filename).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def _cccl_dirs() -> tuple[str, ...]:
    """CUB, Thrust and libcu++ include dirs of the CCCL bundled with CuPy."""
    spec = importlib.util.find_spec("cupy")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the CUDA sources need the CCCL headers bundled with CuPy: install "
                          "sortgrad[cuda12] or sortgrad[cuda13]")
    root = os.path.join(list(spec.submodule_search_locations)[0], "_core", "include", "cupy",
                        "_cccl")
    dirs = tuple(os.path.join(root, name) for name in ("cub", "thrust", "libcudacxx"))
    missing = [d for d in dirs if not os.path.isdir(d)]
    if missing:
        raise ImportError(f"CuPy's bundled CCCL headers are missing: {missing}")
    return dirs


def include_dirs() -> list[str]:
    """Include search path: the shared `.cuh` dir, then CuPy's CCCL."""
    return [_CUDA_DIR, *_cccl_dirs()]


def compile_options(arch: str | int | None = None) -> tuple[str, ...]:
    """NVRTC options for every sortgrad `.cu` file. `arch` (e.g. 80 or "90") adds
    `-arch=sm_<arch>`; None leaves the architecture to CuPy (the current device's)."""
    options = ["-std=c++17", *(f"-I{d}" for d in include_dirs())]
    if arch is not None:
        options.append(f"-arch=sm_{arch}")
    return tuple(options)


@functools.lru_cache(maxsize=None)
def _headers_digest() -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(_CUDA_DIR)):
        if name.endswith(".cuh"):
            digest.update(name.encode())
            with open(os.path.join(_CUDA_DIR, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def _code(package: str, filename: str) -> str:
    return f"// sortgrad headers {_headers_digest()}\n" + source_text(package, filename)


def _device_id() -> int:
    import cupy
    return cupy.cuda.runtime.getDevice()


def get_module(package: str, filename: str, name_expressions):
    """The `cupy.RawModule` of `filename` in `package` for the current device, compiled on first
    use with the given template instantiations (cached per (device, package, filename))."""
    key = (_device_id(), package, filename)
    module = _modules.get(key)
    if module is None:
        import cupy
        with _lock:
            module = _modules.get(key)
            if module is None:
                module = cupy.RawModule(code=_code(package, filename),
                                        options=compile_options(),
                                        name_expressions=tuple(name_expressions))
                module.compile()  # compile now, on this device, not at the first lookup
                _modules[key] = module
    return module


def _package_sources(package: str) -> dict | None:
    """CUDA_SOURCES of the package's CuPy module (`<package>._cupy`, or the registry's name for
    it), or None when the package has no CuPy module yet. Other import errors propagate."""
    name = _CUPY_MODULES.get(package, f"{package}._cupy")
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and name.startswith(err.name):  # the module or its package
            return None
        raise
    return dict(module.CUDA_SOURCES)


def get_kernel(package: str, filename: str, name_expression: str):
    """The `cupy.RawKernel` of one instantiation (which must be listed in the package's
    CUDA_SOURCES for `filename`). Cached per device: a launch costs one dict lookup here."""
    key = (_device_id(), package, filename, name_expression)
    kernel = _kernels.get(key)
    if kernel is None:
        sources = _package_sources(package) or {}
        expressions = tuple(sources.get(filename, ()))
        if name_expression not in expressions:
            raise KeyError(f"{name_expression!r} is not listed in {package}._cupy.CUDA_SOURCES"
                           f"[{filename!r}]")
        kernel = get_module(package, filename, expressions).get_function(name_expression)
        _kernels[key] = kernel
    return kernel


# --- shared by the op modules: raw bits and row batches ------------------------------------------

# C type of the raw bits by element width (kernels move values as bits)
C_BITS = {1: "unsigned char", 2: "unsigned short", 4: "unsigned int", 8: "unsigned long long"}
_UINT = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}
MAX_ROWS_PER_LAUNCH = 1 << 30  # kernels number rows (segments) with int32


def bits(a):
    """The raw bits of an array (a view as unsigned integers of the element width)."""
    return a.view(_UINT[a.dtype.itemsize])


def row_batches(rows: int):
    """(start, stop) row ranges of at most MAX_ROWS_PER_LAUNCH rows."""
    for start in range(0, rows, MAX_ROWS_PER_LAUNCH):
        yield start, min(rows, start + MAX_ROWS_PER_LAUNCH)


# --- launching (the op modules go through these, so tests can run them on the host emulator) ---

def array_module():
    """The array module behind `xp()` (CuPy; the host emulator swaps in NumPy)."""
    import cupy
    return cupy


class _WorkspaceModule:
    """The array module with `empty` served by the active workspace (everything else as is)."""

    __slots__ = ("_module",)

    def __init__(self, module):
        self._module = module

    def empty(self, shape, dtype=float, order="C"):
        module = self._module
        return workspace.allocate(shape, dtype, lambda s, d: module.empty(s, dtype=d))

    def __getattr__(self, name):
        return getattr(self._module, name)


def xp():
    """The array module the op modules allocate with: CuPy, whose `empty` takes the thread's
    workspace memory when a workspace is active (`workspace.use` / `workspace.measuring`)."""
    module = array_module()
    return module if workspace.active() is None else _WorkspaceModule(module)


def _cupy_stream(stream, device_id: int):
    """`stream` as a CuPy stream object (None stays None)."""
    import cupy
    if stream is None or isinstance(stream, (cupy.cuda.Stream, cupy.cuda.ExternalStream)):
        return stream
    if isinstance(stream, int):
        handle = stream
    elif hasattr(stream, "__cuda_stream__"):  # the CUDA stream protocol: (version, handle)
        handle = stream.__cuda_stream__()[1]
    elif hasattr(stream, "handle"):  # a Numba stream: ctypes handle
        handle = getattr(stream.handle, "value", stream.handle) or 0
    else:
        raise TypeError(f"stream must be None, a CuPy stream, an object with __cuda_stream__ "
                        f"or a cudaStream_t handle (int), got {type(stream).__name__}")
    return cupy.cuda.ExternalStream(int(handle), device_id)


@contextlib.contextmanager
def stream_scope(stream, like=None):
    """Makes the device of the CuPy array `like` and `stream` current for the block (new
    arrays are allocated and kernels launched there). `stream`: None (the current stream), a
    CuPy stream, an object with `__cuda_stream__`, a Numba stream or a raw `cudaStream_t`
    handle (int)."""
    import cupy
    with contextlib.ExitStack() as scope:
        device = getattr(like, "device", None)
        if isinstance(device, cupy.cuda.Device):
            scope.enter_context(device)
        cupy_stream = _cupy_stream(stream, cupy.cuda.runtime.getDevice())
        if cupy_stream is not None:
            scope.enter_context(cupy_stream)
        yield


def launch(package: str, filename: str, name_expression: str, grid: int, block: int, args,
           shared_mem: int = 0) -> None:
    """Launches one instantiation on the current stream with a 1-D grid and block. Scalars in
    `args` must be NumPy scalars of the kernel parameter's exact type."""
    kernel = get_kernel(package, filename, name_expression)
    kernel((int(grid),), (int(block),), tuple(args), shared_mem=int(shared_mem))


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_id: int) -> int:
    import cupy
    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def multiprocessor_count() -> int:
    """Streaming multiprocessors of the current device (sizes grids of few long rows)."""
    return _multiprocessor_count(_device_id())
