"""Kernel API: sortgrad.kernels.top_k, CPU backend.

References: sortgrad.testing.reference_top_k (pure Python, IEEE totalOrder, ties to the lower
index) and jax.lax.top_k. Values are compared bit for bit, indices exactly.

Both order NaNs of one sign by payload (IEEE totalOrder), except bfloat16's, which tie and come
back as the canonical NaN of their sign (XLA:CPU compares bfloat16 through float32).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sortgrad.kernels import top_k
from sortgrad.testing import (FLOAT_DTYPES, INT_DTYPES, SIZES, assert_same_bits, bits, dtype_id,
                              reference_top_k)
from sortgrad.testing import make_keys as _make_keys
from sortgrad.testing.oracles import xla_cpu_sorted_values

ALL_DTYPES = [*FLOAT_DTYPES, *INT_DTYPES]

# Keys (sortgrad.testing.make_keys): the "special" pool without 0.5 and without the smallest
# normal (signed zeros, NaNs of both signs, infinities, extremes, subnormals of both signs);
# NaN payloads only where asked for.
make_keys = functools.partial(_make_keys, half=False, tiny=False)


def reference_rows(x, k):
    """The Python oracle row by row (64-bit integers: exact only below 2**53 there, so those
    go to jax.lax.top_k)."""
    if x.dtype in (np.int64, np.uint64) or x.shape[-1] == 0:
        return lax_top_k(x, k)
    rows = x.reshape(-1, x.shape[-1])
    vals = np.empty((rows.shape[0], k), x.dtype)
    idx = np.empty((rows.shape[0], k), np.int64)
    for r, row in enumerate(rows):
        vals[r], idx[r] = reference_top_k(row, k)
    return vals.reshape(x.shape[:-1] + (k,)), idx.reshape(x.shape[:-1] + (k,))


def lax_top_k(x, k):
    if x.shape[-1] == 0 or k == 0:
        shape = x.shape[:-1] + (k,)
        return np.zeros(shape, x.dtype), np.zeros(shape, np.int32)
    v, i = jax.lax.top_k(jnp.asarray(x), k)
    return np.asarray(v), np.asarray(i)


def full_reference(x, reference):
    """The reference top-n of each row (the top-k is its first k entries: both references
    are deterministic, ties to the lower index)."""
    n = x.shape[-1]
    return reference_rows(x, n) if reference == "oracle" else lax_top_k(x, n)


def check_top_k(x, ks, reference="oracle"):
    x_copy = x.copy()
    ref_values, ref_indices = full_reference(x_copy, reference)
    for k in ks:
        values, indices = top_k(x, k)
        np.testing.assert_array_equal(bits(x), bits(x_copy))  # input untouched
        out_shape = x.shape[:-1] + (k,)
        assert values.shape == out_shape and indices.shape == out_shape
        assert values.dtype == x.dtype and indices.dtype == np.int32
        np.testing.assert_array_equal(indices, ref_indices[..., :k], err_msg=f"k = {k}")
        assert_same_bits(values, ref_values[..., :k])
        assert_same_bits(values, xla_cpu_sorted_values(
            np.take_along_axis(x_copy, indices.astype(np.int64), axis=-1), x.shape[-1]))


def k_values(n):
    """0, 1, n and middle values, including both sides of the small-k / large-k switch."""
    ks = {0, 1, n, n // 2, max(n - 1, 0), min(n, 3), n // 8, n // 8 + 1, min(n, 64),
          min(n, 65)}
    return sorted(k for k in ks if 0 <= k <= n)


# every dtype x size x pattern, except: large rows only with the "special" pattern or for a
# few dtypes, and an empty row only once per dtype
CASES = [pytest.param(dtype, n, pattern, id=f"{dtype_id(dtype)}-{n}-{pattern}")
         for dtype in ALL_DTYPES for n in SIZES for pattern in ("random", "ties", "special")
         if (n < 1023 or pattern == "special" or dtype in (np.float32, np.float16, np.int32))
         and (n > 0 or pattern == "random")]


@pytest.mark.parametrize("dtype,n,pattern", CASES)
def test_top_k_matches_oracle(dtype, n, pattern):
    rng = np.random.default_rng([n, len(pattern)])
    x = make_keys(rng, (n,), dtype, pattern)
    ks = k_values(n) if n <= 33 else [0, 1, 7, n // 8, n // 8 + 1, 64, 65, n // 2, n]
    check_top_k(x, ks, "oracle" if n <= 1025 else "lax")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_top_k_batched_3d(dtype):
    rng = np.random.default_rng(1)
    for shape in [(2, 3, 33), (3, 1, 8), (1, 2, 1), (2, 2, 600)]:
        x = make_keys(rng, shape, dtype, "special" if shape[-1] % 2 else "ties")
        check_top_k(x, k_values(shape[-1]), "oracle" if shape[-1] < 100 else "lax")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_top_k_total_order(dtype):
    """+NaN > +inf > ... > +0.0 > -0.0 > ... > -inf > -NaN; equal entries: lower index first."""
    x = np.array([-0.0, math.nan, 0.0, -math.inf, 1.0, math.nan, math.inf, 0.0, -0.0, 1.0,
                  math.nan], dtype)
    x[10] = -x[10]  # -NaN
    assert np.signbit(x[10]) and np.signbit(x[0])
    expected = [1, 5, 6, 4, 9, 2, 7, 0, 8, 3, 10]
    values, indices = top_k(x, 11)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(np.asarray(jax.lax.top_k(x, 11)[1]), expected)
    assert_same_bits(values, x[expected])
    for k in range(12):
        values, indices = top_k(x, k)
        np.testing.assert_array_equal(indices, expected[:k])


# (bfloat16: lax.top_k ranks all NaNs of a sign as equal and writes canonical NaNs; so does
# the kernel)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_top_k_nan_payloads_match_lax(dtype):
    rng = np.random.default_rng(4)
    for n in (33, 1025):
        x = make_keys(rng, (3, n), dtype, "special", payloads=True)
        check_top_k(x, (1, 5, n // 8 + 1, n // 2, n), "lax")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.uint8],
                         ids=dtype_id)
def test_top_k_many_rows_match_lax(dtype):
    """Enough rows and work for the multi-threaded paths, small and large k."""
    rng = np.random.default_rng(9)
    x = make_keys(rng, (64, 1025), dtype, "ties" if dtype == np.float64 else "random")
    check_top_k(x, (1, 64, 129, 1025), "lax")


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 0, 4), (4, 3, 0)])
def test_top_k_empty_shapes(shape):
    x = np.zeros(shape, np.float32)
    values, indices = top_k(x, 0)
    assert values.shape == shape[:-1] + (0,) and values.dtype == np.float32
    assert indices.shape == shape[:-1] + (0,) and indices.dtype == np.int32
    if shape[-1]:
        values, indices = top_k(x, shape[-1])
        assert values.shape == shape and indices.shape == shape


def test_top_k_accepts_numpy_integer_k_and_lists():
    values, indices = top_k([3.0, 1.0, 2.0, 3.0], np.int64(2), backend="cpu")
    np.testing.assert_array_equal(values, [3.0, 3.0])
    np.testing.assert_array_equal(indices, [0, 3])
    assert indices.dtype == np.int32


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_top_k_non_contiguous_input(layout):
    rng = np.random.default_rng(6)
    base = make_keys(rng, (40, 66), np.float32, "special")
    x = base.T if layout == "transposed" else base[:, ::2]
    check_top_k(x, (1, 3, 20), "oracle")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=dtype_id)
@pytest.mark.parametrize("order", ["shuffled", "ascending", "descending"])
def test_top_k_long_rows_with_sparse_special_values(dtype, order):
    """Long float rows take the float screen (blocks skipped by comparing values with the
    k-th best): NaNs of both signs, +-0.0, +-inf and ties to the k-th value, sprinkled into
    mostly ordinary data, must still be ranked by totalOrder."""
    rng = np.random.default_rng([7, np.dtype(dtype).itemsize, len(order)])
    n = 50_000
    x = rng.standard_normal((2, n)).astype(dtype)
    if order == "ascending":
        x.sort(axis=-1)
    elif order == "descending":
        x = -np.sort(x, axis=-1)
    specials = make_keys(rng, (2, 40), dtype, "special", payloads=True)
    where = rng.choice(n, size=40, replace=False)
    x[:, where] = specials
    x[1, rng.choice(n, size=30, replace=False)] = np.sort(x[1])[-20]  # ties near the top
    check_top_k(x, [1, 5, 16, 48], "lax")


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, jnp.bfloat16],
                         ids=dtype_id)
def test_top_k_rows_split_over_threads(monkeypatch, rows, dtype):
    """Few long rows are split into column chunks (one task each) whose candidates are merged:
    ties across chunk borders must still go to the lower index."""
    from sortgrad.kernels.top_k import _cpu as top_k_cpu
    monkeypatch.setattr(top_k_cpu, "SPLIT_MIN_N", 64)
    monkeypatch.setattr(top_k_cpu, "num_threads", lambda: 4)
    n = 20_000
    assert top_k_cpu._chunks_per_row(rows, n, 16) > 1
    rng = np.random.default_rng([rows, np.dtype(dtype).itemsize])
    for pattern in ("random", "ties", "special"):
        x = make_keys(rng, (rows, n), dtype, pattern)
        check_top_k(x, [1, 7, 16, 64], "lax")
