"""Run any op's CuPy backend (`sortgrad/kernels/<op>/_cupy.py` and its `.cu` files) on the host,
without a GPU: the CUDA C sources are compiled with g++ against `sortgrad_emulation.cuh` (next
to this file: every CUDA thread a fiber; barriers and warp collectives emulated and checked) and
the `_cupy.py` module runs unchanged on NumPy arrays.

How it plugs in: every `_cupy.py` reaches CuPy only through four hooks of
`sortgrad.kernels._cuda.cupy_loader` -- `array_module()` (the array module behind `xp()`, which
the modules allocate with), `stream_scope(stream, like)`, `launch(package, filename,
name_expression, grid, block, args, shared_mem=0)` and `multiprocessor_count()`.
`Emulator.installed()` swaps them for host versions: `array_module()` is `HOST_XP` (NumPy whose
`empty` fills new arrays with the byte 0xA5, so an output entry a kernel forgets to write shows
up), `launch` runs the instantiation in the emulator, `stream_scope` does nothing,
`multiprocessor_count()` is `Emulator.sm_count`. Workspaces (`cupy_loader.xp()` carving scratch
from a given buffer) work on top of it unchanged.

Which kernels exist comes from the package's `CUDA_SOURCES` (`{"file.cu": (name expressions)}`,
as for NVRTC): each `.cu` file is compiled once with all its instantiations, for a package
named at construction (in parallel) or on its first launch. Every launch checks the arguments
against the kernel's C++ signature: their count, device arrays (C-contiguous NumPy arrays)
where a parameter is a pointer, NumPy scalars of the parameter's exact byte width elsewhere
(what CuPy passes), a 1-D grid of 1 .. 2^31 - 1 blocks of 1 .. 1024 threads, no dynamic shared
memory. Compiled libraries are cached by a digest of the generated code, every header and the
compiler flags (in $SORTGRAD_EMULATOR_CACHE, else ~/.cache/sortgrad-emulator).

Usage, in a test file::

    import pytest
    from _emulation import cuda_host
    from sortgrad.kernels.soft import _cupy as soft_cupy

    @pytest.fixture(scope="session")
    def emulator(tmp_path_factory):   # skips where g++ or a supported CPU is missing
        return cuda_host.make_emulator(tmp_path_factory, packages=[soft_cupy.PACKAGE])

    def test_soft_rank(emulator):
        x = np.random.default_rng(0).normal(size=(3, 100))
        with emulator.installed():      # NumPy arrays in, NumPy arrays out
            ranks, perm, block_ids = soft_cupy.soft_rank_rows(x, 1.0, "l2", False)
        # or: emulator.call(soft_cupy.soft_rank_rows, x, 1.0, "l2", False, out=(...))
        # emulator.launches: (package, filename, name_expression, grid, block) of each launch

An op that composes other ops (soft: segmented_sort -> isotonic -> permutation) needs nothing
more: their packages are compiled on first launch (name them in `packages` to build them up
front, in parallel). Lower-level pieces: `EmulatedSource` (one `.cu` file, also from a code
string, for tests of the emulator itself), `HOST_XP`, `unavailable_reason()`, `cache_dir()`.

Not emulated: streams (launches run synchronously, in call order), dynamic shared memory,
memory fences and cross-block atomics, and CuPy's `-ftz=true` (subnormal float32 results are
not flushed here as they are on the GPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from sortgrad.kernels._cuda import cupy_loader

EMULATION_DIR = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(EMULATION_DIR, "sortgrad_emulation.cuh")
CUDA_DIR = os.path.dirname(os.path.abspath(cupy_loader.__file__))  # the shared .cuh files
CXX_FLAGS = ("-std=c++17", "-O1", "-fno-strict-aliasing", "-shared", "-fPIC", "-Wall",
             "-Wno-unknown-pragmas", "-Werror")
HOOKS = ("array_module", "launch", "stream_scope", "multiprocessor_count")
MAX_PARAMS = 64


def unavailable_reason() -> str | None:
    """Why the emulator cannot run here (None when it can)."""
    if shutil.which("g++") is None:
        return "the CUDA host emulator needs g++"
    if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        return "the emulator's fiber switch supports x86-64 and aarch64 only"
    return None


def cache_dir(tmp_path_factory=None) -> str:
    """Where compiled libraries are kept: $SORTGRAD_EMULATOR_CACHE, else
    ~/.cache/sortgrad-emulator, else (not writable) a pytest temporary directory."""
    path = os.environ.get("SORTGRAD_EMULATOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sortgrad-emulator")
    try:
        os.makedirs(path, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    if tmp_path_factory is None:
        return tempfile.mkdtemp(prefix="sortgrad-emulator-")
    return str(tmp_path_factory.mktemp("sortgrad-emulator"))


def make_emulator(tmp_path_factory=None, packages=(), sm_count: int = 1) -> "Emulator":
    """An `Emulator` with the `.cu` files of `packages` built, or `pytest.skip` where the
    emulator cannot run (for a fixture)."""
    reason = unavailable_reason()
    if reason:
        import pytest
        pytest.skip(reason)
    return Emulator(cache_dir(tmp_path_factory), packages=packages, sm_count=sm_count)


class _HostXP:
    """The array module the `_cupy.py` modules allocate with, on the host: NumPy, except that
    `empty` / `empty_like` fill new arrays with the byte 0xA5 (never-written output entries
    show up) and `asarray` always copies (an upload to the device)."""

    @staticmethod
    def empty(shape, dtype=float, order="C"):
        a = np.empty(shape, dtype=dtype, order=order)
        a.reshape(-1).view(np.uint8)[...] = 0xA5
        return a

    def empty_like(self, a, dtype=None, shape=None):
        return self.empty(np.shape(a) if shape is None else shape,
                          a.dtype if dtype is None else dtype)

    @staticmethod
    def asarray(a, dtype=None, order=None):
        return np.array(a, dtype=dtype, order=order, copy=True)

    def __getattr__(self, name):  # everything else: NumPy's
        return getattr(np, name)


HOST_XP = _HostXP()


def _header_bytes() -> bytes:
    parts = []
    for directory in (EMULATION_DIR, CUDA_DIR):
        for name in sorted(os.listdir(directory)):
            if name.endswith(".cuh"):
                with open(os.path.join(directory, name), "rb") as f:
                    parts.append(name.encode() + b"\0" + f.read())
    return b"\0".join(parts)


class EmulatedSource:
    """One `.cu` file compiled for the host emulator with the given instantiations (name
    expressions). `code` replaces the package's file text (e.g. for tests of the emulator)."""

    def __init__(self, package: str, filename: str, expressions, cache: str, code=None):
        self.package, self.filename = package, filename
        self.expressions = list(expressions)
        self._index = {e: i for i, e in enumerate(self.expressions)}
        text = code if code is not None else cupy_loader.source_text(package, filename)
        parts = ['#include "sortgrad_emulation.cuh"', f'#line 1 "{package}/{filename}"', text,
                 '#line 1 "emulator-entry-points"']
        for i, e in enumerate(self.expressions):
            parts.append(
                f'extern "C" int sg_launch_{i}(unsigned g, unsigned b, void** a) '
                f'{{ return sg_emu::launch(&{e}, dim3(g), dim3(b), a); }}\n'
                f'extern "C" int sg_describe_{i}(long long* s, int* p, int c) '
                f'{{ return sg_emu::describe(&{e}, s, p, c); }}')
        parts.append('extern "C" const char* sg_last_error() { return sg_emu::error().c_str(); }')
        self.code = "\n".join(parts) + "\n"
        digest = hashlib.sha256(self.code.encode())
        digest.update(_header_bytes())
        digest.update(" ".join(CXX_FLAGS).encode())
        self.path = os.path.join(cache, f"{filename}.{digest.hexdigest()[:16]}.so")
        self.lib = None
        self.params: dict = {}

    def build(self) -> "EmulatedSource":
        """Compiles the library unless the cache has it (atomic: safe across processes)."""
        if not os.path.exists(self.path):
            fd, cpp = tempfile.mkstemp(suffix=".cpp", dir=os.path.dirname(self.path))
            with os.fdopen(fd, "w") as f:
                f.write(self.code)
            tmp = cpp[:-4] + ".so"
            try:
                subprocess.run(["g++", *CXX_FLAGS, f"-I{EMULATION_DIR}", f"-I{CUDA_DIR}",
                                "-o", tmp, cpp], check=True, capture_output=True, text=True)
                os.replace(tmp, self.path)
            except subprocess.CalledProcessError as err:
                raise RuntimeError(f"g++ failed for {self.package}/{self.filename}:\n"
                                   f"{err.stderr[-6000:]}") from None
            finally:
                os.unlink(cpp)
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return self

    def load(self) -> "EmulatedSource":
        """Loads the library and reads every instantiation's parameter list."""
        self.lib = ctypes.CDLL(self.path)
        self.lib.sg_last_error.restype = ctypes.c_char_p
        for i, e in enumerate(self.expressions):
            sizes, pointers = (ctypes.c_longlong * MAX_PARAMS)(), (ctypes.c_int * MAX_PARAMS)()
            count = getattr(self.lib, f"sg_describe_{i}")(sizes, pointers, MAX_PARAMS)
            assert count <= MAX_PARAMS, f"{e}: {count} parameters"
            self.params[e] = [(sizes[j], bool(pointers[j])) for j in range(count)]
        return self

    def launch(self, expression: str, grid: int, block: int, args) -> None:
        """Runs one instantiation; RuntimeError on an emulation error (divergent barrier, ...),
        AssertionError on arguments that do not match the kernel's signature."""
        if expression not in self._index:
            raise KeyError(f"{expression!r} is not an instantiation of {self.filename}")
        params = self.params[expression]
        args = tuple(args)
        assert len(args) == len(params), f"{expression}: {len(args)} args, {len(params)} params"
        holders = []
        for j, (arg, (size, is_pointer)) in enumerate(zip(args, params)):
            if is_pointer:
                assert isinstance(arg, np.ndarray), (
                    f"{expression} arg {j}: {type(arg).__name__} for a pointer parameter")
                assert arg.flags.c_contiguous, f"{expression} arg {j}: not C-contiguous"
                holders.append(ctypes.c_void_p(arg.ctypes.data))
            else:  # CuPy passes a NumPy scalar with its own width: it must match the parameter
                assert isinstance(arg, np.generic) and arg.dtype.itemsize == size, (
                    f"{expression} arg {j}: {arg!r} for a {size}-byte parameter")
                holders.append(ctypes.create_string_buffer(arg.tobytes(), size))
        argv = (ctypes.c_void_p * max(1, len(holders)))(
            *[ctypes.cast(ctypes.byref(h) if isinstance(h, ctypes.c_void_p) else h,
                          ctypes.c_void_p) for h in holders])
        launch = getattr(self.lib, f"sg_launch_{self._index[expression]}")
        if launch(ctypes.c_uint(int(grid)), ctypes.c_uint(int(block)), argv):
            raise RuntimeError(f"{expression}: {self.lib.sg_last_error().decode()}")


