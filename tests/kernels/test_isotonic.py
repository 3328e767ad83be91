"""The isotonic-regression kernel (decreasing PAV) and its VJP, against the float64 oracle in
sortgrad.testing (a different algorithm: list of blocks, merge the first violating pair)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sortgrad.kernels import isotonic_regression, isotonic_regression_vjp
from sortgrad.testing import (SIZES, finite_difference_jacobian, isotonic_inputs,
                              reference_isotonic, reference_isotonic_minmax,
                              reference_isotonic_vjp)

REGS = ["l2", "kl"]
DTYPES = [np.float32, np.float64]
# float32 results are float64 sums rounded once; allow a few float32 ulps of the data scale.
RTOL = {np.float32: 2e-6, np.float64: 1e-12}


def _rows(a, n):
    a = np.asarray(a)
    return a.reshape(math.prod(a.shape[:-1]), n)


def _reference_rows(s, w, regularization):
    n = s.shape[-1]
    w = np.broadcast_to(w, s.shape)
    sols, blocks = [], []
    for s_row, w_row in zip(_rows(s, n), _rows(w, n)):
        sol, blk = reference_isotonic(s_row.astype(np.float64), w_row.astype(np.float64),
                                      regularization)
        sols.append(sol)
        blocks.append(blk)
    shape = s.shape
    if not sols:
        return np.zeros(shape), np.zeros(shape, np.int32)
    return np.stack(sols).reshape(shape), np.stack(blocks).reshape(shape)


def _scale(*arrays):
    return max([1.0] + [float(np.max(np.abs(a))) for a in arrays if a.size])


def _assert_valid_blocks(sol, blocks, s, w, regularization):
    """block ids 0, 1, ... from the left in +0/+1 steps; the solution is constant inside a
    block, non-increasing across blocks, and each block holds its own block value."""
    n = sol.shape[-1]
    w = np.broadcast_to(w, s.shape)
    for sol_row, blk, s_row, w_row in zip(_rows(sol, n), _rows(blocks, n), _rows(s, n),
                                          _rows(w, n)):
        if n == 0:
            continue
        assert blk[0] == 0
        steps = np.diff(blk)
        assert np.all((steps == 0) | (steps == 1)), blk
        same = steps == 0
        assert np.all(np.diff(sol_row)[same] == 0)
        assert np.all(np.diff(sol_row)[~same] <= 0)
        for b in range(blk[-1] + 1):
            sel = blk == b
            # the block value from the kernel's own blocks, by the oracle's reduction
            value, _ = reference_isotonic(s_row[sel].astype(np.float64),
                                          w_row[sel].astype(np.float64), regularization,
                                          pool_ties=True)
            np.testing.assert_allclose(sol_row[sel], value[0],
                                       rtol=RTOL[sol.dtype.type] * 10,
                                       atol=RTOL[sol.dtype.type] * 10 * _scale(s_row, w_row))


# --- the oracle itself --------------------------------------------------------------------------

@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("seed", range(6))
def test_reference_solver_matches_minmax_formula(regularization, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 14))
    s, w = rng.normal(size=n) * 2, rng.normal(size=n)
    sol, _ = reference_isotonic(s, w, regularization)
    np.testing.assert_allclose(sol, reference_isotonic_minmax(s, w, regularization),
                               rtol=1e-12, atol=1e-12)


def test_reference_solver_small_example():
    # y = s - w = [1, 3, 2]: 1 < 3 pools to 2; then 2 and 2 are equal: one block (the default,
    # the kernels' pooled side of a kink), or separate blocks with pool_ties=False; the
    # solution is the same
    sol, blocks = reference_isotonic([1.0, 3.0, 2.0], [0.0, 0.0, 0.0], "l2")
    np.testing.assert_array_equal(sol, [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(blocks, [0, 0, 0])
    sol, blocks = reference_isotonic([1.0, 3.0, 2.0], [0.0, 0.0, 0.0], "l2", pool_ties=False)
    np.testing.assert_array_equal(sol, [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(blocks, [0, 0, 1])
    # tie keys (the soft ops' exception): equal blocks over tied keys stay apart
    sol, blocks = reference_isotonic([2.0, 2.0, 1.0, 1.0], [0.0] * 4, "l2",
                                     tie_keys=[5.0, 5.0, 4.0, 3.0])
    np.testing.assert_array_equal(blocks, [0, 1, 2, 2])
    sol, blocks = reference_isotonic([3.0, 1.0, 2.0], [0.0, 0.0, 0.0], "l2")
    np.testing.assert_array_equal(sol, [3.0, 1.5, 1.5])
    np.testing.assert_array_equal(blocks, [0, 1, 1])


# --- forward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("shared_w", [False, True], ids=["w_full", "w_shared"])
def test_forward_matches_reference(regularization, dtype, n, shared_w):
    rng = np.random.default_rng(n + 7 * shared_w)
    rows = 1 if n >= 1023 else 3
    kind = "sorted" if n >= 1023 else "random"
    s, w = isotonic_inputs(rng, (rows, n), dtype, regularization, kind)
    if shared_w:
        w = w[0].copy()
    sol, blocks = isotonic_regression(s, w, regularization=regularization)
    assert sol.dtype == dtype and sol.shape == s.shape
    assert blocks.dtype == np.int32 and blocks.shape == s.shape
    ref_sol, ref_blocks = _reference_rows(s, w, regularization)
    np.testing.assert_allclose(sol, ref_sol, rtol=RTOL[dtype],
                               atol=RTOL[dtype] * _scale(s, w))
    np.testing.assert_array_equal(blocks, ref_blocks)
    if n < 1000:
        _assert_valid_blocks(sol, blocks, s, w, regularization)


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared_w", [False, True], ids=["w_full", "w_shared"])
def test_batch_dims(regularization, dtype, shared_w):
    rng = np.random.default_rng(1)
    s, w = isotonic_inputs(rng, (2, 3, 17), dtype, regularization)
    if shared_w:
        w = w[1, 2].copy()
    sol, blocks = isotonic_regression(s, w, regularization=regularization)
    assert sol.shape == blocks.shape == (2, 3, 17)
    ref_sol, ref_blocks = _reference_rows(s, w, regularization)
    np.testing.assert_allclose(sol, ref_sol, rtol=RTOL[dtype], atol=RTOL[dtype] * _scale(s, w))
    np.testing.assert_array_equal(blocks, ref_blocks)
    _assert_valid_blocks(sol, blocks, s, w, regularization)
    # each row on its own gives the same answer as inside the batch
    for i in range(2):
        for j in range(3):
            row_sol, row_blocks = isotonic_regression(s[i, j], w if shared_w else w[i, j],
                                                      regularization=regularization)
            np.testing.assert_array_equal(row_sol, sol[i, j])
            np.testing.assert_array_equal(row_blocks, blocks[i, j])


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5), (2, 0, 4)])
@pytest.mark.parametrize("regularization", REGS)
def test_empty(shape, regularization):
    s = np.zeros(shape)
    sol, blocks = isotonic_regression(s, np.zeros(shape), regularization=regularization)
    assert sol.shape == blocks.shape == shape
    assert blocks.dtype == np.int32
    gs, gw = isotonic_regression_vjp(np.zeros(shape), s, np.zeros(shape), blocks,
                                     regularization=regularization)
    assert gs.shape == gw.shape == shape


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_size_one_is_the_block_value(regularization, dtype):
    s, w = np.array([[2.5], [-1.0]], dtype), np.array([[0.5], [3.0]], dtype)
    sol, blocks = isotonic_regression(s, w, regularization=regularization)
    np.testing.assert_allclose(sol, s - w)  # both block values reduce to s - w for one entry
    np.testing.assert_array_equal(blocks, [[0], [0]])


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("n", [33, 1025])
def test_heavy_ties(regularization, n):
    rng = np.random.default_rng(n)
    s, w = isotonic_inputs(rng, (4, n), np.float64, regularization, "ties")
    sol, blocks = isotonic_regression(s, w, regularization=regularization)
    ref_sol, ref_blocks = _reference_rows(s, w, regularization)
    np.testing.assert_allclose(sol, ref_sol, rtol=1e-12, atol=1e-12)
    if regularization == "l2":  # small-integer means are exact: the same pooling decisions
        np.testing.assert_array_equal(blocks, ref_blocks)
    _assert_valid_blocks(sol, blocks, s, w, regularization)


@pytest.mark.parametrize("regularization", REGS)
def test_equal_neighbours_pool(regularization):
    """Equal neighbours pool (the pooled side of a kink): a constant row is one block."""
    s = np.full((2, 9), 1.5)
    sol, blocks = isotonic_regression(s, np.zeros(9), regularization=regularization)
    np.testing.assert_array_equal(blocks, 0)
    np.testing.assert_allclose(sol, 1.5, rtol=1e-14)
    # a violation next to the equal run: 1 < 3 pool to 2, then equal to the 2s: one block
    sol, blocks = isotonic_regression(np.array([2.0, 2.0, 1.0, 3.0]), np.zeros(4),
                                      regularization="l2")
    np.testing.assert_array_equal(blocks, [0, 0, 0, 0])
    np.testing.assert_array_equal(sol, [2.0, 2.0, 2.0, 2.0])


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["random", "sorted", "ties"])
def test_solution_is_non_increasing(regularization, dtype, kind):
    rng = np.random.default_rng(3)
    s, w = isotonic_inputs(rng, (5, 257), dtype, regularization, kind)
    sol, _ = isotonic_regression(s, w, regularization=regularization)
    assert np.all(np.diff(sol, axis=-1) <= 0)


def test_kl_equal_block_values_stay_monotone():
    """Blocks whose values are equal in exact arithmetic (here 1 = lse(1, 2) - lse(1, 0) and
    1 = 1 - 0) must not come out increasing after rounding."""
    sol, _ = isotonic_regression(np.array([1.0, 1.0, 2.0]), np.array([0.0, 1.0, 0.0]),
                                 regularization="kl")
    np.testing.assert_allclose(sol, 1.0, rtol=1e-15)
    assert np.all(np.diff(sol) <= 0), sol.tolist()


def test_already_decreasing_is_unchanged():
    y = np.array([5.0, 3.0, 2.5, -1.0])
    sol, blocks = isotonic_regression(y, np.zeros(4), regularization="l2")
    np.testing.assert_array_equal(sol, y)
    np.testing.assert_array_equal(blocks, [0, 1, 2, 3])


def test_increasing_pools_everything():
    sol, blocks = isotonic_regression(np.arange(6.0), np.zeros(6), regularization="l2")
    np.testing.assert_allclose(sol, 2.5)
    np.testing.assert_array_equal(blocks, 0)


@pytest.mark.parametrize("regularization", REGS)
def test_kl_extreme_spread(regularization):
    """Exponents far apart (spread >> 700): no overflow, still the oracle's answer."""
    rng = np.random.default_rng(5)
    s = np.sort(rng.normal(size=(2, 40)) * 800, axis=-1)[:, ::-1].copy()
    s[:, 10:14] = s[:, 10:11] - np.array([5.0, 0.0, 3.0, 1.0])  # some violations to pool
    w = np.log(np.arange(40, 0, -1.0))
    sol, blocks = isotonic_regression(s, w, regularization=regularization)
    assert np.all(np.isfinite(sol))
    ref_sol, ref_blocks = _reference_rows(s, w, regularization)
    np.testing.assert_allclose(sol, ref_sol, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(blocks, ref_blocks)


@pytest.mark.parametrize("regularization", REGS)
def test_nan_row_does_not_touch_other_rows(regularization):
    rng = np.random.default_rng(6)
    s, w = isotonic_inputs(rng, (3, 20), np.float64, regularization)
    clean_sol, clean_blocks = isotonic_regression(s, w, regularization=regularization)
    s_nan = s.copy()
    s_nan[1, 7] = np.nan
    sol, blocks = isotonic_regression(s_nan, w, regularization=regularization)
    np.testing.assert_array_equal(sol[[0, 2]], clean_sol[[0, 2]])
    np.testing.assert_array_equal(blocks[[0, 2]], clean_blocks[[0, 2]])


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_16_bit_inputs_compute_in_float32(regularization, dtype):
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dtype = ml_dtypes.bfloat16
    rng = np.random.default_rng(7)
    s, w = isotonic_inputs(rng, (2, 33), np.float64, regularization)
    s16, w16 = s.astype(dtype), w.astype(dtype)
    sol, blocks = isotonic_regression(s16, w16, regularization=regularization)
    assert sol.dtype == np.float32
    sol32, blocks32 = isotonic_regression(s16.astype(np.float32), w16.astype(np.float32),
                                          regularization=regularization)
    np.testing.assert_array_equal(sol, sol32)
    np.testing.assert_array_equal(blocks, blocks32)


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("shared_w", [False, True], ids=["w_full", "w_shared"])
def test_inputs_not_modified(regularization, shared_w):
    rng = np.random.default_rng(8)
    s, w = isotonic_inputs(rng, (3, 40), np.float64, regularization)
    if shared_w:
        w = w[0].copy()
    s0, w0 = s.copy(), w.copy()
    sol, blocks = isotonic_regression(s, w, regularization=regularization)
    np.testing.assert_array_equal(s, s0)
    np.testing.assert_array_equal(w, w0)
    g = rng.normal(size=s.shape)
    g0, b0 = g.copy(), blocks.copy()
    isotonic_regression_vjp(g, s, w, blocks, regularization=regularization)
    for a, a0 in [(s, s0), (w, w0), (g, g0), (blocks, b0)]:
        np.testing.assert_array_equal(a, a0)


# --- VJP ----------------------------------------------------------------------------------------

def _fd_vjp(g, s, w, regularization, step=1e-6):
    """<g, d solution> by central differences of the oracle, per row (w full)."""
    n = s.shape[-1]
    grads_s, grads_w = [], []
    for g_row, s_row, w_row in zip(_rows(g, n), _rows(s, n), _rows(w, n)):
        def f_s(v, w_row=w_row, g_row=g_row):
            return g_row @ reference_isotonic(v, w_row, regularization)[0]

        def f_w(v, s_row=s_row, g_row=g_row):
            return g_row @ reference_isotonic(s_row, v, regularization)[0]
        grads_s.append(finite_difference_jacobian(f_s, s_row, step))
        grads_w.append(finite_difference_jacobian(f_w, w_row, step))
    return np.stack(grads_s).reshape(s.shape), np.stack(grads_w).reshape(s.shape)


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("kind", ["random", "sorted"])
def test_vjp_matches_finite_differences(regularization, kind):
    rng = np.random.default_rng(9)
    s, w = isotonic_inputs(rng, (3, 16), np.float64, regularization, kind)
    g = rng.normal(size=s.shape)
    _, blocks = isotonic_regression(s, w, regularization=regularization)
    assert blocks.max() < 15, "the inputs should pool somewhere"
    grad_s, grad_w = isotonic_regression_vjp(g, s, w, blocks, regularization=regularization)
    assert grad_s.dtype == grad_w.dtype == np.float64
    fd_s, fd_w = _fd_vjp(g, s, w, regularization)
    np.testing.assert_allclose(grad_s, fd_s, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad_w, fd_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 31, 32, 33, 1025])
