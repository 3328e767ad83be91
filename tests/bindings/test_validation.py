"""Bad input: every public entry point raises a clear error before any kernel runs.

Kernel API: the error must come from the argument checks, not from inside a backend (the
traceback must not reach a backend module). JAX API: the error must come at trace time
(jax.eval_shape runs no kernel). Rows past the int32 index range are checked without
allocating them (a broadcast view at the kernel API, a ShapeDtypeStruct at the JAX API).
"""

from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sortgrad
from sortgrad.kernels import inverse_permutation, permutation_scatter, segmented_sort, top_k

HAVE_CUPY = importlib.util.find_spec("cupy") is not None
TOO_LONG = 2**31  # one past the int32 index range
BACKEND_MODULE = re.compile(r"_cpu\.py|_numba|_cupy|numba[/\\]")
K_NAMED = r"\bk\b"


def raises_before_kernel(exc, fn, *args, match=None, **kwargs):
    """fn(*args) raises `exc` (matching `match`) from the checks, not from a backend."""
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    frames = [str(entry.path) for entry in info.traceback]
    assert not any(BACKEND_MODULE.search(f) for f in frames), frames
    return info


def big_view(dtype=np.float32, shape=(TOO_LONG,)):
    return np.broadcast_to(np.zeros((), dtype), shape)


# --- backends --------------------------------------------------------------------------------

KERNEL_CALLS = {
    "segmented_sort": lambda backend: segmented_sort(np.arange(5.0), backend=backend),
    "segmented_sort_ragged": lambda backend: segmented_sort(np.arange(5.0), [0, 2, 5],
                                                            backend=backend),
    "top_k": lambda backend: top_k(np.arange(5.0), 2, backend=backend),
    "inverse_permutation": lambda backend: inverse_permutation(np.arange(5), backend=backend),
    "permutation_scatter": lambda backend: permutation_scatter(np.arange(3.0), np.arange(3), 4,
                                                               backend=backend),
}


@pytest.mark.parametrize("call", list(KERNEL_CALLS))
def test_backend_cpu_and_none_work(call):
    for backend in (None, "cpu"):
        out = KERNEL_CALLS[call](backend)
        assert out is not None


def _cupy_gpu_count() -> int:
    if not HAVE_CUPY:
        return 0
    import cupy
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


def _numba_cuda_available() -> bool:
    from numba import cuda
    return cuda.is_available()


@pytest.mark.skipif(HAVE_CUPY, reason="CuPy is installed here")
@pytest.mark.parametrize("call", list(KERNEL_CALLS))
def test_cupy_backend_without_cupy_names_the_extra(call):
    with pytest.raises(ImportError) as info:
        KERNEL_CALLS[call]("cupy")
    message = str(info.value)
    assert "sortgrad[cuda12]" in message and "cuda13" in message, message


@pytest.mark.skipif(not HAVE_CUPY or _cupy_gpu_count() > 0, reason="needs CuPy without a GPU")
@pytest.mark.parametrize("call", list(KERNEL_CALLS))
def test_cupy_backend_without_gpu_says_so(call):
    with pytest.raises(RuntimeError, match=r"GPU.*sortgrad\[cuda12\]"):
        KERNEL_CALLS[call]("cupy")


@pytest.mark.skipif(_numba_cuda_available(), reason="Numba CUDA (or its simulator) is on")
@pytest.mark.parametrize("call", list(KERNEL_CALLS))
def test_numba_backend_without_gpu_says_so(call):
    with pytest.raises(RuntimeError, match="GPU"):
        KERNEL_CALLS[call]("numba")


@pytest.mark.parametrize("backend", ["cupy", "numba"])
@pytest.mark.parametrize("call", list(KERNEL_CALLS))
def test_device_backend_rejects_host_arrays(call, backend):
    if backend == "cupy" and _cupy_gpu_count() == 0:
        pytest.skip("no CuPy GPU")
    if backend == "numba" and not _numba_cuda_available():
        pytest.skip("no Numba CUDA target")
    with pytest.raises(TypeError, match="host array"):
        KERNEL_CALLS[call](backend)


