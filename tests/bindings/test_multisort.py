"""sortgrad's multi-key sorts (bindings/jax/multisort.py) against JAX's own ops.

sort_multiple == jax.lax.sort(operands, num_keys=..., is_stable=True); lexsort ==
jnp.lexsort; complex_argsort == jnp.argsort(stable=True); complex_sort == jnp.sort. Values
are compared bit for bit (-0.0 vs 0.0, NaN signs and payloads), indices exactly (ours are
int32; jnp's are int64 under x64), gradients exactly against JAX's gradients of those ops and
with check_grads. The suite runs with x64 enabled (tests/conftest.py); test_x32_* run in JAX's
default x32 mode.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sortgrad
from sortgrad.bindings.jax.multisort import complex_argsort, complex_sort, lexsort, sort_multiple
from sortgrad.testing import assert_same_bits, dtype_id

SIZES = (0, 1, 31, 32, 33, 1023, 1025)
NAN, INF = math.nan, math.inf
NEG_NAN = -np.float64(NAN)  # a NaN with the sign bit set


@pytest.fixture(params=["buffer", "pure"])
def mode(request):
    with sortgrad.callback_mode(request.param):
        yield request.param


# --- data ------------------------------------------------------------------------------------

def tie_keys(rng, shape, dtype):
    """Heavy ties: bool at random; integers 0..2; floats 0..2 mixed with -0.0, NaNs of both
    signs (payload NaNs too, except bfloat16, whose lax.sort on CPU drops payloads) and
    +-inf. No subnormals (XLA:CPU flushes them when it sorts; see the complex test)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        return rng.integers(0, 3, size=shape).astype(dtype)
    pool = np.array([0.0, 1.0, 2.0, -0.0, NAN, NEG_NAN, INF, -INF, 1.0, 2.0], np.float64)
    out = rng.choice(pool, size=shape).astype(dtype)
    if dtype != jnp.bfloat16 and out.size >= 4:
        payload = {2: (0x7E01, 0xFE03), 4: (0x7FC00001, 0xFFC00003),
                   8: (0x7FF8000000000001, 0xFFF8000000000003)}[dtype.itemsize]
        flat = out.reshape(-1).view(f"u{dtype.itemsize}")
        where = rng.choice(flat.size, size=max(1, flat.size // 16), replace=False)
        flat[where] = np.where(rng.random(where.size) < 0.5, *payload).astype(flat.dtype)
    return out


def complex_keys(rng, shape, dtype, subnormals=False):
    """Complex values with many ties in the real part (and in both parts), NaNs (both signs)
    in the real and/or imaginary part, infs, signed zeros."""
    part = np.float32 if dtype == np.complex64 else np.float64
    pool = [0.0, -0.0, 1.0, -1.0, 2.5, NAN, NEG_NAN, INF, -INF]
    if subnormals:
        tiny = float(np.finfo(part).smallest_subnormal)
        pool += [tiny, -tiny, 3 * tiny]
    pool = np.array(pool, part)
    re = rng.choice(pool, size=shape)
    im = np.where(rng.random(shape) < 0.3, rng.standard_normal(shape).astype(part),
                  rng.choice(pool, size=shape))
    out = np.empty(shape, dtype)
    out.real, out.imag = re, im
    return out


def assert_same_indices(actual, expected, msg=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == np.int32, (msg, actual.dtype)
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    np.testing.assert_array_equal(actual, expected, err_msg=msg)


def assert_all_same_bits(actual, expected, msg=""):
    assert isinstance(actual, list) and len(actual) == len(expected), (msg, type(actual))
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert_same_bits(a, b, f"{msg} operand {i}")


def lax_reference(operands, num_keys, axis, descending):
    """jax.lax.sort; descending as jnp.argsort(descending=True) builds it: the stable sort of
    the reversed operands, reversed (the reverse order, full ties in original order)."""
    if not descending:
        return list(jax.lax.sort(operands, dimension=axis, num_keys=num_keys, is_stable=True))
    flipped = [jnp.flip(a, axis) for a in operands]
    out = jax.lax.sort(flipped, dimension=axis, num_keys=num_keys, is_stable=True)
    return [jnp.flip(a, axis) for a in out]


# --- sort_multiple vs lax.sort ---------------------------------------------------------------

KEY_DTYPES = [  # per case, the dtypes of the (up to) three keys
    (np.int32, np.float32, jnp.bfloat16),
    (np.float16, np.bool_, np.int32),
    (jnp.bfloat16, np.float64, np.float16),
    (np.bool_, np.int8, np.float32),
]
LAYOUTS = {  # name -> (shape for n, axis)
    "2d-last": (lambda n: (3, n), -1),
    "2d-first": (lambda n: (n, 2), 0),
    "3d-middle": (lambda n: (2, n, 2), 1),
    "3d-last": (lambda n: (2, 2, n), -1),
}


def operands_for(rng, shape, axis, key_dtypes):
    keys = [jnp.asarray(tie_keys(rng, shape, d)) for d in key_dtypes]
    values = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    iota = jax.lax.broadcasted_iota(jnp.int32, shape, axis % len(shape))
    return keys + [values, iota]


# each layout at a few sizes (every size, every layout at least once; 33: three layouts)
LAYOUTS_AT = {0: ("2d-last", "3d-middle"), 1: ("2d-first",), 31: ("3d-last",),
              32: ("2d-last",), 33: ("2d-first", "3d-middle", "3d-last"), 1023: ("3d-middle",),
              1025: ("2d-first",)}
MATCH_CASES = [(n, layout) for n in SIZES for layout in LAYOUTS if layout in LAYOUTS_AT[n]]


@pytest.mark.parametrize("n,layout", MATCH_CASES, ids=[f"{n}-{lay}" for n, lay in MATCH_CASES])
def test_sort_multiple_matches_lax_sort(n, layout):
    """Every case: two of the KEY_DTYPES combinations, num_keys 1, 2, 3, both directions (one
    jitted program for ours, one for the reference)."""
    shape_of, axis = LAYOUTS[layout]
    shape = shape_of(n)
    case = MATCH_CASES.index((n, layout))
    rng = np.random.default_rng(case)
    combos = [KEY_DTYPES[case % 4], KEY_DTYPES[(case + 1) % 4]]
    operands = [operands_for(rng, shape, axis, key_dtypes) for key_dtypes in combos]
    configs = [(num_keys, descending) for num_keys in (1, 2, 3) for descending in (False, True)]

    def ours(operands):
        return [[sort_multiple(ops, num_keys=k, axis=axis, descending=d) for k, d in configs]
                for ops in operands]

    def theirs(operands):
        return [[lax_reference(ops, k, axis, d) for k, d in configs] for ops in operands]

    got, want = jax.jit(ours)(operands), jax.jit(theirs)(operands)
    for key_dtypes, got_c, want_c in zip(combos, got, want):
        for (k, d), g, w in zip(configs, got_c, want_c):
            assert_all_same_bits(g, w, f"{[dtype_id(t) for t in key_dtypes]} num_keys={k} "
                                       f"desc={d}")
    if n == 33:  # eagerly too (the ops' own staging), one configuration
        assert_all_same_bits(sort_multiple(operands[0], num_keys=2, axis=axis, descending=True),
                             want[0][3], "eager")


def test_sort_multiple_descending_keeps_ties_in_order():
    """descending reverses the lexicographic order, not the ties: full ties keep their
    original order (unlike the ascending result reversed, which reverses them)."""
    k0 = jnp.array([1, 0, 1, 0, 1], jnp.int32)
    k1 = jnp.array([0.0, 5.0, -0.0, 5.0, 1.0], jnp.float32)
    iota = jnp.arange(5, dtype=jnp.int32)
    np.testing.assert_array_equal(sort_multiple([k0, k1, iota], num_keys=2)[2], [1, 3, 0, 2, 4])
    np.testing.assert_array_equal(
        sort_multiple([k0, k1, iota], num_keys=2, descending=True)[2], [4, 0, 2, 1, 3])
    desc = sort_multiple([k0, k1], num_keys=2, descending=True)
    assert_same_bits(desc[1], np.array([1.0, 0.0, -0.0, 5.0, 5.0], np.float32))
    # the keys (as values) are the ascending keys reversed
    asc = sort_multiple([k0, k1], num_keys=2)
    for a, d in zip(asc, desc):
        np.testing.assert_array_equal(np.asarray(d), np.asarray(a)[::-1])


def test_sort_multiple_nan_and_signed_zero_keys():
    """NaNs of both signs are equal to each other and last; -0.0 == 0.0 (ties broken by the
    next key)."""
    k0 = np.array([NAN, 0.0, -0.0, NEG_NAN, -INF, 0.0, NAN], np.float32)
    k1 = np.array([2, 1, 0, 1, 0, 0, 0], np.int32)
    iota = np.arange(7, dtype=np.int32)
    got = sort_multiple([k0, k1, iota], num_keys=2)
    np.testing.assert_array_equal(got[2], [4, 2, 5, 1, 6, 3, 0])
    assert_all_same_bits(got, lax_reference([k0, k1, iota], 2, -1, False))


def test_single_array_and_sequences():
    x = np.array([3.0, -0.0, NAN, 0.0, 1.0], np.float64)
    for arg in (x, jnp.asarray(x)):
        out = sort_multiple(arg)
        assert isinstance(out, jax.Array)
        assert_same_bits(out, jax.lax.sort(arg))
        assert_same_bits(sort_multiple(arg, descending=True),
                         lax_reference([arg], 1, -1, True)[0])
    for seq in ([x], (x,)):
        out = sort_multiple(seq)
        assert isinstance(out, list) and len(out) == 1
        assert_same_bits(out[0], jax.lax.sort(seq)[0])
    # non-key operands of any dtype (complex, uint8) travel along
    c = (np.arange(5) * (1 - 2j)).astype(np.complex64)
    u = np.arange(5, dtype=np.uint8)
    assert_all_same_bits(sort_multiple([x, c, u]), list(jax.lax.sort([x, c, u], num_keys=1)))


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128], ids=dtype_id)
def test_sort_multiple_complex_keys_match_lax_sort(dtype):
    rng = np.random.default_rng(7)
    for shape, axis in (((4, 33), -1), ((40, 3), 0)):
        c = jnp.asarray(complex_keys(rng, shape, dtype))
        k = jnp.asarray(tie_keys(rng, shape, np.int32))
        v = jnp.asarray(rng.standard_normal(shape))
        for ops, num_keys in (([c, v], 1), ([k, c, v], 2), ([c, k, v], 2), ([c, k, v], 3)):
            for descending in (False, True):
                assert_all_same_bits(
                    sort_multiple(ops, num_keys=num_keys, axis=axis, descending=descending),
                    lax_reference(ops, num_keys, axis, descending), f"{num_keys} {descending}")


def test_sort_multiple_jit_and_vmap(mode):
    rng = np.random.default_rng(2)
    ops = operands_for(rng, (4, 3, 65), -1, (np.int8, np.float32))

    def ours(*ops):
        return sort_multiple(list(ops), num_keys=2, descending=False)

    def ours_desc_axis0(*ops):
        return sort_multiple(list(ops), num_keys=2, axis=0, descending=True)

    want = lax_reference(ops, 2, -1, False)
    assert_all_same_bits(jax.jit(ours)(*ops), want, "jit")
    assert_all_same_bits(jax.vmap(ours)(*ops), want, "vmap")
    assert_all_same_bits(jax.jit(jax.vmap(ours, in_axes=1, out_axes=1))(*ops), want, "vmap 1")
    # vmap over axis 0, sorting along the (mapped) operand's axis 0 = the array's axis 1
    want0 = lax_reference(ops, 2, 1, True)
    assert_all_same_bits(jax.vmap(ours_desc_axis0)(*ops), want0, "vmap desc axis 0")


def test_sort_multiple_on_emulated_routes(route):
    """The argsort passes on every route the binding tests cover (bfloat16 keys included)."""
    rng = np.random.default_rng(4)
    ops = operands_for(rng, (3, 40), -1, (jnp.bfloat16, np.int32))
    for descending in (False, True):
        assert_all_same_bits(jax.jit(lambda *o, d=descending: sort_multiple(
            list(o), num_keys=2, descending=d))(*ops),
            lax_reference(ops, 2, -1, descending))


@pytest.mark.parametrize("shape,axis", [((0,), 0), ((3, 0), -1), ((0, 4), -1), ((0, 4), 0)])
def test_size_zero(shape, axis):
    ops = [jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32)]
    assert_all_same_bits(sort_multiple(ops, num_keys=2, axis=axis),
                         list(jax.lax.sort(ops, dimension=axis, num_keys=2)))
    assert_same_indices(lexsort(ops, axis=axis), jnp.lexsort(ops, axis=axis))
    c = jnp.zeros(shape, jnp.complex64)
    assert_same_indices(complex_argsort(c, axis=axis), jnp.argsort(c, axis=axis, stable=True))
    assert_same_bits(complex_sort(c, axis=axis, descending=True),
                     jnp.sort(c, axis=axis, descending=True))


