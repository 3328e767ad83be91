"""The GPU branch of the JAX binding beyond what the `route` fixture's value tests show: scratch
sizing and carving, the backend choice, dtypes that take the host path. Run on the emulated
device platforms (tests/_emulation/jax_device.py) with JAX on the CPU."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lowering import CPU_CALLBACK_TARGETS, callback_targets

import sortgrad
from sortgrad.bindings.jax import _call, _device
from sortgrad.kernels._cuda import workspace
from sortgrad.testing import assert_same_bits, make_keys


@pytest.fixture
def emulated_cupy(cuda_emulator):
    from _emulation import jax_device
    platform = jax_device.EmulatedCupy(cuda_emulator)
    with _call.emulate_device(platform):
        yield platform


@pytest.fixture
def warnings_seen(monkeypatch):
    seen = []
    monkeypatch.setattr(_device, "warn_once", lambda key, message: seen.append(message))
    return seen


def _soft_rank_loss(x):
    return jnp.sum(sortgrad.soft_rank(x, regularization_strength=0.5) ** 2)


def test_workspace_carves_aligned_blocks_and_counts_overflow():
    buffer = np.zeros(3 * workspace.ALIGNMENT, np.uint8)
    with workspace.use(buffer) as used:
        a = workspace.allocate((3, 5), np.float64, lambda s, d: pytest.fail("fits"))
        b = workspace.allocate((2,), np.int32, lambda s, d: pytest.fail("fits"))
        c = workspace.allocate((40,), np.float64, lambda s, d: np.empty(s, d))
    assert a.base is not None and np.shares_memory(a, buffer) and a.shape == (3, 5)
    assert b.ctypes.data - buffer.ctypes.data == workspace.ALIGNMENT  # the next aligned block
    assert not np.shares_memory(c, buffer) and used.overflow_bytes == 320
    with workspace.measuring() as measured:
        workspace.allocate((3, 5), np.float64, lambda s, d: np.empty(s, d))
        workspace.allocate((0,), np.int32, lambda s, d: np.empty(s, d))
        workspace.allocate((257,), np.uint8, lambda s, d: np.empty(s, d))
    assert measured.bytes == workspace.ALIGNMENT + 0 + 2 * workspace.ALIGNMENT
    assert workspace.active() is None
    with pytest.raises(ValueError, match="1-D uint8"):
        workspace.use(np.zeros((2, 2), np.uint8))


def test_scratch_is_an_xla_output_carved_without_overflow(emulated_cupy, warnings_seen):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 300)))
    before = _call._scratch_bytes.cache_info().misses
    g = jax.jit(jax.grad(_soft_rank_loss))(x)
    assert _call._scratch_bytes.cache_info().misses > before
    # the soft passes need scratch: it is requested as one extra uint8 output of the callback
    text = jax.jit(jax.grad(_soft_rank_loss)).lower(x).as_text()
    assert re.search(r"tensor<\d+xui8>", text), "no scratch output"
    batched = jax.vmap(jax.grad(_soft_rank_loss))(jnp.stack([x, -x, 2 * x]))
    assert not warnings_seen, warnings_seen
    with _call.emulate_device(None):
        expected = jax.grad(_soft_rank_loss)(x)
    np.testing.assert_allclose(g, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(batched[0], expected, rtol=1e-12, atol=1e-12)


def test_scratch_overflow_is_served_and_warned(emulated_cupy, warnings_seen, monkeypatch):
    """A pass whose scratch output is too small still computes the right values (the rest comes
    from the backend's allocator) and says so once."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 50)))
    monkeypatch.setattr(_call, "_scratch_bytes", lambda *args: workspace.ALIGNMENT)
    got = jax.jit(lambda v: sortgrad.soft_sort(v, regularization_strength=0.3))(x)
    with _call.emulate_device(None):
        expected = sortgrad.soft_sort(x, regularization_strength=0.3)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert warnings_seen and "scratch" in warnings_seen[0]


def test_passes_get_the_platform_stream(emulated_cupy):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9)))
    jax.jit(lambda v: (sortgrad.sort(v), sortgrad.top_k(v, 3)))(x)
    assert len(emulated_cupy.streams) == 2  # one per pass, made from the callback's context


