"""Kernel API: sortgrad.kernels.segmented_sort (rows and ragged CSR segments), CPU backend.

References: the pure-Python oracles of sortgrad.testing, and jnp.sort / jnp.argsort(stable=True)
for the larger and batched cases. Values are compared bit for bit (-0.0 vs 0.0, NaN signs and
payloads), permutations exactly.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sortgrad.kernels import segmented_sort
from sortgrad.testing import (FLOAT_DTYPES, INT_DTYPES, SIZES, assert_same_bits, bits, dtype_id,
                              flush_subnormals, reference_argsort, reference_segmented_sort,
                              reference_sort_rows)
from sortgrad.testing import make_keys as _make_keys
from sortgrad.testing.oracles import xla_cpu_sorted_values

ALL_DTYPES = [*FLOAT_DTYPES, *INT_DTYPES]
PATTERNS = ["random", "ties", "special"]

# Keys (sortgrad.testing.make_keys): the full "special" pool (signed zeros, NaNs of both signs,
# infinities, extremes, ties, subnormals of both signs, the smallest normal) and NaN payloads
# unless told not to (jnp.sort of bfloat16 on CPU does not keep them).
make_keys = functools.partial(_make_keys, payloads=True)


def reference_rows(x, descending):
    """The oracle on the order keys (subnormals flushed, as jnp.sort compares them); 64-bit
    integers through jnp.argsort(stable=True), because the Python oracle compares them as
    floats (exact only up to 2**53)."""
    if x.shape[-1] == 0:  # (the oracle cannot reshape empty rows)
        return x.copy(), np.zeros(x.shape, np.int64)
    if x.dtype in (np.int64, np.uint64):
        perm = np.asarray(jnp.argsort(x, axis=-1, stable=True, descending=descending))
    else:
        perm = reference_sort_rows(flush_subnormals(x), descending)[1]
    return xla_cpu_sorted_values(np.take_along_axis(x, perm, axis=-1), x.shape[-1]), perm


def check_rows(x, descending):
    """segmented_sort(x) against the oracle; returns (values, perm)."""
    x_copy = x.copy()
    values, perm = segmented_sort(x, descending=descending)
    np.testing.assert_array_equal(bits(x), bits(x_copy))  # input untouched
    assert perm.dtype == np.int32
    assert perm.shape == x.shape
    ref_values, ref_perm = reference_rows(x_copy, descending)
    np.testing.assert_array_equal(perm, ref_perm)
    assert_same_bits(values, ref_values)
    return values, perm


# --- rows ------------------------------------------------------------------------------------

# every dtype x size x pattern, except: large rows only with the "special" pattern or for a
# few dtypes, and an empty row only once per dtype (it has no pattern)
ROW_CASES = [pytest.param(dtype, n, pattern, id=f"{dtype_id(dtype)}-{n}-{pattern}")
             for dtype in ALL_DTYPES for n in SIZES for pattern in PATTERNS
             if (n < 1023 or pattern == "special" or dtype in (np.float32, np.int8))
             and (n > 0 or pattern == "random")]


@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
@pytest.mark.parametrize("dtype,n,pattern", ROW_CASES)
def test_rows_match_oracle(dtype, n, pattern, descending):
    rng = np.random.default_rng([n, PATTERNS.index(pattern), descending])
    x = make_keys(rng, (n,), dtype, pattern)
    check_rows(x, descending)


@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
@pytest.mark.parametrize("dtype", ALL_DTYPES + [np.bool_], ids=dtype_id)
def test_batched_3d_matches_oracle(dtype, descending):
    rng = np.random.default_rng(7)
    for shape in [(2, 3, 33), (3, 1, 5), (1, 4, 1), (2, 2, 32)]:
        if dtype == np.bool_:
            x = rng.random(shape) < 0.5
        else:
            x = make_keys(rng, shape, dtype, "special" if shape[-1] > 5 else "ties")
        check_rows(x, descending)


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0), (2, 0, 4), (4, 3, 0)])
def test_empty_shapes(shape):
    x = np.zeros(shape, np.float32)
    for descending in (False, True):
        values, perm = segmented_sort(x, descending=descending)
        assert values.shape == shape and values.dtype == np.float32
        assert perm.shape == shape and perm.dtype == np.int32


@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16, np.float32, np.float64, np.int64,
                                   np.uint8], ids=dtype_id)
def test_many_rows_match_jnp(dtype, descending):
    """Enough rows to use every core; jnp.argsort(stable=True) is the reference order."""
    rng = np.random.default_rng(11)
    x = make_keys(rng, (64, 1025), dtype, "ties" if dtype == np.float64 else "special",
                  payloads=False)
    if dtype == np.int64:
        x = make_keys(rng, (64, 1025), dtype, "random") // (2**60)  # heavy ties, wide keys
    x_copy = x.copy()
    values, perm = segmented_sort(x, descending=descending)
    np.testing.assert_array_equal(bits(x), bits(x_copy))
    ref_perm = np.asarray(jnp.argsort(x_copy, axis=-1, stable=True, descending=descending))
    np.testing.assert_array_equal(perm, ref_perm)
    assert_same_bits(values, np.take_along_axis(x_copy, ref_perm, axis=-1))
    if not descending:  # ascending values are jnp.sort's values exactly
        assert_same_bits(values, np.asarray(jnp.sort(x_copy, axis=-1)))


@pytest.mark.parametrize("dtype", ALL_DTYPES + [np.bool_], ids=dtype_id)
def test_rows_at_the_radix_sort_length(dtype):
    """Rows of RADIX_MIN_N and more take the LSD radix sort: full-range random keys (every
    digit pass moves data), heavy ties (passes skipped), both directions."""
    from sortgrad.kernels.segmented_sort._cpu import RADIX_MIN_N
    rng = np.random.default_rng([13, np.dtype(dtype).itemsize])
    for n in (RADIX_MIN_N - 1, RADIX_MIN_N, 3 * RADIX_MIN_N + 5):
        for pattern in ("random", "ties"):
            if dtype == np.bool_:
                x = rng.random((2, n)) < (0.5 if pattern == "random" else 0.01)
            else:
                x = make_keys(rng, (2, n), dtype, pattern)
            for descending in (False, True):
                check_rows(x, descending)


def test_descending_is_stable_not_reversed():
    """Descending keeps ties in original index order (not the reversed ascending sort)."""
    x = np.array([1.0, 2.0, -0.0, 1.0, 0.0, 2.0, math.nan, -math.nan], np.float32)
    x[7] = -x[6]
    values, perm = segmented_sort(x, descending=True)
    np.testing.assert_array_equal(perm, [6, 7, 1, 5, 0, 3, 2, 4])
    np.testing.assert_array_equal(perm, np.asarray(jnp.argsort(x, stable=True, descending=True)))
    assert_same_bits(values, x[[6, 7, 1, 5, 0, 3, 2, 4]])
    values, perm = segmented_sort(x)
    np.testing.assert_array_equal(perm, [2, 4, 0, 3, 1, 5, 6, 7])
    assert_same_bits(values, np.asarray(jnp.sort(x)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_signed_zeros_and_nans_keep_bits(dtype):
    x = np.array([0.0, -0.0, math.nan, 0.0, -0.0, -math.inf, math.inf, math.nan], dtype)
    x[7] = -x[7]  # -NaN
    assert np.signbit(x[7]) and np.signbit(x[1]) and not np.signbit(x[2])
    for descending in (False, True):
        values, perm = segmented_sort(x, descending=descending)
        ref = np.asarray(jnp.argsort(x, stable=True, descending=descending))
        np.testing.assert_array_equal(perm, ref)
        assert_same_bits(values, x[ref])
    assert_same_bits(segmented_sort(x)[0], np.asarray(jnp.sort(x)))


@pytest.mark.parametrize("layout", ["transposed", "strided", "fortran"])
def test_non_contiguous_input(layout):
    rng = np.random.default_rng(3)
    base = make_keys(rng, (33, 66), np.float32, "special")
    x = {"transposed": base.T, "strided": base[:, ::2],
         "fortran": np.asfortranarray(base)}[layout]
    x_copy = x.copy()
    values, perm = segmented_sort(x)
    np.testing.assert_array_equal(bits(x), bits(x_copy))
    ref_values, ref_perm = reference_rows(np.ascontiguousarray(x), False)
    np.testing.assert_array_equal(perm, ref_perm)
    assert_same_bits(values, ref_values)


def test_values_equal_gather_of_perm():
    rng = np.random.default_rng(5)
    x = make_keys(rng, (3, 4, 65), np.float64, "special")
    for descending in (False, True):
        values, perm = segmented_sort(x, descending=descending)
        assert_same_bits(values, np.take_along_axis(x, perm.astype(np.int64), axis=-1))
        np.testing.assert_array_equal(np.sort(perm, axis=-1),
                                      np.broadcast_to(np.arange(65), x.shape))


def test_python_list_and_backend_cpu():
    values, perm = segmented_sort([3.0, 1.0, 2.0], backend="cpu")
    np.testing.assert_array_equal(values, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(perm, [1, 2, 0])
    assert perm.dtype == np.int32


# --- ragged segments -------------------------------------------------------------------------

def random_offsets(rng, lengths, trailing):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return offsets, int(offsets[-1]) + trailing


RAGGED_LAYOUTS = {
    "one_segment": ([33], 0),
    "with_empties": ([0, 3, 0, 0, 1, 31, 0, 32, 33, 2, 0], 0),
    "trailing": ([5, 0, 7], 6),
    "only_trailing": ([], 9),
    "all_empty": ([0, 0, 0], 0),
    "empty_then_trailing": ([0, 0], 4),
    "nothing": ([], 0),
    "long": ([1025, 1, 0, 4097, 31], 3),
}


def reference_ragged(x, offsets, descending):
    if x.dtype not in (np.int64, np.uint64):
        perm = reference_segmented_sort(flush_subnormals(x), offsets, descending)[1]
        values = x.copy()
        for a, b in zip(offsets[:-1], offsets[1:]):  # (bfloat16: canonical NaNs, as in rows)
            values[a:b] = xla_cpu_sorted_values(x[a:b][perm[a:b]], b - a)
        return values, perm
    values, perm = x.copy(), np.zeros(x.shape, np.int64)
    for a, b in zip(offsets[:-1], offsets[1:]):
        values[a:b], perm[a:b] = reference_rows(x[a:b], descending)
    return values, perm


def check_ragged(x, offsets, descending):
    x_copy, offsets_copy = x.copy(), np.array(offsets, copy=True)
    values, perm = segmented_sort(x, offsets, descending=descending)
    np.testing.assert_array_equal(bits(x), bits(x_copy))
    np.testing.assert_array_equal(np.asarray(offsets), offsets_copy)
    assert perm.dtype == np.int32 and perm.shape == x.shape
    ref_values, ref_perm = reference_ragged(x_copy, np.asarray(offsets_copy, np.int64),
                                            descending)
    np.testing.assert_array_equal(perm, ref_perm)
    assert_same_bits(values, ref_values)
    end = int(offsets_copy[-1])
    # elements past the last offset: copied through, perm 0
    assert_same_bits(values[end:], x_copy[end:])
    np.testing.assert_array_equal(perm[end:], 0)


RAGGED_CASES = [pytest.param(dtype, layout, id=f"{dtype_id(dtype)}-{layout}")
                for dtype in ALL_DTYPES for layout in RAGGED_LAYOUTS
                if layout != "long" or dtype in (np.float32, np.float16, np.int64)]


@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
@pytest.mark.parametrize("dtype,layout", RAGGED_CASES)
def test_ragged_matches_oracle(dtype, layout, descending):
    lengths, trailing = RAGGED_LAYOUTS[layout]
    rng = np.random.default_rng([len(lengths), trailing, descending])
    offsets, size = random_offsets(rng, lengths, trailing)
    x = make_keys(rng, (size,), dtype, "special" if layout != "with_empties" else "ties")
    check_ragged(x, offsets, descending)


@pytest.mark.parametrize("offset_dtype", [np.int32, np.int64, np.uint32, np.uint64, "list"])
def test_ragged_offset_dtypes(offset_dtype):
    rng = np.random.default_rng(2)
    offsets, size = random_offsets(rng, [4, 0, 9, 1, 33], 2)
    offsets = offsets.tolist() if offset_dtype == "list" else offsets.astype(offset_dtype)
    x = make_keys(rng, (size,), np.float32, "special")
    check_ragged(x, offsets, False)
    check_ragged(x, offsets, True)


def test_ragged_random_layouts():
    rng = np.random.default_rng(13)
    for trial in range(20):
        lengths = rng.choice([0, 1, 2, 3, 31, 32, 33, 64], size=rng.integers(0, 12))
        trailing = int(rng.choice([0, 1, 5]))
        offsets, size = random_offsets(rng, lengths, trailing)
        dtype = ALL_DTYPES[trial % len(ALL_DTYPES)]
        x = make_keys(rng, (size,), dtype, PATTERNS[trial % 3])
        check_ragged(x, offsets, bool(trial % 2))


def test_ragged_segments_are_independent():
    """Each segment equals the row sort of that segment alone."""
    rng = np.random.default_rng(17)
    lengths = [7, 0, 33, 1, 32]
    offsets, size = random_offsets(rng, lengths, 0)
    x = make_keys(rng, (size,), np.float64, "special")
    values, perm = segmented_sort(x, offsets)
    for a, b in zip(offsets[:-1], offsets[1:]):
        seg = x[a:b]
        np.testing.assert_array_equal(perm[a:b], reference_argsort(flush_subnormals(seg)))
        assert_same_bits(values[a:b], seg[reference_argsort(flush_subnormals(seg))])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_subnormals_order_like_jnp_sort(dtype):
    """jnp.sort on XLA:CPU: float32/float64/bfloat16 subnormals tie with +-0.0 (stable);
    float16 subnormals are ordered as numbers. Values keep their bits either way."""
    tiny = float(ml_dtypes.finfo(dtype).smallest_subnormal)
    normal = float(ml_dtypes.finfo(dtype).tiny)
    x = np.array([tiny, 0.0, -tiny, -0.0, normal, -normal, 3 * tiny, 1.0], dtype)
    for descending in (False, True):
        values, perm = segmented_sort(x, descending=descending)
        ref = np.asarray(jnp.argsort(x, stable=True, descending=descending))
        np.testing.assert_array_equal(perm, ref)
        assert_same_bits(values, x[ref])
    assert_same_bits(segmented_sort(x)[0], np.asarray(jnp.sort(x)))
    expected = [5, 2, 1, 3, 0, 6, 4, 7] if dtype == np.float16 else [5, 0, 1, 2, 3, 6, 4, 7]
    np.testing.assert_array_equal(segmented_sort(x)[1], expected)