# --- lexsort ---------------------------------------------------------------------------------

def test_lexsort_matches_jnp():
    """1 to 4 keys (float32, int32, bool, bfloat16 with ties, NaNs, -0.0), a complex key, keys
    as one stacked array; sizes 1, 33, 1025 and three layouts (one jitted program each side)."""
    rng = np.random.default_rng(13)
    cases = []
    for n in (1, 33, 1025):
        for shape, axis in (((3, n), -1), ((n, 2), 0), ((2, n, 2), 1)):
            keys = [jnp.asarray(tie_keys(rng, shape, d))
                    for d in (np.float32, np.int32, np.bool_, jnp.bfloat16)]
            c = jnp.asarray(complex_keys(rng, shape, np.complex64))
            cases.append((axis, keys, c))

    axes = [axis for axis, _, _ in cases]

    def run(sort):
        def body(arrays):
            out = []
            for axis, (keys, c) in zip(axes, arrays):
                out += [sort(keys[:m], axis=axis) for m in (1, 2, 3, 4)]
                out.append(sort([keys[1], c], axis=axis))
                out.append(sort(jnp.stack(keys[:2]).astype(jnp.float32), axis=axis))
            return out
        return body

    arrays = [(keys, c) for _, keys, c in cases]
    got, want = jax.jit(run(lexsort))(arrays), jax.jit(run(jnp.lexsort))(arrays)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_same_indices(g, w, f"lexsort {i}: axis {axes[i // 6]}, {i % 6}")
    # eagerly, one case
    axis, keys, _ = cases[4]
    assert_same_indices(lexsort(keys[:3], axis=axis), jnp.lexsort(keys[:3], axis=axis))


