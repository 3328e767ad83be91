"""Segmented sort on every backend (the `backend` fixture, tests/_backends.py): `sort_rows` and
`sort_segments` against the oracles of `sortgrad.testing` and, on the device backends, the CPU
backend -- values bit for bit (raw bits: -0.0, NaN signs and payloads, subnormals), permutations
exactly.

Cases come in three tiers (`over_backends`): small rows run everywhere, the simulator included
(with its lowered constants they take the multi-tile and merge paths); rows around the default
tile (2048), past 4096 and ragged layouts of thousands run on every backend but the simulator;
the longest only on real devices. Backend-specific checks (row batches of the CuPy launches,
the public API with device arrays, argument errors) select their backends explicitly.

`sort_rows(..., reverse=True)` (each sorted row read backwards, `jnp.sort(descending=True)`:
equal keys in decreasing column order) is checked the same way, against two oracle routes
that agree with each other (the ascending oracle read backwards; the stable sort of the
other direction on the reversed row, columns mapped back) and, where JAX keeps the dtype,
`jnp.sort(descending=True)` / `jnp.argsort(stable=True)` read backwards.
"""

from __future__ import annotations

import functools
import inspect

import jax.numpy as jnp
import numpy as np
import pytest
from _backends import CUPY, DEVICE, PUBLIC, PUBLIC_DEVICE, cpu_result, on_host, over_backends, seed

from sortgrad import kernels
from sortgrad.kernels._cuda import cupy_loader
from sortgrad.testing import (
    PAYLOAD_NANS,
    SIZES,
    assert_same_bits,
    make_keys,
    reference_argsort,
    reference_segmented_sort,
    reference_sort_rows,
)

OP = "segmented_sort"
FLOATS = ("float16", "float32", "float64")
OTHER_DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                "uint64")


def keys(rng, shape, dtype, pattern):
    """Sort keys; "special": signed zeros, NaNs of both signs and with payloads, infinities,
    extremes, subnormals of both signs, with heavy ties."""
    return make_keys(rng, shape, dtype, pattern, payloads=True, more_subnormals=True)


def _check_sort(backend, x, descending, values, perm, want_values, want_perm):
    assert perm.dtype == np.int32
    assert_same_bits(values, want_values, "values vs oracle")
    np.testing.assert_array_equal(perm, want_perm, err_msg="perm vs oracle")
    if backend.device:
        cpu_values, cpu_perm = cpu_result(OP, "sort_rows", x, descending)
        assert_same_bits(values, cpu_values, "values vs CPU backend")
        np.testing.assert_array_equal(perm, cpu_perm, err_msg="perm vs CPU backend")


# --- sort_rows --------------------------------------------------------------------------------

# The simulator's shapes: one tile, a partial tile, several tiles and merge passes of the
# lowered 16-element tile; 32- and 64-bit floats take every shape, the other key kinds and
# widths one short row, one past a warp and one with merge passes.
SIM_SHAPES = [(1, 0), (0, 5), (1, 1), (3, 5), (2, 31), (1, 32), (1, 33), (2, 70)]
SORT_SIM = ([(d, rows, n, "special") for d in ("float32", "float64") for rows, n in SIM_SHAPES]
            + [(d, rows, n, "special") for d in ("float16", "int32", "uint64", "int8", "bool")
               for rows, n in [(3, 5), (1, 33), (2, 70)]]
            + [("float32", 3, 37, "special")])
# Every edge size with every pattern (float32), the other floats and key dtypes around the
# tile sizes, batch shapes with empty dims and many short rows.
SORT_EMU = ([("float32", 1 if n >= 4097 else 3, n, p) for n in SIZES
             for p in ("random", "ties", "special")]
            + [(d, 1 if n >= 4097 else 3, n, "special") for d in ("float16", "float64")
               for n in (33, 1025, 4097)]
            + [(d, 3, n, "random") for d in OTHER_DTYPES for n in (33, 2049)]
            + [(d, 3, 300, "special") for d in ("int8", "uint64", "int64")]
            + [("float32", rows, n, "ties") for rows, n in [(0, 5), (4, 0), (0, 0), (300, 3),
                                                           (9, 100)]])
