"""The `backend` fixture: one test body per op, run on every backend (DESIGN.md section 6).

Params (test ids):
  "cpu"              the CPU modules (`sortgrad/kernels/<op>/_cpu.py`) on NumPy arrays.
  "cupy-emulated"    the CuPy modules (`_cupy.py`) unchanged, their CUDA C compiled with g++
                     against the host emulator (tests/_emulation/cuda_host.py), NumPy arrays
                     as device memory. Skipped without g++ (or on a CPU the fibers do not
                     support).
  "numba-simulator"  the Numba CUDA modules (`_numba_cuda.py`) on Numba's CUDA simulator
                     (tests/conftest.py turns it on where no GPU is visible), marker cudasim,
                     with the launch constants of `LOWERED` so that rows of a few dozen
                     entries already take the multi-tile, multi-pass, chunked and staged paths.
                     Skipped when the simulator is off.
  "cupy"             (marker gpu) the CuPy modules on a real device; skipped without CuPy or a
                     CUDA device.
  "numba"            (marker gpu) the Numba CUDA modules on a real device, default constants;
                     skipped on the simulator or without a device.
  "numba-lowered"    (marker gpu) the same with the simulator's lowered constants (`LOWERED`),
                     so that on a GPU both constant sets run, as the per-backend files did.

The runner (`Backend`, what the fixture returns):
  .name, .kind (the registry backend: "cpu" | "cupy" | "numba"), .where ("host" |
  "emulator" | "simulator" | "gpu"), .device, .simulated, .emulated, .lowered;
  .module(op)             the backend module from `sortgrad.kernels._backends.REGISTRY`
                          (applies the lowered constants / emulator settings of `op` once;
                          the fixture does this up front for the test module's `OP`, so
                          that they also hold for calls through the public API);
  .to_backend(np_array)   a copy on the backend (NumPy for cpu and cupy-emulated, CuPy, Numba
                          device array); .to_host(result) back to NumPy (checks the array kind);
  .empty(shape, dtype)    a backend array whose bytes are 0xA5 (unwritten outputs show up);
  .streams()              the stream forms to try (cpu: [None]; cupy: a non-blocking Stream and
                          its raw handle; numba: a Numba stream; cupy-emulated: a stand-in,
                          streams are not emulated); .synchronize(stream);
  .call(op, function, *arrays, out=None, stream=None, **kwargs)
                          converts NumPy arguments (not those wrapped in `on_host(...)`) and
                          NumPy `out=` arrays to the backend, runs the row function (under the
                          emulator's `installed()` for cupy-emulated; `stream=` passed to the
                          device modules, then synchronised), checks that out= arrays are the
                          ones returned and that no input was written, and returns NumPy
                          results (one array or a tuple, as the row function);
  .run(op, function, *args, **kwargs)
                          the same call on arrays already on the backend, results as returned;
  .check_out(op, function, *arrays, **kwargs)
                          the out= protocol: results written into given (0xA5-filled) arrays,
                          those objects returned, bit-identical to out=None;
  .configure(op, cupy={...}, numba={...}, cpu={...})
                          monkeypatches constants of the backend module of `op` (only the
                          entry of this backend's kind applies); .set_sm_count(n): the
                          emulator's multiprocessor count (no-op elsewhere).
Module helpers: `on_host(array)` (an argument that stays a host array, e.g. CSR offsets),
`cpu_result(op, function, *arrays)` (the CPU backend's answer, for cross-checks), `seed(*parts)`.

Case selection: `over_backends("a,b", simulator=[...], emulator=[...], gpu=[...],
backends=BACKENDS, where=None)` parametrizes "backend,a,b": `simulator` cases run on every
backend, `emulator` cases on all but the simulator (too slow there), `gpu` cases on real
devices only; `backends` restricts the backends, `where(spec, *case)` filters pairs.
`on_backends(*names)` parametrizes a case-free test over some backends. Name groups for
`backends=`: BACKENDS (all), DEVICE (not cpu), GPU (real devices), PUBLIC (those the public
kernel API can route to: not cupy-emulated, CuPy is not importable there), PUBLIC_DEVICE,
CUPY (cupy-emulated, cupy), NUMBA (numba-simulator, numba, numba-lowered).

A test module that sets `OP = "<op>"` gets that op's lowered constants / emulator settings
applied before the test runs (`Backend.module`), also for calls through the public API.

Nothing here imports Numba's CUDA target or CuPy at import time (conftest imports this module
right after setting NUMBA_ENABLE_CUDASIM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import sys

import numpy as np
import pytest

from sortgrad.kernels._backends import array_kind, backend_module
from sortgrad.testing import assert_same_bits, bits, filled_bytes

# ---------------------------------------------------------------------------------------------
# The backends


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    kind: str            # registry backend: "cpu" | "cupy" | "numba"
    where: str           # "host" | "emulator" | "simulator" | "gpu"
    lowered: bool = False

    @property
    def marks(self):
        if self.where == "gpu":
            return (pytest.mark.gpu,)
        if self.where == "simulator":
            return (pytest.mark.cudasim,)
        return ()


SPECS = {spec.name: spec for spec in (
    Spec("cpu", "cpu", "host"),
    Spec("cupy-emulated", "cupy", "emulator"),
    Spec("numba-simulator", "numba", "simulator", lowered=True),
    Spec("cupy", "cupy", "gpu"),
    Spec("numba", "numba", "gpu"),
    Spec("numba-lowered", "numba", "gpu", lowered=True),
)}
BACKENDS = tuple(SPECS)
DEVICE = tuple(name for name, spec in SPECS.items() if spec.kind != "cpu")
GPU = tuple(name for name, spec in SPECS.items() if spec.where == "gpu")
# the backends the public kernel API can route to (CuPy is not importable for the emulator)
PUBLIC = tuple(name for name, spec in SPECS.items() if spec.where != "emulator")
PUBLIC_DEVICE = tuple(name for name in PUBLIC if name in DEVICE)
CUPY = ("cupy-emulated", "cupy")
NUMBA = tuple(name for name, spec in SPECS.items() if spec.kind == "numba")

_NUMBA_SORT = "sortgrad.kernels.segmented_sort._numba_cuda"
_NUMBA_TOPK = "sortgrad.kernels.top_k._numba_cuda"
_NUMBA_PERM = "sortgrad.kernels.permutation._numba_cuda"
_NUMBA_ISO = "sortgrad.kernels.isotonic._numba_cuda"
_NUMBA_SOFT = "sortgrad.kernels.soft._numba_cuda"

# Lowered Numba launch constants per op: (module, name, value, raising). Hard ops: 16-element
# sort tiles (rows of 17+ take merge passes), top-k of at most 8 by radix select with a 16-key
# row cache and 8-element split chunks, 16-entry permutation stages. Isotonic: 32-thread blocks
# of 4 entries per thread (33 entries span 9 threads and 4 merge levels). Soft (and the ops it
# composes, where the constants exist: raising=False): 32-thread blocks, a 128-entry stage (so
# that n = 1025 takes the direct global-memory path), 256-entry sort tiles.
_HARD = [(_NUMBA_SORT, "SORT_TILE", 16, True), (_NUMBA_SORT, "SORT_THREADS", 32, True),
         (_NUMBA_SORT, "MERGE_THREADS", 32, True), (_NUMBA_SORT, "MERGE_ITEMS", 4, True),
         (_NUMBA_TOPK, "TOPK_THREADS", 32, True), (_NUMBA_TOPK, "TOPK_MAX_K", 8, True),
         (_NUMBA_TOPK, "TOPK_CACHE_BYTES", 64, True), (_NUMBA_TOPK, "TOPK_SPLIT_CHUNK", 8, True),
         (_NUMBA_PERM, "PERM_THREADS", 32, True), (_NUMBA_PERM, "PERM_STAGE_BYTES", 64, True)]
LOWERED = {
    "segmented_sort": _HARD,
    "top_k": _HARD,
    "permutation": _HARD,
    "isotonic": [(_NUMBA_ISO, "BLOCK", 32, True), (_NUMBA_ISO, "CHUNK", 4, True)],
    "soft": [(_NUMBA_SOFT, "BLOCK", 32, False), (_NUMBA_SOFT, "ITEMS", 4, False),
             (_NUMBA_ISO, "BLOCK", 32, False), (_NUMBA_ISO, "CHUNK", 4, False),
             (_NUMBA_SORT, "SORT_THREADS", 32, False), (_NUMBA_SORT, "SORT_TILE", 256, False),
             (_NUMBA_SORT, "MERGE_THREADS", 32, False)],
}
# The emulator's multiprocessor count per op (isotonic: 8 persistent blocks for the large
# kernels); 1 elsewhere.
EMULATOR_SM_COUNT = {"isotonic": 2}


def _unavailable(spec: Spec) -> str | None:
    """Why `spec` cannot run here (None when it can)."""
    if spec.where == "host":
        return None
    if spec.where == "emulator":
        from _emulation import cuda_host
        return cuda_host.unavailable_reason()
    if spec.kind == "numba":
        from numba.core import config
        if spec.where == "simulator":
            if not config.ENABLE_CUDASIM:
                return "Numba's CUDA simulator is off (a GPU is visible, or it was disabled)"
            return None
        if config.ENABLE_CUDASIM:
            return "Numba runs on its CUDA simulator here: needs a CUDA GPU"
        from numba import cuda
        return None if cuda.is_available() else "needs a CUDA GPU (Numba)"
    try:
        import cupy
    except ImportError:
        return "needs CuPy"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - CuPy raises its own CUDARuntimeError without a driver
        count = 0
    return None if count > 0 else "needs a CUDA GPU (CuPy)"


class Host:
    """An argument `Backend.call` leaves on the host (e.g. CSR offsets, read on the host)."""

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array


def on_host(array) -> Host:
    return Host(np.asarray(array))


class EmulatedStream:
    """What the emulated backend gets as `stream=`: streams are not emulated (launches run
    synchronously, in order); passing one checks that the keyword reaches the launches."""

    ptr = 0

    def synchronize(self):
        pass


def _unwrap(a):
    return a.array if isinstance(a, Host) else a


def cpu_result(op: str, function: str, *args, **kwargs):
    """The CPU backend's row function on NumPy copies of the arguments (for cross-checks)."""
    args = [np.ascontiguousarray(_unwrap(a)) if isinstance(_unwrap(a), np.ndarray) else a
            for a in args]
    return getattr(backend_module(op, "cpu"), function)(*args, **kwargs)


