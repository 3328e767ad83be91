"""NaN payloads on every backend (the `backend` fixture): sort, argsort and top-k of rows full of
NaNs of both signs with different payloads (quiet and signalling), mixed with +-inf, +-0.0 and
ties, against JAX on XLA:CPU directly (`jnp.sort`, `jnp.argsort(stable=True)`, `lax.top_k`),
bit for bit, and against the oracles of `sortgrad.testing`.

What XLA:CPU does (jax 0.10):
- jnp.sort / jnp.argsort: every NaN (any sign, any payload) ties with every other, above +inf.
- lax.top_k: IEEE totalOrder, NaNs of one sign ordered by their payload bits (float16/32/64);
  bfloat16 is compared after a float32 round trip that makes each NaN the quiet NaN of its sign,
  so there the NaNs of one sign tie (lower index first).
- Values keep their bits (float16/32/64); bfloat16 NaNs come back as 0x7FC0 | sign in rows of
  more than one element (a one-element row is not sorted: its bits are kept).
bfloat16 runs on the CPU only (the device kernels take no bfloat16: the JAX binding sorts its
float32 upcast there, see tests/bindings/test_hard_ops.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers np.dtype("bfloat16"))
import numpy as np
import pytest
from _backends import on_host, over_backends, seed

from sortgrad import kernels
from sortgrad.testing import (assert_same_bits, reference_argsort, reference_segmented_sort,
                              reference_sort_rows, reference_top_k)

FLOATS = ("float16", "bfloat16", "float32", "float64")
_LAYOUT = {"float16": (10, 5), "bfloat16": (8, 7), "float32": (8, 23), "float64": (11, 52)}


def nan_pool(dtype) -> np.ndarray:
    """Raw bits: NaNs of both signs (the canonical quiet NaN, quiet NaNs with payloads low and
    high, all mantissa bits set, signalling NaNs), +-inf, +-0.0, +-1.0, 2.0, +-max."""
    dtype = np.dtype(dtype)
    exp_bits, man_bits = _LAYOUT[dtype.name]
    width = 1 + exp_bits + man_bits
    sign = 1 << (width - 1)
    inf = ((1 << exp_bits) - 1) << man_bits
    quiet = 1 << (man_bits - 1)
    payloads = [quiet, quiet | 1, quiet | 3, (1 << man_bits) - 1, 1, quiet >> 1, 5]
    one = np.array(1.0, dtype).reshape(1).view(f"u{width // 8}")[0].item()
    two = np.array(2.0, dtype).reshape(1).view(f"u{width // 8}")[0].item()
    big = inf - 1
    pool = [inf | p for p in payloads] + [0, inf, one, two, big]
    pool += [v | sign for v in pool] + [inf | quiet] * 4  # extra ties of the default NaN
    return np.array(pool, dtype=f"u{width // 8}")


def nan_rows(dtype, rows, n, tag="") -> np.ndarray:
    pool = nan_pool(dtype)
    rng = np.random.default_rng(seed("nan-payloads", dtype, rows, n, tag))
    return rng.choice(pool, size=(rows, n)).view(np.dtype(dtype))


def _float_case(spec, dtype, *rest):
    return dtype != "bfloat16" or spec.kind == "cpu"


SIM = [(d, n) for d in FLOATS for n in (1, 31, 32, 33)]
EMU = [(d, n) for d in FLOATS for n in (1023, 1025)]


def _ubits(a):
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def jnp_results(x):
    """What JAX gives on XLA:CPU for every row function below."""
    jx = jnp.asarray(x)
    return {"sort": np.asarray(jnp.sort(jx, axis=-1)),
            "perm": np.asarray(jnp.argsort(jx, axis=-1, stable=True)),
            "sort_desc": np.asarray(jnp.sort(jx, axis=-1, descending=True)),
            "perm_desc": np.asarray(jnp.argsort(jx, axis=-1, stable=True, descending=True))}


def test_the_pool_holds_nans_jax_tells_apart():
    """The data is what the module claims: payloads of both signs that lax.top_k orders apart
    (float32), and XLA:CPU's canonical bfloat16 NaNs."""
    x = nan_rows("float32", 1, 200)
    nans = np.unique(_ubits(x)[np.isnan(x)])
    assert len(nans) >= 12 and (nans >> 31).min() == 0 and (nans >> 31).max() == 1
    v, _ = jax.lax.top_k(jnp.asarray(x), 200)
    assert len(np.unique(_ubits(v)[np.isnan(np.asarray(v))])) == len(nans)
    b = nan_rows("bfloat16", 1, 200)
    vb = np.asarray(jnp.sort(jnp.asarray(b)))
    assert set(_ubits(vb)[np.isnan(vb.astype(np.float32))].tolist()) == {0x7FC0, 0xFFC0}