SORT_GPU = [(d, rows, n, "special") for d in ("float32", "float64")
            for rows, n in [(3, 2047), (2, 2049), (1, 9000), (300, 129), (1, 40000)]]


@functools.cache
def _sort_case(dtype, rows, n, pattern, descending):
    x = keys(np.random.default_rng(seed("sort", dtype, rows, n, pattern)), (rows, n), dtype,
             pattern)
    return (x, *reference_sort_rows(x, descending))


@over_backends("dtype,rows,n,pattern", simulator=SORT_SIM, emulator=SORT_EMU, gpu=SORT_GPU)
@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
def test_sort_rows(backend, dtype, rows, n, pattern, descending):
    x, want_values, want_perm = _sort_case(dtype, rows, n, pattern, descending)
    values, perm = backend.call(OP, "sort_rows", x, descending)
    _check_sort(backend, x, descending, values, perm, want_values, want_perm)


def test_sort_distinct_values_and_all_ties(backend):
    rng = np.random.default_rng(3)
    x = np.stack([rng.permutation(40).astype(np.float64), np.zeros(40), -np.zeros(40)])
    x[2, ::3] = 0.0  # -0.0 and +0.0 interleaved: equal, original order kept
    values, perm = backend.call(OP, "sort_rows", x, False)
    np.testing.assert_array_equal(perm[0], np.argsort(x[0]))
    np.testing.assert_array_equal(perm[1:], np.tile(np.arange(40), (2, 1)))
    assert_same_bits(values[2], x[2])
    _check_sort(backend, x, False, values, perm, *reference_sort_rows(x, False))


# --- sort_rows(reverse=True) --------------------------------------------------------------------

# Every key dtype of the device modules (their DTYPES; no bfloat16 there).
DEVICE_DTYPES = FLOATS + OTHER_DTYPES
REVERSE_SIZES = (1, 31, 32, 33, 1023, 1025, 4097)
# The simulator (lowered 16-element tiles): one element, around a warp (one tile, a partial
# tile, merge passes), empty shapes; every key dtype at one short row and one with merges.
REVERSE_SIM = ([(d, rows, n, "special") for d in ("float32", "float64")
                for rows, n in [(1, 1), (2, 31), (1, 32), (2, 33), (3, 5), (1, 0), (0, 5),
                                (2, 70)]]
               + [("float32", 2, 33, "ties"), ("float16", 2, 33, "special"),
                  ("float16", 1, 70, "special")]
               + [(d, 2, n, "ties") for d in OTHER_DTYPES for n in (5, 33)])
REVERSE_EMU = ([("float32", 1 if n >= 4097 else 3, n, p) for n in REVERSE_SIZES
                for p in ("random", "ties", "special")]
               + [(d, 1 if n >= 4097 else 3, n, p) for d in ("float16", "float64")
                  for n in REVERSE_SIZES for p in ("ties", "special")]
               + [(d, 2, n, p) for d in OTHER_DTYPES for n in (33, 1025, 4097)
                  for p in ("random", "ties")]
               + [("float32", rows, n, "ties") for rows, n in [(4, 0), (300, 3), (9, 100)]])
REVERSE_GPU = ([(d, rows, n, "special") for d in ("float32", "float64")
                for rows, n in [(3, 2047), (2, 2049), (1, 9000), (300, 129), (1, 40000)]]
               + [("float32", rows, n, "ties") for rows, n in [(2, 2049), (1, 40000)]])


def reference_reverse(x, descending=False):
    """(values, perm) of `sort_rows(x, descending, reverse=True)` by two oracle routes, checked
    against each other: the stable sort read backwards, and the stable sort of the other
    direction on the reversed row (ties lower index first there, i.e. higher index here) with
    columns j -> n - 1 - j."""
    n = x.shape[-1]
    perm = reference_sort_rows(x, descending)[1]
    backwards = perm[..., ::-1]
    other = np.zeros(x.shape, np.int64)
    for index in np.ndindex(x.shape[:-1]):
        other[index] = n - 1 - reference_argsort(x[index][::-1], not descending)
    np.testing.assert_array_equal(backwards, other, err_msg="the two reverse oracles")
    return np.take_along_axis(x, backwards, axis=-1), backwards


