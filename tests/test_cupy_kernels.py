"""CuPy backend (CUDA C kernels) of segmented sort, top-k and permutations, against the CPU
backend: values bit for bit, permutations and indices exactly.

One test body, two runners:
- "emulator": the .cu files compiled with g++ against the host CUDA emulator
  (tests/_emulation: sortgrad_emulation.cuh, every CUDA thread a fiber, barriers and warp
  collectives checked; cuda_host.py, the runner) and the `_cupy.py` modules run on NumPy arrays
  through the loader's `xp` / `launch` / `stream_scope` / `multiprocessor_count` hooks. Runs
  without a GPU (CI); checks the algorithms, the launch arithmetic, barrier placement and the
  kernel argument types (sizes are checked against the kernel signatures).
- "gpu" (marker gpu): the same calls on CuPy arrays on a real device, plus the public API
  (`sortgrad.kernels.X(cupy_array)`), batch shapes, streams and argument errors. Skipped
  without CuPy or a CUDA device.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from _emulation import cuda_host

from sortgrad.kernels._cuda import cupy_loader
from sortgrad.kernels.permutation import _cpu as perm_cpu
from sortgrad.kernels.permutation import _cupy as perm_cupy
from sortgrad.kernels.segmented_sort import _cpu as sort_cpu
from sortgrad.kernels.segmented_sort import _cupy as sort_cupy
from sortgrad.kernels.top_k import _cpu as topk_cpu
from sortgrad.kernels.top_k import _cupy as topk_cupy

PACKAGES = (sort_cupy.PACKAGE, topk_cupy.PACKAGE, perm_cupy.PACKAGE)
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
SIZES = [0, 1, 31, 32, 33, 1023, 1025, 4097]
FLOATS = ["float16", "float32", "float64"]
OTHER_DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]
PAYLOAD_NANS = {"float16": (0x7E01, 0xFE03), "float32": (0x7FC00001, 0xFFC00003),
                "float64": (0x7FF8000000000001, 0xFFF8000000000003)}


# --- host emulator runner (tests/_emulation/cuda_host.py) ------------------------------------

@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    return cuda_host.make_emulator(tmp_path_factory, packages=PACKAGES)


# --- GPU runner -------------------------------------------------------------------------------

def _gpu_unavailable() -> str | None:
    try:
        import cupy
    except ImportError:
        return "needs CuPy"
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
    except Exception:  # CUDARuntimeError without a driver
        pass
    return "needs a CUDA GPU"


@pytest.fixture(scope="session")
def cupy_gpu():
    reason = _gpu_unavailable()
    if reason:
        pytest.skip(reason)
    import cupy
    return cupy


class Runner:
    """Calls a backend function on host arrays and returns host arrays."""

    def __init__(self, kind, emulator=None, cupy=None):
        self.kind, self.emulator, self.cupy = kind, emulator, cupy

    def __call__(self, fn, *args, host_args=()):
        """fn(*args); NumPy arguments go to the device except those at positions host_args."""
        out = self.call(fn, *[self.device(a) if isinstance(a, np.ndarray) and i not in host_args
                              else a for i, a in enumerate(args)])
        outs = out if isinstance(out, tuple) else (out,)
        host = tuple(self.host(o) for o in outs)
        return host if isinstance(out, tuple) else host[0]

    def call(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on device arrays (NumPy arrays on the emulator)."""
        if self.kind == "emulator":
            return self.emulator.call(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    def device(self, a):
        return np.array(a) if self.kind == "emulator" else self.cupy.asarray(a)

    def host(self, a):
        if self.kind == "emulator":
            assert isinstance(a, np.ndarray), type(a)
            return a
        assert isinstance(a, self.cupy.ndarray), type(a)
        return a.get()

    def empty(self, shape, dtype):
        """A device array filled with the byte 0xA5 (unwritten entries show up)."""
        if self.kind == "emulator":
            return cuda_host.HOST_XP.empty(shape, dtype)
        a = self.cupy.empty(shape, dtype)
        a.reshape(-1).view(self.cupy.uint8).fill(0xA5)
        return a


@pytest.fixture(params=["emulator", pytest.param("gpu", marks=pytest.mark.gpu)])
def run(request):
    if request.param == "emulator":
        return Runner("emulator", emulator=request.getfixturevalue("emulator"))
    return Runner("gpu", cupy=request.getfixturevalue("cupy_gpu"))


# --- data -------------------------------------------------------------------------------------

def make_keys(rng, shape, dtype, pattern):
    """Keys: "random", "ties" (values 0..3) or "special" (signed zeros, NaNs of both signs and
    with payloads, infinities, extremes, subnormals of both signs)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if pattern == "ties":
        return rng.integers(0, 4, size=shape).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if pattern == "random":
            return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
        pool = np.array([info.min, info.min + 1, 0, 1, 2, info.max - 1, info.max], dtype=dtype)
        return rng.choice(pool, size=shape)
    if pattern == "random":
        return (rng.standard_normal(shape) * 100).astype(dtype)
    info = np.finfo(dtype)
    pool = np.array([0.0, -0.0, math.nan, -math.nan, math.inf, -math.inf, 1.0, -1.0, 2.0, 0.5,
                     info.max, -info.max, info.smallest_subnormal, -info.smallest_subnormal,
                     info.tiny, 3 * info.smallest_subnormal], dtype=dtype)
    out = rng.choice(pool, size=shape)
    flat = out.reshape(-1).view(UINT[dtype.itemsize])
    if flat.size >= 4:
        pos, neg = PAYLOAD_NANS[dtype.name]
        where = rng.choice(flat.size, size=max(1, flat.size // 16), replace=False)
        flat[where] = np.where(rng.random(where.size) < 0.5, pos, neg).astype(flat.dtype)
    return out


def assert_same_bits(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        actual.dtype, actual.shape, expected.dtype, expected.shape)
    np.testing.assert_array_equal(actual.view(UINT[actual.dtype.itemsize]) if actual.size
                                  else actual, expected.view(UINT[expected.dtype.itemsize])
                                  if expected.size else expected)


def _seed(*parts) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


# --- segmented sort ---------------------------------------------------------------------------

SORT_CASES = ([("float32", n, p) for n in SIZES for p in ("random", "ties", "special")]
              + [(d, n, "special") for d in ("float16", "float64") for n in (33, 1025, 4097)]
              + [(d, n, "random") for d in OTHER_DTYPES for n in (33, 2049)]
              + [(d, 300, "special") for d in ("int8", "uint64", "int64")])


@pytest.mark.parametrize("dtype,n,pattern", SORT_CASES)
@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
def test_sort_rows(run, dtype, n, pattern, descending):
    rng = np.random.default_rng(_seed("sort", dtype, n, pattern, descending))
    rows = 1 if n >= 4097 else 3
    x = make_keys(rng, (rows, n), dtype, pattern)
    values, perm = run(sort_cupy.sort_rows, x, descending)
    expected_values, expected_perm = sort_cpu.sort_rows(x, descending)
    assert_same_bits(values, expected_values)
    np.testing.assert_array_equal(perm, expected_perm)
    assert perm.dtype == np.int32


@pytest.mark.parametrize("rows,n", [(0, 5), (4, 0), (0, 0), (300, 3), (9, 100)])
def test_sort_rows_shapes(run, rows, n):
    x = make_keys(np.random.default_rng(rows + n), (rows, n), "float32", "ties")
    values, perm = run(sort_cupy.sort_rows, x, False)
    expected_values, expected_perm = sort_cpu.sort_rows(x, False)
    assert_same_bits(values, expected_values)
    np.testing.assert_array_equal(perm, expected_perm)


RAGGED = {
    "mixed": [0, 1, 31, 32, 33, 0, 1023, 1025, 5, 2049, 4097, 2],
    "empty": [0, 0, 0],
    "none": [],
    "long": [6000, 2100, 9000],
    "many_short": [3, 8, 9, 16, 17, 1, 0, 2, 250, 256, 257] * 5,
}


@pytest.mark.parametrize("layout", sorted(RAGGED))
@pytest.mark.parametrize("dtype,pattern", [("float32", "special"), ("float32", "ties"),
                                           ("int64", "random"), ("float16", "special")])
@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
def test_sort_segments(run, layout, dtype, pattern, descending):
    rng = np.random.default_rng(_seed("ragged", layout, dtype, pattern, descending))
    offsets = np.concatenate([[0], np.cumsum(RAGGED[layout], dtype=np.int64)]).astype(np.int64)
    tail = 7  # elements past the last offset are copied through with perm 0
    x = make_keys(rng, (int(offsets[-1]) + tail,), dtype, pattern)
    values, perm = run(sort_cupy.sort_segments, x, offsets, descending, host_args=(1,))
    from sortgrad.kernels import segmented_sort  # the CPU entry point handles the tail
    expected_values, expected_perm = segmented_sort(x, offsets, descending=descending)
    assert_same_bits(values, expected_values)
    np.testing.assert_array_equal(perm, expected_perm)


# --- top-k ------------------------------------------------------------------------------------

def _ks(n):
    return sorted({k for k in (0, 1, 5, 32, 33, 100, 2049, n) if k <= n})


TOPK_CASES = ([("float32", n, p) for n in SIZES for p in ("random", "ties", "special")]
              + [(d, n, "special") for d in ("float16", "float64") for n in (33, 1025, 4097)]
              + [(d, n, "random") for d in OTHER_DTYPES for n in (1500, 1504)])


@pytest.mark.parametrize("dtype,n,pattern", TOPK_CASES)
def test_top_k(run, dtype, n, pattern):
    rng = np.random.default_rng(_seed("topk", dtype, n, pattern))
    rows = 1 if n >= 4097 else 2
    x = make_keys(rng, (rows, n), dtype, pattern)
    for k in _ks(n):
        values, indices = run(topk_cupy.top_k_rows, x, k)
        expected_values, expected_indices = topk_cpu.top_k_rows(x, k)
        assert_same_bits(values, expected_values)
        np.testing.assert_array_equal(indices, expected_indices, err_msg=f"k={k}")


@pytest.mark.parametrize("pattern", ["random", "ties", "special"])
@pytest.mark.parametrize("extra", [5, 8], ids=["scalar_loads", "vector_loads"])
def test_top_k_split_rows(run, pattern, extra):
    """Few long rows: the filter splits each row over several blocks, then reduces."""
    rng = np.random.default_rng(_seed("split", pattern, extra))
    x = make_keys(rng, (1, 3 * topk_cupy.MIN_CHUNK + extra), "float32", pattern)
    for k in (1, 7, 32, 33, 300):
        values, indices = run(topk_cupy.top_k_rows, x, k)
        expected_values, expected_indices = topk_cpu.top_k_rows(x, k)
        assert_same_bits(values, expected_values)
        np.testing.assert_array_equal(indices, expected_indices)


def test_top_k_short_last_chunk(emulator, monkeypatch):
    """Many chunks per row and a last chunk shorter than k (its candidate list is padded with
    max() items), with keys equal to that padding's: NaNs with all bits set."""
    monkeypatch.setattr(topk_cupy, "MIN_CHUNK", 64)
    monkeypatch.setattr(emulator, "sm_count", 64)
    run = Runner("emulator", emulator=emulator)
    rng = np.random.default_rng(7)
    for n, fill in ((3203, 200), (3200, 200), (3203, 3195), (3200, 3195)):
        # 41 chunks of 80, the last of 3 (scalar loads); vector loads. Rows mostly of the
        # lowest key: the k-th largest is one, so padding and real entries tie.
        x = make_keys(rng, (1, n), "float32", "special")
        x.view(np.uint32)[0, rng.choice(n, fill, replace=False)] = 0xFFFFFFFF
        for k in (5, 40, 64):
            values, indices = run(topk_cupy.top_k_rows, x, k)
            expected_values, expected_indices = topk_cpu.top_k_rows(x, k)
            assert_same_bits(values, expected_values)
            np.testing.assert_array_equal(indices, expected_indices)


def test_top_k_ascending_rows(run):
    """Increasing rows: every element beats the running threshold of the warp filter."""
    x = np.arange(2 * 3000, dtype=np.float32).reshape(2, 3000)
    for k in (1, 32, 500):
        values, indices = run(topk_cupy.top_k_rows, x, k)
        expected_values, expected_indices = topk_cpu.top_k_rows(x, k)
        assert_same_bits(values, expected_values)
        np.testing.assert_array_equal(indices, expected_indices)


# --- permutations -----------------------------------------------------------------------------

def _random_perm(rng, rows, m, n):
    return np.array([rng.permutation(n)[:m] for _ in range(rows)], dtype=np.int32).reshape(rows, m)


@pytest.mark.parametrize("n", SIZES + [9000])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int8", "bool"])
def test_scatter_rows(run, n, dtype):
    rng = np.random.default_rng(_seed("scatter", n, dtype))
    rows = 3
    for m in sorted({0, n // 2, n}):
        perm = _random_perm(rng, rows, m, n)
        values = make_keys(rng, (rows, m), dtype, "special" if dtype in FLOATS else "random")
        out = run(perm_cupy.scatter_rows, values, perm, n)
        assert_same_bits(out, perm_cpu.scatter_rows(values, perm, n))


@pytest.mark.parametrize("n", [5, 33, 1025, 9000])
def test_scatter_skips_out_of_range(run, n):
    rng = np.random.default_rng(n)
    perm = _random_perm(rng, 2, n, n)
    perm[:, 0], perm[:, -1] = -1, n + 3
    values = rng.standard_normal((2, n)).astype(np.float32)
    out = run(perm_cupy.scatter_rows, values, perm, n)
    expected = np.zeros((2, n), np.float32)
    for r in range(2):
        keep = (perm[r] >= 0) & (perm[r] < n)
        expected[r, perm[r][keep]] = values[r][keep]
    assert_same_bits(out, expected)


@pytest.mark.parametrize("n", SIZES + [9000])
def test_inverse_rows(run, n):
    rng = np.random.default_rng(_seed("inverse", n))
    for rows in (1, 5):
        perm = _random_perm(rng, rows, n, n)
        inv = run(perm_cupy.inverse_rows, perm)
        np.testing.assert_array_equal(inv, perm_cpu.inverse_rows(perm))
        assert inv.dtype == np.int32


# --- out= (the row-function protocol): results written into given arrays -----------------------

def _check_out(run, fn, *args, host_args=(), **kwargs):
    """fn(*args, out=given) writes the given device arrays (pre-filled with a byte pattern) and
    returns those objects; the results are bit-identical to fn(*args) (out=None)."""
    dev = [run.device(a) if isinstance(a, np.ndarray) and i not in host_args else a
           for i, a in enumerate(args)]
    fresh = run.call(fn, *dev, **kwargs)
    single = not isinstance(fresh, tuple)
    fresh = (fresh,) if single else fresh
    given = tuple(run.empty(f.shape, f.dtype) for f in fresh)
    got = run.call(fn, *dev, out=given[0] if single else given, **kwargs)
    got = (got,) if single else got
    assert isinstance(got, tuple) and len(got) == len(given)
    for g, o, f in zip(got, given, fresh):
        assert g is o, "the function must return the arrays given in out"
        assert_same_bits(run.host(g), run.host(f))


@pytest.mark.parametrize("shape", [(3, 33), (2, 0), (1, 4097)])
@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
def test_out_sort_rows(run, shape, descending):
    x = make_keys(np.random.default_rng(_seed("out-sort", shape)), shape, "float32", "special")
    _check_out(run, sort_cupy.sort_rows, x, descending)


@pytest.mark.parametrize("layout", ["mixed", "none"])
def test_out_sort_segments(run, layout):
    rng = np.random.default_rng(_seed("out-ragged", layout))
    offsets = np.concatenate([[0], np.cumsum(RAGGED[layout], dtype=np.int64)]).astype(np.int64)
    x = make_keys(rng, (int(offsets[-1]) + 5,), "float16", "special")
    _check_out(run, sort_cupy.sort_segments, x, offsets, True, host_args=(1,))


@pytest.mark.parametrize("shape,k", [((2, 100), 100), ((2, 1500), 5), ((2, 1500), 100),
                                     ((1, 4097), 2049), ((3, 40), 0),
                                     ((1, 3 * topk_cupy.MIN_CHUNK + 5), 7)])
def test_out_top_k_rows(run, shape, k):
    x = make_keys(np.random.default_rng(_seed("out-topk", shape, k)), shape, "float64", "ties")
    _check_out(run, topk_cupy.top_k_rows, x, k)


@pytest.mark.parametrize("n", [0, 33, 9000])  # 9000 float32: the direct kernel (zeroes out)
def test_out_permutations(run, n):
    rng = np.random.default_rng(_seed("out-perm", n))
    perm = _random_perm(rng, 3, n, n)
    _check_out(run, perm_cupy.inverse_rows, perm)
    part = _random_perm(rng, 3, n // 2, n)
    values = rng.standard_normal((3, n // 2)).astype(np.float32)
    _check_out(run, perm_cupy.scatter_rows, values, part, n)


def test_row_functions_take_out_and_stream_by_keyword():
    import inspect
    from sortgrad.kernels.isotonic import _cupy as iso_cupy
    for fn in (sort_cupy.sort_rows, sort_cupy.sort_segments, topk_cupy.top_k_rows,
               perm_cupy.inverse_rows, perm_cupy.scatter_rows, iso_cupy.isotonic_rows,
               iso_cupy.isotonic_vjp_rows):
        params = inspect.signature(fn).parameters
        for name in ("out", "stream"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (fn.__name__, name)
            assert params[name].default is None


def test_row_batches(emulator, monkeypatch):
    """Launches of at most MAX_ROWS_PER_LAUNCH rows (int32 row numbers in the kernels)."""
    monkeypatch.setattr(sort_cupy, "MAX_ROWS_PER_LAUNCH", 4)
    run = Runner("emulator", emulator=emulator)
    rng = np.random.default_rng(5)
    for n in (5, 3000):
        x = make_keys(rng, (11, n), "float32", "ties")
        values, perm = run(sort_cupy.sort_rows, x, True)
        np.testing.assert_array_equal(perm, sort_cpu.sort_rows(x, True)[1])
        for k in sorted({3, min(40, n), n}):
            np.testing.assert_array_equal(run(topk_cupy.top_k_rows, x, k)[1],
                                          topk_cpu.top_k_rows(x, k)[1])
        p = _random_perm(rng, 11, n, n)
        np.testing.assert_array_equal(run(perm_cupy.inverse_rows, p), perm_cpu.inverse_rows(p))


EMULATOR_CHECKS = r"""
__global__ void good(int* out) {
  __shared__ int s[64];
  s[threadIdx.x] = (int)threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = s[63 - threadIdx.x] + __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}
__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void shuffle_after_exit(int* out) {
  if (threadIdx.x & 1) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}
__global__ void mixed_barriers(int* out) {
  if ((threadIdx.x & 31) < 16) __syncwarp(); else __syncthreads();
  out[threadIdx.x] = 1;
}
"""


def test_emulator_checks_barriers(emulator, tmp_path):
    """The emulator runs correct code and rejects barriers that not every thread reaches."""
    names = ["good", "divergent_barrier", "shuffle_after_exit", "mixed_barriers"]
    source = cuda_host.EmulatedSource("checks", "checks.cu", names, str(tmp_path),
                                      code=EMULATOR_CHECKS)
    source.build().load()
    out = np.zeros(64, np.int32)
    source.launch("good", 1, 64, (out,))
    t = np.arange(64)
    np.testing.assert_array_equal(out, (63 - t) + (t ^ 1))
    for name, message in [("divergent_barrier", "__syncthreads after some threads"),
                          ("shuffle_after_exit", "warp collective after some lanes"),
                          ("mixed_barriers", "deadlock")]:
        with pytest.raises(RuntimeError, match=message):
            source.launch(name, 1, 64, (out,))


def test_emulator_catches_forgotten_outputs(emulator):
    """The emulator's fresh arrays are not zero: an unwritten output entry fails the tests."""
    with emulator.installed():
        a = cupy_loader.xp().empty((3,), np.int32)
    assert (a != 0).all()


# --- GPU only: the public API, streams, argument errors --------------------------------------

@pytest.mark.gpu
def test_public_api_routes_cupy_arrays(cupy_gpu):
    cp = cupy_gpu
    from sortgrad import kernels
    rng = np.random.default_rng(0)
    x = make_keys(rng, (2, 3, 1025), "float32", "special")
    values, perm = kernels.segmented_sort(cp.asarray(x), descending=True)
    expected_values, expected_perm = kernels.segmented_sort(x, descending=True)
    assert isinstance(values, cp.ndarray)
    assert_same_bits(values.get(), expected_values)
    np.testing.assert_array_equal(perm.get(), expected_perm)

    offsets = np.array([0, 3, 3, 700, 2900], np.int64)
    flat = x.reshape(-1)[:3000].copy()
    for offs in (offsets, cp.asarray(offsets)):
        values, perm = kernels.segmented_sort(cp.asarray(flat), offs)
        expected_values, expected_perm = kernels.segmented_sort(flat, offsets)
        assert_same_bits(values.get(), expected_values)
        np.testing.assert_array_equal(perm.get(), expected_perm)

    values, idx = kernels.top_k(cp.asarray(x), 7)
    expected_values, expected_idx = kernels.top_k(x, 7)
    assert_same_bits(values.get(), expected_values)
    np.testing.assert_array_equal(idx.get(), expected_idx)

    p = np.stack([rng.permutation(50) for _ in range(6)]).astype(np.int32).reshape(2, 3, 50)
    np.testing.assert_array_equal(kernels.inverse_permutation(cp.asarray(p)).get(),
                                  kernels.inverse_permutation(p))
    v = rng.standard_normal((2, 3, 50)).astype(np.float64)
    out = kernels.permutation_scatter(cp.asarray(v), cp.asarray(p), 60)
    assert_same_bits(out.get(), kernels.permutation_scatter(v, p, 60))


@pytest.mark.gpu
def test_stream_argument(cupy_gpu):
    cp = cupy_gpu
    x = make_keys(np.random.default_rng(1), (64, 5000), "float32", "random")
    stream = cp.cuda.Stream(non_blocking=True)
    device_x = cp.asarray(x)
    cp.cuda.Device().synchronize()
    for s in (stream, stream.ptr):
        values, perm = sort_cupy.sort_rows(device_x, False, stream=s)
        top_values, top_idx = topk_cupy.top_k_rows(device_x, 16, stream=s)
        stream.synchronize()
        expected_values, expected_perm = sort_cpu.sort_rows(x, False)
        assert_same_bits(values.get(), expected_values)
        np.testing.assert_array_equal(perm.get(), expected_perm)
        np.testing.assert_array_equal(top_idx.get(), topk_cpu.top_k_rows(x, 16)[1])


@pytest.mark.gpu
def test_argument_errors(cupy_gpu):
    cp = cupy_gpu
    from sortgrad import kernels
    x = np.ones((3, 4), np.float32)
    with pytest.raises(TypeError):
        kernels.segmented_sort(x, backend="cupy")  # a host array
    with pytest.raises(ValueError):
        kernels.segmented_sort(cp.asarray(np.ones((4, 6), np.float32))[:, ::2], backend="cupy")
    with pytest.raises(TypeError):
        kernels.top_k(cp.ones((3, 4), dtype=cp.complex64), 2)
    with pytest.raises(ValueError):
        kernels.top_k(cp.ones((3, 4), dtype=cp.float32), 5)
    with pytest.raises(TypeError):
        kernels.inverse_permutation(cp.zeros((2, 3), dtype=cp.int64))
    with pytest.raises(ValueError):
        kernels.permutation_scatter(cp.ones((2, 3), cp.float32), cp.zeros((2, 3), cp.int32), 2)


@pytest.mark.gpu
def test_module_cache_per_device(cupy_gpu):
    module = cupy_loader.get_module(sort_cupy.PACKAGE, sort_cupy.SOURCE,
                                    sort_cupy.CUDA_SOURCES[sort_cupy.SOURCE])
    assert module is cupy_loader.get_module(sort_cupy.PACKAGE, sort_cupy.SOURCE,
                                            sort_cupy.CUDA_SOURCES[sort_cupy.SOURCE])
    with pytest.raises(KeyError):
        cupy_loader.get_kernel(sort_cupy.PACKAGE, sort_cupy.SOURCE, "sg_sort_small<float>")