@over_backends("dtype,n", simulator=SIM, emulator=EMU, where=_float_case)
def test_sort_rows_match_jnp(backend, dtype, n):
    x = nan_rows(dtype, 3, n)
    ref = jnp_results(x)
    values, perm = backend.call("segmented_sort", "sort_rows", x, False)
    np.testing.assert_array_equal(perm, ref["perm"], err_msg="perm vs jnp.argsort")
    assert_same_bits(values, ref["sort"], "values vs jnp.sort")
    want_values, want_perm = reference_sort_rows(x)
    np.testing.assert_array_equal(perm, want_perm, err_msg="perm vs oracle")
    assert_same_bits(values, want_values, "values vs oracle")
    # reverse: jnp.sort(descending=True), the ascending sort read backwards
    values, perm = backend.call("segmented_sort", "sort_rows", x, False, reverse=True)
    assert_same_bits(values, ref["sort_desc"], "reverse values vs jnp.sort(descending=True)")
    np.testing.assert_array_equal(perm, ref["perm"][:, ::-1], err_msg="reverse perm")
    # descending: the stable descending sort, jnp.argsort(stable=True, descending=True)
    values, perm = backend.call("segmented_sort", "sort_rows", x, True)
    np.testing.assert_array_equal(perm, ref["perm_desc"], err_msg="perm vs jnp.argsort desc")
    want_values, want_perm = reference_sort_rows(x, descending=True)
    np.testing.assert_array_equal(perm, want_perm, err_msg="descending perm vs oracle")
    assert_same_bits(values, want_values, "descending values vs oracle")
    if n > 1:  # the descending values are the (canonical) values of jnp.sort's NaNs, reordered
        assert_same_bits(np.sort(_ubits(values), axis=-1), np.sort(_ubits(ref["sort"]), axis=-1))


@over_backends("dtype,n", simulator=SIM, emulator=EMU, where=_float_case)
def test_top_k_rows_match_lax(backend, dtype, n):
    x = nan_rows(dtype, 3, n)
    jx = jnp.asarray(x)
    for k in sorted({1, min(n, 5), n // 2, n} - {0}):
        ref_values, ref_indices = (np.asarray(a) for a in jax.lax.top_k(jx, k))
        values, indices = backend.call("top_k", "top_k_rows", x, k)
        np.testing.assert_array_equal(indices, ref_indices, err_msg=f"indices vs lax, k={k}")
        assert_same_bits(values, ref_values, f"values vs lax.top_k, k={k}")
        for r in range(x.shape[0]):
            want_values, want_indices = reference_top_k(x[r], k)
            np.testing.assert_array_equal(indices[r], want_indices, err_msg=f"oracle, k={k}")
            assert_same_bits(values[r], want_values, f"values vs oracle, k={k}")


@over_backends("dtype", simulator=FLOATS, where=_float_case)
@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
def test_sort_segments_match_oracle(backend, dtype, descending):
    """Segments of 0, 1, 2, 31 and 40 elements (and a tail): each sorts as a row of its own
    (bfloat16: canonical NaNs except in one-element segments and the tail)."""
    x = nan_rows(dtype, 1, 100, "segments")[0]
    offsets = np.array([0, 0, 1, 3, 34, 74, 75, 95], np.int64)
    values, perm = backend.call("segmented_sort", "sort_segments", x, on_host(offsets),
                                descending)
    want_values, want_perm = reference_segmented_sort(x, offsets, descending)
    np.testing.assert_array_equal(perm, want_perm)
    assert_same_bits(values, want_values)
    for a, b in zip(offsets[:-1], offsets[1:]):
        if b > a and not descending:
            assert_same_bits(values[a:b], np.asarray(jnp.sort(jnp.asarray(x[a:b]))))
            np.testing.assert_array_equal(perm[a:b], reference_argsort(x[a:b]))
    assert_same_bits(values[95:], x[95:])


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n", [1, 31, 32, 33, 1023, 1025])
def test_public_kernel_api_matches_jax(dtype, n):
    """sortgrad.kernels.segmented_sort / segmented_argsort / top_k (CPU) on batched input."""
    x = nan_rows(dtype, 6, n, "public").reshape(2, 3, n)
    ref = jnp_results(x)
    values, perm = kernels.segmented_sort(x)
    assert_same_bits(values, ref["sort"])
    np.testing.assert_array_equal(perm, ref["perm"])
    values, perm = kernels.segmented_sort(x, reverse=True)
    assert_same_bits(values, ref["sort_desc"])
    np.testing.assert_array_equal(kernels.segmented_argsort(x), ref["perm"])
    np.testing.assert_array_equal(kernels.segmented_argsort(x, descending=True), ref["perm_desc"])
    for k in sorted({1, n // 2, n}):
        ref_values, ref_indices = (np.asarray(a) for a in jax.lax.top_k(jnp.asarray(x), k))
        values, indices = kernels.top_k(x, k)
        assert_same_bits(values, ref_values, f"k={k}")
        np.testing.assert_array_equal(indices, ref_indices, err_msg=f"k={k}")
