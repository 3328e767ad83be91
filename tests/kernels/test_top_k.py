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


# --- the selection algorithm's hard cases (threshold screen, insertion buffer, compaction,
# prefix estimate, column ranges of long rows, the survivors' radix sort) ---------------------
#
# Reference: `lexsort_top_k`, written from the definition with NumPy only: the totalOrder key
# of each entry as an unsigned integer (floats: sign-magnitude bits to an order-preserving
# code; bfloat16 NaNs first made the canonical NaN of their sign; signed integers offset by
# 2**(w-1)), then np.lexsort by (key descending, column ascending).

def _order_codes(x):
    """Unsigned codes whose ascending order is the totalOrder of x (last axis unchanged)."""
    x = np.asarray(x)
    width = x.dtype.itemsize * 8
    u = bits(x).astype(np.uint64)
    if x.dtype.kind == "f" or x.dtype == jnp.bfloat16:
        sign = np.uint64(1 << (width - 1))
        if x.dtype == jnp.bfloat16 and x.shape[-1] > 1:
            nan = (u & np.uint64(0x7FFF)) > np.uint64(0x7F80)
            u = np.where(nan, (u & sign) | np.uint64(0x7FC0), u)
        all_ones = np.uint64((1 << width) - 1)
        return np.where(u & sign, ~u & all_ones, u | sign)
    if x.dtype.kind == "i":
        return u ^ np.uint64(1 << (width - 1)) & np.uint64((1 << width) - 1)
    return u


def lexsort_top_k(x, k):
    """(values, int64 indices) of the k largest of each row: largest first, ties to the lower
    index, values with the bits lax.top_k writes (bfloat16 NaNs canonical in rows of > 1)."""
    x = np.asarray(x)
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    codes = _order_codes(rows)
    n = rows.shape[-1]
    cols = np.broadcast_to(np.arange(n), rows.shape)
    order = np.lexsort((cols, ~codes), axis=-1)[:, :k]
    values = xla_cpu_sorted_values(np.take_along_axis(rows, order, axis=-1), n)
    return (values.reshape(x.shape[:-1] + (k,)), order.reshape(x.shape[:-1] + (k,)))


def check_against(x, ks, reference=lexsort_top_k):
    x_copy = x.copy()
    for k in ks:
        want_values, want_indices = reference(x_copy, k)
        values, indices = top_k(x, k)
        assert indices.dtype == np.int32 and values.dtype == x.dtype
        np.testing.assert_array_equal(indices, want_indices, err_msg=f"k = {k}, n = {x.shape}")
        assert_same_bits(values, want_values, f"k = {k}")
    np.testing.assert_array_equal(bits(x), bits(x_copy))  # input untouched


def algorithm_ks(n):
    """k at the switches of the CPU kernel: the insertion buffer (k <= 32) and the compaction
    path, k around the 64-column screen blocks, near n."""
    from sortgrad.kernels.top_k import _cpu as top_k_cpu
    small = top_k_cpu.INSERTION_K
    ks = {0, 1, 2, small, small + 1, 63, 64, 65, 100, 256, n // 3, n - 2, n - 1, n}
    return sorted(k for k in ks if 0 <= k <= n)


def test_lexsort_reference_matches_the_oracle():
    """The reference used below agrees with the Python oracle on every dtype's specials."""
    rng = np.random.default_rng(21)
    for dtype in ALL_DTYPES:
        x = make_keys(rng, (3, 40), dtype, "special", payloads=True)
        for k in (1, 7, 40):
            want = reference_rows(x, k)
            got = lexsort_top_k(x, k)
            np.testing.assert_array_equal(got[1], want[1], err_msg=dtype_id(dtype))
            assert_same_bits(got[0], want[0], dtype_id(dtype))


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_top_k_algorithm_switches(dtype, n):
    """Every size x dtype at the k where the kernel changes path, three patterns."""
    rng = np.random.default_rng([n, np.dtype(dtype).itemsize, 3])
    for pattern in ("random", "ties", "special"):
        x = make_keys(rng, (2, n), dtype, pattern, payloads=pattern == "special")
        check_against(x, algorithm_ks(n))


@pytest.mark.parametrize("value", [0.0, -0.0, 1.5, math.inf, -math.inf, math.nan, -math.nan])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_top_k_all_equal_rows(dtype, value):
    """A row of one value: every entry ties, the indices are 0..k-1 for every k and path."""
    for n in (1, 33, 1025, 5000):
        x = np.full((2, n), value, dtype)
        for k in algorithm_ks(n):
            values, indices = top_k(x, k)
            np.testing.assert_array_equal(indices, np.broadcast_to(np.arange(k), (2, k)))
            assert_same_bits(values, xla_cpu_sorted_values(x[:, :k], n))


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.uint32, np.int64,
                                   np.uint64, np.int16, np.uint16, np.bool_], ids=dtype_id)