def check_against_jnp(x, values, perm):
    """reverse=True with descending=False is jnp.sort(descending=True) (values, bit for bit)
    and jnp.argsort(stable=True) read backwards (perm) -- where JAX keeps the dtype (x32 mode
    narrows 64-bit types). Not jnp.argsort(descending=True): that keeps ties in order."""
    if x.size == 0 or jnp.asarray(x[..., :1]).dtype != x.dtype:
        return
    assert_same_bits(values, np.asarray(jnp.sort(x, axis=-1, descending=True)),
                     "values vs jnp.sort(descending=True)")
    np.testing.assert_array_equal(perm, np.asarray(jnp.argsort(x, axis=-1, stable=True))[
        ..., ::-1], err_msg="perm vs jnp.argsort(stable=True) reversed")


def _check_reverse(backend, x, descending, values, perm, want_values, want_perm):
    assert perm.dtype == np.int32 and values.dtype == x.dtype
    assert values.shape == perm.shape == x.shape
    assert_same_bits(values, want_values, "values vs oracle")
    np.testing.assert_array_equal(perm, want_perm, err_msg="perm vs oracle")
    if backend.device:
        cpu_values, cpu_perm = cpu_result(OP, "sort_rows", x, descending, reverse=True)
        assert_same_bits(values, cpu_values, "values vs CPU backend")
        np.testing.assert_array_equal(perm, cpu_perm, err_msg="perm vs CPU backend")


@functools.cache
def _reverse_case(dtype, rows, n, pattern, descending):
    x = keys(np.random.default_rng(seed("reverse", dtype, rows, n, pattern)), (rows, n), dtype,
             pattern)
    return (x, *reference_reverse(x, descending))


@over_backends("dtype,rows,n,pattern", simulator=REVERSE_SIM, emulator=REVERSE_EMU,
               gpu=REVERSE_GPU)
@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
def test_sort_rows_reverse(backend, dtype, rows, n, pattern, descending):
    x, want_values, want_perm = _reverse_case(dtype, rows, n, pattern, descending)
    values, perm = backend.call(OP, "sort_rows", x, descending, reverse=True)
    _check_reverse(backend, x, descending, values, perm, want_values, want_perm)
    if not descending:
        check_against_jnp(x, values, perm)


def _tie_rows(dtype, n):
    """Rows of keys that are all equal in sort order: +0.0 / -0.0 interleaved; (floats) NaNs
    of both signs, with and without payloads; (float32/64) subnormals among zeros."""
    dtype = np.dtype(dtype)
    zeros = np.zeros(n, dtype)
    if dtype.kind != "f":
        return zeros[None]
    zeros[::3] = -0.0
    ubits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[dtype.itemsize]
    pos, neg = PAYLOAD_NANS[dtype.name]
    pool = np.array([pos, neg, np.array(np.nan, dtype).view(ubits),
                     np.array(-np.nan, dtype).view(ubits)], ubits)
    nans = pool[np.arange(n) % 4].view(dtype)
    rows = [zeros, nans]
    if dtype != np.float16:  # float16 subnormals do not tie with zero (as on XLA:CPU)
        tiny = np.zeros(n, dtype)
        tiny[1::2] = np.finfo(dtype).smallest_subnormal
        tiny[2::4] = -np.finfo(dtype).smallest_subnormal
        rows.append(tiny)
    return np.stack(rows)


@over_backends("dtype,n", simulator=[(d, n) for d in ("float32", "float64", "float16", "int8")
                                     for n in (1, 31, 33, 40)],
               emulator=[(d, n) for d in DEVICE_DTYPES for n in (1025, 4097)])
