"""Property tests (hypothesis): arbitrary arrays with NaNs of both signs and payloads, infinities,
signed zeros, subnormals and heavy ties, against the oracles of sortgrad.testing and JAX's ops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sortgrad
from sortgrad.kernels import inverse_permutation, permutation_scatter, segmented_sort, top_k
from sortgrad.testing import (UINT_BY_ITEMSIZE, assert_same_bits, flush_subnormals,
                              reference_segmented_sort, reference_sort_rows, reference_top_k)

FLOATS = [np.float16, np.float32, np.float64]
INTS = [np.int8, np.int32, np.uint8, np.uint32]

PROPS = settings(max_examples=30, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
JAX_PROPS = settings(PROPS, max_examples=10)  # every new shape compiles


@st.composite
def keys(draw, shape, dtypes=FLOATS + INTS):
    """An array of `shape` (a strategy or tuple): any float bits (NaN of both signs and with
    payloads, +-inf, -0.0, subnormals) or integers, often with heavy ties."""
    dtype = np.dtype(draw(st.sampled_from(dtypes)))
    shape = draw(shape) if isinstance(shape, st.SearchStrategy) else shape
    if draw(st.booleans()):  # heavy ties
        values = st.sampled_from([0, 1, 2, 3])
        return draw(hnp.arrays(np.int8, shape, elements=values)).astype(dtype)
    if dtype.kind == "f":
        elements = st.floats(width=dtype.itemsize * 8, allow_nan=True, allow_infinity=True,
                             allow_subnormal=True)
        x = draw(hnp.arrays(dtype, shape, elements=elements))
        if x.size and draw(st.booleans()):  # raw bits: NaN payloads of both signs and friends
            raw = draw(hnp.arrays(UINT_BY_ITEMSIZE[dtype.itemsize], x.size))
            where = draw(hnp.arrays(np.bool_, x.size))
            x = x.reshape(-1).copy()
            x.view(UINT_BY_ITEMSIZE[dtype.itemsize])[where] = raw[where]
            x = x.reshape(shape)
        return x
    return draw(hnp.arrays(dtype, shape))


row_shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=40)


def oracle_sort_rows(x, descending):
    if x.shape[-1] == 0:
        return x.copy(), np.zeros(x.shape, np.int64)
    perm = reference_sort_rows(flush_subnormals(x), descending)[1]
    return np.take_along_axis(x, perm, axis=-1), perm


# --- kernels ---------------------------------------------------------------------------------

@PROPS
@given(x=keys(row_shapes), descending=st.booleans())
def test_segmented_sort_rows_equal_oracle(x, descending):
    x_copy = x.copy()
    values, perm = segmented_sort(x, descending=descending)
    assert_same_bits(x, x_copy)
    ref_values, ref_perm = oracle_sort_rows(x_copy, descending)
    assert perm.dtype == np.int32
    np.testing.assert_array_equal(perm, ref_perm)
    assert_same_bits(values, ref_values)


@st.composite
def ragged(draw):
    lengths = draw(st.lists(st.sampled_from([0, 0, 1, 2, 3, 5, 17, 33]), max_size=8))
    trailing = draw(st.integers(0, 4))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    x = draw(keys(st.just((int(offsets[-1]) + trailing,))))
    offsets = offsets.astype(draw(st.sampled_from([np.int32, np.int64])))
    return x, offsets


@PROPS
@given(data=ragged(), descending=st.booleans())
def test_segmented_sort_ragged_equals_oracle(data, descending):
    x, offsets = data
    x_copy = x.copy()
    values, perm = segmented_sort(x, offsets, descending=descending)
    assert_same_bits(x, x_copy)
    offsets64 = offsets.astype(np.int64)
    ref_perm = reference_segmented_sort(flush_subnormals(x_copy), offsets64, descending)[1]
    np.testing.assert_array_equal(perm, ref_perm)
    starts = np.repeat(offsets64[:-1], np.diff(offsets64))
    end = int(offsets64[-1])
    ref_values = x_copy.copy()
    ref_values[:end] = x_copy[starts + ref_perm[:end]]
    assert_same_bits(values, ref_values)


@PROPS
@given(x=keys(row_shapes), data=st.data())
def test_top_k_kernel_equals_lax_top_k(x, data):
    n = x.shape[-1]
    k = data.draw(st.integers(0, n))
    x_copy = x.copy()
    values, indices = top_k(x, k)
    assert_same_bits(x, x_copy)
    assert indices.dtype == np.int32 and indices.shape == x.shape[:-1] + (k,)
    assert_same_bits(values, np.take_along_axis(x_copy, indices.astype(np.int64), axis=-1))
    if n and k:
        ref_values, ref_indices = jax.lax.top_k(x_copy, k)
        np.testing.assert_array_equal(indices, ref_indices)
        assert_same_bits(values, ref_values)


@PROPS
@given(x=keys(hnp.array_shapes(min_dims=1, max_dims=1, max_side=40), dtypes=[np.float32]),
       data=st.data())
def test_top_k_kernel_equals_oracle_without_payloads(x, data):
    x = np.where(np.isnan(x), np.copysign(np.float32(np.nan), x), x)  # canonical NaNs
    k = data.draw(st.integers(0, x.shape[0]))
    values, indices = top_k(x, k)
    ref_values, ref_indices = reference_top_k(x, k)
    np.testing.assert_array_equal(indices, ref_indices)
    assert_same_bits(values, ref_values)


@PROPS
@given(perm=st.integers(0, 50).flatmap(lambda n: st.permutations(list(range(n)))),
       dtype=st.sampled_from([np.int32, np.int64, np.uint32]))
def test_inverse_permutation_is_an_involution(perm, dtype):
    p = np.array(perm, dtype=dtype)
    inv = inverse_permutation(p)
    assert inv.dtype == np.int32
    np.testing.assert_array_equal(p[inv], np.arange(len(perm)))
    np.testing.assert_array_equal(inv[p.astype(np.int64)], np.arange(len(perm)))
    np.testing.assert_array_equal(inverse_permutation(inv), p)


@PROPS
@given(data=st.data())
def test_scatter_inverts_gather(data):
    n = data.draw(st.integers(0, 40))
    batch = data.draw(st.sampled_from([(), (2,), (2, 3)]))
    x = data.draw(keys(st.just(batch + (n,))))
    perms = [data.draw(st.permutations(list(range(n)))) for _ in range(int(np.prod(batch)))]
    perm = np.array(perms, dtype=np.int32).reshape(batch + (n,))
    gathered = np.take_along_axis(x, perm.astype(np.int64), axis=-1)
    assert_same_bits(permutation_scatter(gathered, perm, n), x)
    # partial rows (top-k style): m of the n positions, the rest zeros
    m = data.draw(st.integers(0, n))
    out = permutation_scatter(gathered[..., :m], perm[..., :m], n)
    expected = np.zeros_like(x)
    np.put_along_axis(expected, perm[..., :m].astype(np.int64), gathered[..., :m], axis=-1)
    assert_same_bits(out, expected)


# --- JAX ops ---------------------------------------------------------------------------------

jax_shapes = st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2, 5, 33]))


@JAX_PROPS
@given(x=keys(jax_shapes, dtypes=FLOATS + [np.int32, np.uint8]), descending=st.booleans(),
       mode=st.sampled_from(["buffer", "pure"]))
def test_jax_sort_argsort_equal_jnp(x, descending, mode):
    with sortgrad.callback_mode(mode):
        got = jax.jit(lambda x: (sortgrad.sort(x, descending=descending),
                                 sortgrad.argsort(x, descending=descending)))(x)
    assert_same_bits(got[0], jnp.sort(x, descending=descending))
    assert np.asarray(got[1]).dtype == np.int32
    np.testing.assert_array_equal(got[1], jnp.argsort(x, stable=True, descending=descending))


@JAX_PROPS
@given(x=keys(jax_shapes, dtypes=FLOATS + [np.int8]), data=st.data())
def test_jax_top_k_equals_lax(x, data):
    k = data.draw(st.integers(0, x.shape[-1]))
    values, indices = sortgrad.top_k(x, k)
    assert np.asarray(indices).dtype == np.int32
    ref_values, ref_indices = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(indices, ref_indices)
    assert_same_bits(values, ref_values)


@JAX_PROPS
@given(x=keys(jax_shapes, dtypes=[np.float32, np.float64]), data=st.data())
def test_jax_grads_equal_jax(x, data):
    k = data.draw(st.integers(0, x.shape[-1]))
    # No subnormal cotangents: XLA:CPU flushes them to zero in JAX's own scatter-based
    # gradient, while sortgrad moves the cotangent's bits unchanged.
    w = data.draw(hnp.arrays(x.dtype, x.shape,
                             elements=st.floats(-4, 4, width=32, allow_subnormal=False)))
    wk = w[..., :k]

    def losses(sort, topk):
        return lambda x: (jax.grad(lambda x: jnp.sum(w * sort(x)))(x),
                          jax.grad(lambda x: jnp.sum(w * sort(x, descending=True)))(x),
                          jax.grad(lambda x: jnp.sum(wk * topk(x, k)[0]))(x))
    got = jax.jit(losses(sortgrad.sort, sortgrad.top_k))(x)
    ref = jax.jit(losses(jnp.sort, jax.lax.top_k))(x)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@JAX_PROPS
@given(x=keys(st.just((3, 2, 7)), dtypes=[np.float32, np.int32]))
def test_jax_vmap_equals_batched_call(x):
    def ops(x):
        return [sortgrad.sort(x), sortgrad.argsort(x, descending=True), *sortgrad.top_k(x, 3)]
    batched = ops(x)
    for a, b in zip(jax.vmap(jax.vmap(ops))(x), batched):
        assert_same_bits(a, b)
