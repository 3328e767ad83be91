"""Shared support of the Numba CUDA kernels (`<op>/_numba_cuda.py`).

Stable API (the backend modules of every op import these names; do not rename):

Arrays and streams
- `SIMULATOR`: True when Numba runs its CUDA simulator (`NUMBA_ENABLE_CUDASIM=1`). This module
  patches nothing: the tests make the simulator's static `cuda.shared.array` thread-safe
  themselves (tests/_emulation/numba_simulator.py, called from tests/conftest.py).
- `as_device(x) -> (array, kind)`: a Numba device array for a Numba device array (kind
  "numba"), a CuPy array (kind "cupy") or any `__cuda_array_interface__` object (kind "cuda").
  Zero-copy and without synchronisation (the interface's stream is not waited on).
- `like_input(result, kind)`: a result (Numba device array) as the input's kind: CuPy arrays
  for "cupy" (zero-copy), Numba device arrays otherwise.
- `out_views(out)`: Numba views of the result arrays given in a row function's `out=` tuple
  (any device array kind, zero-copy): the kernels write them, the given objects are returned.
- `resolve_stream(stream, x=None)`: the Numba stream to launch on. None -> CuPy's current stream
  when `x` is a CuPy array, else Numba's default stream; also takes Numba streams, CuPy streams
  (`.ptr`), objects with `__cuda_stream__` and raw integer handles. The simulator returns 0.
- `empty(shape, dtype, kind="numba", stream=None)`, `zeros(shape, dtype, stream, kind="numba")`:
  new device arrays, the only way the Numba modules allocate: the thread's workspace memory
  when one is active (`workspace.py`), else CuPy's pool on `stream` for kind "cupy" (returned
  as Numba views; `like_input` turns them back) or Numba's allocator.
- `to_device(host_array, stream)`: a small host table uploaded on `stream`;
  `placeholder(dtype)`: a cached 1-element device array for unused kernel arguments.
- `flat(a)`: a C-contiguous device array as 1-D.
- `bits_view(a)`: `a` viewed as the unsigned integer dtype of its width (values move as bits).
- `device_limits()`: `DeviceLimits(max_threads_per_block, multiprocessor_count,
  max_shared_memory_per_block, warp_size)` of the current device (fixed values in the
  simulator); launch configurations are computed from these.
- `grid_for(n, threads, limits=None)`: blocks for a grid-stride loop over n items.

Keys (the two orders of `sortgrad.kernels._keys`, as device functions)
- `key_function(dtype, order, descending=False)`: device function `key(bits) -> uint64` of the
  raw bits of one element; order "sort" (jnp.sort: -0.0 == +0.0, subnormals equal to zero
  except float16's, every NaN one key above +inf) or "total" (IEEE totalOrder on the bits).
  Descending keys are complemented, so ascending (key, index) order is the stable descending
  order. Keys fit in the width of the dtype.
- `key_storage_dtype(dtype)`: uint32 for widths <= 32 bits, else uint64 (shared-memory key
  arrays); `KEY_SENTINEL[storage]` is its all-ones value (>= every key: pads sort networks).

Warp / block collectives (`shared_or_shuffle` picks the implementation per target)
Every helper has a warp-shuffle version (real GPU) and a shared-memory twin (the simulator has
no shuffles). Contract common to both, so a kernel written once runs on both targets:
- call them from block-uniform control flow, with every thread of the block (the twins use
  `cuda.syncthreads()`); blockDim.x must be a multiple of 32 and at most 1024;
- `tid` is `cuda.threadIdx.x`; `scratch` is a shared array of at least blockDim.x elements of
  the value's dtype, used only by these helpers (the shuffle versions ignore it);
- values: int32, int64, float32 or float64 (the types warp shuffles move; cast unsigned keys to
  int64 and back -- same-width integer casts keep the bits). NaN is neither max nor min.
- (Numba's CUDA target fails to type the builtins max/min on integers in device functions:
  compare explicitly.)
- `warp_sum`, `warp_max`, `warp_min(value, tid, scratch)`: the warp's reduction, in every lane.
- `warp_inclusive_sum(value, tid, scratch)`: inclusive prefix sum over the lanes.
- `warp_broadcast(value, src_lane, tid, scratch)`: lane src_lane's value, in every lane.
- `block_exclusive_sum(value, tid, nthreads, scratch, warp_totals) -> (exclusive, total)`:
  block-wide exclusive prefix sum in thread order and the block total; `warp_totals` is a
  shared array of 32 elements of the value's dtype.

Sorting network
- `bitonic_sort_slots(keys, idx, tile, slot, tid, nthreads)`: block-wide bitonic sort of
  shared arrays by (key, idx), every aligned `slot` independently (see its docstring).

Compilation check without a GPU
- `compile_ptx_cases(cases, cc)`: compiles (dispatcher, signature) pairs to PTX for a compute
  capability with NVVM (no driver needed), to type-check kernels for the real target.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import numba
import numpy as np
from numba import cuda

from .._backends import array_kind
from . import workspace

SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
WARP_SIZE = 32
FULL_MASK = 0xFFFFFFFF

_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


# --- arrays and streams ------------------------------------------------------------------------

def as_device(x):
    """(Numba device array, kind) for a device array; TypeError for host arrays.

    CuPy and other `__cuda_array_interface__` objects are wrapped zero-copy with `sync=False`:
    their exported stream is not synchronised (the caller launches on the right stream).
    """
    kind = array_kind(x)
    if kind == "numba":
        return x, kind
    if kind == "host":
        raise TypeError(f"expected a device array, got {type(x).__name__}")
    if SIMULATOR:
        raise TypeError("the CUDA simulator takes only Numba (simulated) device arrays")
    return cuda.from_cuda_array_interface(x.__cuda_array_interface__, owner=x, sync=False), kind


def like_input(result, kind: str):
    """`result` (a Numba device array) as an array of the input's kind: CuPy for "cupy"."""
    if kind == "cupy":
        import cupy
        return cupy.asarray(result)  # zero-copy; the view keeps `result` (and its owner) alive
    return result