@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
def test_reverse_puts_ties_in_decreasing_column_order(backend, dtype, n, descending):
    """All-tie rows (signed zeros, NaN payloads, subnormals): perm is n-1, ..., 0 and the values
    are the row read backwards, bit for bit; descending=True without reverse keeps 0, ..., n-1."""
    x = _tie_rows(dtype, n)
    values, perm = backend.call(OP, "sort_rows", x, descending, reverse=True)
    np.testing.assert_array_equal(perm, np.tile(np.arange(n)[::-1], (x.shape[0], 1)))
    assert_same_bits(values, x[:, ::-1])
    _check_reverse(backend, x, descending, values, perm, *reference_reverse(x, descending))
    _, forward = backend.call(OP, "sort_rows", x, descending)
    np.testing.assert_array_equal(forward, np.tile(np.arange(n), (x.shape[0], 1)))


# --- sort_segments ----------------------------------------------------------------------------

def _lengths(lengths, tail=7):
    """CSR offsets of segments of these lengths, and the array size (a tail past the last
    offset is copied through with perm 0)."""
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    return offsets, int(offsets[-1]) + tail


def _explicit(offsets, size=200):
    return np.array(offsets, np.int64), size


LAYOUTS = {
    # around the simulator's lowered tile (16): empty, 1, 2, long, tail
    "short_mixed": _explicit([0, 0, 1, 3, 40, 41, 41, 45, 150, 190]),
    "one_long_among_tiny": _explicit([0, 2, 3, 5, 6, 90, 92, 93, 95, 200]),
    "all_empty": _explicit([0, 0, 0]),
    "no_segments": _explicit([0]),
    "whole": _explicit([0, 200]),
    "exact_tiles": _explicit([0, 16, 48, 112]),
    "empty_array": _explicit([0], size=0),
    # around the default tiles and the length bins
    "mixed": _lengths([0, 1, 31, 32, 33, 0, 1023, 1025, 5, 2049, 4097, 2]),
    "empty": _lengths([0, 0, 0]),
    "none": _lengths([]),
    "long": _lengths([6000, 2100, 9000]),
    "many_short": _lengths([3, 8, 9, 16, 17, 1, 0, 2, 250, 256, 257] * 5),
}
SEGMENT_SIM = ([(layout, "float32", "special") for layout in
                ("short_mixed", "one_long_among_tiny", "all_empty", "no_segments", "whole",
                 "exact_tiles", "empty_array")]
               + [("short_mixed", "float16", "special"), ("short_mixed", "int64", "special"),
                  ("one_long_among_tiny", "float64", "special"),
                  ("exact_tiles", "uint64", "special")])
SEGMENT_EMU = [(layout, dtype, pattern)
               for layout in ("empty", "long", "many_short", "mixed", "none")
               for dtype, pattern in [("float32", "special"), ("float32", "ties"),
                                      ("int64", "random"), ("float16", "special")]]


@functools.cache
def _segment_case(layout, dtype, pattern, descending):
    offsets, size = LAYOUTS[layout]
    rng = np.random.default_rng(seed("ragged", layout, dtype, pattern))
    x = keys(rng, (size,), dtype, pattern)
    return (x, offsets, *reference_segmented_sort(x, offsets, descending))


@over_backends("layout,dtype,pattern", simulator=SEGMENT_SIM, emulator=SEGMENT_EMU)
@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
def test_sort_segments(backend, layout, dtype, pattern, descending):
    x, offsets, want_values, want_perm = _segment_case(layout, dtype, pattern, descending)
    values, perm = backend.call(OP, "sort_segments", x, on_host(offsets), descending)
    assert values.shape == perm.shape == x.shape and perm.dtype == np.int32
    assert_same_bits(values, want_values, "values vs oracle")
    np.testing.assert_array_equal(perm, want_perm, err_msg="perm vs oracle")
    if backend.device:
        cpu_values, cpu_perm = cpu_result(OP, "sort_segments", x, offsets, descending)
        assert_same_bits(values, cpu_values, "values vs CPU backend")
        np.testing.assert_array_equal(perm, cpu_perm)


# --- out= (the row-function protocol) -----------------------------------------------------------

