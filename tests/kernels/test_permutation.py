"""Kernel API: sortgrad.kernels.inverse_permutation and permutation_scatter, CPU backend.

References: NumPy's put_along_axis / argsort written out here; values are compared bit for bit.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from sortgrad.kernels import inverse_permutation, permutation_scatter, segmented_sort, top_k
from sortgrad.testing import (FLOAT_DTYPES, INT_DTYPES, SIZES, assert_same_bits, dtype_id,
                              random_perms)

VALUE_DTYPES = [*FLOAT_DTYPES, *INT_DTYPES, np.bool_]
INDEX_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                np.uint64]


def random_values(rng, shape, dtype):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    pool = np.array([0.0, -0.0, math.nan, math.copysign(math.nan, -1.0), math.inf, -math.inf,
                     1.5, -2.25], dtype=dtype)
    out = (rng.standard_normal(shape) * 10).astype(dtype)
    mask = rng.random(shape) < 0.3
    out[mask] = rng.choice(pool, size=int(mask.sum()))
    return out


def reference_inverse(p):
    inv = np.empty(p.shape, np.int64)
    np.put_along_axis(inv, p.astype(np.int64), np.broadcast_to(np.arange(p.shape[-1]), p.shape),
                      axis=-1)
    return inv


def reference_scatter(values, perm, n):
    out = np.zeros(values.shape[:-1] + (n,), values.dtype)
    if values.size:
        np.put_along_axis(out, perm.astype(np.int64), values, axis=-1)
    return out


# --- inverse_permutation ---------------------------------------------------------------------

@pytest.mark.parametrize("batch", [(), (3,), (2, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("n", SIZES)
def test_inverse_permutation_matches_reference(n, batch):
    rng = np.random.default_rng([n, len(batch)])
    p = random_perms(rng, batch, n)
    p_copy = p.copy()
    inv = inverse_permutation(p)
    np.testing.assert_array_equal(p, p_copy)
    assert inv.dtype == np.int32 and inv.shape == p.shape
    np.testing.assert_array_equal(inv, reference_inverse(p_copy))
    # inv[p[i]] = i and p[inv[j]] = j
    ar = np.broadcast_to(np.arange(n), p.shape)
    np.testing.assert_array_equal(np.take_along_axis(inv, p_copy, axis=-1), ar)
    np.testing.assert_array_equal(np.take_along_axis(p_copy, inv.astype(np.int64), axis=-1), ar)
    # an involution
    np.testing.assert_array_equal(inverse_permutation(inv), p_copy)


@pytest.mark.parametrize("dtype", INDEX_DTYPES, ids=dtype_id)
def test_inverse_permutation_index_dtypes(dtype):
    rng = np.random.default_rng(1)
    n = min(100, np.iinfo(dtype).max + 1)
    p = random_perms(rng, (4,), n, dtype)
    p_copy = p.copy()
    inv = inverse_permutation(p)
    np.testing.assert_array_equal(p, p_copy)
    assert inv.dtype == np.int32
    np.testing.assert_array_equal(inv, reference_inverse(p_copy))
    np.testing.assert_array_equal(inverse_permutation(inv), p_copy)


def test_inverse_permutation_special_perms():
    for n in (1, 2, 33):
        ident = np.arange(n)
        np.testing.assert_array_equal(inverse_permutation(ident), ident)
        rev = ident[::-1]  # non-contiguous view, self-inverse
        np.testing.assert_array_equal(inverse_permutation(rev), rev)
        shift = np.roll(ident, 1)
        np.testing.assert_array_equal(inverse_permutation(shift), np.roll(ident, -1))


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 0, 4)])
def test_inverse_permutation_empty(shape):
    p = np.zeros(shape, np.int32)
    inv = inverse_permutation(p)
    assert inv.shape == shape and inv.dtype == np.int32


def test_inverse_of_sort_permutation_gives_ranks():
    """inverse_permutation(argsort(x)) = the rank of each element (stable)."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 4, size=(3, 33)).astype(np.float32)
    perm = np.asarray(jnp.argsort(x, axis=-1, stable=True))
    ranks = inverse_permutation(perm)
    np.testing.assert_array_equal(ranks, reference_inverse(perm))
    sorted_x = np.take_along_axis(x, perm, axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(sorted_x, ranks.astype(np.int64), axis=-1), x)


# --- permutation_scatter ---------------------------------------------------------------------

@pytest.mark.parametrize("n,dtype", [
    pytest.param(n, dtype, id=f"{n}-{dtype_id(dtype)}") for n in SIZES for dtype in VALUE_DTYPES
    if n < 1023 or dtype in (np.float32, jnp.bfloat16, np.int64)])