@pytest.mark.parametrize("backend", ["tpu", "CPU", "", "cuda", "numpy"])
@pytest.mark.parametrize("call", list(KERNEL_CALLS))
def test_unknown_backend(call, backend):
    with pytest.raises(ValueError, match="backend"):
        KERNEL_CALLS[call](backend)


# --- segmented_sort --------------------------------------------------------------------------

def test_segmented_sort_rejects_scalars_and_bad_dtypes():
    raises_before_kernel(ValueError, segmented_sort, np.float32(1.0))
    for bad in (np.array([1 + 2j, 3j]), np.array(["b", "a"]), np.array([object(), object()])):
        raises_before_kernel(TypeError, segmented_sort, bad)


@pytest.mark.parametrize("offsets,exc", [
    (np.array([0.0, 2.0, 5.0]), TypeError),            # not integer
    (np.array([True, False]), TypeError),              # bool is not an index type
    (np.array([[0, 2], [2, 5]]), ValueError),          # not 1-D
    (np.array(0), ValueError),                         # 0-d
    (np.array([], np.int64), ValueError),              # empty
    (np.array([1, 2, 5]), ValueError),                 # does not start at 0
    (np.array([0, 3, 2, 5]), ValueError),              # decreasing
    (np.array([0, 2, 6]), ValueError),                 # overruns (size 5)
    (np.array([0, 2, 2**40]), ValueError),             # overruns, wide
    (np.array([0, -1]), ValueError),                   # negative
    ([0, 3, 1], ValueError),                           # a list, decreasing
])
def test_bad_offsets(offsets, exc):
    raises_before_kernel(exc, segmented_sort, np.arange(5.0, dtype=np.float32), offsets,
                         match="offsets" if exc is ValueError else None)


def test_offsets_need_1d_keys():
    raises_before_kernel(ValueError, segmented_sort, np.zeros((2, 3), np.float32), [0, 3])


def test_segmented_sort_rows_too_long():
    raises_before_kernel(ValueError, segmented_sort, big_view())
    raises_before_kernel(ValueError, segmented_sort, big_view(np.int8, (1, TOO_LONG)))
    raises_before_kernel(ValueError, segmented_sort, big_view(), descending=True)


def test_segmented_sort_segment_too_long():
    raises_before_kernel(ValueError, segmented_sort, big_view(np.int8),
                         np.array([0, TOO_LONG], np.int64))


# --- top_k -----------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [-1, 6, 100, -(2**40), 2**40])
def test_top_k_out_of_range(k):
    raises_before_kernel(ValueError, top_k, np.arange(5.0), k, match=K_NAMED)
    raises_before_kernel(ValueError, top_k, np.zeros((2, 3, 5), np.int32), k, match=K_NAMED)


@pytest.mark.parametrize("k", [1.5, 2.0, "2", None, np.float32(2), [2], np.array([2])])
def test_top_k_non_integer(k):
    raises_before_kernel(TypeError, top_k, np.arange(5.0), k)


def test_top_k_empty_row_k():
    raises_before_kernel(ValueError, top_k, np.zeros(0, np.float32), 1, match=K_NAMED)
    values, indices = top_k(np.zeros(0, np.float32), 0)
    assert values.shape == (0,) and indices.shape == (0,)


def test_top_k_bad_x():
    raises_before_kernel(ValueError, top_k, np.float32(1.0), 0)
    raises_before_kernel(TypeError, top_k, np.array([1j, 2j]), 1)


def test_top_k_rows_too_long():
    raises_before_kernel(ValueError, top_k, big_view(), 1)
    raises_before_kernel(ValueError, top_k, big_view(np.uint8, (2, TOO_LONG)), 0)


# --- permutations ----------------------------------------------------------------------------

@pytest.mark.parametrize("perm", [[0, 1, 3], [0, -1, 2], [3, 0, 1], [[0, 1, 2], [0, 1, 5]],
                                  [2**40, 0, 1]])