@over_backends("shape", simulator=[(1, 0), (3, 5), (2, 70)], emulator=[(3, 33), (2, 0), (1, 4097)])
@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_out_sort_rows(backend, shape, descending, reverse):
    x = keys(np.random.default_rng(seed("out-sort", shape)), shape, "float32", "special")
    values, perm = backend.check_out(OP, "sort_rows", x, descending, reverse=reverse)
    if reverse:
        _check_reverse(backend, x, descending, values, perm, *reference_reverse(x, descending))


@over_backends("dtype,shape", simulator=[("float64", (2, 33)), ("int16", (3, 5))],
               emulator=[(d, (2, 1025)) for d in DEVICE_DTYPES])
def test_out_sort_rows_reverse_dtypes(backend, dtype, shape):
    x = keys(np.random.default_rng(seed("out-reverse", dtype, shape)), shape, dtype, "special")
    values, perm = backend.check_out(OP, "sort_rows", x, False, reverse=True)
    _check_reverse(backend, x, False, values, perm, *reference_reverse(x, False))


@over_backends("layout,dtype,descending",
               simulator=[("short_mixed", "float16", True), ("empty_array", "float32", False)],
               emulator=[("mixed", "float16", True), ("none", "float16", True)])
def test_out_sort_segments(backend, layout, dtype, descending):
    offsets, size = LAYOUTS[layout]
    x = keys(np.random.default_rng(seed("out-ragged", layout)), (size,), dtype, "special")
    backend.check_out(OP, "sort_segments", x, on_host(offsets), descending)


def test_row_functions_take_out_and_stream_by_keyword(backend):
    module = backend.module(OP)
    for fn in (module.sort_rows, module.sort_segments):
        params = inspect.signature(fn).parameters
        for name in ("out", "stream") if backend.device else ("out",):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (fn.__name__, name)
            assert params[name].default is None
    reverse = inspect.signature(module.sort_rows).parameters["reverse"]
    assert reverse.kind is inspect.Parameter.KEYWORD_ONLY and reverse.default is False


# --- streams ----------------------------------------------------------------------------------

@over_backends("rows,n", simulator=[(2, 9)], gpu=[(64, 5000)], backends=DEVICE)
def test_sort_on_streams(backend, rows, n):
    """The row functions launch on the given stream (CuPy: a Stream and its raw handle)."""
    x = keys(np.random.default_rng(seed("stream", n)), (rows, n), "float32", "random")
    for stream in backend.streams():
        values, perm = backend.call(OP, "sort_rows", x, False, stream=stream)
        _check_sort(backend, x, False, values, perm, *cpu_result(OP, "sort_rows", x, False))
    ties = keys(np.random.default_rng(seed("stream-reverse", n)), (rows, n), "float32", "ties")
    for stream in backend.streams():
        for descending in (False, True):
            values, perm = backend.call(OP, "sort_rows", ties, descending, reverse=True,
                                        stream=stream)
            _check_reverse(backend, ties, descending, values, perm,
                           *reference_reverse(ties, descending))
    offsets = np.array([0, 1, n, rows * n - 1], np.int64)
    for stream in backend.streams():
        values, perm = backend.call(OP, "sort_segments", x.reshape(-1), on_host(offsets), True,
                                    stream=stream)
        want_values, want_perm = reference_segmented_sort(x.reshape(-1), offsets, True)
        assert_same_bits(values, want_values)
        np.testing.assert_array_equal(perm, want_perm)


# --- backend-specific: launch batches of the CuPy kernels ----------------------------------------

@over_backends("n", simulator=[5, 3000], backends=CUPY)
def test_row_batches(backend, n, monkeypatch):
    """Launches of at most MAX_ROWS_PER_LAUNCH rows (int32 row numbers in the kernels)."""
    monkeypatch.setattr(cupy_loader, "MAX_ROWS_PER_LAUNCH", 4)
    x = keys(np.random.default_rng(seed("batches", n)), (11, n), "float32", "ties")
    values, perm = backend.call(OP, "sort_rows", x, True)
    _check_sort(backend, x, True, values, perm, *reference_sort_rows(x, True))
    values, perm = backend.call(OP, "sort_rows", x, False, reverse=True)
    _check_reverse(backend, x, False, values, perm, *reference_reverse(x, False))