def seed(*parts) -> int:
    """A reproducible seed from any printable parts (the same data on every backend)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


class Backend:
    """One backend as the tests drive it (see the module docstring)."""

    def __init__(self, spec: Spec, monkeypatch, emulator=None):
        self.spec = spec
        self.name, self.kind, self.where, self.lowered = (spec.name, spec.kind, spec.where,
                                                          spec.lowered)
        self.emulator = emulator
        self._monkeypatch = monkeypatch
        self._prepared: set = set()
        self._sm_count = None

    def __repr__(self):
        return f"Backend({self.name!r})"

    device = property(lambda self: self.kind != "cpu")
    simulated = property(lambda self: self.where == "simulator")
    emulated = property(lambda self: self.where == "emulator")
    gpu = property(lambda self: self.where == "gpu")

    # --- modules and constants ----------------------------------------------------------

    def module(self, op: str):
        """The backend module of `op` (registry); its lowered constants (simulator,
        numba-lowered) and emulator settings are applied on the first use in a test."""
        module = backend_module(op, self.kind)
        if op not in self._prepared:
            self._prepared.add(op)
            if self.lowered:
                for module_name, name, value, raising in LOWERED.get(op, ()):
                    target = importlib.import_module(module_name)
                    if raising or hasattr(target, name):
                        self._monkeypatch.setattr(target, name, value)
            if self.emulator is not None:
                count = self._sm_count or EMULATOR_SM_COUNT.get(op, 1)
                self._monkeypatch.setattr(self.emulator, "sm_count", count)
        return module

    def configure(self, op: str, **by_kind):
        """configure(op, numba={"BLOCK": 32}, cupy={...}): sets constants of this backend's
        module of `op` for the test (only the entry of this backend's kind applies)."""
        values = by_kind.get(self.kind, {})
        module = self.module(op)
        for name, value in values.items():
            self._monkeypatch.setattr(module, name, value)

    def set_sm_count(self, count: int):
        """The emulator's multiprocessor count for the test (real devices keep theirs)."""
        self._sm_count = count
        if self.emulator is not None:
            self._monkeypatch.setattr(self.emulator, "sm_count", count)

    # --- arrays -----------------------------------------------------------------------------

    def to_backend(self, a):
        """A copy of the NumPy array `a` on the backend."""
        a = np.array(a, order="C", copy=True)
        if self.kind == "cpu" or self.emulated:
            return a
        if self.kind == "cupy":
            import cupy
            return cupy.asarray(a)
        from numba import cuda
        return cuda.to_device(a)

    def is_native(self, x) -> bool:
        """Whether `x` is an array of this backend's kind."""
        expected = "host" if self.kind == "cpu" or self.emulated else self.kind
        return array_kind(x) == expected and hasattr(x, "shape")

    def to_host(self, x) -> np.ndarray:
        """A backend array (result) as NumPy; asserts that it is of the backend's kind."""
        assert self.is_native(x), f"{self.name}: got a {type(x).__module__}.{type(x).__name__}"
        if self.kind == "cpu" or self.emulated:
            return np.asarray(x)
        if self.kind == "cupy":
            return x.get()
        return x.copy_to_host()

    def empty(self, shape, dtype, byte: int = 0xA5):
        """A backend array of `shape` and `dtype` filled with the byte `byte`."""
        return self.to_backend(filled_bytes(tuple(shape), dtype, byte))

    # --- streams ----------------------------------------------------------------------------

    def streams(self) -> list:
        """The stream forms to launch on: a non-default stream (and, for CuPy, its raw
        handle); [None] on the CPU."""
        if self.kind == "cpu":
            return [None]
        if self.emulated:
            return [EmulatedStream()]
        if self.kind == "cupy":
            import cupy
            stream = cupy.cuda.Stream(non_blocking=True)
            return [stream, stream.ptr]
        from numba import cuda
        return [cuda.stream()]

    def synchronize(self, stream=None):
        if self.kind == "cpu" or self.emulated:
            return
        if self.kind == "cupy":
            import cupy
            if stream is None:
                cupy.cuda.Device().synchronize()
            elif isinstance(stream, int):
                cupy.cuda.ExternalStream(stream).synchronize()
            else:
                stream.synchronize()
            return
        from numba import cuda
        if stream is None:
            cuda.synchronize()
        else:
            stream.synchronize()

    # --- calls ------------------------------------------------------------------------------

    def run(self, op: str, function: str, *args, out=None, stream=None, **kwargs):
        """module(op).function(*args, out=out[, stream=stream], **kwargs) on backend arrays,
        under the emulator for cupy-emulated; results as the function returns them."""
        fn = getattr(self.module(op), function)
        if self.device:
            kwargs["stream"] = stream
        elif stream is not None:
            raise TypeError("the CPU backend takes no stream")
        scope = self.emulator.installed() if self.emulator is not None else contextlib.nullcontext()
        with scope:
            return fn(*[_unwrap(a) for a in args], out=out, **kwargs)

    def _convert(self, a):
        return self.to_backend(a) if isinstance(a, np.ndarray) else a

    def call(self, op: str, function: str, *args, out=None, stream=None, check_inputs=True,
             **kwargs):
        """The row function on the backend with NumPy arguments converted (see the module
        docstring); returns NumPy results."""
        converted = [a if isinstance(a, Host) else self._convert(a) for a in args]
        kwargs = {key: self._convert(value) for key, value in kwargs.items()}
        single_out = out is not None and not isinstance(out, (tuple, list))
        given = None
        if out is not None:
            given = tuple(self._convert(o) for o in ((out,) if single_out else out))
        result = self.run(op, function, *converted, out=None if given is None else
                          (given[0] if single_out else given), stream=stream, **kwargs)
        self.synchronize(stream)
        results = result if isinstance(result, tuple) else (result,)
        if given is not None:
            assert len(results) == len(given), (function, len(results), len(given))
            for got, o in zip(results, given):
                assert got is o, f"{function}: the arrays given in out= must be returned"
        if check_inputs:
            for original, on_backend in zip(args, converted):
                if isinstance(original, np.ndarray):
                    assert_same_bits(self.to_host(on_backend), original,
                                     f"{function} wrote an input")
        host = tuple(self.to_host(r) for r in results)
        return host if isinstance(result, tuple) else host[0]

    def check_out(self, op: str, function: str, *args, stream=None, **kwargs):
        """out= (the row-function protocol): given arrays (pre-filled with 0xA5) are written
        and returned, bit-identical to out=None. Returns the results."""
        fresh = self.call(op, function, *args, stream=stream, **kwargs)
        single = not isinstance(fresh, tuple)
        fresh = (fresh,) if single else fresh
        given = tuple(self.empty(f.shape, f.dtype) for f in fresh)
        got = self.call(op, function, *args, out=given[0] if single else given, stream=stream,
                        **kwargs)
        got = (got,) if single else got
        for g, f in zip(got, fresh):
            np.testing.assert_array_equal(bits(g), bits(f), err_msg=f"{function} out=")
        return got


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def cuda_emulator(tmp_path_factory):
    """The host CUDA emulator (tests/_emulation/cuda_host.py); `.cu` files are built on their
    first launch (cached on disk). Skips where g++ or a supported CPU is missing."""
    from _emulation import cuda_host
    return cuda_host.make_emulator(tmp_path_factory)


def _param(name, *values, id=None):
    return pytest.param(name, *values, marks=SPECS[name].marks, id=id or name)


def backend_params(names=BACKENDS) -> list:
    """pytest params of `names` for parametrize("backend", ..., indirect=True)."""
    return [_param(name) for name in names]


@pytest.fixture(params=backend_params())
def backend(request, monkeypatch):
    """A `Backend` runner (module docstring); skips where the backend cannot run."""
    spec = SPECS[request.param]
    reason = _unavailable(spec)
    if reason:
        pytest.skip(reason)
    emulator = request.getfixturevalue("cuda_emulator") if spec.where == "emulator" else None
    runner = Backend(spec, monkeypatch, emulator)
    op = getattr(request.module, "OP", None)
    if op is not None:  # the test module's op: its constants apply to public-API calls too
        runner.module(op)
    if not runner.simulated:
        yield runner
        return
    # The simulator runs each CUDA thread as a Python thread and polls at barriers: a short
    # GIL switch interval makes its barriers ~5x faster.
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-5)
    try:
        yield runner
    finally:
        sys.setswitchinterval(old)