def out_views(out):
    """Numba device views (zero-copy) of the result arrays a caller gave in `out` (a tuple):
    what the kernels write; the row function returns the given objects themselves."""
    return tuple(as_device(o)[0] for o in out)


def _cupy_current_stream_ptr() -> int:
    import cupy
    return int(cupy.cuda.get_current_stream().ptr)


def resolve_stream(stream=None, x=None):
    """The Numba stream to launch on (see the module docstring). Never synchronises."""
    if SIMULATOR:
        return 0 if stream is None else stream
    if stream is None:
        if x is not None and array_kind(x) == "cupy":
            ptr = _cupy_current_stream_ptr()
            return cuda.external_stream(ptr) if ptr else cuda.default_stream()
        return cuda.default_stream()
    from numba.cuda.cudadrv.driver import Stream
    if isinstance(stream, Stream):
        return stream
    if hasattr(stream, "__cuda_stream__"):
        ptr = int(stream.__cuda_stream__()[1])
    elif hasattr(stream, "ptr"):  # CuPy streams
        ptr = int(stream.ptr)
    elif isinstance(stream, (int, np.integer)):
        ptr = int(stream)
    else:
        raise TypeError(f"stream must be None, a Numba or CuPy stream or a stream handle, got "
                        f"{type(stream).__name__}")
    return cuda.external_stream(ptr) if ptr else cuda.default_stream()


def stream_handle(stream) -> int:
    """The raw `cudaStream_t` of a Numba stream (0: the default stream)."""
    handle = getattr(stream, "handle", 0) or 0
    return int(getattr(handle, "value", handle) or 0)


def _new_array(shape, dtype, kind: str, stream):
    if kind == "cupy" and not SIMULATOR:
        import cupy
        # CuPy's pool hands memory out per stream: allocate on the stream the kernels use
        with cupy.cuda.ExternalStream(stream_handle(stream)):
            a = cupy.empty(shape, dtype=dtype)
        return cuda.from_cuda_array_interface(a.__cuda_array_interface__, owner=a, sync=False)
    # No stream binding: a bound stream would be exported through __cuda_array_interface__ and
    # make consumers (CuPy) synchronise on it.
    return cuda.device_array(shape, dtype=dtype)


def empty(shape, dtype, kind: str = "numba", stream=None):
    """An uninitialised device array: from the thread's workspace when one is active
    (`workspace.use`), else new memory (a Numba view of CuPy pool memory allocated on `stream`
    for kind "cupy"; Numba's allocator otherwise). The one way the Numba modules allocate."""
    return workspace.allocate(shape, dtype, lambda s, d: _new_array(s, d, kind, stream))


def zeros(shape, dtype, stream, kind: str = "numba"):
    a = empty(shape, dtype, kind, stream)
    fill(a, 0, stream)
    return a


def to_device(host_array, stream):
    """A host array copied to a new device array, queued on `stream` (small tables)."""
    return cuda.to_device(np.ascontiguousarray(host_array), stream=stream)


def current_device_id() -> int:
    return 0 if SIMULATOR else int(cuda.get_current_device().id)


_PLACEHOLDERS: dict = {}