def test_lexsort_last_key_is_primary_and_0d():
    surnames = np.array([1, 0, 1, 0], np.int32)
    first = np.array([0.0, 2.0, -1.0, 1.0], np.float32)
    np.testing.assert_array_equal(lexsort([first, surnames]), [3, 1, 2, 0])
    out = lexsort([np.float32(3.0), np.float32(1.0)])
    assert out.shape == () and out.dtype == jnp.int32 and int(out) == 0
    assert int(jnp.lexsort([np.float32(3.0), np.float32(1.0)])) == 0


# --- complex keys ----------------------------------------------------------------------------

def test_complex_order_documented():
    """The order jnp.argsort(stable=True) gives complex keys (see complex_argsort)."""
    values = [complex(NAN, NAN), complex(NAN, INF), complex(1, NAN), complex(INF, 0),
              complex(NAN, -INF), complex(1, 2), complex(-0.0, 0.0), complex(0.0, -0.0),
              complex(0, NAN), complex(NAN, 0), complex(-INF, NAN), complex(0, INF)]
    x = np.array(values, np.complex128)
    x.real[9] = NEG_NAN  # the sign of a NaN does not matter
    expected = [10, 6, 7, 11, 8, 5, 2, 3, 4, 9, 1, 0]
    assert_same_indices(complex_argsort(x), jnp.argsort(x, stable=True))
    np.testing.assert_array_equal(complex_argsort(x), expected)
    # descending: the reverse order, ties (6, 7: 0+0j == -0-0j) still in index order
    np.testing.assert_array_equal(complex_argsort(x, descending=True),
                                  [0, 1, 9, 4, 3, 2, 5, 8, 11, 6, 7, 10])
    assert_same_indices(complex_argsort(x, descending=True),
                        jnp.argsort(x, stable=True, descending=True))
    # the sort reverses the ascending result: the tied zeros come back swapped
    assert_same_bits(complex_sort(x, descending=True), jnp.sort(x, descending=True))
    assert_same_bits(complex_sort(x, descending=True)[9:11], x[[7, 6]])


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128], ids=dtype_id)
def test_complex_argsort_and_sort_match_jnp(dtype):
    """Every size of SIZES, axis -1 of (3, n) and axis 0 of (n, 2), both directions."""
    rng = np.random.default_rng(np.dtype(dtype).num)
    layouts = [(lambda n: (3, n), -1), (lambda n: (n, 2), 0)]
    xs = [jnp.asarray(complex_keys(rng, shape_of(n), dtype)) for n in SIZES
          for shape_of, _ in layouts]
    configs = [(axis, descending) for n in SIZES for _, axis in layouts
               for descending in (False, True)]

    def run(argsort_op, sort_op):
        def body(xs):
            out = []
            for i, (axis, descending) in enumerate(configs):
                x = xs[i // 2]
                out.append((argsort_op(x, axis=axis, descending=descending),
                            sort_op(x, axis=axis, descending=descending)))
            return out
        return body

    got = jax.jit(run(complex_argsort, complex_sort))(xs)
    want = jax.jit(run(lambda x, **kw: jnp.argsort(x, stable=True, **kw), jnp.sort))(xs)
    for i, ((axis, descending), (gi, gv), (wi, wv)) in enumerate(zip(configs, got, want)):
        msg = f"{xs[i // 2].shape} axis {axis} desc={descending}"
        assert_same_indices(gi, wi, msg)
        assert_same_bits(gv, wv, msg)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128], ids=dtype_id)