# ---------------------------------------------------------------------------------------------
# Case selection


def _id(value) -> str:
    if isinstance(value, (bool, np.bool_)) or value is None:
        return str(value)
    if isinstance(value, (str, int, np.integer)):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, tuple):
        return "x".join(_id(v) for v in value) or "()"
    if isinstance(value, list):
        return ",".join(_id(v) for v in value) or "[]"
    try:
        return np.dtype(value).name
    except TypeError:
        return str(value)


_TIERS = {"simulator": lambda spec: True,
          "emulator": lambda spec: spec.where != "simulator",
          "gpu": lambda spec: spec.where == "gpu"}


def over_backends(argnames: str, *, simulator=(), emulator=(), gpu=(), backends=BACKENDS,
                  where=None):
    """parametrize("backend," + argnames) over (backend, case) pairs: `simulator` cases on
    every backend, `emulator` cases on every backend but the simulator, `gpu` cases on real
    devices only; `backends` restricts the backends and `where(spec, *case)` filters."""
    names = [a.strip() for a in argnames.split(",") if a.strip()]
    params = []
    for name in backends:
        spec = SPECS[name]
        seen = set()  # a case listed in two tiers runs once per backend
        for tier, cases in (("simulator", simulator), ("emulator", emulator), ("gpu", gpu)):
            if not _TIERS[tier](spec):
                continue
            for case in cases:
                values = (case,) if len(names) == 1 else tuple(case)
                assert len(values) == len(names), (argnames, case)
                if where is not None and not where(spec, *values):
                    continue
                case_id = "-".join([name] + [_id(v) for v in values])
                if case_id not in seen:
                    seen.add(case_id)
                    params.append(_param(name, *values, id=case_id))
    return pytest.mark.parametrize(",".join(["backend"] + names), params, indirect=["backend"])


def on_backends(*names):
    """parametrize a case-free test over the backends `names`."""
    return pytest.mark.parametrize("backend", backend_params(names), indirect=True)