def test_top_k_integer_extremes(dtype):
    """The smallest and largest integers of each dtype (and 64-bit values beyond 2**53 and
    2**63, which float-based references would round), mixed with ties, in every path."""
    rng = np.random.default_rng(np.dtype(dtype).itemsize)
    if dtype == np.bool_:
        pool = np.array([False, True])
    else:
        info = np.iinfo(dtype)
        pool = np.array([info.min, info.min + 1, -1 if info.min < 0 else 1, 0, 1,
                         info.max - 1, info.max], dtype)
    for n in (31, 1025, 4097):
        x = rng.choice(pool, size=(3, n)).astype(dtype)
        check_against(x, algorithm_ks(n))
    if dtype in (np.int64, np.uint64):
        info = np.iinfo(dtype)
        x = rng.integers(info.max - 3000, info.max, size=(2, 3000), endpoint=True, dtype=dtype)
        x[0, ::7] = info.min
        check_against(x, algorithm_ks(3000))


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16, np.float32, np.float64],
                         ids=dtype_id)
def test_top_k_many_ties_at_the_threshold(dtype):
    """The k-th value is one of a long run of ties spread over the row (before and after the
    prefix the kernel estimates from, on both sides of block borders): the first columns of
    the run must win, in every path."""
    rng = np.random.default_rng(17)
    for n, k in ((1000, 16), (1000, 40), (4097, 64), (4097, 300), (20000, 1000)):
        x = rng.standard_normal((2, n)).astype(dtype)
        kth = np.sort(x[0].astype(np.float64))[-k]
        x[0, rng.choice(n, size=n // 10, replace=False)] = kth  # ties of the k-th value
        x[1, rng.choice(n, size=n // 4, replace=False)] = np.float64(x[1].max())  # ties at max
        check_against(x, [1, k // 2, k, k + 1, 2 * k])


@pytest.mark.parametrize("dtype", [np.float16, jnp.bfloat16, np.float32, np.float64],
                         ids=dtype_id)
def test_top_k_signed_zeros_infinities_and_nan_payloads(dtype):
    """+NaN (by payload) > +inf > ... > +0.0 > -0.0 > ... > -inf > -NaN (by payload; bfloat16:
    the NaNs of one sign tie), among ordinary values, each kind in runs of ties."""
    rng = np.random.default_rng(5)
    width = np.dtype(dtype).itemsize * 8
    uint = {16: np.uint16, 32: np.uint32, 64: np.uint64}[width]
    exp_bits = {np.dtype(np.float16): 5, np.dtype(jnp.bfloat16): 8,
                np.dtype(np.float32): 8, np.dtype(np.float64): 11}[np.dtype(dtype)]
    mantissa = width - 1 - exp_bits
    quiet = 1 << (mantissa - 1)
    inf_bits = ((1 << exp_bits) - 1) << mantissa
    sign = 1 << (width - 1)
    nans = [inf_bits | quiet, inf_bits | quiet | 1, inf_bits | 3, inf_bits | (quiet - 1),
            inf_bits | ((1 << mantissa) - 1)]
    special = np.array(nans + [b | sign for b in nans] + [0, sign, inf_bits, inf_bits | sign],
                       dtype=uint).view(dtype)
    for n in (64, 1025, 4097, 40000):
        x = (rng.standard_normal((2, n)) * 10).astype(dtype)
        for row in range(2):
            where = rng.choice(n, size=min(n // 2, 4 * special.size), replace=False)
            x[row, where] = np.resize(special, where.size)
        check_against(x, [1, 3, 9, 10, 11, 20, 33, 64, min(n, 200), n // 2])


@pytest.mark.parametrize("order", ["ascending", "descending"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32], ids=dtype_id)
def test_top_k_sorted_rows(dtype, order):
    """Rows in ascending order make every column an insertion (the insertion buffer gives up
    and the row is selected by compaction); descending rows make the prefix the best part,
    so the estimate of the k-th value from it is too high and the range is redone."""
    rng = np.random.default_rng(8)
    for n in (1023, 5000, 70000):
        x = np.sort((rng.standard_normal((2, n)) * 1000).astype(dtype), axis=-1)
        if order == "descending":
            x = x[:, ::-1].copy()
        x[1, rng.choice(n, size=n // 3, replace=False)] = x[1, n // 2]  # and ties
        check_against(x, [1, 16, 32, 33, 100, 300, 1000])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16], ids=dtype_id)
def test_top_k_untypical_prefix(dtype):
    """The compaction path estimates the k-th value from the first columns of a row: here they
    hold a few huge values among small ones and the rest of the row is medium, so the estimate
    is too high and the row must be selected again without it."""
    rng = np.random.default_rng(12)
    for n, k in ((5000, 300), (20000, 500), (70000, 1000)):
        x = (rng.random((2, n)) * 100 + 1000).astype(dtype)  # medium
        prefix = 2 * k + 128  # the kernel's buffer
        x[:, :prefix] = (rng.random((2, prefix)) * 100).astype(dtype)  # small
        x[:, rng.choice(prefix, size=k // 2, replace=False)] = 3000  # a few huge (ties)
        check_against(x, [k, k + 1, 2 * k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, jnp.bfloat16, np.uint8],
                         ids=dtype_id)
def test_top_k_long_single_rows_split_over_threads(monkeypatch, dtype):
    """A single row past SPLIT_MIN_N is split into column ranges (one task per thread) whose
    candidates are merged; ties across range borders go to the lower index. (The threshold
    lowered to 2**16 here; the real one once, below.)"""
    from sortgrad.kernels.top_k import _cpu as top_k_cpu
    real_split = top_k_cpu.SPLIT_MIN_N
    monkeypatch.setattr(top_k_cpu, "SPLIT_MIN_N", 1 << 16)
    monkeypatch.setattr(top_k_cpu, "num_threads", lambda: 2)
    n = (1 << 17) + 7
    assert top_k_cpu._chunks_per_row(1, n, 1024) == 2
    rng = np.random.default_rng(31)
    x = make_keys(rng, (1, n), dtype, "random")
    mid = n // 2
    x[0, mid - 500:mid + 500] = x[0].max()  # ties across the border of the two ranges
    check_against(x, [1, 16, 33, 256, 1024, 1500])
    x = make_keys(rng, (1, n), dtype, "special")
    check_against(x, [1, 64, 1024])
    if dtype == np.float32:  # at the real threshold, both paths of k
        monkeypatch.setattr(top_k_cpu, "SPLIT_MIN_N", real_split)
        x = make_keys(rng, (1, real_split + 7), dtype, "random")
        assert top_k_cpu._chunks_per_row(1, x.shape[-1], 1024) == 2
        check_against(x, [16, 1024])


@pytest.mark.parametrize("k", [1, 16, 40, 200])
def test_top_k_many_rows_threaded(k):
    """Enough rows for the threaded kernel (row groups), every row a different pattern."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal((300, 777)).astype(np.float32)
    x[::3] = np.round(x[::3])  # ties
    x[1::3] = np.sort(x[1::3], axis=-1)  # ascending rows
    check_against(x, [k])


def test_top_k_writes_into_out():
    """out=(values, indices) is written and returned as given (garbage before)."""
    from sortgrad.testing import filled_bytes
    rng = np.random.default_rng(2)
    for shape, k in (((3, 1025), 64), ((2, 5000), 300), ((1, 40), 40), ((4, 7), 0)):
        x = rng.standard_normal(shape).astype(np.float32)
        values = filled_bytes(shape[:-1] + (k,), np.float32)
        indices = filled_bytes(shape[:-1] + (k,), np.int32)
        got = top_k(x, k, out=(values, indices))
        assert got[0] is values and got[1] is indices
        want_values, want_indices = lexsort_top_k(x, k)
        np.testing.assert_array_equal(indices, want_indices)
        assert_same_bits(values, want_values)


@pytest.mark.parametrize("width", [8, 16, 32, 64])
def test_kth_largest_selection(width):
    """The selection the compaction uses (a quickselect for a few keys, a radix select on the
    keys' order codes otherwise): the k-th largest and the count above it, for every kind of
    k, on sizes around the switch, with heavy ties, runs sharing their high bytes and extremes."""
    from sortgrad.kernels.top_k import _cpu as top_k_cpu
    rng = np.random.default_rng(width)
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    offset, wmask = np.uint64(1 << (width - 1)), np.uint64((1 << width) - 1)
    hist = np.empty((2, 256), np.int64)
    for m in (1, 2, 16, 17, 40, 96, 97, 257, 1000, 3000):
        scratch = np.empty(2 * m, np.int64)
        for kind in ("distinct", "ties", "one", "shared-high", "extremes"):
            if kind == "distinct":
                keys = rng.integers(lo, hi, size=m, endpoint=True, dtype=np.int64)
            elif kind == "ties":
                keys = rng.integers(-2, 2, size=m).astype(np.int64)
            elif kind == "one":
                keys = np.full(m, lo + 1, np.int64)
            elif kind == "shared-high":  # differ in the lowest bits only
                keys = (hi - rng.integers(0, 5, size=m)).astype(np.int64)
            else:
                keys = rng.choice(np.array([lo, lo + 1, -1, 0, hi - 1, hi], np.int64), size=m)
            desc = np.sort(keys)[::-1]
            for k in sorted({1, 2, m // 3, m // 2, m - 1, m} & set(range(1, m + 1))):
                t, g = top_k_cpu._kth_largest(keys, m, k, scratch, hist, offset, wmask)
                assert t == desc[k - 1] and g == int(np.sum(keys > t)), (m, kind, k)


@pytest.mark.parametrize("shape,k", [((1, 1 << 21), 3), ((5, 1000), 1000), ((600, 600), 0),
                                     ((2, 70000), 5)])
def test_scatter_of_top_k_indices_zero_fills(shape, k):
    """The backward of top-k, permutation_scatter(g, indices, n): one pass that zero-fills
    the output (here garbage first) and puts g at the indices."""
    from sortgrad.kernels import permutation_scatter
    from sortgrad.testing import filled_bytes
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(np.float32)
    _, indices = top_k(x, k)
    g = rng.standard_normal(shape[:-1] + (k,)).astype(np.float32)
    want = np.zeros(shape, np.float32)
    np.put_along_axis(want, indices.astype(np.int64), g, axis=-1)
    out = filled_bytes(shape, np.float32)
    assert permutation_scatter(g, indices, shape[-1], out=out) is out
    assert_same_bits(out, want)
    assert_same_bits(permutation_scatter(g, indices, shape[-1]), want)
