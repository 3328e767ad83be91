"""The scale-free strength of the soft ops (`softness`, the default): each op's law, the same
relative softness at every n and under x -> a x + b, useful gradients at the default on
standard-normal and integer data, exact derivatives through each row's spread, the edge
rows, and the argument rules. The suite runs with x64 on (tests/conftest.py); the x32 test
switches it off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sortgrad
from sortgrad.bindings.jax import _call, _softness, soft
from sortgrad.testing import (finite_difference_jacobian, reference_soft_quantile,
                              reference_soft_rank, reference_soft_sort,
                              reference_soft_top_k_mask)

RNG = np.random.default_rng(20260)


def _law_eps(row, op, softness, regularization="l2"):
    """The documented law (README, "Choosing the strength"), in NumPy: eps of one row."""
    sigma, n = float(np.std(row)), row.shape[-1]
    if op == "rank":
        return softness * sigma / n if regularization == "l2" else softness * sigma
    if op == "mask":
        return softness * sigma
    return softness * n / sigma  # sort, quantile (L2)


# name -> (op(x, **strength), law op, regularization, reference(row, eps))
K = 3
OPS = {
    "rank_l2": (lambda x, **a: sortgrad.soft_rank(x, **a), "rank", "l2",
                lambda r, e: reference_soft_rank(r, e)),
    "rank_kl": (lambda x, **a: sortgrad.soft_rank(x, regularization="kl", **a), "rank", "kl",
                lambda r, e: reference_soft_rank(r, e, "kl")),
    "rank_desc": (lambda x, **a: sortgrad.soft_rank(x, descending=True, **a), "rank", "l2",
                  lambda r, e: reference_soft_rank(r, e, "l2", True)),
    "sort": (lambda x, **a: sortgrad.soft_sort(x, **a), "sort", "l2",
             lambda r, e: reference_soft_sort(r, e)),
    "sort_desc": (lambda x, **a: sortgrad.soft_sort(x, descending=True, **a), "sort", "l2",
                  lambda r, e: reference_soft_sort(r, e, "l2", True)),
    "mask": (lambda x, **a: sortgrad.soft_top_k_mask(x, K, **a), "mask", "l2",
             lambda r, e: reference_soft_top_k_mask(r, K, e)),
    "quantile": (lambda x, **a: sortgrad.soft_quantile(x, (0.1, 0.5, 0.9), **a), "quantile",
                 "l2", lambda r, e: reference_soft_quantile(r, (0.1, 0.5, 0.9), e)),
}
DEFAULTS = {"rank_l2": 4.0, "rank_kl": 1.0, "rank_desc": 4.0, "sort": 0.3, "sort_desc": 0.3,
            "mask": 1.0, "quantile": 0.3}


# --- the law -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OPS))
def test_softness_is_the_documented_law_per_row(name):
    """op(x, softness=s) is op(x, regularization_strength=law(s, std(row), n)) row by row; the
    default (no argument) is the documented default softness."""
    op, law, reg, _ = OPS[name]
    x = RNG.standard_normal((3, 11)) * np.array([[1e-3], [1.0], [1e3]]) + np.array([[5], [0],
                                                                                    [-2e3]])
    for s in (0.2, DEFAULTS[name], 7.0):
        got = np.asarray(op(x, softness=s))
        # (a JAX strength: the op at that eps, one program for every value)
        want = np.stack([np.asarray(op(row, regularization_strength=jnp.asarray(
            _law_eps(row, law, s, reg)))) for row in x], axis=-1 if name == "quantile" else 0)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
    np.testing.assert_array_equal(op(x), op(x, softness=DEFAULTS[name]))
    assert _softness.default_softness(law, reg) == DEFAULTS[name]


def test_kl_sort_and_quantile_keep_the_absolute_default():
    x = RNG.standard_normal((2, 9))
    for op in (lambda v, **a: sortgrad.soft_sort(v, regularization="kl", **a),
               lambda v, **a: sortgrad.soft_quantile(v, 0.7, regularization="kl", **a)):
        np.testing.assert_array_equal(op(x), op(x, regularization_strength=1.0))


def test_explicit_strength_keeps_its_absolute_meaning():
    x = jnp.array([5.0, 1.0, 2.0])
    np.testing.assert_allclose(sortgrad.soft_rank(x, regularization_strength=2.0),
                               [3.0, 1.25, 1.75], rtol=1e-12)
    np.testing.assert_allclose(sortgrad.soft_sort(x, regularization_strength=1.0),
                               [5 / 3, 8 / 3, 11 / 3], rtol=1e-12)


def test_each_row_gets_its_own_strength():
    """Rows of very different spread in one batch (and under vmap, and along axis 0) give what
    each row gives alone."""
    x = RNG.standard_normal((3, 50)) * np.array([[1e-4], [1.0], [1e4]])
    for name, (op, *_rest) in OPS.items():
        alone = np.stack([np.asarray(op(row)) for row in x], axis=-1 if name == "quantile" else 0)
        np.testing.assert_allclose(op(x), alone, rtol=1e-12, atol=1e-12 * np.abs(alone).max())
        per_row = np.stack([np.asarray(op(row)) for row in x])
        np.testing.assert_allclose(jax.vmap(op)(x), per_row, rtol=1e-12,
                                   atol=1e-12 * np.abs(alone).max())
    np.testing.assert_allclose(sortgrad.soft_rank(x.T, axis=0), sortgrad.soft_rank(x).T,
                               rtol=1e-12)


# --- the same relative softness at every n ----------------------------------------------------

SIZES = {10: 2000, 1000: 20, 10**6: 1}  # n: rows (the same total work per size, n = 1e6 once)
GRID = np.linspace(0.05, 0.95, 19)


@pytest.fixture(scope="module")
def normal_rows():
    rng = np.random.default_rng(7)
    return {n: rng.standard_normal((rows, n)) for n, rows in SIZES.items()}


def _by_position(values, x):
    """values (rows, n) in the sorted order of x, averaged over rows at the positions GRID."""
    n = x.shape[-1]
    ordered = np.take_along_axis(values, np.argsort(x, -1), -1)
    pos = (np.arange(n) + 0.5) / n
    return np.mean([np.interp(GRID, pos, row) for row in ordered], axis=0)


@pytest.mark.parametrize("regularization", ["l2", "kl"])
def test_rank_softness_is_the_same_at_every_n(normal_rows, regularization):
    """At the default, (soft rank - hard rank) / n as a function of the position is the same
    curve at n = 1000 and 10^6 (within 0.01; n = 10 within 0.03), and so is the fraction of
    entries away from their hard rank (the pooled ones: the ones with nonzero gradient)."""
    curves, pooled = {}, {}
    for n, x in normal_rows.items():
        r = np.asarray(sortgrad.soft_rank(x, regularization=regularization))
        hard = np.argsort(np.argsort(x, -1), -1) + 1.0
        curves[n] = _by_position((r - hard) / n, x)
        pooled[n] = np.mean(np.abs(r - hard) > 1e-9)
    big = curves[10**6]
    assert np.abs(big).max() > 0.02  # soft at the default, not the hard rank
    np.testing.assert_allclose(curves[1000], big, atol=0.01)
    np.testing.assert_allclose(curves[10], big, atol=0.03)
    assert pooled[10**6] > 0.5
    assert abs(pooled[1000] - pooled[10**6]) < 0.02
    assert abs(pooled[10] - pooled[10**6]) < 0.12  # n = 10: few entries, discrete blocks


def test_sort_quantile_and_mask_softness_is_the_same_at_every_n(normal_rows):
    """Soft sort: the fraction of pooled values; soft quantiles (q = 0.1, 0.25, 0.75, 0.9) in
    units of the row's std against the hard ones; the median stays the hard median (the
    density is highest there: the L2 soft sort pools it last, see README); the mask's fraction
    of fractional entries (k = n / 4); soft_quantile(x, 0.9) reaches more than 2 entries (at
    n = 10 on most rows: the top values pool when their gaps are wide)."""
    qs = (0.1, 0.25, 0.75, 0.9)
    pooled, shift, mask = {}, {}, {}
    for n, x in normal_rows.items():
        s = np.asarray(sortgrad.soft_sort(x))
        pooled[n] = np.mean(np.abs(s - np.sort(x, -1)) > 1e-9 * np.abs(x).max())
        sd = x.std(-1)
        q = np.asarray(sortgrad.soft_quantile(x, qs))
        shift[n] = np.mean((q - np.quantile(x, qs, axis=-1)) / sd, axis=1)
        m = np.asarray(sortgrad.soft_top_k_mask(x, n // 4))
        mask[n] = np.mean((m > 0) & (m < 1))
        g = np.asarray(jax.grad(lambda v: sortgrad.soft_quantile(v, 0.9).sum())(x))
        reached = np.sum(np.abs(g) > 1e-6 * np.abs(g).max(-1, keepdims=True), -1)
        # n = 10: the top two values pool only when their gap is wide enough (most rows)
        assert np.mean(reached > 2) > (0.8 if n == 10 else 0.999), n
    big = 10**6
    assert 0.5 < pooled[big] < 1 and abs(pooled[1000] - pooled[big]) < 0.02
    assert abs(pooled[10] - pooled[big]) < 0.15
    assert np.abs(shift[big]).min() > 0.01  # soft at every one of these q
    np.testing.assert_allclose(shift[1000], shift[big], atol=0.02)
    np.testing.assert_allclose(shift[10], shift[big], atol=0.1)
    x = normal_rows[big]
    median = float(sortgrad.soft_quantile(x, 0.5)[0])
    assert abs(median - float(np.median(x))) < 1e-3 * x.std()
    assert 0.2 < mask[big] < 0.5
    assert abs(mask[1000] - mask[big]) < 0.02 and abs(mask[10] - mask[big]) < 0.05


# --- invariance under x -> a x + b ------------------------------------------------------------

@pytest.mark.parametrize("dtype, scales, tol", [
    (np.float64, (1e-20, 1e-3, 1e3, 1e20), 1e-9),
    (np.float32, (1e-20, 1e-3, 1e3, 1e20), 2e-4),
])
@pytest.mark.parametrize("name", sorted(OPS))
def test_invariant_under_rescaling_and_shift(name, dtype, scales, tol):
    """rank and mask: op(a x + b) = op(x); sort and quantile: op(a x + b) = a op(x) + b."""
    op, law, *_ = OPS[name]
    x = RNG.standard_normal((2, 40)).astype(dtype)
    base = np.asarray(op(x), np.float64)
    for a in scales:
        for b in (0.0, 3.0 * a):
            y = (x.astype(np.float64) * a + b).astype(dtype)
            got = np.asarray(op(y), np.float64)
            if law in ("sort", "quantile"):
                got = (got - b) / a
            np.testing.assert_allclose(got, base, rtol=tol, atol=tol * np.abs(base).max())


# --- useful gradients at the default on integer data -----------------------------------------

@pytest.mark.parametrize("n", [10, 11, 1000, 100000])
@pytest.mark.parametrize("data", ["arange", "few_values"])
def test_integer_data_get_soft_gradients(n, data):
    """Evenly spaced integers (no fluctuations: they pool only past sqrt(12) for the rank,
    1/sqrt(12) for the sort) and small-range integers with heavy ties: at the default each op
    is soft (rank: a nonzero gradient, which the hard rank never has; sort: values off the
    hard sort; quantile 0.9 of arange: a gradient on more than the 2 interpolated entries; mask:
    fractional entries); integer input equals float input. (Not n = 2: a scale- and
    shift-free rank or mask of 2 entries is constant.)"""
    if data == "arange":
        xi = jnp.arange(n)
    else:
        xi = jnp.asarray(np.random.default_rng(n).integers(0, 4, n))
    xf = xi.astype(jnp.float64)
    k = max(1, n // 4)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(n))
    for reg in ("l2", "kl"):
        rank = lambda v, reg=reg: sortgrad.soft_rank(v, regularization=reg)  # noqa: E731
        np.testing.assert_allclose(rank(xi), rank(xf), rtol=1e-6)
        g = np.asarray(jax.grad(lambda v: jnp.vdot(rank(v), w))(xf))
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-6, reg
    np.testing.assert_allclose(sortgrad.soft_sort(xi), sortgrad.soft_sort(xf), rtol=1e-6)
    assert np.abs(sortgrad.soft_sort(xf) - jnp.sort(xf)).max() > 1e-6
    g = np.asarray(jax.grad(lambda v: sortgrad.soft_quantile(v, 0.9))(xf))
    assert np.all(np.isfinite(g))
    if data == "arange":  # (with ties, q = 0.9 may fall inside a tied stretch: never pooled)
        assert np.sum(np.abs(g) > 1e-9 * np.abs(g).max()) > 2
    mask = np.asarray(sortgrad.soft_top_k_mask(xf, k))
    np.testing.assert_allclose(sortgrad.soft_top_k_mask(xi, k), mask, rtol=1e-6)
    assert np.any((mask > 1e-9) & (mask < 1 - 1e-9))


# --- derivatives ------------------------------------------------------------------------------

def _composite_reference(name, s):
    """f(row) = reference_op(row, law(s, std(row), n)) in NumPy: the composite the op claims."""
    _, law, reg, ref = OPS[name]
    return lambda row: np.asarray(ref(row, _law_eps(row, law, s, reg)), np.float64).ravel()


@pytest.mark.parametrize("name", sorted(OPS))
def test_gradients_include_the_row_spread(name):
    """jacrev and jacfwd agree with central differences of the NumPy composite (the strength
    moves with the data), which differ from the fixed-strength Jacobian."""
    op, law, reg, _ = OPS[name]
    x = np.random.default_rng(5).standard_normal(9)
    s = DEFAULTS[name]
    fd = finite_difference_jacobian(_composite_reference(name, s), x, 1e-6)
    for jac in (jax.jacrev(op)(x), jax.jacfwd(op)(x)):
        np.testing.assert_allclose(np.asarray(jac).reshape(fd.shape), fd, atol=1e-6)
    fixed = jax.jacrev(lambda v: op(v, regularization_strength=_law_eps(x, law, s, reg)))(x)
    assert np.abs(np.asarray(fixed).reshape(fd.shape) - fd).max() > 1e-4


@pytest.mark.parametrize("name", sorted(OPS))
def test_check_grads_second_order(name):
    """In x and in the softness together (the default is the same code at one value)."""
    op = OPS[name][0]
    x = np.random.default_rng(6).standard_normal((2, 7))
    check_grads(lambda v, s: op(v, softness=s), (x, DEFAULTS[name]), order=2,
                modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_small_softness_gives_the_hard_ops_exactly():
    """As the softness -> 0: the hard ranks, jnp.sort, the hard mask, NumPy's quantiles (the
    unpooled values are the input values themselves, not rescaled round trips)."""
    x = np.random.default_rng(13).standard_normal((64, 10)) * 3.7
    s = 1e-3
    hard_ranks = np.argsort(np.argsort(x, -1), -1) + 1.0
    np.testing.assert_array_equal(sortgrad.soft_rank(x, softness=s), hard_ranks)
    np.testing.assert_array_equal(sortgrad.soft_sort(x, softness=s), np.sort(x, -1))
    np.testing.assert_array_equal(sortgrad.soft_sort(x, softness=s, descending=True),
                                  np.sort(x, -1)[:, ::-1])
    np.testing.assert_array_equal(sortgrad.soft_top_k_mask(x, 3, softness=s), hard_ranks > 7)
    np.testing.assert_allclose(sortgrad.soft_quantile(x, (0.2, 0.5), softness=s),
                               np.quantile(x, (0.2, 0.5), axis=-1), rtol=1e-15, atol=1e-15)
    x32 = x.astype(np.float32)
    np.testing.assert_array_equal(sortgrad.soft_sort(x32, softness=s), np.sort(x32, -1))


@pytest.mark.parametrize("name", sorted(OPS))
def test_traced_softness_jits_once_and_is_differentiable(name):
    op = OPS[name][0]
    x = jnp.asarray(np.random.default_rng(8).standard_normal((3, 8)))
    traces = []

    @jax.jit
    def traced(v, s):
        traces.append(1)
        return op(v, softness=s)
    for s in (0.2, 1.5, 6.0):
        np.testing.assert_allclose(traced(x, s), op(x, softness=s), rtol=1e-12, atol=1e-12)
    assert len(traces) == 1
    weights = jnp.linspace(-1.0, 2.0, op(x).size).reshape(op(x).shape)
    loss = lambda s: jnp.sum(op(x, softness=s) * weights)  # noqa: E731
    h = 1e-6
    np.testing.assert_allclose(jax.grad(loss)(1.5), (loss(1.5 + h) - loss(1.5 - h)) / (2 * h),
                               rtol=1e-6, atol=1e-8)
    assert np.all(np.isnan(traced(x, -1.0))) and np.all(np.isnan(traced(x, jnp.nan)))


def test_static_softness_values_share_one_eager_program(monkeypatch):
    """An eager call at another softness value runs the compiled program (no new callbacks)."""
    count = []
    original = _call.kernel_call
    monkeypatch.setattr(soft, "kernel_call", lambda *a, **k: count.append(1) or original(*a, **k))
    x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 6)))
    _call._staged.clear_cache()  # another test may have compiled this program already
    sortgrad.soft_rank(x, softness=1.0)
    assert count
    count.clear()
    sortgrad.soft_rank(x, softness=2.5)
    sortgrad.soft_rank(x + 1, softness=0.3)
    assert not count


# --- edge rows --------------------------------------------------------------------------------

EDGE_OPS = {
    "rank": (lambda v: sortgrad.soft_rank(v), lambda row: np.full(row.shape, (row.size + 1) / 2)),
    "rank_kl": (lambda v: sortgrad.soft_rank(v, regularization="kl"),
                lambda row: np.full(row.shape, (row.size + 1) / 2)),
    "sort": (lambda v: sortgrad.soft_sort(v), lambda row: row),
    "mask": (lambda v: sortgrad.soft_top_k_mask(v, 1), lambda row: np.full(row.shape,
                                                                           1 / row.size)),
    "quantile": (lambda v: sortgrad.soft_quantile(v, 0.3), lambda row: row[0]),
}


@pytest.mark.parametrize("name", sorted(EDGE_OPS))
@pytest.mark.parametrize("row", [[2.5] * 5, [0.0] * 4, [-1e300] * 3, [1e-300] * 3, [7.0],
                                 [0.1] * 3])
def test_constant_rows_and_n1_are_exact_with_finite_gradients(name, row):
    op, want = EDGE_OPS[name]
    row = np.asarray(row)
    np.testing.assert_allclose(op(row), want(row), rtol=1e-14)
    jacs = [jax.jacrev(op)(row), jax.jacfwd(op)(row)]
    if np.abs(row).max() > 1e-100:  # (a KL Hessian of a 1e-300 row is ~1e600: inf)
        jacs.append(jax.hessian(op)(row))
    for jac in jacs:
        assert np.all(np.isfinite(np.asarray(jac))), name


@pytest.mark.parametrize("name", sorted(EDGE_OPS))
def test_non_finite_rows_give_nan_rows_only(name):
    op = EDGE_OPS[name][0]
    x = np.random.default_rng(10).standard_normal((4, 5))
    x[1, 2], x[2, 0], x[3, 4] = np.nan, np.inf, -np.inf
    out = np.asarray(op(x))
    grad = np.asarray(jax.grad(lambda v: jnp.sum(op(v)))(x))
    assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1:]))
    assert np.all(np.isfinite(grad[0])) and np.all(np.isnan(grad[1:]))


def test_huge_and_tiny_rows_do_not_overflow():
    for dtype, top in ((np.float64, 1e308), (np.float32, 3e38)):
        x = np.array([[top, -top, top / 2, 0.0], [1e-300, -1e-300, 3e-301, 0.0]]).astype(dtype)
        if dtype == np.float32:  # normal numbers (XLA's CPU flushes subnormals to zero)
            x[1] = [1e-36, -1e-36, 3e-37, 0.0]
        for op, _ in EDGE_OPS.values():
            assert np.all(np.isfinite(np.asarray(op(x)))), (dtype, op)
            assert np.all(np.isfinite(np.asarray(jax.grad(lambda v: jnp.sum(op(v)))(x))))
        np.testing.assert_allclose(sortgrad.soft_rank(x[:1]), sortgrad.soft_rank(x[:1] / top),
                                   rtol=1e-5)


# --- x32 mode ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OPS))
def test_x32_default_matches_x64_on_the_same_data(name):
    op = OPS[name][0]
    x = np.random.default_rng(11).standard_normal((3, 30)).astype(np.float32)
    want = np.asarray(op(x.astype(np.float64)))
    wgrad = np.asarray(jax.grad(lambda v: jnp.sum(op(v) ** 2))(x.astype(np.float64)))
    with jax.enable_x64(False):
        xj = jnp.asarray(x)
        out = op(xj)
        grad = jax.jit(jax.grad(lambda v: jnp.sum(op(v) ** 2)))(xj)
        assert out.dtype == jnp.float32 and grad.dtype == jnp.float32
        assert op(jnp.arange(12)).dtype == jnp.float32
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(grad, wgrad, rtol=1e-3, atol=1e-3 * np.abs(wgrad).max())


def test_16_bit_input_keeps_its_dtype():
    x = jnp.asarray(np.random.default_rng(12).standard_normal((2, 9)), jnp.bfloat16)
    for name, (op, *_rest) in OPS.items():
        out = op(x)
        assert out.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(np.asarray(out, np.float32),
                                   np.asarray(op(x.astype(jnp.float32)), np.float32), rtol=2e-2,
                                   atol=2e-2)


# --- argument rules ---------------------------------------------------------------------------

CALLS = {
    "soft_rank": lambda x, **a: sortgrad.soft_rank(x, **a),
    "soft_sort": lambda x, **a: sortgrad.soft_sort(x, **a),
    "soft_top_k_mask": lambda x, **a: sortgrad.soft_top_k_mask(x, 2, **a),
    "soft_quantile": lambda x, **a: sortgrad.soft_quantile(x, 0.5, **a),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_bad_softness_raises_at_trace_time(name):
    call = CALLS[name]
    x = jax.ShapeDtypeStruct((2, 5), jnp.float32)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="softness"):
            jax.eval_shape(lambda v, b=bad: call(v, softness=b), x)
    for bad in ("1", True, [1.0]):
        with pytest.raises(TypeError, match="softness"):
            jax.eval_shape(lambda v, b=bad: call(v, softness=b), x)
    with pytest.raises(TypeError, match="softness"):
        jax.eval_shape(lambda v: call(v, softness=jnp.ones(2)), x)
    with pytest.raises(TypeError, match="softness"):
        jax.eval_shape(lambda v: call(v, softness=jnp.asarray(1)), x)
    with pytest.raises(ValueError, match="not both"):
        jax.eval_shape(lambda v: call(v, softness=1.0, regularization_strength=1.0), x)


def test_kl_sort_and_quantile_refuse_softness():
    x = jnp.ones((2, 5))
    for call in (lambda s: sortgrad.soft_sort(x, regularization="kl", softness=s),
                 lambda s: sortgrad.soft_quantile(x, 0.5, regularization="kl", softness=s)):
        for s in (1.0, jnp.asarray(1.0)):
            with pytest.raises(ValueError, match="regularization='l2' with softness"):
                call(s)


def test_mask_softness_is_the_selection_helpers_strength():
    """README: the helpers' strength on standardised scores is the mask's softness."""
    from sortgrad.selection import soft_selection_mask
    c = RNG.standard_normal((3, 30)) * 40.0 + 7.0
    for s in (0.3, 1.0, 2.0):
        np.testing.assert_allclose(soft_selection_mask(c, 5, regularization_strength=s),
                                   sortgrad.soft_top_k_mask(c, 5, softness=s), atol=1e-9)


def test_row_strength_reports_the_law():
    x = jnp.asarray(RNG.standard_normal((2, 20)))
    for op, reg in (("rank", "l2"), ("rank", "kl"), ("mask", "l2"), ("sort", "l2")):
        eps = np.asarray(_softness.row_strength(x, 0.5, op, regularization=reg))[:, 0]
        want = [_law_eps(np.asarray(row), op, 0.5, reg) for row in x]
        np.testing.assert_allclose(eps, want, rtol=1e-12)


def test_softness_figure_script_smoke(tmp_path):
    """perf/softness_figure.py (the README's figure) runs end to end at tiny sizes."""
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[2]
    out = tmp_path / "softness.png"
    proc = subprocess.run([sys.executable, str(root / "perf" / "softness_figure.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert out.stat().st_size > 10_000
