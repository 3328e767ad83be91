"""Device backends of the soft ops (`sortgrad/kernels/soft/_cupy.py` + `soft.cu`, and
`_numba_cuda.py`) against the CPU reference `sortgrad.kernels.soft._cpu`.

Backends (one set of checks):
  * "cupy-emulated": the CuPy module unchanged, its CUDA C (soft.cu, and the segmented-sort and
    isotonic kernels it composes) compiled with g++ against the host emulator
    (tests/_emulation/cuda_host.py), NumPy arrays as device memory;
  * "numba": the Numba CUDA module on the simulator (conftest turns it on without a GPU), with
    lowered launch constants (32-thread blocks, a 128-entry stage, so that n = 1025 takes the
    direct global-memory path), or on a GPU (marker gpu) with the default constants;
  * "cupy": the CuPy module on a GPU (marker gpu; skipped without CuPy and a device).

Each case runs one forward on a batch of rows (random, integer-valued (heavy ties), and where
there are several rows one with NaN and one with +-inf), compares the values with the CPU
(float64 rtol 1e-12, float32 1e-6), checks that perm is a permutation of every row and that
non-finite rows are NaN with block ids 0, then runs the VJP with the backend's own residuals
(perm, block_ids, ranks) on the device and on the CPU and compares. The simulator is slow: it
runs a subset of the cases (all configurations at n = 33, fewer at other sizes).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from numba import cuda

from sortgrad.kernels._cuda import numba_support as ns
from sortgrad.kernels.soft import _cpu
from sortgrad.kernels.soft import _cupy as soft_cupy

TOL = {"float32": 1e-6, "float64": 1e-12}
EPS = 0.7

# (op, regularization, descending or k): every configuration of the three ops; k as a
# function of n ("0", "1", "n")
CONFIGS = ([("rank", reg, desc) for reg in ("l2", "kl") for desc in (False, True)]
           + [("sort", reg, desc) for reg in ("l2", "kl") for desc in (False, True)]
           + [("mask", "l2", k) for k in ("0", "1", "n")])
SIZES = (1, 31, 32, 33, 1025)
DTYPES = ("float32", "float64")


def _config_id(config):
    op, reg, extra = config
    if op == "mask":
        return f"mask-k{extra}"
    return f"{op}-{reg}-{'desc' if extra else 'asc'}"


def _full_cases(sizes):
    return [(n, dtype, c) for n in sizes for dtype in DTYPES for c in CONFIGS]


def _simulator_cases():
    """All configurations at n = 33 (both dtypes) and at n = 1 (the dtype alternating); n = 31
    and n = 32 half of them each; n = 1025 three configurations (one row: the sort is slow)."""
    cases = [(33, dtype, c) for dtype in DTYPES for c in CONFIGS]
    cases += [(1, DTYPES[i % 2], c) for i, c in enumerate(CONFIGS)]
    cases += [(31, DTYPES[i % 2], c) for i, c in enumerate(CONFIGS[0::2])]
    cases += [(32, DTYPES[i % 2], c) for i, c in enumerate(CONFIGS[1::2])]
    cases += [(1025, "float32", ("rank", "kl", True)), (1025, "float64", ("sort", "kl", False)),
              (1025, "float32", ("mask", "l2", "1"))]
    return cases


def _case_id(case):
    n, dtype, config = case
    return f"n{n}-{dtype}-{_config_id(config)}"


# --- backends -----------------------------------------------------------------------------------

class _Backend:
    """A device module and how to move arrays to and from it."""

    def __init__(self, name, module, to_device, to_host, scope=contextlib.nullcontext,
                 stream=None):
        self.name, self.module = name, module
        self.to_device, self.to_host, self.scope = to_device, to_host, scope
        self.stream = stream

    def call(self, function, *args, **kwargs):
        with self.scope():
            return getattr(self.module, function)(*args, **kwargs)


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    from _emulation import cuda_host
    return cuda_host.make_emulator(
        tmp_path_factory, packages=[soft_cupy.PACKAGE, "sortgrad.kernels.isotonic",
                                    "sortgrad.kernels.segmented_sort"])


@pytest.fixture
def emulated(emulator):
    return _Backend("cupy-emulated", soft_cupy, np.ascontiguousarray, np.asarray,
                    emulator.installed)


# Simulator launch constants (module, name, value); the other ops' constants are lowered only
# where they exist (raising=False): a rename there only makes these tests slower.
_SIM_CONSTANTS = [("sortgrad.kernels.soft._numba_cuda", "BLOCK", 32),
                  ("sortgrad.kernels.soft._numba_cuda", "ITEMS", 4),
                  ("sortgrad.kernels.isotonic._numba_cuda", "BLOCK", 32),
                  ("sortgrad.kernels.isotonic._numba_cuda", "CHUNK", 4),
                  ("sortgrad.kernels.segmented_sort._numba_cuda", "SORT_THREADS", 32),
                  ("sortgrad.kernels.segmented_sort._numba_cuda", "SORT_TILE", 256),
                  ("sortgrad.kernels.segmented_sort._numba_cuda", "MERGE_THREADS", 32)]


@pytest.fixture
def numba_backend(monkeypatch):
    if not cuda.is_available():
        pytest.skip("needs Numba CUDA or its simulator")
    import importlib
    module = importlib.import_module("sortgrad.kernels.soft._numba_cuda")
    if ns.SIMULATOR:
        for name, attr, value in _SIM_CONSTANTS:
            monkeypatch.setattr(importlib.import_module(name), attr, value,
                                raising=name == module.__name__)
    return _Backend("numba", module, lambda a: cuda.to_device(np.ascontiguousarray(a)),
                    lambda a: a.copy_to_host())


@pytest.fixture
def cupy_backend():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except Exception:  # noqa: BLE001 - CuPy raises its own error without a driver
        pytest.skip("no CUDA driver")
    return _Backend("cupy", soft_cupy, cupy.asarray, lambda a: a.get())


# --- inputs and checks --------------------------------------------------------------------------

def _inputs(n, dtype, seed, rows=None):
    """Rows: random normal, integer-valued (heavy ties), and (with 4 rows) one with a NaN and
    one with +inf and -inf among finite entries. A single row (the default for n > 64) mixes
    random and integer-valued entries."""
    rng = np.random.default_rng(seed)
    rows = (4 if n <= 64 else 1) if rows is None else rows
    x = rng.normal(size=(rows, n)) * 2
    if rows > 1:
        x[1] = rng.integers(-3, 4, size=n)
    else:
        x[:, ::2] = rng.integers(-3, 4, size=x[:, ::2].shape)
    if rows >= 4 and n:
        x[2, rng.integers(n)] = np.nan
        x[3, rng.integers(n)] = np.inf
        x[3, rng.integers(n)] = -np.inf
    g = rng.normal(size=(rows, n))
    return np.ascontiguousarray(x, dtype=dtype), np.ascontiguousarray(g, dtype=dtype)


def _assert_close(actual, expected, dtype, what):
    tol = TOL[np.dtype(dtype).name]
    finite = expected[np.isfinite(expected)]
    scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, equal_nan=True,
                               err_msg=what)


def _bad_rows(x):
    return ~np.all(np.isfinite(x), axis=-1)


def _check_residuals(x, values, perm, block_ids):
    rows, n = x.shape
    assert perm.dtype == np.int32 and block_ids.dtype == np.int32
    assert values.dtype == x.dtype
    for r in range(rows):
        assert np.array_equal(np.sort(perm[r]), np.arange(n)), f"row {r}: perm"
    bad = _bad_rows(x)
    assert np.all(np.isnan(values[bad]))
    assert np.all(block_ids[bad] == 0)
    assert not np.any(np.isnan(values[~bad]))
    good = block_ids[~bad]
    if good.size:  # numbered 0, 1, ... from the left in steps of 0 or 1
        assert np.all(good[:, 0] == 0)
        assert np.all(np.isin(np.diff(good, axis=-1), (0, 1)))


def _forward_args(config, n):
    op, reg, extra = config
    if op == "mask":
        k = {"0": 0, "1": min(1, n), "n": n}[extra]
        return "soft_top_k_mask_rows", (k, EPS)
    return f"soft_{op}_rows", (EPS, reg, extra)


def _vjp_args(config):
    op, reg, extra = config
    if op == "mask":
        return "soft_top_k_mask_vjp_rows", (EPS,)
    return f"soft_{op}_vjp_rows", (EPS, reg, extra)


def _run_case(backend, n, dtype, config, seed=0, rows=None, use_out=False):
    x, g = _inputs(n, dtype, seed, rows)
    fwd, fargs = _forward_args(config, n)
    kwargs = {}
    if use_out:
        outs = tuple(backend.to_device(np.zeros(x.shape, t)) for t in (x.dtype, np.int32,
                                                                        np.int32))
        kwargs["out"] = outs
    if backend.stream is not None:
        kwargs["stream"] = backend.stream
    result = backend.call(fwd, backend.to_device(x), *fargs, **kwargs)
    if use_out:
        assert all(r is o for r, o in zip(result, outs)), "out= must be returned as given"
    values, perm, block_ids = (backend.to_host(r) for r in result)
    expected = getattr(_cpu, fwd)(x, *fargs)[0]
    what = f"{backend.name} {fwd} n={n} {dtype} {config}"
    _assert_close(values, expected, dtype, what)
    _check_residuals(x, values, perm, block_ids)
    op = config[0]
    if op == "mask":
        good = ~_bad_rows(x)
        assert np.all((values[good] >= 0) & (values[good] <= 1))
        np.testing.assert_allclose(values[good].sum(axis=-1), fargs[0], rtol=TOL[dtype] * 10,
                                   atol=TOL[dtype] * 10 * max(1, n))

    # VJP with the backend's own residuals, on the device and on the CPU
    vjp, vargs = _vjp_args(config)
    residuals = (values, perm, block_ids) if op == "rank" else (perm, block_ids)
    vkwargs = {k: v for k, v in kwargs.items() if k == "stream"}
    if use_out:
        dx_out = backend.to_device(np.zeros(x.shape, x.dtype))
        vkwargs["out"] = dx_out
    dx = backend.call(vjp, backend.to_device(g), backend.to_device(x),
                      *(backend.to_device(r) for r in residuals), *vargs, **vkwargs)
    if use_out:
        assert dx is dx_out, "out= must be returned as given"
    dx = backend.to_host(dx)
    assert dx.dtype == x.dtype
    expected_dx = getattr(_cpu, vjp)(g, x, *residuals, *vargs)
    _assert_close(dx, expected_dx, dtype, f"{what} vjp")
    assert np.all(np.isnan(dx[_bad_rows(x)]))


# --- the emulated CuPy backend (full matrix) ----------------------------------------------------

@pytest.mark.parametrize("case", _full_cases(SIZES + (2100,)), ids=_case_id)
def test_cupy_emulated(emulated, case):
    """2100 > 2048 entries: the direct (unstaged) path of soft.cu and the tiled sort."""
    _run_case(emulated, *case)


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_cupy_emulated_out(emulated, config):
    _run_case(emulated, 33, "float32", config, seed=3, use_out=True)


def test_cupy_emulated_several_blocks(emulated):
    """Many short rows: several rows per block, a partial last block, several blocks."""
    for config in (("rank", "l2", False), ("sort", "kl", True), ("mask", "l2", "1")):
        _run_case(emulated, 5, "float64", config, seed=4, rows=1000)


def _launched(emulator):
    """(op, kernel) of the launches so far: the package's last component, and for soft.cu the
    kernel name."""
    out = []
    for package, _, expression, _, _ in emulator.launches:
        op = package.rsplit(".", 1)[-1]
        out.append((op, expression.split("<")[0].split("::")[-1] if op == "soft" else None))
    emulator.launches.clear()
    return out


def test_cupy_emulated_launches(emulator, emulated):
    """The composition (rows of n <= 2048): one sort launch, prep, one isotonic launch, finish
    forward; prep, one isotonic VJP launch, finish backward."""
    x, g = _inputs(33, "float64", 5)
    emulator.launches.clear()
    ranks, perm, ids = emulated.call("soft_rank_rows", x, EPS, "kl", False)
    assert _launched(emulator) == [("segmented_sort", None), ("soft", "soft_fwd_prep"),
                                   ("isotonic", None), ("soft", "soft_finish")]
    emulated.call("soft_rank_vjp_rows", g, x, ranks, perm, ids, EPS, "kl", False)
    assert _launched(emulator) == [("soft", "soft_vjp_prep"), ("isotonic", None),
                                   ("soft", "soft_finish")]


# --- Numba CUDA (simulator subset; all cases on a GPU) ------------------------------------------

_NUMBA_CASES = _simulator_cases() if ns.SIMULATOR else _full_cases(SIZES + (2100, 70_001))


# the simulator computes with NumPy scalars: the NaN / inf rows warn inside the isotonic kernels
_NAN_ROWS_WARN = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@_NAN_ROWS_WARN
@pytest.mark.parametrize("case", _NUMBA_CASES, ids=_case_id)
def test_numba(numba_backend, case):
    _run_case(numba_backend, *case)


@_NAN_ROWS_WARN
@pytest.mark.parametrize("config", [("rank", "kl", False), ("sort", "l2", True),
                                    ("mask", "l2", "n")], ids=_config_id)
def test_numba_out_and_stream(numba_backend, config):
    numba_backend.stream = cuda.stream()
    _run_case(numba_backend, 33, "float64", config, seed=6, use_out=True)


def test_numba_public_api(numba_backend):
    """Through `sortgrad.kernels.soft` (the backend follows the Numba arrays), 3-D input."""
    from sortgrad.kernels import soft
    x = _inputs(12, "float64", 7, rows=4)[0].reshape(2, 2, 12)
    out = tuple(cuda.device_array(x.shape, t) for t in (np.float64, np.int32, np.int32))
    mask = soft.soft_top_k_mask(cuda.to_device(x), 3, EPS, out=out)
    assert all(a is b for a, b in zip(mask, out))
    _assert_close(mask[0].copy_to_host().reshape(4, 12),
                  _cpu.soft_top_k_mask_rows(x.reshape(4, 12), 3, EPS)[0], "float64",
                  "public soft_top_k_mask")


def test_numba_public_api_vjp(numba_backend):
    from sortgrad.kernels import soft
    x, g = _inputs(12, "float64", 7, rows=4)
    x3, g3 = x.reshape(2, 2, 12), g.reshape(2, 2, 12)
    ranks, perm, ids = soft.soft_rank(cuda.to_device(x3), EPS, regularization="kl")
    assert ranks.shape == (2, 2, 12)
    _assert_close(ranks.copy_to_host().reshape(4, 12),
                  _cpu.soft_rank_rows(x, EPS, "kl", False)[0], "float64", "public soft_rank")
    dx = soft.soft_rank_vjp(cuda.to_device(g3), cuda.to_device(x3), ranks, perm, ids, EPS,
                            regularization="kl")
    expected = _cpu.soft_rank_vjp_rows(g, x, ranks.copy_to_host().reshape(4, 12),
                                       perm.copy_to_host().reshape(4, 12),
                                       ids.copy_to_host().reshape(4, 12), EPS, "kl", False)
    _assert_close(dx.copy_to_host().reshape(4, 12), expected, "float64", "public vjp")


@pytest.mark.parametrize("which", ["cupy-emulated", "numba"])
def test_float32_subnormals(request, which):
    """float32 subnormal inputs and outputs keep their bits (no flush to zero; CuPy compiles
    with -ftz=true, soft.cu widens and narrows through the bits)."""
    backend = request.getfixturevalue("emulated" if which == "cupy-emulated"
                                      else "numba_backend")
    x = np.full((2, 6), 3e-40, np.float32)
    x[1] = -1e-42
    g = (np.arange(12, dtype=np.float32).reshape(2, 6) - 5) * np.float32(1e-41)
    values, perm, ids = (backend.to_host(a) for a in backend.call(
        "soft_sort_rows", backend.to_device(x), 1e45, "l2", True))
    expected = _cpu.soft_sort_rows(x, 1e45, "l2", True)[0]
    assert np.all(expected != 0) and np.all(np.abs(expected) < np.finfo(np.float32).tiny)
    np.testing.assert_array_equal(values, expected)
    dx = backend.to_host(backend.call("soft_sort_vjp_rows", backend.to_device(g),
                                      backend.to_device(x), backend.to_device(perm),
                                      backend.to_device(ids), 1e45, "l2", True))
    np.testing.assert_array_equal(dx, _cpu.soft_sort_vjp_rows(g, x, perm, ids, 1e45, "l2", True))
    assert np.count_nonzero(dx) == 11


# --- CuPy on a GPU ----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", _full_cases(SIZES + (2100, 70_001)), ids=_case_id)
def test_cupy_gpu(cupy_backend, case):
    _run_case(cupy_backend, *case)


# --- empty inputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
@pytest.mark.parametrize("which", ["cupy-emulated", "numba"])
def test_empty(request, which, shape):
    backend = request.getfixturevalue("emulated" if which == "cupy-emulated"
                                      else "numba_backend")
    x = np.zeros(shape, np.float32)
    dev = backend.to_device
    for fwd, args in (("soft_rank_rows", (EPS, "kl", True)),
                      ("soft_sort_rows", (EPS, "l2", False)),
                      ("soft_top_k_mask_rows", (0, EPS))):
        values, perm, _ = backend.call(fwd, dev(x), *args)
        assert backend.to_host(values).shape == shape and backend.to_host(perm).dtype == np.int32
    i = np.zeros(shape, np.int32)
    dx = backend.call("soft_rank_vjp_rows", dev(x), dev(x), dev(x), dev(i), dev(i), EPS, "l2",
                      False)
    assert backend.to_host(dx).shape == shape
    dx = backend.call("soft_sort_vjp_rows", dev(x), dev(x), dev(i), dev(i), EPS, "kl", True)
    assert backend.to_host(dx).shape == shape
    dx = backend.call("soft_top_k_mask_vjp_rows", dev(x), dev(x), dev(i), dev(i), EPS)
    assert backend.to_host(dx).shape == shape


# --- the Numba kernels compile for the real target (NVVM, no GPU needed) ------------------------

_PTX_SCRIPT = """
import sys
try:
    from numba.cuda.cudadrv.nvvm import NVVM
    NVVM()
except Exception as err:
    print("no NVVM:", err)
    sys.exit(77)
from sortgrad.kernels._cuda import numba_support as ns
from sortgrad.kernels.soft import _numba_cuda as nb
cases = nb.ptx_cases()
ptx = ns.compile_ptx_cases(cases, cc=(8, 0))
assert ptx and all(".entry" in p for p in ptx.values())
"""


@pytest.mark.skipif(not ns.SIMULATOR, reason="a GPU run compiles the kernels anyway")
def test_numba_kernels_compile_to_ptx():
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0", SORTGRAD_TEST_CUDASIM="0")
    import sortgrad
    root = os.path.dirname(os.path.dirname(os.path.abspath(sortgrad.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    if result.returncode == 77:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr


# --- module surface ---------------------------------------------------------------------------

def test_cuda_sources_listed():
    """soft.cu's instantiations are listed for the NVRTC compile test and the loader."""
    expressions = soft_cupy.CUDA_SOURCES["soft.cu"]
    assert len(set(expressions)) == len(expressions) == 6
    assert soft_cupy.DTYPES == ("float32", "float64")