def placeholder(dtype):
    """A 1-element device array of `dtype` (per device) for kernel arguments a launch does not
    use."""
    key = (current_device_id(), np.dtype(dtype))
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = cuda.device_array(1, dtype=np.dtype(dtype))
    return _PLACEHOLDERS[key]


def uint_dtype(dtype) -> np.dtype:
    return np.dtype(_UINT_OF_SIZE[np.dtype(dtype).itemsize])


def bits_view(a):
    """`a` as the unsigned integers of its width (bool -> uint8), same shape, zero-copy."""
    target = uint_dtype(a.dtype)
    if np.dtype(a.dtype) == target:
        return a
    return a.view(target)


def flat(a):
    """A C-contiguous device array as 1-D (zero-copy)."""
    return a.reshape(math.prod(tuple(a.shape)))


class DeviceLimits(NamedTuple):
    max_threads_per_block: int
    multiprocessor_count: int
    max_shared_memory_per_block: int
    warp_size: int


_SIMULATED_LIMITS = DeviceLimits(1024, 1, 48 * 1024, WARP_SIZE)


def device_limits() -> DeviceLimits:
    if SIMULATOR:
        return _SIMULATED_LIMITS
    return _limits_of(cuda.get_current_device().id)


@functools.lru_cache(maxsize=None)
def _limits_of(device_id: int) -> DeviceLimits:
    dev = cuda.get_current_device()
    return DeviceLimits(int(dev.MAX_THREADS_PER_BLOCK), int(dev.MULTIPROCESSOR_COUNT),
                        int(dev.MAX_SHARED_MEMORY_PER_BLOCK), int(dev.WARP_SIZE))


