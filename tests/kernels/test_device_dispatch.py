"""The device path of the kernel API: checks on metadata and the hand-off to a backend module.

A recording stand-in replaces the backend module, so these tests pin down the dispatch layer
alone (argument checks, 2-D row views, reshaping back, host offsets); the kernels themselves
are tested in the backend test files. Device arrays come from Numba (its CUDA simulator when
there is no GPU).
"""

import numpy as np
import pytest
from numba import cuda

from sortgrad import kernels
from sortgrad.kernels import _backends

pytestmark = pytest.mark.skipif(not cuda.is_available(),
                                reason="needs Numba CUDA or its simulator")


def _host_w(w):
    """The CPU kernel takes a shared w as one 1-D row; the device path passes it as (1, n)."""
    w = w.copy_to_host()
    return w[0] if w.shape[0] == 1 else w


class Recorder:
    """A backend module that records its calls and returns host-computed device results."""

    DTYPES = ("float32", "float64", "int32")

    def __init__(self):
        self.calls = []

    def _record(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))

    def sort_rows(self, keys, descending, *, out=None, stream=None):
        self._record("sort_rows", keys.shape, descending, stream=stream)
        values, perm = kernels.segmented_sort(keys.copy_to_host(), descending=descending)
        return cuda.to_device(values), cuda.to_device(perm)

    def sort_segments(self, keys, offsets, descending, *, out=None, stream=None):
        self._record("sort_segments", keys.shape, offsets, descending, stream=stream)
        values, perm = kernels.segmented_sort(keys.copy_to_host(), offsets,
                                              descending=descending)
        return cuda.to_device(values), cuda.to_device(perm)

    def top_k_rows(self, x, k, *, out=None, stream=None):
        self._record("top_k_rows", x.shape, k, stream=stream)
        values, idx = kernels.top_k(x.copy_to_host(), k)
        return cuda.to_device(values), cuda.to_device(idx)

    def inverse_rows(self, perm, *, out=None, stream=None):
        self._record("inverse_rows", perm.shape, stream=stream)
        return cuda.to_device(kernels.inverse_permutation(perm.copy_to_host()))

    def scatter_rows(self, values, perm, n, *, out=None, stream=None):
        self._record("scatter_rows", values.shape, perm.shape, n, stream=stream)
        out = kernels.permutation_scatter(values.copy_to_host(), perm.copy_to_host(), n)
        return cuda.to_device(out)

    def isotonic_rows(self, s, w, regularization, *, out=None, stream=None):
        self._record("isotonic_rows", s.shape, w.shape, regularization, stream=stream)
        sol, blocks = kernels.isotonic_regression(s.copy_to_host(), _host_w(w),
                                                  regularization=regularization)
        return cuda.to_device(sol), cuda.to_device(blocks)

    def isotonic_vjp_rows(self, g, s, w, blocks, regularization, *, out=None, stream=None):
        self._record("isotonic_vjp_rows", g.shape, s.shape, w.shape, blocks.shape,
                     regularization, stream=stream)
        gs, gw = kernels.isotonic_regression_vjp(g.copy_to_host(), s.copy_to_host(),
                                                 _host_w(w), blocks.copy_to_host(),
                                                 regularization=regularization)
        return cuda.to_device(gs), cuda.to_device(gw)


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    original = _backends.backend_module
    monkeypatch.setattr(_backends, "backend_module",
                        lambda op, backend: original(op, backend) if backend == "cpu" else rec)
    return rec


def test_sort_rows_are_2d_and_reshaped_back(recorder):
    x = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
    stream = object()
    values, perm = kernels.segmented_sort(cuda.to_device(x), descending=True, stream=stream)
    assert recorder.calls == [("sort_rows", ((6, 5), True), {"stream": stream})]
    want_values, want_perm = kernels.segmented_sort(x, descending=True)
    np.testing.assert_array_equal(values.copy_to_host(), want_values)
    np.testing.assert_array_equal(perm.copy_to_host(), want_perm)
    assert values.shape == x.shape


def test_device_arrays_choose_numba_without_a_backend(recorder):
    kernels.top_k(cuda.to_device(np.arange(6.0)), 2)
    assert recorder.calls[0][:2] == ("top_k_rows", ((1, 6), 2))


@pytest.mark.parametrize("offsets", [np.array([0, 2, 2, 5]), [0, 2, 2, 5],
                                     np.array([0, 2, 2, 5], np.uint8), "device"])
def test_segments_get_validated_host_offsets(recorder, offsets):
    if isinstance(offsets, str):
        offsets = cuda.to_device(np.array([0, 2, 2, 5], np.int32))
    x = np.array([3.0, 1.0, 5.0, 4.0, 4.0, 9.0])
    values, perm = kernels.segmented_sort(cuda.to_device(x), offsets, backend="numba")
    name, (shape, host_offsets, descending), _ = recorder.calls[0]
    assert name == "sort_segments" and shape == (6,) and descending is False
    assert isinstance(host_offsets, np.ndarray) and host_offsets.dtype == np.int64
    np.testing.assert_array_equal(host_offsets, [0, 2, 2, 5])
    np.testing.assert_array_equal(values.copy_to_host(), [1.0, 3.0, 4.0, 4.0, 5.0, 9.0])