def test_bfloat16_keys_on_the_device(emulated_cupy):
    """The device kernels have no bfloat16 arrays: sort/argsort/top_k order the float32 upcast
    in the GPU branch and gather the values, bit-identical to JAX (and the gradients too)."""
    rng = np.random.default_rng(3)
    x_np = make_keys(rng, (3, 37), jnp.bfloat16, "special", subnormals=False, tiny=False,
                     payloads=False)
    x = jnp.asarray(x_np)
    assert callback_targets(lambda v: sortgrad.sort(v), x) == {CPU_CALLBACK_TARGETS["buffer"]}
    for descending in (False, True):
        assert_same_bits(sortgrad.sort(x, descending=descending),
                         jnp.sort(x, descending=descending))
        np.testing.assert_array_equal(
            sortgrad.argsort(x, descending=descending),
            jnp.argsort(x, stable=True, descending=descending))
    for k in (0, 1, 5, 37):
        values, indices = sortgrad.top_k(x, k)
        ref_values, ref_indices = jax.lax.top_k(x, k)
        assert_same_bits(values, ref_values)
        np.testing.assert_array_equal(indices, ref_indices)
    w = jnp.asarray(rng.standard_normal((3, 5)), jnp.bfloat16)
    finite = jnp.where(jnp.isfinite(x), x, 0)
    for ours, ref in [(lambda v: jnp.sum(sortgrad.sort(v, descending=True)[:, :5] * w),
                       lambda v: jnp.sum(jnp.sort(v, descending=True)[:, :5] * w)),
                      (lambda v: jnp.sum(sortgrad.top_k(v, 5)[0] * w),
                       lambda v: jnp.sum(jax.lax.top_k(v, 5)[0] * w))]:
        assert_same_bits(jax.grad(ours)(finite), jax.grad(ref)(finite))


class _Missing:
    backend = "cupy"

    def unavailable(self):
        return "CuPy is not installed"


def test_backend_choice(monkeypatch, warnings_seen):
    monkeypatch.setattr(_device, "_jax_has_gpu", lambda: True)
    monkeypatch.setattr(_device, "PLATFORMS", {"cupy": _Missing(), "numba": _Missing()})
    assert sortgrad.get_gpu_backend() is None
    assert _device.gpu_platform() is None  # the default: host path, with a warning
    assert len(warnings_seen) == 1 and "sortgrad[cuda13]" in warnings_seen[0]
    for name in ("cupy", "numba"):
        with sortgrad.gpu_backend(name), pytest.raises(ImportError, match=name):
            _device.gpu_platform()
    assert sortgrad.get_gpu_backend() is None
    with pytest.raises(ValueError, match="gpu backend"):
        sortgrad.set_gpu_backend("opencl")
    monkeypatch.setattr(_device, "_jax_has_gpu", lambda: False)
    with sortgrad.gpu_backend("cupy"):
        assert _device.gpu_platform() is None  # no GPU: the GPU branch is never lowered


def test_backend_choice_is_part_of_the_compiled_program_key(monkeypatch):
    seen = []
    monkeypatch.setattr(_call, "_staged", lambda impl, x, route, static: seen.append(route))
    x = jnp.ones(3)
    sortgrad.sort(x)
    with sortgrad.gpu_backend("numba"):
        sortgrad.sort(x)
    assert seen[0] != seen[1] and seen[1][1] == "numba"


class _FakeDeviceBuffer:
    def __init__(self, shape, strides, dtype=np.float32):
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.__cuda_array_interface__ = {"data": (1234, False), "strides": strides,
                                         "shape": shape, "typestr": self.dtype.str, "version": 3}


def test_gpu_buffers_must_be_row_major():
    assert _device._cuda_ptr(_FakeDeviceBuffer((2, 3), None)) == 1234
    assert _device._cuda_ptr(_FakeDeviceBuffer((2, 3), (12, 4))) == 1234
    assert _device._cuda_ptr(_FakeDeviceBuffer((2, 1, 3), (12, 99, 4))) == 1234  # size-1 dim
    with pytest.raises(ValueError, match="row-major"):
        _device._cuda_ptr(_FakeDeviceBuffer((2, 3), (4, 8)))


def test_modes_belong_to_the_thread_that_traces():
    """One thread's callback mode / GPU backend never leaks into what another thread traces
    (they were process-wide: issue 16)."""
    import threading
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def other():
        with sortgrad.callback_mode("pure"), sortgrad.gpu_backend("numba"):
            inside.set()
            done.wait(30)
            seen["other"] = (sortgrad.get_callback_mode(), sortgrad.get_gpu_backend())

    thread = threading.Thread(target=other)
    thread.start()
    assert inside.wait(30)
    x = jnp.arange(6.0)
    try:
        assert sortgrad.get_callback_mode() == "buffer" and sortgrad.get_gpu_backend() is None
        targets = callback_targets(lambda v: sortgrad.sort(v), x)
        assert targets == {CPU_CALLBACK_TARGETS["buffer"]}, targets
    finally:
        done.set()
        thread.join(30)
    assert seen["other"] == ("pure", "numba")
    assert sortgrad.get_callback_mode() == "buffer" and sortgrad.get_gpu_backend() is None