class Emulator:
    """The CuPy backend's launches on the host (see the module docstring).

    `packages`: op packages (e.g. "sortgrad.kernels.top_k") whose `.cu` files are built now, in
    parallel; any other package is built on its first launch. `sm_count`: what
    `multiprocessor_count()` returns (it sizes grids of few long rows; tests may change it).
    `launches`: (package, filename, name_expression, grid, block) of every launch, in order
    (clear it before a call to see which kernels that call launched).
    """

    def __init__(self, cache: str, packages=(), sm_count: int = 1):
        self.cache = cache
        self.sm_count = sm_count
        self.sources: dict = {}  # (package, filename) -> loaded EmulatedSource
        self.launches: list = []
        self._lock = threading.Lock()
        self.build(*packages)

    def _sources_of(self, package: str) -> list[EmulatedSource]:
        sources = cupy_loader._package_sources(package)
        if sources is None:
            raise LookupError(f"{package} has no CuPy module (no {package}._cupy)")
        return [EmulatedSource(package, filename, expressions, self.cache)
                for filename, expressions in sources.items()]

    def build(self, *packages: str) -> None:
        """Builds (or loads from the cache) every `.cu` file of `packages`."""
        todo = [s for p in packages for s in self._sources_of(p)
                if (s.package, s.filename) not in self.sources]
        workers = max(1, min(len(todo), os.cpu_count() or 1, 4))
        with ThreadPoolExecutor(max_workers=workers) as pool:  # g++ runs in parallel
            built = list(pool.map(EmulatedSource.build, todo))
        with self._lock:
            for s in built:
                self.sources.setdefault((s.package, s.filename), s.load())

    def source(self, package: str, filename: str) -> EmulatedSource:
        key = (package, filename)
        if key not in self.sources:
            self.build(package)
            if key not in self.sources:
                raise KeyError(f"{filename} is not listed in {package}._cupy.CUDA_SOURCES")
        return self.sources[key]

    def launch(self, package, filename, name_expression, grid, block, args,
               shared_mem=0) -> None:
        """Stand-in for `cupy_loader.launch` (same signature)."""
        assert shared_mem == 0, "dynamic shared memory is not emulated"
        assert 0 < int(grid) < 2**31 and 0 < int(block) <= 1024, (name_expression, grid, block)
        self.launches.append((package, filename, name_expression, int(grid), int(block)))
        self.source(package, filename).launch(name_expression, int(grid), int(block), args)

    @contextlib.contextmanager
    def installed(self):
        """Within the block, `cupy_loader`'s hooks run on this emulator (restored after)."""
        saved = {name: getattr(cupy_loader, name) for name in HOOKS}
        cupy_loader.array_module = lambda: HOST_XP
        cupy_loader.launch = self.launch
        cupy_loader.stream_scope = lambda stream=None, like=None: contextlib.nullcontext()
        cupy_loader.multiprocessor_count = lambda: self.sm_count
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(cupy_loader, name, value)

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) with the hooks installed (NumPy arrays in and out)."""
        with self.installed():
            return fn(*args, **kwargs)