def test_scatter_inverts_gather(n, dtype):
    """x == scatter(take_along_axis(x, perm), perm, n) for a permutation, bit for bit."""
    rng = np.random.default_rng([n, np.dtype(dtype).num])
    batch = (2, 3) if n < 1000 else (2,)
    x = random_values(rng, batch + (n,), dtype)
    perm = random_perms(rng, batch, n, np.int32)
    gathered = np.take_along_axis(x, perm.astype(np.int64), axis=-1)
    g_copy, p_copy = gathered.copy(), perm.copy()
    out = permutation_scatter(gathered, perm, n)
    assert_same_bits(gathered, g_copy)
    np.testing.assert_array_equal(perm, p_copy)
    assert_same_bits(out, x)
    assert_same_bits(out, reference_scatter(g_copy, p_copy, n))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, jnp.bfloat16, np.int8, np.uint32],
                         ids=dtype_id)
@pytest.mark.parametrize("n,m", [(1, 0), (1, 1), (33, 1), (33, 5), (33, 32), (1025, 64),
                                 (1025, 200), (4097, 3)])
def test_scatter_partial_rows_zero_elsewhere(n, m, dtype):
    """m < n distinct indices (as from top-k): the rest of the row is zero (+0.0)."""
    rng = np.random.default_rng([n, m])
    batch = (2, 3)
    idx = random_perms(rng, batch, n, np.int64)[..., :m].astype(np.int32)
    values = random_values(rng, batch + (m,), dtype)
    out = permutation_scatter(values, idx, n)
    assert out.shape == batch + (n,) and out.dtype == values.dtype
    assert_same_bits(out, reference_scatter(values, idx, n))


@pytest.mark.parametrize("dtype", INDEX_DTYPES, ids=dtype_id)
def test_scatter_index_dtypes(dtype):
    rng = np.random.default_rng(3)
    n = min(100, np.iinfo(dtype).max + 1)
    perm = random_perms(rng, (3,), n, dtype)
    values = random_values(rng, (3, n), np.float32)
    out = permutation_scatter(values, perm, n)
    assert_same_bits(out, reference_scatter(values, perm, n))


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128], ids=dtype_id)
def test_scatter_complex_values(dtype):
    """The docstring promises any numeric dtype."""
    rng = np.random.default_rng(8)
    perm = random_perms(rng, (2,), 33, np.int32)
    values = random_values(rng, (2, 33), dtype)
    assert_same_bits(permutation_scatter(values, perm, 33), reference_scatter(values, perm, 33))


def test_scatter_keeps_signed_zero_and_nan_bits():
    values = np.array([-0.0, math.nan, math.copysign(math.nan, -1.0), 0.0], np.float32)
    values[1] = np.uint32(0x7FC00005).view(np.float32)  # payload NaN
    perm = np.array([3, 0, 2, 5])
    out = permutation_scatter(values, perm, 6)
    expected = np.zeros(6, np.float32)
    expected[[3, 0, 2, 5]] = values
    assert_same_bits(out, expected)
    assert np.signbit(out[3]) and not np.signbit(out[1]) and not np.signbit(out[4])


@pytest.mark.parametrize("shape,n", [((0,), 0), ((0,), 4), ((3, 0), 5), ((0, 4), 4),
                                     ((2, 0, 3), 3)])
def test_scatter_empty(shape, n):
    values = np.zeros(shape, np.float32)
    out = permutation_scatter(values, np.zeros(shape, np.int32), n)
    assert out.shape == shape[:-1] + (n,) and out.dtype == np.float32
    np.testing.assert_array_equal(out, 0)


def test_scatter_is_backward_of_sort_and_top_k():
    """Scattering through the kernels' own permutations sends each value home."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 4, size=(3, 4, 65)).astype(np.float64)
    x[0, 0, :3] = [-0.0, np.nan, 0.0]
    values, perm = segmented_sort(x)
    assert_same_bits(permutation_scatter(values, perm, 65), x)
    for k in (1, 9, 65):
        v, idx = top_k(x, k)
        expected = np.zeros_like(x)
        np.put_along_axis(expected, idx.astype(np.int64), np.take_along_axis(
            x, idx.astype(np.int64), axis=-1), axis=-1)
        assert_same_bits(permutation_scatter(v, idx, 65), expected)


def test_scatter_python_int_n_variants():
    values = np.array([1.0, 2.0], np.float32)
    perm = np.array([2, 0], np.int32)
    expected = np.array([2.0, 0.0, 1.0, 0.0], np.float32)
    for n in (4, np.int32(4), np.int64(4), np.uint8(4)):
        np.testing.assert_array_equal(permutation_scatter(values, perm, n), expected)