def test_inverse_permutation_out_of_range(perm):
    raises_before_kernel(ValueError, inverse_permutation, np.array(perm))


def test_inverse_permutation_bad_input():
    raises_before_kernel(TypeError, inverse_permutation, np.array([0.0, 1.0]))
    raises_before_kernel(TypeError, inverse_permutation, np.array([True, False]))
    raises_before_kernel(ValueError, inverse_permutation, np.int32(0))
    raises_before_kernel(ValueError, inverse_permutation, big_view(np.int32))


def test_scatter_shape_mismatch():
    values = np.zeros((2, 3), np.float32)
    for perm in (np.zeros((2, 4), np.int32), np.zeros((3,), np.int32),
                 np.zeros((1, 3), np.int32), np.zeros((3, 2), np.int32)):
        raises_before_kernel(ValueError, permutation_scatter, values, perm, 5)


@pytest.mark.parametrize("perm", [[0, 1, 5], [0, -1, 2], [7, 0, 1], [2**40, 0, 1]])
def test_scatter_out_of_range(perm):
    raises_before_kernel(ValueError, permutation_scatter, np.ones(3, np.float32), np.array(perm), 5)


def test_scatter_bad_n_and_perm():
    values, perm = np.ones(3, np.float32), np.array([0, 1, 2])
    raises_before_kernel(ValueError, permutation_scatter, values, perm, 2)   # n < m
    raises_before_kernel(ValueError, permutation_scatter, values, perm, -1)
    raises_before_kernel(TypeError, permutation_scatter, values, perm, 4.0)
    raises_before_kernel(TypeError, permutation_scatter, values, perm, "4")
    raises_before_kernel(TypeError, permutation_scatter, values, perm.astype(np.float32), 4)
    raises_before_kernel(ValueError, permutation_scatter, np.float32(1), np.int32(0), 1)


def test_scatter_rows_too_long():
    raises_before_kernel(ValueError, permutation_scatter, np.ones(3, np.float32),
                         np.array([0, 1, 2]), TOO_LONG)
    raises_before_kernel(ValueError, permutation_scatter, big_view(), big_view(np.int32),
                         TOO_LONG)


# --- JAX ops ---------------------------------------------------------------------------------

def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("k", [-1, 6, 1000])
def test_jax_top_k_out_of_range(k):
    x = jnp.arange(5.0)
    with pytest.raises(ValueError, match=K_NAMED):
        sortgrad.top_k(x, k)
    with pytest.raises(ValueError, match=K_NAMED):
        jax.eval_shape(lambda x: sortgrad.top_k(x, k), spec((3, 5)))
    with pytest.raises(ValueError, match=K_NAMED):
        jax.eval_shape(lambda x: sortgrad.top_k(x, k, axis=0), spec((5, 3)))
    with pytest.raises(ValueError, match=K_NAMED):
        jax.jit(lambda x: sortgrad.top_k(x, k)).lower(x)


def test_jax_top_k_k_checked_along_the_axis():
    # k = 4 fits the last axis (6) but not axis 0 (3)
    with pytest.raises(ValueError, match=K_NAMED):
        jax.eval_shape(lambda x: sortgrad.top_k(x, 4, axis=0), spec((3, 6)))
    out = jax.eval_shape(lambda x: sortgrad.top_k(x, 4), spec((3, 6)))
    assert out[0].shape == (3, 4) and out[1].shape == (3, 4) and out[1].dtype == jnp.int32


@pytest.mark.parametrize("k", [1.5, 2.0, "2", None, [2]])
def test_jax_top_k_non_integer(k):
    with pytest.raises(TypeError):
        sortgrad.top_k(jnp.arange(5.0), k)
    with pytest.raises(TypeError):
        jax.eval_shape(lambda x: sortgrad.top_k(x, k), spec((5,)))


def test_jax_top_k_traced_k():
    with pytest.raises(TypeError):
        jax.jit(lambda x, k: sortgrad.top_k(x, k))(jnp.arange(5.0), 2)