def test_complex_subnormal_parts_match_jnp(dtype):
    rng = np.random.default_rng(9)
    x = jnp.asarray(complex_keys(rng, (4, 64), dtype, subnormals=True))
    for descending in (False, True):
        assert_same_indices(complex_argsort(x, descending=descending),
                            jnp.argsort(x, stable=True, descending=descending))
        assert_same_bits(complex_sort(x, descending=descending),
                         jnp.sort(x, descending=descending))


def test_complex_under_jit_vmap_and_real_input(mode):
    rng = np.random.default_rng(5)
    x = jnp.asarray(complex_keys(rng, (3, 4, 33), np.complex64))
    f = jax.jit(jax.vmap(lambda v: (complex_argsort(v, axis=0, descending=True),
                                    complex_sort(v, axis=0))))
    idx, vals = f(x)
    assert_same_indices(idx, jnp.argsort(x, axis=1, stable=True, descending=True))
    assert_same_bits(vals, jnp.sort(x, axis=1))
    r = jnp.asarray(tie_keys(rng, (3, 33), np.float32))
    assert_same_indices(complex_argsort(r), jnp.argsort(r, stable=True))
    assert_same_bits(complex_sort(r, descending=True), jnp.sort(r, descending=True))


# --- gradients -------------------------------------------------------------------------------