def grid_for(n: int, threads: int, limits: DeviceLimits | None = None) -> int:
    """Blocks for a grid-stride loop over n items: enough to fill the device (32 blocks per
    SM), no more than the items need, at least 1."""
    limits = limits or device_limits()
    return max(1, min(-(-n // threads), 32 * limits.multiprocessor_count, 2**31 - 1))


@cuda.jit
def _fill_kernel(out, value):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < out.shape[0]:
        out[i] = value
        i += stride


def fill(a, value, stream) -> None:
    """a[...] = value on `stream` (value cast to a's dtype; 0 for zeros of any dtype)."""
    size = math.prod(tuple(a.shape))
    if size == 0:
        return
    target = flat(a)
    if value == 0:
        target = bits_view(target)
    threads = 256 if not SIMULATOR else 32
    _fill_kernel[grid_for(size, threads), threads, stream](target, value)


# --- keys ---------------------------------------------------------------------------------------

_EXPONENT_MASK = {"float16": 0x7C00, "float32": 0x7F800000, "float64": 0x7FF0000000000000}
# Smallest normal number (sort order flushes subnormals to zero); float16 keeps its subnormals.
_SMALLEST_NORMAL = {"float16": 0, "float32": 0x00800000, "float64": 0x0010000000000000}

ORDERS = ("sort", "total")


def key_storage_dtype(dtype) -> np.dtype:
    return np.dtype(np.uint32) if np.dtype(dtype).itemsize <= 4 else np.dtype(np.uint64)


KEY_SENTINEL = {np.dtype(np.uint32): np.uint32(0xFFFFFFFF),
                np.dtype(np.uint64): np.uint64(0xFFFFFFFFFFFFFFFF)}


@functools.lru_cache(maxsize=None)
def key_function(dtype, order: str, descending: bool = False):
    """Device function key(bits) -> uint64 (see the module docstring)."""
    dtype = np.dtype(dtype)
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    width = dtype.itemsize * 8
    all_ones = np.uint64((1 << width) - 1)
    sign = np.uint64(1 << (width - 1))
    magnitude_mask = np.uint64(((1 << width) - 1) ^ (1 << (width - 1)))
    flip = all_ones if descending else np.uint64(0)
    zero = np.uint64(0)

    if dtype.name in _EXPONENT_MASK and order == "sort":
        exponent = np.uint64(_EXPONENT_MASK[dtype.name])
        smallest_normal = np.uint64(_SMALLEST_NORMAL[dtype.name])

        @cuda.jit(device=True, inline=True)
        def key(bits):
            b = np.uint64(bits)
            magnitude = b & magnitude_mask
            if magnitude > exponent:
                k = all_ones                       # every NaN: one key above +inf
            elif magnitude < smallest_normal or magnitude == zero:
                k = sign                           # -0.0, +0.0, subnormals: the key of +0.0
            elif (b & sign) != zero:
                k = b ^ all_ones                   # negative: complement reverses magnitudes
            else:
                k = b | sign
            return k ^ flip
    elif dtype.name in _EXPONENT_MASK:

        @cuda.jit(device=True, inline=True)
        def key(bits):
            b = np.uint64(bits)
            if (b & sign) != zero:
                k = b ^ all_ones
            else:
                k = b | sign
            return k ^ flip
    elif dtype.kind == "i":

        @cuda.jit(device=True, inline=True)
        def key(bits):
            return (np.uint64(bits) ^ sign) ^ flip
    elif dtype.kind in "ub":

        @cuda.jit(device=True, inline=True)
        def key(bits):
            return np.uint64(bits) ^ flip
    else:
        raise TypeError(f"no key order for dtype {dtype}")
    return key


# --- warp and block collectives -----------------------------------------------------------------

def shared_or_shuffle(shuffle_version, shared_version):
    """The implementation for the current target: the shared-memory twin in the simulator."""
    return shared_version if SIMULATOR else shuffle_version


if SIMULATOR:
    class _KernelContextCuda:
        """`cuda` inside simulated device functions of this module: the simulator swaps the
        module global `cuda` per call, which races between its threads when the kernel lives in
        another module; this proxy reads the running kernel's context instead."""

        def __getattr__(self, name):
            from numba.cuda.simulator.kernel import _get_kernel_context
            return getattr(_get_kernel_context(), name)

    cu = _KernelContextCuda()
else:
    cu = cuda


# Shuffle versions (real GPU). All 32 lanes must be active (full mask).

@cuda.jit(device=True, inline=True)
def _warp_sum_shfl(value, tid, scratch):
    offset = 16
    while offset > 0:
        value += cu.shfl_xor_sync(FULL_MASK, value, offset)
        offset //= 2
    return value


@cuda.jit(device=True, inline=True)
def _warp_max_shfl(value, tid, scratch):
    offset = 16
    while offset > 0:
        other = cu.shfl_xor_sync(FULL_MASK, value, offset)
        if other > value:
            value = other
        offset //= 2
    return value


@cuda.jit(device=True, inline=True)
def _warp_min_shfl(value, tid, scratch):
    offset = 16
    while offset > 0:
        other = cu.shfl_xor_sync(FULL_MASK, value, offset)
        if other < value:
            value = other
        offset //= 2
    return value


@cuda.jit(device=True, inline=True)
def _warp_inclusive_sum_shfl(value, tid, scratch):
    lane = tid % WARP_SIZE
    offset = 1
    while offset < WARP_SIZE:
        other = cu.shfl_up_sync(FULL_MASK, value, offset)
        if lane >= offset:
            value += other
        offset *= 2
    return value


@cuda.jit(device=True, inline=True)
def _warp_broadcast_shfl(value, src_lane, tid, scratch):
    return cu.shfl_sync(FULL_MASK, value, src_lane)


# Shared-memory twins (simulator). Every thread of the block takes part: the leading barrier
# protects the previous call's readers of `scratch`, the second publishes the writes.

@cuda.jit(device=True)
def _warp_sum_shared(value, tid, scratch):
    cu.syncthreads()
    scratch[tid] = value
    cu.syncthreads()
    base = tid - tid % WARP_SIZE
    acc = scratch[base]
    for i in range(1, WARP_SIZE):
        acc += scratch[base + i]
    return acc


@cuda.jit(device=True)
def _warp_max_shared(value, tid, scratch):
    cu.syncthreads()
    scratch[tid] = value
    cu.syncthreads()
    base = tid - tid % WARP_SIZE
    acc = scratch[base]
    for i in range(1, WARP_SIZE):
        if scratch[base + i] > acc:
            acc = scratch[base + i]
    return acc


@cuda.jit(device=True)
def _warp_min_shared(value, tid, scratch):
    cu.syncthreads()
    scratch[tid] = value
    cu.syncthreads()
    base = tid - tid % WARP_SIZE
    acc = scratch[base]
    for i in range(1, WARP_SIZE):
        if scratch[base + i] < acc:
            acc = scratch[base + i]
    return acc


@cuda.jit(device=True)
def _warp_inclusive_sum_shared(value, tid, scratch):
    cu.syncthreads()
    scratch[tid] = value
    cu.syncthreads()
    base = tid - tid % WARP_SIZE
    acc = scratch[base]
    for i in range(base + 1, tid + 1):
        acc += scratch[i]
    return acc


@cuda.jit(device=True)
def _warp_broadcast_shared(value, src_lane, tid, scratch):
    cu.syncthreads()
    scratch[tid] = value
    cu.syncthreads()
    return scratch[tid - tid % WARP_SIZE + src_lane]


warp_sum = shared_or_shuffle(_warp_sum_shfl, _warp_sum_shared)
warp_max = shared_or_shuffle(_warp_max_shfl, _warp_max_shared)
warp_min = shared_or_shuffle(_warp_min_shfl, _warp_min_shared)
warp_inclusive_sum = shared_or_shuffle(_warp_inclusive_sum_shfl, _warp_inclusive_sum_shared)
warp_broadcast = shared_or_shuffle(_warp_broadcast_shfl, _warp_broadcast_shared)


@cuda.jit(device=True)
def _block_exclusive_sum_shfl(value, tid, nthreads, scratch, warp_totals):
    lane = tid % WARP_SIZE
    warp = tid // WARP_SIZE
    num_warps = (nthreads + WARP_SIZE - 1) // WARP_SIZE
    if tid < WARP_SIZE:
        warp_totals[tid] = 0
    inclusive = warp_inclusive_sum(value, tid, scratch)
    cu.syncthreads()
    if lane == WARP_SIZE - 1:
        warp_totals[warp] = inclusive
    cu.syncthreads()
    # Every warp scans the (at most 32) warp totals itself: a block-uniform call.
    own_total = warp_totals[lane]
    totals_inclusive = warp_inclusive_sum(own_total, tid, scratch)
    warp_offset = warp_broadcast(totals_inclusive - own_total, warp, tid, scratch)
    total = warp_broadcast(totals_inclusive, num_warps - 1, tid, scratch)
    cu.syncthreads()
    return warp_offset + inclusive - value, total


@cuda.jit(device=True)
def _block_exclusive_sum_shared(value, tid, nthreads, scratch, warp_totals):
    # Simulator twin: every thread sums the published values itself (blocks are small there);
    # three barriers instead of the nine of the warp-structured version.
    cu.syncthreads()
    scratch[tid] = value
    cu.syncthreads()
    before = value - value
    for i in range(tid):
        before += scratch[i]
    total = before
    for i in range(tid, nthreads):
        total += scratch[i]
    cu.syncthreads()
    return before, total


block_exclusive_sum = shared_or_shuffle(_block_exclusive_sum_shfl, _block_exclusive_sum_shared)
"""(exclusive prefix sum of `value` in thread order, block total); see the module docstring.
Ends with a barrier, so the caller may reuse `warp_totals` / `scratch` right away."""


# --- shared-memory sorting network -------------------------------------------------------------

@cuda.jit(device=True)
def bitonic_sort_slots(keys, idx, tile, slot, tid, nthreads):
    """Sorts every aligned block of `slot` elements of the shared arrays keys[:tile],
    idx[:tile] ascending by (key, idx) (tile and slot powers of two, slot <= tile).

    Block-uniform: every thread calls it after a barrier that published the arrays; it ends
    with a barrier. Each size starts with a flip step (i against its mirror in the size block),
    so every slot comes out ascending (no alternating directions) and slots stay independent.
    """
    half = tile // 2
    size = 2
    while size <= slot:
        distance = size // 2
        flip = True
        while distance > 0:
            for q in range(tid, half, nthreads):
                i = 2 * q - (q & (distance - 1))
                if flip:
                    j = i ^ (size - 1)
                else:
                    j = i + distance
                ki = keys[i]
                kj = keys[j]
                if kj < ki or (kj == ki and idx[j] < idx[i]):
                    keys[i] = kj
                    keys[j] = ki
                    t = idx[i]
                    idx[i] = idx[j]
                    idx[j] = t
            cu.syncthreads()
            flip = False
            distance //= 2
        size *= 2


# --- compilation check --------------------------------------------------------------------------

@contextlib.contextmanager
def _assumed_compute_capability(cc):
    """Numba asks the driver for the compute capability when it types a call to a device
    function; without a GPU, answer `cc` instead."""
    import types as _types

    from numba.cuda import dispatcher as _dispatcher
    original = _dispatcher.get_current_device
    _dispatcher.get_current_device = lambda: _types.SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        _dispatcher.get_current_device = original


def compile_ptx_cases(cases, cc=(8, 0)) -> dict:
    """PTX of each (dispatcher, signature) in `cases` for compute capability `cc`, compiled
    with NVVM (no GPU or driver needed). Not available in the simulator."""
    if SIMULATOR:
        raise RuntimeError("compile_ptx_cases needs the real CUDA target (NUMBA_ENABLE_CUDASIM=0)")
    out = {}
    with _assumed_compute_capability(cc):
        for dispatcher, signature in cases:
            ptx, _ = cuda.compile_ptx(dispatcher.py_func, signature, cc=cc)
            out[(dispatcher.py_func.__qualname__, str(signature))] = ptx
    return out