@pytest.mark.parametrize("offsets", [[1, 2], [0, 3, 2], [0, 7], [[0, 1]], [0.0, 1.0]])
def test_bad_offsets_raise_before_the_backend(recorder, offsets):
    with pytest.raises((ValueError, TypeError), match="offsets"):
        kernels.segmented_sort(cuda.to_device(np.arange(6.0)), np.array(offsets))
    assert recorder.calls == []


def test_host_arrays_are_refused_by_device_backends(recorder):
    with pytest.raises(TypeError, match="keys is a host array"):
        kernels.segmented_sort(np.arange(4.0), backend="numba")
    with pytest.raises(TypeError, match="perm is a host array"):
        kernels.permutation_scatter(cuda.to_device(np.arange(3.0)), np.arange(3, dtype=np.int32),
                                    4, backend="numba")
    assert recorder.calls == []


def test_device_arrays_are_refused_by_the_cpu_backend():
    with pytest.raises(TypeError, match="backend='cpu'"):
        kernels.top_k(cuda.to_device(np.arange(4.0)), 1, backend="cpu")


def test_non_contiguous_and_wrong_dtypes_raise(recorder):
    x = cuda.to_device(np.zeros((6, 4)).T)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        kernels.top_k(x, 1)
    with pytest.raises(TypeError, match="x has dtype int16"):
        kernels.top_k(cuda.to_device(np.arange(4, dtype=np.int16)), 1)
    with pytest.raises(TypeError, match="perm must be int32"):
        kernels.inverse_permutation(cuda.to_device(np.arange(4, dtype=np.int64)))
    with pytest.raises(ValueError, match="k must satisfy"):
        kernels.top_k(cuda.to_device(np.arange(4.0)), 5)
    with pytest.raises(ValueError, match="at least one dimension"):
        kernels.top_k(cuda.to_device(np.zeros((), np.float32)), 0)
    assert recorder.calls == []


def test_scatter_and_inverse(recorder):
    perm = np.array([[2, 0, 1], [0, 2, 1]], np.int32)
    inv = kernels.inverse_permutation(cuda.to_device(perm))
    np.testing.assert_array_equal(inv.copy_to_host(), [[1, 2, 0], [0, 2, 1]])
    vals = np.array([[1.0, 2.0], [3.0, 4.0]])
    out = kernels.permutation_scatter(cuda.to_device(vals), cuda.to_device(np.ascontiguousarray(perm[:, :2])), 4)
    np.testing.assert_array_equal(out.copy_to_host(), [[2.0, 0, 1.0, 0], [3.0, 0, 4.0, 0]])
    assert recorder.calls[1][1] == ((2, 2), (2, 2), 4)
    with pytest.raises(ValueError, match="same shape"):
        kernels.permutation_scatter(cuda.to_device(vals), cuda.to_device(perm), 4)
    with pytest.raises(ValueError, match="smaller than the row length"):
        kernels.permutation_scatter(cuda.to_device(vals), cuda.to_device(np.ascontiguousarray(perm[:, :2])), 1)


def test_isotonic_shared_w_is_one_row(recorder):
    s = np.random.default_rng(1).standard_normal((2, 3, 4))
    w = np.arange(4.0)[::-1].copy()
    sol, blocks = kernels.isotonic_regression(cuda.to_device(s), cuda.to_device(w),
                                              regularization="kl")
    assert recorder.calls[0][1] == ((6, 4), (1, 4), "kl")
    want_sol, want_blocks = kernels.isotonic_regression(s, w, regularization="kl")
    np.testing.assert_allclose(sol.copy_to_host(), want_sol)
    np.testing.assert_array_equal(blocks.copy_to_host(), want_blocks)
    g = cuda.to_device(np.ones_like(s))
    gs, gw = kernels.isotonic_regression_vjp(g, cuda.to_device(s), cuda.to_device(w), blocks,
                                             regularization="kl")
    assert gs.shape == gw.shape == s.shape
    with pytest.raises(TypeError, match="w must have the dtype of s"):
        kernels.isotonic_regression(cuda.to_device(s), cuda.to_device(w.astype(np.float32)))
    with pytest.raises(ValueError, match="w must have the shape"):
        kernels.isotonic_regression(cuda.to_device(s), cuda.to_device(np.zeros(3)))
    with pytest.raises(ValueError, match="regularization"):
        kernels.isotonic_regression(cuda.to_device(s), cuda.to_device(w), regularization="l1")


def test_backend_module_names_a_missing_kernel():
    with pytest.raises(NotImplementedError, match="no nothing kernel"):
        _backends.backend_module("nothing", "numba")
