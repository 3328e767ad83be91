"""The CPU soft ops on long rows (issue 15): rows of at least RADIX_MIN_N elements are sorted
inside the fused row kernels (radix sort whose sorted keys are decoded back into the values,
no gather) and the PAVs keep their block lengths in the block_ids buffer and the sums only of
pooled blocks. Both must give, bit for bit, what the gather path (the permutation from
`_argsort`, the values gathered through it) and the reference PAV give:
- outputs, block ids and gradients of every op equal those of the gather path, on data with
  ties, signed zeros, subnormals, huge and tiny values, non-finite rows, both dtypes, both
  directions, every regularization;
- the permutation sorts the row (ties in any order: outputs never depend on it);
- the block ids are those of `isotonic_regression` (pav_l2_row / pav_kl_row) on the same
  isotonic problem;
- a long single row (2^17) matches the oracle-free invariants (ranks sum, mask sum, sort
  sum) and the gather path.
"""

from __future__ import annotations

import numpy as np
import pytest

from sortgrad.kernels.soft import _cpu as soft_cpu
from sortgrad.kernels.isotonic import _cpu as iso_cpu
from sortgrad.kernels.segmented_sort._cpu import RADIX_MIN_N

DTYPES = ("float32", "float64")


def _data(kind, rows, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal((rows, n))
    elif kind == "ties":
        x = rng.integers(-4, 5, (rows, n)).astype(np.float64)
    elif kind == "positive":  # small positive integers: the lowest radix digit is constant,
        # the pass skipped, an even number of passes: the sorted keys end in the first buffer
        x = rng.integers(1, 9, (rows, n)).astype(np.float64)
    elif kind == "zeros":  # signed zeros and a few values
        x = np.where(rng.random((rows, n)) < 0.5, 0.0, -0.0)
        x[:, ::7] = rng.standard_normal(x[:, ::7].shape)
    elif kind == "subnormal":
        tiny = np.finfo(dtype).smallest_subnormal
        x = rng.integers(-50, 50, (rows, n)) * float(tiny)
    elif kind == "huge":
        x = np.clip(rng.standard_normal((rows, n)), -4, 4) * (float(np.finfo(dtype).max) / 8)
    elif kind == "mixed":  # positive and negative, wide exponents
        x = rng.standard_normal((rows, n)) * 10.0 ** rng.integers(-20, 20, (rows, n))
    elif kind == "nonfinite":
        x = rng.standard_normal((rows, n))
        x[0, n // 2] = np.nan
        if rows > 1:
            x[1, 3] = -np.inf
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(x.astype(dtype))


def _gather_plan(x, descending, perm):
    spec = soft_cpu.key_spec(x.dtype, canonical=False, descending=descending)
    soft_cpu._argsort(x, descending, perm)
    return soft_cpu.raw_bits(x), spec, False


def _all_ops(x, g, eps):
    """{op: (values, block_ids, dx, perm)} of every soft op on x."""
    out = {}
    n = x.shape[1]
    for reg in ("l2", "kl"):
        for desc in (False, True):
            y, p, b = soft_cpu.soft_rank_rows(x, eps, reg, desc)
            dx = soft_cpu.soft_rank_vjp_rows(g, x, y, p, b, eps, reg, desc)
            out["rank", reg, desc] = (y, b, dx, p)
            y, p, b = soft_cpu.soft_sort_rows(x, eps, reg, desc)
            dx = soft_cpu.soft_sort_vjp_rows(g, x, p, b, eps, reg, desc)
            out["sort", reg, desc] = (y, b, dx, p)
    for k in (0, 1, n // 3, n):
        y, p, b = soft_cpu.soft_top_k_mask_rows(x, k, eps)
        dx = soft_cpu.soft_top_k_mask_vjp_rows(g, x, p, b, eps)
        out["mask", k] = (y, b, dx, p)
    return out


def _same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(
        a.view(np.uint8), b.view(np.uint8))


def _check_perm(x, p, descending):
    """perm sorts each row by value (descending for the isotonic problem)."""
    for r in range(x.shape[0]):
        row = x[r].astype(np.float64)
        if not np.all(np.isfinite(row)):
            continue
        v = row[p[r]]
        assert sorted(p[r].tolist()) == list(range(x.shape[1]))
        d = np.diff(v)
        assert np.all(d <= 0) if descending else np.all(d >= 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "positive", "zeros", "subnormal", "huge", "mixed",
                                  "nonfinite"])
@pytest.mark.parametrize("eps", [1e-3, 1.0, 300.0])
def test_fused_equals_gather_path(monkeypatch, dtype, kind, eps):
    rows, n = 3, RADIX_MIN_N + 37
    x = _data(kind, rows, n, dtype)
    g = np.random.default_rng(1).standard_normal((rows, n)).astype(dtype)
    fused = _all_ops(x, g, eps)
    monkeypatch.setattr(soft_cpu, "_sort_plan", _gather_plan)
    gathered = _all_ops(x, g, eps)
    for key, (y, b, dx, p) in fused.items():
        y0, b0, dx0, _ = gathered[key]
        assert _same_bits(y, y0), (key, "values")
        assert np.array_equal(b, b0), (key, "block_ids")
        assert _same_bits(dx, dx0), (key, "gradient")
    for key in (("rank", "l2", False), ("rank", "l2", True)):
        # ranks: the isotonic problem is sorted descending in the signed x
        _check_perm(x if not key[2] else -x, fused[key][3], descending=True)
    _check_perm(x, fused["sort", "l2", True][3], descending=True)
    _check_perm(x, fused["sort", "l2", False][3], descending=False)


def _ids(counts):
    return np.repeat(np.arange(len(counts), dtype=np.int32), counts)


def _reference_rank_blocks(s, reg):
    """Block ids of the soft rank's isotonic problem by the isotonic kernels' own PAVs (the
    ones the soft rank called before it was fused)."""
    n = s.shape[0]
    rho = np.arange(n, 0, -1, dtype=np.float64)
    sol, ref = np.empty(n), np.empty(n, np.int32)
    if reg == "l2":
        iso_cpu.pav_l2_row(s - rho, iso_cpu.no_keys(), sol, ref)
        return ref
    if s[0] - s[-1] < iso_cpu.LINEAR_KL_SPREAD:
        e = np.exp(s - s[0])
        sum_e, sum_rho, counts = np.empty(n), np.empty(n), np.empty(n, np.int64)
        top = iso_cpu.pav_ratio_blocks(e, rho.copy(), s, np.log(rho), iso_cpu.no_keys(),
                                       sum_e, sum_rho, counts)
        return _ids(counts[:top + 1])
    iso_cpu.pav_kl_row(s, np.log(rho), iso_cpu.no_keys(), sol, ref)
    return ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [RADIX_MIN_N, 4099])
def test_block_ids_match_isotonic_regression(dtype, n):
    """The fused stacks pool exactly as the isotonic kernels' PAVs on the same problem."""
    x = _data("ties", 4, n, dtype, seed=n)  # integers: kinks (equal blocks) at eps = 1, 0.5
    x[1] *= np.asarray(0.37, dtype)
    x[2] = _data("normal", 1, n, dtype, seed=n + 1)[0]
    x[3] = x[2] * np.asarray(10.0, dtype)  # pooled blocks in the soft sort's shifted KL PAV
    for eps in (1e-3, 0.05, 0.5, 1.0, 20.0, 1e4):
        for reg in ("l2", "kl"):
            _, perm, blocks = soft_cpu.soft_rank_rows(x, eps, reg, False)
            for r in range(x.shape[0]):
                s = x[r].astype(np.float64)[perm[r]] * (1.0 / eps)
                assert np.array_equal(blocks[r], _reference_rank_blocks(s, reg)), (eps, reg, r)
            _, perm, blocks = soft_cpu.soft_sort_rows(x, eps, reg, True)
            for r in range(x.shape[0]):
                s = x[r].astype(np.float64)[perm[r]]
                theta = np.arange(n, 0, -1, dtype=np.float64) * (1.0 / eps)
                sol, ref = np.empty(n), np.empty(n, np.int32)
                if reg == "l2":
                    iso_cpu.pav_l2_row(theta - s, s, sol, ref)
                else:
                    iso_cpu.pav_kl_row(theta, s, s, sol, ref)
                assert np.array_equal(blocks[r], ref), (eps, "sort", reg, r)
        k = n // 4
        _, perm, blocks = soft_cpu.soft_top_k_mask_rows(x, k, eps)
        for r in range(x.shape[0]):
            s = x[r].astype(np.float64)[perm[r]] * (1.0 / eps)
            w = (np.arange(n) < k).astype(np.float64)
            sol, ref = np.empty(n), np.empty(n, np.int32)
            iso_cpu.pav_l2_row(s - w, s, sol, ref)
            assert np.array_equal(blocks[r], ref), (eps, "mask", r)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_long_row(monkeypatch, dtype):
    n = 1 << 17
    x = _data("normal", 1, n, dtype, seed=3)
    x[0, ::5] = x[0, 1::5]  # ties
    g = np.random.default_rng(4).standard_normal((1, n)).astype(dtype)
    eps = 1.0
    ranks, perm, blocks = soft_cpu.soft_rank_rows(x, eps, "l2", False)
    assert abs(ranks.astype(np.float64).sum() - n * (n + 1) / 2) <= 1e-6 * n * n
    assert ranks.min() >= 1 and ranks.max() <= n
    mask, _, _ = soft_cpu.soft_top_k_mask_rows(x, 1000, 0.01)
    assert abs(mask.astype(np.float64).sum() - 1000) <= 1e-3
    values, _, _ = soft_cpu.soft_sort_rows(x, 100.0, "l2", False)
    assert np.all(np.diff(values.astype(np.float64)) >= 0)
    fused = {key: v for key, v in _all_ops(x, g, eps).items() if key[0] != "mask"}
    monkeypatch.setattr(soft_cpu, "_sort_plan", _gather_plan)
    gathered = {key: v for key, v in _all_ops(x, g, eps).items() if key[0] != "mask"}
    for key, (y, b, dx, _) in fused.items():
        y0, b0, dx0, _ = gathered[key]
        assert _same_bits(y, y0) and np.array_equal(b, b0) and _same_bits(dx, dx0), key