def test_gradients_of_an_operand_sorted_by_integer_keys():
    rng = np.random.default_rng(6)
    k0 = jnp.asarray(rng.integers(0, 3, (3, 9)), jnp.int32)
    k1 = jnp.asarray(rng.integers(0, 2, (3, 9)), jnp.int8)
    x = jnp.asarray(rng.standard_normal((3, 9)))

    def ours(x):
        return sort_multiple([k0, k1, x], num_keys=2, descending=True)[2]

    def theirs(x):
        return lax_reference([k0, k1, x], 2, -1, True)[2]

    check_grads(ours, (x,), order=2, modes=("fwd", "rev"))
    w = jnp.asarray(rng.standard_normal((3, 9)))
    assert_same_bits(jax.grad(lambda x: jnp.sum(w * ours(x)))(x),
                     jax.grad(lambda x: jnp.sum(w * theirs(x)))(x))
    assert_same_bits(jax.jvp(ours, (x,), (w,))[1], jax.jvp(theirs, (x,), (w,))[1])


def test_gradients_of_float_keys_and_operands():
    """Float keys are gathered values too: their gradient is lax.sort's."""
    rng = np.random.default_rng(8)
    key = jnp.asarray(rng.permutation(12).astype(np.float64) / 3).reshape(3, 4)
    v = jnp.asarray(rng.standard_normal((3, 4)))

    def ours(key, v):
        a, b = sort_multiple([key, v], axis=0)
        return jnp.sum(a * b ** 2)

    def theirs(key, v):
        a, b = jax.lax.sort([key, v], dimension=0, num_keys=1)
        return jnp.sum(a * b ** 2)

    check_grads(ours, (key, v), order=2, modes=("fwd", "rev"))
    for g, h in zip(jax.grad(ours, (0, 1))(key, v), jax.grad(theirs, (0, 1))(key, v)):
        assert_same_bits(g, h)