@pytest.mark.parametrize("op", ["sort", "argsort", "top_k"])
def test_jax_rows_too_long(op):
    fn = {"sort": lambda x: sortgrad.sort(x), "argsort": lambda x: sortgrad.argsort(x),
          "top_k": lambda x: sortgrad.top_k(x, 1)}[op]
    with pytest.raises(ValueError):
        jax.eval_shape(fn, spec((TOO_LONG,)))
    with pytest.raises(ValueError):
        jax.eval_shape(fn, spec((2, TOO_LONG), jnp.int8))
    axis_fn = {"sort": lambda x: sortgrad.sort(x, axis=0),
               "argsort": lambda x: sortgrad.argsort(x, axis=0, descending=True),
               "top_k": lambda x: sortgrad.top_k(x, 1, axis=0)}[op]
    with pytest.raises(ValueError):
        jax.eval_shape(axis_fn, spec((TOO_LONG, 2), jnp.bfloat16))


def test_jax_rows_too_long_only_along_the_axis():
    """A long *batch* axis is fine: only the sorted axis is limited."""
    out = jax.eval_shape(lambda x: sortgrad.sort(x, axis=-1), spec((TOO_LONG, 2)))
    assert out.shape == (TOO_LONG, 2)


@pytest.mark.parametrize("op", ["sort", "argsort", "top_k"])
def test_jax_bad_axis(op):
    fn = {"sort": sortgrad.sort, "argsort": sortgrad.argsort,
          "top_k": lambda x, axis: sortgrad.top_k(x, 1, axis=axis)}[op]
    x = jnp.zeros((2, 3))
    for axis in (2, -3, 10):
        with pytest.raises((ValueError, IndexError)):
            fn(x, axis=axis)
    for axis in (1.0, "0", True) + ((None,) if op == "top_k" else ()):
        with pytest.raises(TypeError):
            fn(x, axis=axis)


def test_jax_top_k_complex_is_a_type_error():
    """As lax.top_k (sort and argsort take complex keys, as jnp.sort)."""
    fn = lambda x: sortgrad.top_k(x, 1)  # noqa: E731
    with pytest.raises(TypeError):
        fn(jnp.array([1 + 1j, 2.0]))
    with pytest.raises(TypeError):
        jax.eval_shape(fn, spec((3,), jnp.complex64))


def test_jax_argsort_index_dtype():
    with pytest.raises(TypeError, match="dtype"):
        sortgrad.argsort(jnp.zeros(3), dtype=jnp.float32)
    assert sortgrad.argsort(jnp.zeros(3), dtype=jnp.int16).dtype == jnp.int16


def test_callback_mode_rejects_unknown():
    before = sortgrad.get_callback_mode()
    for bad in ("sequential", "Pure", "", None):
        with pytest.raises(ValueError):
            sortgrad.set_callback_mode(bad)
        with pytest.raises(ValueError):
            with sortgrad.callback_mode(bad):
                pass
    assert sortgrad.get_callback_mode() == before


def test_export_serialization_is_refused_as_documented():
    """README: programs with sortgrad ops are not serializable (host callbacks)."""
    from jax import export
    with pytest.raises(NotImplementedError, match="host_callbacks"):
        export.export(jax.jit(lambda v: sortgrad.sort(v)))(
            jax.ShapeDtypeStruct((4,), jnp.float32)).serialize()


@pytest.mark.parametrize("value", ["yes", None, 1, 0.0])
def test_descending_must_be_a_bool(value):
    x = jnp.arange(4.0)
    calls = [lambda d: sortgrad.sort(x, descending=d), lambda d: sortgrad.argsort(x, descending=d),
             lambda d: sortgrad.soft_rank(x, descending=d),
             lambda d: sortgrad.soft_sort(x, descending=d),
             lambda d: sortgrad.sort_multiple([x], descending=d),
             lambda d: sortgrad.kernels.soft_rank(np.arange(4.0), descending=d)]
    for call in calls:
        with pytest.raises(TypeError, match="descending must be a bool"):
            call(value)
    assert sortgrad.sort(x, descending=np.True_)[0] == 3.0
