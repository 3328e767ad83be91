"""Public JAX ops sortgrad.sort / argsort / top_k against JAX's own ops.

Values must equal jnp.sort / jax.lax.top_k bit for bit (-0.0 vs 0.0, NaN signs and positions),
indices must equal jnp.argsort(stable=True) / lax.top_k exactly, and gradients must equal JAX's
gradients of those ops. Every test builds fresh functions inside the chosen callback mode (the
mode is read at trace time).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sortgrad
from _lowering import CPU_CALLBACK_TARGETS, callback_targets
from _routes import simulator_case
from sortgrad.testing import FLOAT_DTYPES, INT_DTYPES, SIZES, assert_same_bits, bits, dtype_id
from sortgrad.testing import make_keys as _make_keys

ALL_DTYPES = [*FLOAT_DTYPES, *INT_DTYPES, np.bool_]
MODES = ["buffer", "pure"]


@pytest.fixture(params=MODES)
def mode(request):
    """Runs the test body in each callback mode (restored afterwards)."""
    with sortgrad.callback_mode(request.param):
        yield request.param


def make_keys(rng, shape, dtype, pattern="special"):
    """sortgrad.testing.make_keys: "random", "ties" (0..3 cast) or "special": -0.0/0.0, NaNs of
    both signs (payload NaNs too: bfloat16's come back from jnp.sort / lax.top_k as the
    canonical NaN of their sign, and sortgrad's too), +-inf, ties. No subnormals (XLA on CPU
    flushes them when it sorts; see test_subnormals_match_jnp), nor the smallest normal."""
    return _make_keys(rng, shape, dtype, pattern, subnormals=False, tiny=False, payloads=True)


def assert_same_indices(actual, expected, msg=""):
    """int32 indices equal to JAX's (jnp.argsort gives int64 under x64)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == np.int32, (msg, actual.dtype)
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    np.testing.assert_array_equal(actual, expected, err_msg=msg)