@pytest.mark.parametrize("shared_w", [False, True], ids=["w_full", "w_shared"])
def test_vjp_matches_reference(regularization, dtype, n, shared_w):
    rng = np.random.default_rng(10 + n)
    s, w = isotonic_inputs(rng, (2, n), dtype, regularization, "sorted" if n > 33 else "random")
    if shared_w:
        w = w[0].copy()
    g = rng.normal(size=s.shape).astype(dtype)
    _, blocks = isotonic_regression(s, w, regularization=regularization)
    grad_s, grad_w = isotonic_regression_vjp(g, s, w, blocks, regularization=regularization)
    assert grad_s.dtype == grad_w.dtype == dtype
    assert grad_s.shape == grad_w.shape == s.shape  # grad_w per row even for a shared w
    w_full = np.broadcast_to(w, s.shape)
    for r in range(2):
        ref_s, ref_w = reference_isotonic_vjp(g[r], s[r], w_full[r], blocks[r], regularization)
        np.testing.assert_allclose(grad_s[r], ref_s, rtol=RTOL[dtype] * 10,
                                   atol=RTOL[dtype] * 10 * _scale(g[r]))
        np.testing.assert_allclose(grad_w[r], ref_w, rtol=RTOL[dtype] * 10,
                                   atol=RTOL[dtype] * 10 * _scale(g[r]))