def test_gradients_of_complex_sort():
    rng = np.random.default_rng(10)
    # distinct real parts: away from ties (where the sort has kinks)
    x = jnp.asarray(rng.permutation(10) + 1j * rng.standard_normal(10), jnp.complex128)

    def ours(x):
        return complex_sort(x), complex_sort(x, descending=True)

    def theirs(x):
        return jnp.sort(x), jnp.sort(x, descending=True)

    check_grads(ours, (x,), order=2, modes=("fwd", "rev"))
    check_grads(theirs, (x,), order=1, modes=("fwd", "rev"))  # jnp's gradient, for the record
    w = jnp.asarray(rng.standard_normal(10) + 1j * rng.standard_normal(10))

    def loss(f):
        return lambda x: sum(jnp.sum(jnp.abs(w * y) ** 2) for y in f(x))
    assert_same_bits(jax.grad(loss(ours))(x), jax.grad(loss(theirs))(x))
    for g, h in zip(jax.jvp(ours, (x,), (w,))[1], jax.jvp(theirs, (x,), (w,))[1]):
        assert_same_bits(g, h)


# --- x32 -------------------------------------------------------------------------------------

def test_x32_mode():
    rng = np.random.default_rng(12)
    k = tie_keys(rng, (3, 33), np.float32)
    i = rng.integers(0, 3, (3, 33)).astype(np.int32)
    v = rng.standard_normal((3, 33)).astype(np.float32)
    c = complex_keys(rng, (3, 33), np.complex64)
    with jax.enable_x64(False):
        ops = [jnp.asarray(a) for a in (i, k, v)]
        for descending in (False, True):
            got = jax.jit(lambda *o, d=descending: sort_multiple(list(o), num_keys=2,
                                                                 descending=d))(*ops)
            assert [g.dtype for g in got] == [jnp.int32, jnp.float32, jnp.float32]
            assert_all_same_bits(got, lax_reference(ops, 2, -1, descending))
            cj = jnp.asarray(c)
            assert_same_indices(complex_argsort(cj, descending=descending),
                                jnp.argsort(cj, stable=True, descending=descending))
            assert_same_bits(complex_sort(cj, descending=descending),
                             jnp.sort(cj, descending=descending))
        assert_same_indices(lexsort(ops[:2]), jnp.lexsort(ops[:2]))
        assert jnp.lexsort(ops[:2]).dtype == jnp.int32
        x = ops[2]
        g = jax.grad(lambda x: jnp.sum(jnp.arange(33.0) * sort_multiple(
            [ops[0], x], num_keys=1)[1]))(x)
        assert g.dtype == jnp.float32
        want = jax.grad(lambda x: jnp.sum(jnp.arange(33.0) * jax.lax.sort(
            [ops[0], x], num_keys=1)[1]))(x)
        assert_same_bits(g, want)
        check_grads(lambda x: sort_multiple([ops[0], x])[1], (x,), order=2,
                    modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)


# --- validation ------------------------------------------------------------------------------