def assert_grads_equal(actual, expected, msg=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (msg, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    np.testing.assert_array_equal(actual.astype(np.float64), expected.astype(np.float64),
                                  err_msg=msg)


def top_k_along(x, k, axis=-1):
    """jax.lax.top_k along `axis` via moveaxis (the reference)."""
    v, i = jax.lax.top_k(jnp.moveaxis(x, axis, -1), k)
    return jnp.moveaxis(v, -1, axis), jnp.moveaxis(i, -1, axis)


def all_ops(sort, argsort, topk, ks, axis=-1):
    def run(x):
        out = [sort(x, axis=axis), sort(x, axis=axis, descending=True),
               argsort(x, axis=axis), argsort(x, axis=axis, descending=True)]
        for k in ks:
            out += list(topk(x, k, axis=axis))
        return out
    return run


def reference_ops(ks, axis=-1):
    return all_ops(jnp.sort, lambda x, axis, descending=False: jnp.argsort(
        x, axis=axis, stable=True, descending=descending), top_k_along, ks, axis)


def sortgrad_ops(ks, axis=-1):
    return all_ops(sortgrad.sort, sortgrad.argsort, sortgrad.top_k, ks, axis)


NAMES = ["sort", "sort desc", "argsort", "argsort desc"]


def check_all(x, ks, axis=-1, jit=True):
    ref = jax.jit(reference_ops(ks, axis))(x)
    fn = sortgrad_ops(ks, axis)
    got = jax.jit(fn)(x) if jit else fn(x)
    names = NAMES + [f"top_k {k} {part}" for k in ks for part in ("values", "indices")]
    for name, a, b in zip(names, got, ref):
        if "argsort" in name or "indices" in name:
            assert_same_indices(a, b, name)
        else:
            assert_same_bits(a, b, name)


def ks_for(n):
    return tuple(sorted({0, min(n, 1), n // 2, n}))


# --- values ----------------------------------------------------------------------------------

# every dtype with sizes 1, 32, 33; the other sizes for a few dtypes (and test_empty)
VALUE_CASES = [pytest.param(dtype, n, id=f"{dtype_id(dtype)}-{n}")
               for dtype in ALL_DTYPES for n in SIZES
               if n in (1, 32, 33)
               or (n == 0 and dtype in (np.float32, np.int8, np.bool_, jnp.bfloat16))
               or (n == 31 and dtype in (np.float32, np.uint8))
               or (n == 1023 and dtype == np.float32)
               or (n in (1025, 4097) and dtype in (np.float32, jnp.bfloat16, np.int32,
                                                   np.float64))]


@pytest.mark.simulator_route
@pytest.mark.parametrize("dtype,n", VALUE_CASES)
def test_values_match_jax(route, dtype, n):
    simulator_case(route, n in (1, 33) and dtype in (np.float32, jnp.bfloat16, np.int8))
    rng = np.random.default_rng([n, np.dtype(dtype).num])
    pattern = "ties" if dtype == np.float64 and n > 100 else "special"
    x = jnp.asarray(make_keys(rng, (2, n) if n < 4000 else (n,), dtype, pattern))
    check_all(x, ks_for(n))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16], ids=dtype_id)
def test_inputs_past_the_serial_size_match_jax(mode, dtype):
    """Inputs of at least PARALLEL_MIN_ELEMENTS take the threaded kernels (and, in buffer
    mode, write into XLA's buffers from them): same results as small inputs' serial path."""
    from sortgrad.kernels._rows import PARALLEL_MIN_ELEMENTS
    rng = np.random.default_rng(11)
    rows = -(-PARALLEL_MIN_ELEMENTS // 1000) + 1
    x = jnp.asarray(make_keys(rng, (rows, 1000), dtype, "ties"))
    check_all(x, (1, 500))
    check_all(jnp.asarray(make_keys(rng, (PARALLEL_MIN_ELEMENTS + 7,), dtype, "special")),
              (3,), jit=False)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.int8], ids=dtype_id)
def test_values_match_jax_both_modes_eager_and_jit(mode, dtype):
    rng = np.random.default_rng(3)
    x = jnp.asarray(make_keys(rng, (3, 33), dtype))
    check_all(x, (1, 11), jit=False)
    for n in (1, 1025):
        x = jnp.asarray(make_keys(rng, (3, n), dtype, "special" if n < 100 else "ties"))
        check_all(x, (1, n // 3, n), jit=True)


def test_axis(mode):
    """Every axis of a 3-D input (one program holds them all)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(make_keys(rng, (4, 5, 6), np.float32, "special"))
    axes = [0, 1, 2, -1, -2, -3]

    def ks(axis):
        n = x.shape[axis]
        return (0, 1, n // 2, n)

    def run(make_ops):
        return lambda x: [make_ops(ks(axis), axis)(x) for axis in axes]
    got = jax.jit(run(sortgrad_ops))(x)
    ref = jax.jit(run(reference_ops))(x)
    for axis, g, r in zip(axes, got, ref):
        names = NAMES + [f"top_k {k} {part}" for k in ks(axis) for part in ("values", "indices")]
        for name, a, b in zip(names, g, r):
            if "argsort" in name or "indices" in name:
                assert_same_indices(a, b, f"axis {axis} {name}")
            else:
                assert_same_bits(a, b, f"axis {axis} {name}")
    # and eagerly, on one axis
    check_all(x, (0, 2, 4), axis=-2, jit=False)


def test_descending_values_are_reversed_ascending_like_jnp(route):
    """jnp.sort(descending=True) is the ascending stable sort reversed: equal values (0.0 and
    -0.0, NaNs of both signs) come out in reverse index order. argsort stays stable."""
    x = jnp.asarray(np.array([0.0, -0.0, math.nan, -math.nan, 1.0], np.float32))
    x = x.at[3].set(-x[2])
    out = sortgrad.sort(x, descending=True)
    assert_same_bits(out, jnp.sort(x, descending=True))
    assert np.signbit(np.asarray(out)[3]) and not np.signbit(np.asarray(out)[4])
    np.testing.assert_array_equal(sortgrad.argsort(x, descending=True), [2, 3, 4, 0, 1])
    np.testing.assert_array_equal(sortgrad.argsort(x), [0, 1, 4, 2, 3])


@pytest.mark.simulator_route
def test_top_k_total_order(route):
    x = np.array([-0.0, math.nan, 0.0, -math.inf, 1.0, math.nan, math.inf, 0.0, -0.0, 1.0,
                  math.nan], np.float32)
    x[10] = -x[10]
    expected = [1, 5, 6, 4, 9, 2, 7, 0, 8, 3, 10]
    for k in range(12):
        values, indices = sortgrad.top_k(jnp.asarray(x), k)
        np.testing.assert_array_equal(indices, expected[:k])
        ref_v, ref_i = jax.lax.top_k(x, k)
        np.testing.assert_array_equal(indices, ref_i)
        assert_same_bits(values, ref_v)


def _nan_payload_pool(dtype):
    """Raw bits of NaNs of both signs with different payloads (the canonical quiet NaN, quiet
    NaNs with low / high payloads, all mantissa bits set, signalling NaNs) mixed with +-inf,
    +-0.0, +-1.0, 2.0 and extra copies of the default NaN (ties)."""
    dtype = np.dtype(dtype)
    width = dtype.itemsize * 8
    ubits = f"u{dtype.itemsize}"
    inf = int(np.array(np.inf, dtype).reshape(1).view(ubits)[0])
    man_bits = {"float16": 10, "bfloat16": 7, "float32": 23, "float64": 52}[dtype.name]
    quiet = 1 << (man_bits - 1)
    pool = [inf | p for p in (quiet, quiet | 1, quiet | 3, (1 << man_bits) - 1, 1, quiet >> 1)]
    pool += [0, inf] + [int(np.array(v, dtype).reshape(1).view(ubits)[0]) for v in (1.0, 2.0)]
    pool += [v | (1 << (width - 1)) for v in pool] + [inf | quiet] * 3
    return np.array(pool, dtype=ubits)


@pytest.mark.simulator_route
@pytest.mark.parametrize("n", [1, 31, 32, 33, 1023, 1025])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_nan_payloads_match_jax(route, dtype, n):
    """NaNs of both signs and many payloads: jnp.sort / jnp.argsort(stable=True) tie them all;
    lax.top_k orders them by payload within a sign (float16/32/64) or ties them (bfloat16, which
    XLA:CPU compares through float32); bfloat16 NaNs come back as 0x7FC0 | sign from rows of
    more than one element. Bit for bit, both directions, every top-k path."""
    simulator_case(route, n in (1, 33) and dtype in (np.float32, jnp.bfloat16))
    rng = np.random.default_rng([n, np.dtype(dtype).num, 16])
    x = jnp.asarray(rng.choice(_nan_payload_pool(dtype), size=(2, n)).view(dtype))
    check_all(x, tuple(sorted({1, min(n, 5), n // 2, n})))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_nan_payloads_match_jax_both_modes_eager(mode, dtype):
    rng = np.random.default_rng([np.dtype(dtype).num, 17])
    for n in (1, 33):
        x = jnp.asarray(rng.choice(_nan_payload_pool(dtype), size=(3, n)).view(dtype))
        check_all(x, (1, n), jit=False)


def test_subnormals_match_jnp():
    """Contract: identical to jnp.sort / jnp.argsort(stable=True) / lax.top_k on every input,
    subnormals included (XLA on CPU compares float32 subnormals as zeros when it sorts)."""
    tiny = float(np.finfo(np.float32).smallest_subnormal)
    x = jnp.asarray(np.array([tiny, 0.0, -tiny, -0.0, 1.0, -1.0, 2 * tiny], np.float32))
    check_all(x, (1, 3, 7), jit=False)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4), (2, 0, 3)])
def test_empty(route, mode, shape):
    x = jnp.zeros(shape, jnp.float32)
    n = shape[-1]
    check_all(x, (0, n) if n else (0,), jit=False)
    check_all(x, (0, n) if n else (0,), jit=True)
    g = jax.grad(lambda x: jnp.sum(sortgrad.sort(x)))(x)
    assert g.shape == shape
    g = jax.grad(lambda x: jnp.sum(sortgrad.top_k(x, 0)[0]))(x)
    assert g.shape == shape


def test_numpy_and_list_inputs():
    x = np.array([[3.0, -0.0, 0.0, 1.0]], np.float32)
    assert_same_bits(sortgrad.sort(x), jnp.sort(x))
    np.testing.assert_array_equal(sortgrad.argsort([3, 1, 2]), [1, 2, 0])
    v, i = sortgrad.top_k(x, 2)
    ref_v, ref_i = jax.lax.top_k(x, 2)
    assert_same_bits(v, ref_v)
    np.testing.assert_array_equal(i, ref_i)


def test_jit_with_static_arguments():
    rng = np.random.default_rng(0)
    x = jnp.asarray(make_keys(rng, (3, 4, 9), np.float32))
    sort = jax.jit(sortgrad.sort, static_argnames=("axis", "descending"))
    assert_same_bits(sort(x, axis=1, descending=True), jnp.sort(x, axis=1, descending=True))
    top = jax.jit(sortgrad.top_k, static_argnums=1, static_argnames="axis")
    v, i = top(x, 3, axis=0)
    ref_v, ref_i = top_k_along(x, 3, axis=0)
    assert_same_bits(v, ref_v)
    assert_same_indices(i, ref_i)


# --- inputs are never modified ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.int64, jnp.bfloat16], ids=dtype_id)
def test_inputs_not_modified(route, mode, dtype):
    rng = np.random.default_rng(1)
    x_np = make_keys(rng, (3, 65), dtype)
    x = jnp.asarray(x_np)
    x_bits = bits(x_np).copy()
    sortgrad_ops((1, 65))(x)
    jax.jit(sortgrad_ops((5,)))(x)
    sortgrad_ops((2,))(x_np)
    np.testing.assert_array_equal(bits(x), x_bits)
    np.testing.assert_array_equal(bits(x_np), x_bits)
    if np.dtype(dtype).kind == "f":
        w = jnp.asarray(rng.standard_normal((3, 65)).astype(dtype))
        w_bits = bits(w).copy()
        jax.grad(lambda x: jnp.sum(w * sortgrad.sort(x, descending=True)))(x)
        jax.jit(jax.grad(lambda x: jnp.sum(w[:, :7] * sortgrad.top_k(x, 7)[0])))(x)
        np.testing.assert_array_equal(bits(x), x_bits)
        np.testing.assert_array_equal(bits(w), w_bits)


# --- gradients -------------------------------------------------------------------------------

def loss_fns(lib, w, k, axis=-1):
    """Scalar losses through each differentiable output, for `lib` = "sortgrad" or "jax"."""
    if lib == "sortgrad":
        sort, topk = sortgrad.sort, sortgrad.top_k
        argsort = sortgrad.argsort
    else:
        sort, topk = jnp.sort, top_k_along
        argsort = lambda x, axis, descending=False: jnp.argsort(  # noqa: E731
            x, axis=axis, stable=True, descending=descending)
    wk = jnp.moveaxis(jnp.moveaxis(w, axis, -1)[..., :k], -1, axis)
    return {
        "sort": lambda x: jnp.sum(w * sort(x, axis=axis)),
        "sort desc": lambda x: jnp.sum(w * sort(x, axis=axis, descending=True)),
        "top_k": lambda x: jnp.sum(wk * topk(x, k, axis=axis)[0]),
        "argsort gather": lambda x: jnp.sum(
            w * jnp.take_along_axis(x, argsort(x, axis=axis, descending=True), axis=axis)),
    }


def all_grads(lib, w, k, axis=-1, transform=jax.grad):
    fns = loss_fns(lib, w, k, axis)
    return lambda x: {name: transform(f)(x) for name, f in fns.items()}


def check_grads_match(x, w, k, axis=-1, transform=jax.grad, jit=True):
    """Gradients of every loss, all in one program per library (jit) or eagerly."""
    wrap = jax.jit if jit else (lambda f: f)
    got = wrap(all_grads("sortgrad", w, k, axis, transform))(x)
    ref = jax.jit(all_grads("jax", w, k, axis, transform))(x)
    for name in got:
        assert_grads_equal(got[name], ref[name], name)


@pytest.mark.simulator_route
@pytest.mark.parametrize("dtype,n", [
    pytest.param(dtype, n, id=f"{dtype_id(dtype)}-{n}") for dtype in FLOAT_DTYPES
    for n in (1, 32, 33, 1025) if n < 1025 or dtype in (np.float32, jnp.bfloat16)])
def test_grad_matches_jax(route, dtype, n):
    simulator_case(route, n == 33 and dtype == np.float64)
    rng = np.random.default_rng([n, np.dtype(dtype).num])
    x = jnp.asarray(make_keys(rng, (2, n), dtype, "special" if n < 100 else "ties"))
    w = jnp.asarray(rng.standard_normal((2, n)).astype(dtype))
    check_grads_match(x, w, max(1, n // 2))


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=dtype_id)
def test_grad_matches_jax_both_modes_eager(mode, dtype):
    rng = np.random.default_rng(21)
    x = jnp.asarray(make_keys(rng, (3, 17), dtype, "special"))
    w = jnp.asarray(rng.standard_normal((3, 17)).astype(dtype))
    check_grads_match(x, w, 5, jit=False)


@pytest.mark.parametrize("axis", [0, -2])
def test_grad_along_axis_and_jit_grad(route, mode, axis):
    rng = np.random.default_rng(axis + 10)
    x = jnp.asarray(make_keys(rng, (4, 5, 6), np.float64, "ties"))
    w = jnp.asarray(rng.standard_normal((4, 5, 6)))
    check_grads_match(x, w, 3, axis=axis)  # one jit around all the grads
    # jit inside grad's transform: jit(grad(f)) per loss
    got = loss_fns("sortgrad", w, 3, axis)["sort desc"]
    ref = loss_fns("jax", w, 3, axis)["sort desc"]
    assert_grads_equal(jax.jit(jax.grad(got))(x), jax.grad(ref)(x))


def test_value_and_grad_and_numerical_check():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 8)))  # distinct values: differentiable
    w = jnp.asarray(rng.standard_normal((3, 8)))
    for name, f in loss_fns("sortgrad", w, 4).items():
        value, grad = jax.value_and_grad(f)(x)
        ref_value, ref_grad = jax.value_and_grad(loss_fns("jax", w, 4)[name])(x)
        assert float(value) == float(ref_value), name
        assert_grads_equal(grad, ref_grad, name)
    from jax import test_util  # noqa: F401  (jax.test_util is not imported by jax)
    jax.test_util.check_grads(lambda x: sortgrad.sort(x, descending=True), (x,), order=1,
                              modes=["rev"])
    jax.test_util.check_grads(lambda x: sortgrad.top_k(x, 3)[0], (x,), order=1, modes=["rev"])


@pytest.mark.simulator_route
def test_jacrev_matches_jax(route, mode):
    rng = np.random.default_rng(4)
    x = jnp.asarray(make_keys(rng, (7,), np.float32, "ties").astype(np.float32))
    x = x.at[0].set(-0.0).at[1].set(jnp.nan)
    for ours, ref in [
        (lambda x: sortgrad.sort(x), lambda x: jnp.sort(x)),
        (lambda x: sortgrad.sort(x, descending=True), lambda x: jnp.sort(x, descending=True)),
        (lambda x: sortgrad.top_k(x, 3)[0], lambda x: jax.lax.top_k(x, 3)[0]),
    ]:
        assert_grads_equal(jax.jacrev(ours)(x), jax.jacrev(ref)(x))
    x2 = jnp.asarray(make_keys(rng, (3, 5), np.float64, "ties"))
    assert_grads_equal(jax.jacrev(lambda x: sortgrad.sort(x, axis=0))(x2),
                       jax.jacrev(lambda x: jnp.sort(x, axis=0))(x2))
    assert_grads_equal(jax.jit(jax.jacrev(lambda x: sortgrad.top_k(x, 2)[0]))(x2),
                       jax.jacrev(lambda x: jax.lax.top_k(x, 2)[0])(x2))


def test_composed_grads():
    """sort of a sort, top-k of a sort: gradients still equal JAX's."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(make_keys(rng, (3, 17), np.float64, "ties"))
    w = jnp.asarray(rng.standard_normal((3, 5)))

    def ours(x):
        return jnp.sum(w * sortgrad.top_k(sortgrad.sort(x * 2.0, descending=True), 5)[0])

    def ref(x):
        return jnp.sum(w * jax.lax.top_k(jnp.sort(x * 2.0, descending=True), 5)[0])
    assert_grads_equal(jax.grad(ours)(x), jax.grad(ref)(x))


@pytest.mark.parametrize("dtype", [*INT_DTYPES, np.bool_], ids=dtype_id)
def test_integer_inputs_have_no_gradient(route, dtype):
    rng = np.random.default_rng(7)
    x = jnp.asarray(make_keys(rng, (2, 9), dtype, "special"))
    for f, ref in [(lambda x: sortgrad.sort(x), lambda x: jnp.sort(x)),
                   (lambda x: sortgrad.top_k(x, 4)[0], lambda x: jax.lax.top_k(x, 4)[0])]:
        out, vjp = jax.vjp(f, x)
        ref_out, ref_vjp = jax.vjp(ref, x)
        assert_same_bits(out, ref_out)
        (ct,) = vjp(jnp.zeros(out.shape, jax.dtypes.float0))
        (ref_ct,) = ref_vjp(jnp.zeros(out.shape, jax.dtypes.float0))
        assert ct.dtype == ref_ct.dtype == jax.dtypes.float0
        assert ct.shape == x.shape


def test_integer_outputs_carry_no_gradient():
    """argsort and top-k indices are integer outputs: a float loss through them only gets
    gradient from the float values they gather."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((2, 6)))

    def ours(x):
        i = sortgrad.top_k(x, 3)[1]
        return jnp.sum(jnp.take_along_axis(x, i, axis=-1) * i.astype(x.dtype))

    def ref(x):
        i = jax.lax.top_k(x, 3)[1]
        return jnp.sum(jnp.take_along_axis(x, i, axis=-1) * i.astype(x.dtype))
    assert_grads_equal(jax.grad(ours)(x), jax.grad(ref)(x))


# --- vmap ------------------------------------------------------------------------------------

def test_vmap_equals_batched_call(route, mode):
    rng = np.random.default_rng(9)
    x = jnp.asarray(make_keys(rng, (4, 3, 33), np.float32))
    for f in [lambda r: sortgrad.sort(r), lambda r: sortgrad.sort(r, descending=True),
              lambda r: sortgrad.argsort(r), lambda r: sortgrad.argsort(r, descending=True),
              lambda r: sortgrad.top_k(r, 5)[0], lambda r: sortgrad.top_k(r, 5)[1]]:
        batched = f(x)
        assert_same_bits(jax.vmap(f)(x), batched)
        assert_same_bits(jax.vmap(jax.vmap(f))(x), batched)
        assert_same_bits(jax.jit(jax.vmap(f))(x), batched)
        assert_same_bits(jax.vmap(jax.jit(f))(x), batched)
    check_all(x, (0, 5, 33), jit=False)  # and the batched call is JAX's


def test_vmap_axes_match_jax(route, mode):
    rng = np.random.default_rng(10)
    x = jnp.asarray(make_keys(rng, (5, 4, 6), np.float32))
    # batch dim in the middle, op along the first remaining axis
    got = jax.vmap(lambda m: sortgrad.sort(m, axis=0, descending=True), in_axes=1)(x)
    ref = jax.vmap(lambda m: jnp.sort(m, axis=0, descending=True), in_axes=1)(x)
    assert_same_bits(got, ref)
    got = jax.vmap(lambda m: sortgrad.argsort(m, axis=0), in_axes=2, out_axes=1)(x)
    ref = jax.vmap(lambda m: jnp.argsort(m, axis=0, stable=True), in_axes=2, out_axes=1)(x)
    assert_same_indices(got, ref)
    got = jax.vmap(jax.vmap(lambda r: sortgrad.top_k(r, 2)), in_axes=(1,))(x)
    ref = jax.vmap(jax.vmap(lambda r: jax.lax.top_k(r, 2)), in_axes=(1,))(x)
    assert_same_bits(got[0], ref[0])
    assert_same_indices(got[1], ref[1])


@pytest.mark.simulator_route
def test_vmap_of_grad(route, mode):
    """Per-example gradients, the cotangent weights shared (unbatched)."""
    rng = np.random.default_rng(11)
    x = jnp.asarray(make_keys(rng, (3, 4, 9), np.float64, "ties"))
    w = jnp.asarray(rng.standard_normal(9))
    names = ("sort", "sort desc", "top_k", "argsort gather")

    def per_example(lib, nest):
        fns = loss_fns(lib, w, 4)

        def run(x):
            out = {}
            for name in names:
                g = jax.grad(fns[name])
                for _ in range(nest):
                    g = jax.vmap(g)
                out[name] = g(x)
            return out
        return run
    for nest, xs in ((1, x[0]), (2, x)):
        got = jax.jit(per_example("sortgrad", nest))(xs)
        ref = jax.jit(per_example("jax", nest))(xs)
        for name in names:
            assert_grads_equal(got[name], ref[name], f"{nest} {name}")
    # eagerly, one of them
    ours, ref = loss_fns("sortgrad", w, 4)["top_k"], loss_fns("jax", w, 4)["top_k"]
    assert_grads_equal(jax.vmap(jax.vmap(jax.grad(ours)))(x), jax.vmap(jax.vmap(jax.grad(ref)))(x))


def test_grad_of_vmap_with_batched_weights(route, mode):
    rng = np.random.default_rng(12)
    x = jnp.asarray(make_keys(rng, (3, 10), np.float32, "ties"))
    w = jnp.asarray(rng.standard_normal((3, 10)).astype(np.float32))

    def ours(x):
        return jnp.sum(jax.vmap(lambda r, s: s * sortgrad.sort(r))(x, w))

    def ref(x):
        return jnp.sum(jax.vmap(lambda r, s: s * jnp.sort(r))(x, w))
    assert_grads_equal(jax.grad(ours)(x), jax.grad(ref)(x))


# --- callback modes --------------------------------------------------------------------------

def test_callback_mode_switch():
    start = sortgrad.get_callback_mode()
    assert start in MODES
    try:
        sortgrad.set_callback_mode("pure")
        assert sortgrad.get_callback_mode() == "pure"
        with sortgrad.callback_mode("buffer"):
            assert sortgrad.get_callback_mode() == "buffer"
        assert sortgrad.get_callback_mode() == "pure"
        with pytest.raises(RuntimeError):
            with sortgrad.callback_mode("buffer"):
                raise RuntimeError("boom")
        assert sortgrad.get_callback_mode() == "pure"
        with pytest.raises(ValueError):
            sortgrad.set_callback_mode("sequential")
        assert sortgrad.get_callback_mode() == "pure"
    finally:
        sortgrad.set_callback_mode(start)
    assert sortgrad.get_callback_mode() == start


def test_mode_selects_the_callback():
    """The mode read at trace time decides which callback the program lowered for the CPU
    holds (and only that one: the GPU branch is not lowered for the CPU)."""
    x = jnp.arange(12.0).reshape(3, 4)
    for m in MODES:
        with sortgrad.callback_mode(m):
            for f in (lambda x: sortgrad.sort(x), lambda x: sortgrad.argsort(x),
                      lambda x: sortgrad.top_k(x, 2),
                      jax.grad(lambda x: jnp.sum(sortgrad.sort(x)))):
                targets = callback_targets(f, x)
                assert targets == {CPU_CALLBACK_TARGETS[m]}, (m, targets)


def test_modes_agree():
    rng = np.random.default_rng(13)
    x = jnp.asarray(make_keys(rng, (2, 3, 40), np.float16))
    w = jnp.asarray(rng.standard_normal((2, 3, 40)).astype(np.float16))
    results = {}
    for m in MODES:
        with sortgrad.callback_mode(m):
            fns = sortgrad_ops((3, 40))
            results[m] = list(jax.jit(fns)(x)) + [
                jax.grad(lambda x: jnp.sum(w * sortgrad.sort(x, descending=True)))(x)]
    for a, b in zip(results["buffer"], results["pure"]):
        assert_same_bits(a, b)