@pytest.mark.parametrize("regularization", REGS)
def test_vjp_block_sums(regularization):
    """Within each block the gradients carry the block's total cotangent (both rules)."""
    rng = np.random.default_rng(11)
    s, w = isotonic_inputs(rng, (4, 50), np.float64, regularization)
    g = rng.normal(size=s.shape)
    _, blocks = isotonic_regression(s, w, regularization=regularization)
    grad_s, grad_w = isotonic_regression_vjp(g, s, w, blocks, regularization=regularization)
    for r in range(4):
        for b in np.unique(blocks[r]):
            sel = blocks[r] == b
            np.testing.assert_allclose(grad_s[r, sel].sum(), g[r, sel].sum(), atol=1e-12)
            np.testing.assert_allclose(grad_w[r, sel].sum(), -g[r, sel].sum(), atol=1e-12)


def test_vjp_kl_is_max_shifted():
    s = np.array([[1000.0, 1001.0, 999.0]])
    w = np.array([[-800.0, -799.0, -801.0]])
    _, blocks = isotonic_regression(s, w, regularization="kl")
    g = np.array([[1.0, 2.0, 3.0]])
    grad_s, grad_w = isotonic_regression_vjp(g, s, w, blocks, regularization="kl")
    assert np.all(np.isfinite(grad_s)) and np.all(np.isfinite(grad_w))
    ref_s, ref_w = reference_isotonic_vjp(g[0], s[0], w[0], blocks[0], "kl")
    np.testing.assert_allclose(grad_s[0], ref_s, rtol=1e-12)
    np.testing.assert_allclose(grad_w[0], ref_w, rtol=1e-12)


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["L2", "KL", "", None, "entropic", "l1"])
def test_bad_regularization_raises(bad):
    s = np.zeros((2, 3))
    with pytest.raises(ValueError):
        isotonic_regression(s, s, regularization=bad)
    with pytest.raises(ValueError):
        isotonic_regression_vjp(s, s, s, np.zeros((2, 3), np.int32), regularization=bad)


@pytest.mark.parametrize("w_shape", [(2, 4), (4,), (3, 3), (1, 2, 3), (2,)])
def test_w_shape_mismatch_raises(w_shape):
    s = np.zeros((2, 3))
    with pytest.raises(ValueError):
        isotonic_regression(s, np.zeros(w_shape), regularization="l2")
    with pytest.raises(ValueError):
        isotonic_regression_vjp(s, s, np.zeros(w_shape), np.zeros((2, 3), np.int32),
                                regularization="l2")


@pytest.mark.parametrize("which", ["cotangent", "block_ids"])
def test_vjp_shape_mismatch_raises(which):
    s = np.zeros((2, 3))
    g = np.zeros((2, 4)) if which == "cotangent" else s
    blocks = np.zeros((2, 4) if which == "block_ids" else (2, 3), np.int32)
    with pytest.raises(ValueError):
        isotonic_regression_vjp(g, s, s, blocks, regularization="l2")


def test_scalar_raises():
    with pytest.raises(ValueError):
        isotonic_regression(np.float64(1.0), np.float64(1.0), regularization="l2")


def test_integer_input_raises():
    with pytest.raises(TypeError):
        isotonic_regression(np.arange(4), np.zeros(4), regularization="l2")