# --- the public API with backend arrays ----------------------------------------------------------

@over_backends("n", simulator=[20], emulator=[1025], backends=PUBLIC)
def test_public_api(backend, n):
    """Backend arrays in, backend arrays out, batch shapes and ragged segments with host and
    device offsets (the backend named or followed)."""
    x = keys(np.random.default_rng(seed("public", n)), (2, 3, n), "float32", "special")
    values, perm = kernels.segmented_sort(backend.to_backend(x), descending=True,
                                          backend=backend.kind)
    assert backend.is_native(values) and backend.is_native(perm)
    assert values.shape == perm.shape == x.shape
    want_values, want_perm = reference_sort_rows(x, True)
    assert_same_bits(backend.to_host(values), want_values)
    np.testing.assert_array_equal(backend.to_host(perm), want_perm)

    flat = x.reshape(-1)
    offsets = np.array([0, 7, 7, 30, 55] if n < 100 else [0, 3, 3, 700, 2900], np.int64)
    want_values, want_perm = reference_segmented_sort(flat, offsets)
    for offs in (offsets, backend.to_backend(offsets)):
        values, perm = kernels.segmented_sort(backend.to_backend(flat), offs)  # followed
        assert backend.is_native(values)
        assert_same_bits(backend.to_host(values), want_values)
        np.testing.assert_array_equal(backend.to_host(perm), want_perm)


@over_backends("n", simulator=[20], emulator=[1025], backends=PUBLIC)
def test_public_api_reverse(backend, n):
    """segmented_sort(reverse=True) on every backend, batch shapes, out= and streams; offsets
    with reverse are refused."""
    x = keys(np.random.default_rng(seed("public-reverse", n)), (2, 3, n), "float32", "special")
    want_values, want_perm = reference_reverse(x)
    values, perm = kernels.segmented_sort(backend.to_backend(x), reverse=True,
                                          backend=backend.kind)
    assert backend.is_native(values) and backend.is_native(perm)
    assert values.shape == perm.shape == x.shape
    assert_same_bits(backend.to_host(values), want_values)
    np.testing.assert_array_equal(backend.to_host(perm), want_perm)
    for stream in backend.streams():
        out = (backend.empty(x.shape, x.dtype), backend.empty(x.shape, np.int32))
        got = kernels.segmented_sort(backend.to_backend(x), reverse=True, out=out,
                                     backend=backend.kind, stream=stream)
        backend.synchronize(stream)
        assert got[0] is out[0] and got[1] is out[1]
        assert_same_bits(backend.to_host(out[0]), want_values)
        np.testing.assert_array_equal(backend.to_host(out[1]), want_perm)
    with pytest.raises(ValueError, match="reverse"):
        kernels.segmented_sort(backend.to_backend(x.reshape(-1)), np.array([0, 3], np.int64),
                               reverse=True, backend=backend.kind)


@over_backends("n", simulator=[9], backends=PUBLIC_DEVICE)
def test_public_api_with_an_explicit_stream(backend, n):
    x = keys(np.random.default_rng(2), (2, n), "float64", "special")
    for stream in backend.streams():
        values, perm = kernels.segmented_sort(backend.to_backend(x), backend=backend.kind,
                                              stream=stream)
        backend.synchronize(stream)
        np.testing.assert_array_equal(backend.to_host(perm), reference_sort_rows(x)[1])
        assert_same_bits(backend.to_host(values), reference_sort_rows(x)[0])


@over_backends("n", simulator=[4], backends=PUBLIC_DEVICE)
def test_argument_errors(backend, n):
    with pytest.raises(TypeError, match="host array"):
        kernels.segmented_sort(np.arange(float(n)), backend=backend.kind)
    with pytest.raises(TypeError, match="complex64"):
        kernels.segmented_sort(backend.to_backend(np.zeros(n, np.complex64)),
                               backend=backend.kind)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.segmented_sort(backend.to_backend(np.zeros((n, 3), np.float32)).T,
                               backend=backend.kind)