def test_validation():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="operands"):
        sort_multiple([])
    with pytest.raises(ValueError, match=r"operands\[0\].*operands\[1\]"):
        sort_multiple([x, jnp.zeros((3, 2))])
    for num_keys in (0, 3, -1):
        with pytest.raises(ValueError, match="num_keys"):
            sort_multiple([x, x], num_keys=num_keys)
    with pytest.raises(TypeError, match="num_keys"):
        sort_multiple([x, x], num_keys=1.0)
    with pytest.raises(TypeError, match="num_keys"):
        sort_multiple([x, x], num_keys=True)
    for fn in (lambda axis: sort_multiple([x], axis=axis), lambda axis: lexsort([x], axis=axis),
               lambda axis: complex_argsort(x, axis=axis),
               lambda axis: complex_sort(x, axis=axis)):
        for bad in (True, 1.0, "0", None):
            with pytest.raises(TypeError, match="axis"):
                fn(bad)
        with pytest.raises(ValueError, match="axis"):
            fn(2)
        assert np.shape(jax.tree.leaves(fn(np.int64(1)))[0]) == (2, 3)
    with pytest.raises(ValueError, match="dimension"):
        sort_multiple([jnp.float32(1.0)])
    with pytest.raises(ValueError, match="dimension"):
        complex_argsort(jnp.complex64(1.0))
    with pytest.raises(ValueError, match="dimension"):
        complex_sort(jnp.complex64(1.0))
    with pytest.raises(ValueError, match="keys"):
        lexsort([])
    with pytest.raises(ValueError, match=r"keys\[0\].*keys\[1\]"):
        lexsort([x, jnp.zeros(3)])
    with pytest.raises(TypeError, match="keys"):
        lexsort(3)
    with pytest.raises(TypeError, match="axis"):
        lexsort([jnp.float32(1.0)], axis=True)
    # a key must be a sort key dtype; other operands need not be
    f8 = jnp.zeros((2, 3), jnp.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"operands\[1\]"):
        sort_multiple([x, f8], num_keys=2)
    assert sort_multiple([x, f8])[1].dtype == jnp.float8_e4m3fn
    with pytest.raises(TypeError, match=r"keys\[0\]"):
        lexsort([f8, x])
    with pytest.raises(TypeError, match=r"\bx\b"):
        complex_argsort(f8)
    # errors at trace time: no kernel runs
    with pytest.raises(ValueError, match="num_keys"):
        jax.eval_shape(lambda a: sort_multiple([a], num_keys=2), jax.ShapeDtypeStruct((3,),
                                                                                      np.float32))


# --- the public sort / argsort / top_k API items (the peers' behaviours) ----------------------

def test_public_sort_and_argsort_take_complex_keys_as_jnp():
    rng = np.random.default_rng(11)
    c = (rng.integers(-2, 3, (4, 33)) + 1j * rng.integers(-2, 3, (4, 33))).astype(np.complex64)
    c[0, :3] = [complex(np.nan, 1), complex(1, np.nan), -0.0]
    for descending in (False, True):
        assert_same_bits(sortgrad.sort(c, descending=descending),
                         jnp.sort(c, descending=descending))
        np.testing.assert_array_equal(
            sortgrad.argsort(c, axis=0, descending=descending),
            jnp.argsort(c, axis=0, stable=True, descending=descending))


def test_axis_none_and_index_dtype_as_jnp():
    x = jnp.asarray(np.random.default_rng(12).integers(0, 5, (3, 4, 5)).astype(np.float32))
    assert_same_bits(sortgrad.sort(x, axis=None), jnp.sort(x, axis=None))
    np.testing.assert_array_equal(sortgrad.argsort(x, axis=None),
                                  jnp.argsort(x, axis=None, stable=True))
    for dtype in (jnp.int16, jnp.int64, jnp.uint32):
        got, want = sortgrad.argsort(x, dtype=dtype), jnp.argsort(x, stable=True, dtype=dtype)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_top_k_returns_what_lax_top_k_returns():
    x = jnp.asarray(np.random.default_rng(13).standard_normal((2, 9)))
    ours, theirs = sortgrad.top_k(x, 3), jax.lax.top_k(x, 3)
    assert type(ours) is type(theirs) is list
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)  # same pytree structure
