"""Soft rank, soft sort and the soft top-k mask on every backend (the `backend` fixture,
tests/_backends.py): the row functions of `sortgrad/kernels/soft/` (`_cpu.py`; `_cupy.py` +
`soft.cu`, composing the segmented-sort and isotonic kernels; `_numba_cuda.py`) and their VJPs.

Each case runs one forward on a batch of rows (random, integer-valued (heavy ties), and where
there are several rows one with NaN and one with +-inf), checks that perm is a permutation of
every row, that block ids run 0, 1, ... in steps of 0 or 1 and that non-finite rows are NaN
with block ids 0, then runs the VJP with the backend's own residuals (perm, block_ids, ranks).
Device backends are compared with the CPU backend `sortgrad.kernels.soft._cpu` (values and
VJP, float64 rtol 1e-12, float32 1e-6 of the data scale); the CPU backend with the float64
oracles of `sortgrad.testing` on its finite rows (`reference_soft_rank` / `_sort` /
`_top_k_mask`; the VJP against g @ the oracle's Jacobian on rows of at most 64 entries -- for
the soft sort only on rows without ties, where the VJP follows the backend's order of ties).

Cases come in three tiers (`over_backends`): the simulator is slow and runs a subset (all
configurations at n = 33, fewer at other sizes, lowered launch constants: 32-thread blocks, a
128-entry stage, so that n = 1025 takes the direct global-memory path); every other backend
runs all configurations at n = 1, 31, 32, 33, 1025 and 2100 (> 2048 entries: the direct
(unstaged) path of soft.cu and the tiled sort); real devices also n = 70001.
"""

from __future__ import annotations

import numpy as np
import pytest
from _backends import PUBLIC, cpu_result, on_backends, over_backends

from sortgrad.kernels.soft import _cupy as soft_cupy
from sortgrad.testing import (
    filled_bytes,
    reference_soft_rank,
    reference_soft_rank_jacobian,
    reference_soft_sort,
    reference_soft_sort_jacobian,
    reference_soft_top_k_mask,
    reference_soft_top_k_mask_jacobian,
)

OP = "soft"
TOL = {"float32": 1e-6, "float64": 1e-12}
EPS = 0.7
# the oracles' Jacobians are dense (n, n) products: rows up to this length
JACOBIAN_MAX_N = 64

# "op-regularization-asc|desc" or "mask-k<k>": every configuration of the three ops; k as a
# function of n ("0", "1", "n")
CONFIGS = ([f"rank-{reg}-{order}" for reg in ("l2", "kl") for order in ("asc", "desc")]
           + [f"sort-{reg}-{order}" for reg in ("l2", "kl") for order in ("asc", "desc")]
           + [f"mask-k{k}" for k in ("0", "1", "n")])
SIZES = (1, 31, 32, 33, 1025)
DTYPES = ("float32", "float64")


def _parse(config):
    """(op, regularization, descending) or ("mask", None, k) (k as in CONFIGS)."""
    parts = config.split("-")
    if parts[0] == "mask":
        return "mask", None, parts[1][1:]
    return parts[0], parts[1], parts[2] == "desc"


def _full_cases(sizes):
    return [(n, dtype, c) for n in sizes for dtype in DTYPES for c in CONFIGS]


def _simulator_cases():
    """All configurations at n = 33 (both dtypes) and at n = 1 (the dtype alternating); n = 31
    and n = 32 half of them each; n = 1025 three configurations (one row: the sort is slow)."""
    cases = [(33, dtype, c) for dtype in DTYPES for c in CONFIGS]
    cases += [(1, DTYPES[i % 2], c) for i, c in enumerate(CONFIGS)]
    cases += [(31, DTYPES[i % 2], c) for i, c in enumerate(CONFIGS[0::2])]
    cases += [(32, DTYPES[i % 2], c) for i, c in enumerate(CONFIGS[1::2])]
    cases += [(1025, "float32", "rank-kl-desc"), (1025, "float64", "sort-kl-asc"),
              (1025, "float32", "mask-k1")]
    return cases


SIM_CASES = _simulator_cases()
EMU_CASES = _full_cases(SIZES + (2100,))
GPU_CASES = _full_cases((70_001,))

# the simulator computes with NumPy scalars: the NaN / inf rows warn inside the isotonic kernels
_NAN_ROWS_WARN = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


# --- inputs and checks --------------------------------------------------------------------------

def _inputs(n, dtype, seed, rows=None):
    """Rows: random normal, integer-valued (heavy ties), and (with 4 rows) one with a NaN and
    one with +inf and -inf among finite entries. A single row (the default for n > 64) mixes
    random and integer-valued entries."""
    rng = np.random.default_rng(seed)
    rows = (4 if n <= 64 else 1) if rows is None else rows
    x = rng.normal(size=(rows, n)) * 2
    if rows > 1:
        x[1] = rng.integers(-3, 4, size=n)
    else:
        x[:, ::2] = rng.integers(-3, 4, size=x[:, ::2].shape)
    if rows >= 4 and n:
        x[2, rng.integers(n)] = np.nan
        x[3, rng.integers(n)] = np.inf
        x[3, rng.integers(n)] = -np.inf
    g = rng.normal(size=(rows, n))
    return np.ascontiguousarray(x, dtype=dtype), np.ascontiguousarray(g, dtype=dtype)


def _assert_close(actual, expected, dtype, what):
    tol = TOL[np.dtype(dtype).name]
    finite = expected[np.isfinite(expected)]
    scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, equal_nan=True,
                               err_msg=what)


def _bad_rows(x):
    return ~np.all(np.isfinite(x), axis=-1)


def _check_residuals(x, values, perm, block_ids):
    rows, n = x.shape
    assert perm.dtype == np.int32 and block_ids.dtype == np.int32
    assert values.dtype == x.dtype
    assert values.shape == perm.shape == block_ids.shape == x.shape
    for r in range(rows):
        assert np.array_equal(np.sort(perm[r]), np.arange(n)), f"row {r}: perm"
    bad = _bad_rows(x)
    assert np.all(np.isnan(values[bad]))
    assert np.all(block_ids[bad] == 0)
    assert not np.any(np.isnan(values[~bad]))
    good = block_ids[~bad]
    if good.size:  # numbered 0, 1, ... from the left in steps of 0 or 1
        assert np.all(good[:, 0] == 0)
        assert np.all(np.isin(np.diff(good, axis=-1), (0, 1)))


def _mask_k(extra, n):
    return {"0": 0, "1": min(1, n), "n": n}[extra]


def _forward_args(config, n):
    op, reg, extra = _parse(config)
    if op == "mask":
        return "soft_top_k_mask_rows", (_mask_k(extra, n), EPS)
    return f"soft_{op}_rows", (EPS, reg, extra)


def _vjp_args(config):
    op, reg, extra = _parse(config)
    if op == "mask":
        return "soft_top_k_mask_vjp_rows", (EPS,)
    return f"soft_{op}_vjp_rows", (EPS, reg, extra)


def _oracle(config, n):
    """(values(row), jacobian(row)) of the float64 oracles for `config` at row length n."""
    op, reg, extra = _parse(config)
    if op == "mask":
        k = _mask_k(extra, n)
        return (lambda row: reference_soft_top_k_mask(row, k, EPS),
                lambda row: reference_soft_top_k_mask_jacobian(row, k, EPS))
    values, jacobian = {"rank": (reference_soft_rank, reference_soft_rank_jacobian),
                        "sort": (reference_soft_sort, reference_soft_sort_jacobian)}[op]
    return (lambda row: values(row, EPS, reg, extra),
            lambda row: jacobian(row, EPS, reg, extra))


def _check_oracle_forward(x, values, config, what):
    value_fn, _ = _oracle(config, x.shape[1])
    for r in np.flatnonzero(~_bad_rows(x)):
        _assert_close(values[r], value_fn(x[r]), x.dtype, f"{what} row {r} vs oracle")


def _check_oracle_vjp(x, g, dx, config, what):
    n = x.shape[1]
    if n > JACOBIAN_MAX_N:
        return
    _, jacobian_fn = _oracle(config, n)
    for r in np.flatnonzero(~_bad_rows(x)):
        if config.startswith("sort") and np.unique(x[r]).size < n:
            continue  # ties: the soft sort's VJP follows the backend's order of ties
        expected = g[r].astype(np.float64) @ jacobian_fn(x[r])
        _assert_close(dx[r], expected, x.dtype, f"{what} vjp row {r} vs oracle Jacobian")


def check_soft(backend, n, dtype, config, *, seed=0, rows=None, use_out=False, stream=None):
    """Forward and VJP of `config` on the backend (module docstring); out= arrays (pre-filled
    with the byte 0xA5) are returned as given (`Backend.call` checks), inputs untouched."""
    x, g = _inputs(n, dtype, seed, rows)
    fwd, fargs = _forward_args(config, n)
    out = (tuple(filled_bytes(x.shape, t) for t in (x.dtype, np.int32, np.int32))
           if use_out else None)
    values, perm, block_ids = backend.call(OP, fwd, x, *fargs, out=out, stream=stream)
    what = f"{backend.name} {fwd} n={n} {dtype} {config}"
    _check_residuals(x, values, perm, block_ids)
    if backend.device:
        _assert_close(values, cpu_result(OP, fwd, x, *fargs)[0], dtype, what)
    else:
        _check_oracle_forward(x, values, config, what)
    op = config.split("-")[0]
    if op == "mask":
        good = ~_bad_rows(x)
        assert np.all((values[good] >= 0) & (values[good] <= 1))
        np.testing.assert_allclose(values[good].sum(axis=-1), fargs[0], rtol=TOL[dtype] * 10,
                                   atol=TOL[dtype] * 10 * max(1, n))

    # VJP with the backend's own residuals
    vjp, vargs = _vjp_args(config)
    residuals = (values, perm, block_ids) if op == "rank" else (perm, block_ids)
    dx = backend.call(OP, vjp, g, x, *residuals, *vargs,
                      out=filled_bytes(x.shape, x.dtype) if use_out else None, stream=stream)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    if backend.device:
        _assert_close(dx, cpu_result(OP, vjp, g, x, *residuals, *vargs), dtype, f"{what} vjp")
    else:
        _check_oracle_vjp(x, g, dx, config, what)
    assert np.all(np.isnan(dx[_bad_rows(x)]))


# --- forward and VJP over sizes, dtypes, configurations ------------------------------------------

@_NAN_ROWS_WARN
@over_backends("n,dtype,config", simulator=SIM_CASES, emulator=EMU_CASES, gpu=GPU_CASES)
def test_soft_rows(backend, n, dtype, config):
    check_soft(backend, n, dtype, config)


@over_backends("config", emulator=["rank-l2-asc", "sort-kl-desc", "mask-k1"])
def test_several_blocks(backend, config):
    """Many short rows: several rows per block, a partial last block, several blocks."""
    check_soft(backend, 5, "float64", config, seed=4, rows=1000)


# --- kinks: the pooled side (DESIGN.md "Kinks") ----------------------------------------------------
# At a kink (equal neighbouring PAV blocks, e.g. integer data at eps = 1) the VJP is the pooled
# side's; equal blocks over tied inputs (a mask saturated at 1 or 0 over ties) stay apart.
# Before, equal blocks never pooled: every kink below gave the unpooled side (often all zeros).

def _vjp(backend, fwd, vjp, x, g, fargs, vargs):
    values, perm, ids = backend.call(OP, fwd, x, *fargs)
    residuals = (values, perm, ids) if fwd == "soft_rank_rows" else (perm, ids)
    return values, perm, ids, backend.call(OP, vjp, g, x, *residuals, *vargs)


# (config, x, eps, expected block ids, d): one row at a kink; d a direction that turns the
# equality into a strict violation (the pooled side) -- along -d the blocks stay apart
_KINKS = [
    # soft_rank([5, 1, 2], eps=1): s = [5, 2, 1], s - rho = [2, 0, 0]
    ("rank-l2-asc", [5.0, 1.0, 2.0], 1.0, [0, 1, 1], [0.0, 1.0, -1.0]),
    # descending: s = [-1, -2, -5], s - rho = [-4, -4, -6]
    ("rank-l2-desc", [5.0, 1.0, 2.0], 1.0, [0, 0, 1], [0.0, 1.0, -1.0]),
    # eps = 2: s = [4, 1, 0], s - rho = [1, -1, -1]
    ("rank-l2-asc", [8.0, 0.0, 2.0], 2.0, [0, 1, 1], [0.0, 1.0, 0.0]),
    # evenly spaced: theta - s constant, every block equal
    ("sort-l2-desc", [1.0, 3.0, 2.0], 1.0, [0, 0, 0], [0.0, 1.0, 0.0]),
    ("sort-kl-desc", [1.0, 3.0, 2.0], 1.0, [0, 0, 0], [0.0, 1.0, 0.0]),
    ("sort-l2-asc", [1.0, 3.0, 2.0], 1.0, [0, 0, 0], [-1.0, 0.0, 0.0]),
    ("sort-kl-asc", [1.0, 0.0, 0.5], 2.0, [0, 0, 0], [0.0, -1.0, 0.0]),  # gaps 1 / eps
    # mask k=1 at [10, 9]: x/eps - w_k = [9, 9, ...]: untied, equal: pooled
    ("mask-k1", [10.0, 9.0, 0.0, 0.0, 0.0], 1.0, [0, 0, 1, 2, 3], [-1.0, 1.0, 0.0, 0.0, 0.0]),
]


def _kink_args(config, x, eps):
    op, reg, extra = _parse(config)
    if op == "mask":
        k = _mask_k(extra, x.shape[-1])
        return ("soft_top_k_mask_rows", (k, eps), "soft_top_k_mask_vjp_rows", (eps,),
                lambda row: reference_soft_top_k_mask(row, k, eps),
                lambda row: reference_soft_top_k_mask_jacobian(row, k, eps))
    value_fn, jac_fn = {"rank": (reference_soft_rank, reference_soft_rank_jacobian),
                        "sort": (reference_soft_sort, reference_soft_sort_jacobian)}[op]
    return (f"soft_{op}_rows", (eps, reg, extra), f"soft_{op}_vjp_rows", (eps, reg, extra),
            lambda row: value_fn(row, eps, reg, extra), lambda row: jac_fn(row, eps, reg, extra))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(_KINKS)))
def test_kink_gives_the_pooled_side(backend, case, dtype):
    """The blocks pool the equal neighbours; the VJP is g @ the oracle's (pooled) Jacobian and
    nonzero; one-sided finite differences along d (into the pooled side) match it, those along
    -d (the unpooled side) do not."""
    config, x, eps, expected, d = _KINKS[case]
    x, d = np.array([x], dtype), np.array(d)
    fwd, fargs, vjp, vargs, value_fn, jac_fn = _kink_args(config, x, eps)
    g = np.random.default_rng(case).normal(size=x.shape).astype(dtype)
    _, _, ids, dx = _vjp(backend, fwd, vjp, x, g, fargs, vargs)
    np.testing.assert_array_equal(ids[0], expected)
    jac = jac_fn(x[0].astype(np.float64))
    _assert_close(dx[0], g[0].astype(np.float64) @ jac, dtype, f"{config} vjp vs oracle")
    assert np.abs(dx).max() > 1e-3
    h = 1e-7
    f0 = value_fn(x[0].astype(np.float64))
    pooled = (value_fn(x[0] + h * d) - f0) / h
    unpooled = (value_fn(x[0] - h * d) - f0) / -h
    np.testing.assert_allclose(jac @ d, pooled, atol=1e-6)
    assert np.abs(jac @ d - unpooled).max() > 1e-3
    if backend.device:
        cpu = cpu_result(OP, fwd, x, *fargs)
        np.testing.assert_array_equal(ids, cpu[2])


# Saturated ties: the mask is flat there, so its Jacobian is 0 (the blocks stay apart)
_FLAT = [([5.0, 5.0, 0.0], 2, 1.0, [0, 1, 2]),
         ([3.0, 0.0, 0.0], 1, 1.0, [0, 1, 2]),
         ([10.0, 9.0, 0.0, 0.0, 0.0], 2, 1.0, [0, 1, 2, 3, 4]),
         ([4.0, 4.0, 4.0, -2.0, -2.0], 3, 2.0, [0, 1, 2, 3, 4])]


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_saturated_ties_keep_a_zero_jacobian(backend, dtype):
    """The tie exception: equal blocks over tied inputs saturated at 1 or 0 stay apart and the
    mask's Jacobian is 0 there, also next to a kink that pools ([10, 9, 0, 0, 0], k = 1:
    10 / 1 - 1 == 9 / 1 pool, the pooled side; the tied zeros stay flat)."""
    for x, k, eps, expected in _FLAT + [([10.0, 9.0, 0.0, 0.0, 0.0], 1, 1.0, [0, 0, 1, 2, 3])]:
        x = np.array([x], dtype)
        g = np.random.default_rng(k).normal(size=x.shape).astype(dtype)
        mask, _, ids, dx = _vjp(backend, "soft_top_k_mask_rows", "soft_top_k_mask_vjp_rows",
                                x, g, (k, eps), (eps,))
        np.testing.assert_array_equal(mask[0], (np.arange(x.shape[1]) < k).astype(dtype))
        np.testing.assert_array_equal(ids[0], expected)
        jac = reference_soft_top_k_mask_jacobian(x[0], k, eps)
        _assert_close(dx[0], g[0].astype(np.float64) @ jac, dtype, f"mask {x} k={k}")
        flat = slice(None) if expected[1] == 1 else slice(2, None)  # the tied, saturated ones
        np.testing.assert_array_equal(dx[0, flat], 0.0)
        np.testing.assert_array_equal(jac[:, flat], 0.0)
        np.testing.assert_array_equal(jac[flat, :], 0.0)
        if flat != slice(None):
            assert np.abs(dx[0, :2]).min() > 1e-3  # the pooled pair


def _integer_rows(config, n, rows, seed):
    """Integer-valued rows. Rank and mask: integers in [-m, m] (m = 3, or n for longer
    rows), every other row doubled (kinks at eps = 1 and 2). Soft sort (distinct values: its
    VJP at tied inputs follows the backend's order of ties): every other row a permutation of
    n consecutive integers (theta - s constant at eps = 1: one kink through the whole row),
    the others with gaps of 1 and 2 (theta - s rises: everything pools, no kink)."""
    rng = np.random.default_rng(seed)
    if config.startswith("sort"):
        steps = rng.integers(1, 3, size=(rows, n))
        steps[0::2] = 1
        return np.stack([rng.permutation(r) for r in np.cumsum(steps, axis=1) - n]).astype(float)
    m = 3 if n <= 7 else n
    x = rng.integers(-m, m + 1, size=(rows, n))
    x[1::2] *= 2
    return x.astype(float)


@over_backends("n", simulator=[7], emulator=[7, 40])
@pytest.mark.parametrize("eps", [1.0, 2.0])
def test_integer_data_vjp_matches_the_oracle(backend, n, eps):
    """Integer-valued rows at eps = 1 and 2, every configuration (L2 and KL, both orders, the
    mask): the VJP is g @ the oracle's Jacobian (the pooled side at every kink, tied saturated
    mask entries flat), on every backend. The rows hold kinks (the finest-partition blocks, the
    old convention, differ on some row) wherever integer data can have them."""
    from sortgrad.testing import oracles
    for config in CONFIGS:
        x = _integer_rows(config, n, 12, n + int(eps))
        op, reg, extra = _parse(config)
        fwd, fargs, vjp, vargs, _, jac_fn = _kink_args(config, x, eps)
        g = np.random.default_rng(n).normal(size=x.shape)
        _, _, ids, dx = _vjp(backend, fwd, vjp, x, g, fargs, vargs)
        kinks = 0
        for r in range(x.shape[0]):
            _assert_close(dx[r], g[r] @ jac_fn(x[r]), "float64", f"{config} row {r} vs oracle")
            if op == "mask":
                s = np.sort(x[r])[::-1] / eps
                w = (np.arange(n) < fargs[0]).astype(float)
            elif op == "rank":
                s = np.sort((-x[r] if extra else x[r]) / eps)[::-1]
                w = np.arange(n, 0, -1.0) if reg == "l2" else np.log(np.arange(n, 0, -1.0))
            else:
                s, w = np.arange(n, 0, -1.0) / eps, np.sort(x[r] if extra else -x[r])[::-1]
            finest = oracles.reference_isotonic(s, w, reg or "l2", pool_ties=False)[1]
            kinks += not np.array_equal(finest, ids[r])
        # no kinks: KL ranks (block values log(sum e^s / sum rho)), masks with k = 0 or n
        # (equal values only over ties), the soft sort at eps = 2 (integer gaps > 1 / eps)
        if not (config.startswith("rank-kl") or config in ("mask-k0", "mask-kn")
                or (op == "sort" and eps == 2.0)):
            assert kinks > 0, f"{config}: the rows should hold kinks"


# --- out= (the row-function protocol), streams ----------------------------------------------------

@_NAN_ROWS_WARN
@over_backends("n,dtype,config,seed",
               simulator=[(33, "float64", c, 6) for c in ("rank-kl-asc", "sort-l2-desc",
                                                          "mask-kn")],
               emulator=[(33, "float32", c, 3) for c in CONFIGS])
def test_out_and_streams(backend, n, dtype, config, seed):
    """out= given (written, returned as given) on each of the backend's stream forms."""
    for stream in backend.streams():
        check_soft(backend, n, dtype, config, seed=seed, use_out=True, stream=stream)


# --- the composition on the emulator ------------------------------------------------------------

def _launched(emulator):
    """(op, kernel) of the launches so far: the package's last component, and for soft.cu the
    kernel name."""
    out = []
    for package, _, expression, _, _ in emulator.launches:
        op = package.rsplit(".", 1)[-1]
        out.append((op, expression.split("<")[0].split("::")[-1] if op == "soft" else None))
    emulator.launches.clear()
    return out


@on_backends("cupy-emulated")
def test_cupy_launches(backend):
    """The composition (rows of n <= 2048), forward: keys, one sort launch, prep, one isotonic
    launch, the block starts and sums (one isotonic VJP launch), finish, the per-row fallback
    (rank and mask); backward: [the block starts (KL rank)], prep, one isotonic VJP launch,
    finish."""
    emulator = backend.emulator
    x, g = _inputs(33, "float64", 5)
    emulator.launches.clear()
    ranks, perm, ids = backend.call(OP, "soft_rank_rows", x, EPS, "kl", False)
    assert _launched(emulator) == [("soft", "soft_keys"), ("segmented_sort", None),
                                   ("soft", "soft_fwd_prep"), ("isotonic", None),
                                   ("soft", "soft_extents"), ("soft", "soft_mid"),
                                   ("isotonic", None), ("soft", "soft_finish"),
                                   ("soft", "soft_fallback")]
    backend.call(OP, "soft_rank_vjp_rows", g, x, ranks, perm, ids, EPS, "kl", False)
    assert _launched(emulator) == [("soft", "soft_extents"), ("soft", "soft_vjp_prep"),
                                   ("isotonic", None), ("soft", "soft_finish")]


# --- the public API with backend arrays ----------------------------------------------------------

def _check_public_oracle(x_rows, values_rows, value_fn, what):
    for r in np.flatnonzero(~_bad_rows(x_rows)):
        _assert_close(values_rows[r], value_fn(x_rows[r]), "float64", f"{what} row {r} vs oracle")


@on_backends(*PUBLIC)
def test_public_api(backend):
    """Through `sortgrad.kernels.soft` (the backend follows the arrays), 3-D input, out=."""
    from sortgrad.kernels import soft
    x = _inputs(12, "float64", 7, rows=4)[0].reshape(2, 2, 12)
    out = tuple(backend.empty(x.shape, t) for t in (np.float64, np.int32, np.int32))
    mask = soft.soft_top_k_mask(backend.to_backend(x), 3, EPS, out=out)
    assert all(a is b for a, b in zip(mask, out))
    values = backend.to_host(mask[0]).reshape(4, 12)
    _assert_close(values, cpu_result(OP, "soft_top_k_mask_rows", x.reshape(4, 12), 3, EPS)[0],
                  "float64", "public soft_top_k_mask")
    _check_public_oracle(x.reshape(4, 12), values,
                         lambda row: reference_soft_top_k_mask(row, 3, EPS),
                         "public soft_top_k_mask")


@on_backends(*PUBLIC)
def test_public_api_vjp(backend):
    from sortgrad.kernels import soft
    x, g = _inputs(12, "float64", 7, rows=4)
    x3, g3 = backend.to_backend(x.reshape(2, 2, 12)), backend.to_backend(g.reshape(2, 2, 12))
    ranks, perm, ids = soft.soft_rank(x3, EPS, regularization="kl")
    assert ranks.shape == (2, 2, 12) and backend.is_native(ranks)
    ranks_h, perm_h, ids_h = (backend.to_host(a).reshape(4, 12) for a in (ranks, perm, ids))
    _assert_close(ranks_h, cpu_result(OP, "soft_rank_rows", x, EPS, "kl", False)[0], "float64",
                  "public soft_rank")
    _check_public_oracle(x, ranks_h, lambda row: reference_soft_rank(row, EPS, "kl"),
                         "public soft_rank")
    dx = soft.soft_rank_vjp(g3, x3, ranks, perm, ids, EPS, regularization="kl")
    assert backend.is_native(dx)
    expected = cpu_result(OP, "soft_rank_vjp_rows", g, x, ranks_h, perm_h, ids_h, EPS, "kl",
                          False)
    _assert_close(backend.to_host(dx).reshape(4, 12), expected, "float64", "public vjp")


# --- float32 subnormals, empty inputs -------------------------------------------------------------

def test_float32_subnormals(backend):
    """float32 subnormal inputs and outputs keep their bits (no flush to zero; CuPy compiles
    with -ftz=true, soft.cu widens and narrows through the bits)."""
    x = np.full((2, 6), 3e-40, np.float32)
    x[1] = -1e-42
    g = (np.arange(12, dtype=np.float32).reshape(2, 6) - 5) * np.float32(1e-41)
    values, perm, ids = backend.call(OP, "soft_sort_rows", x, 1e45, "l2", True)
    expected = cpu_result(OP, "soft_sort_rows", x, 1e45, "l2", True)[0]
    assert np.all(expected != 0) and np.all(np.abs(expected) < np.finfo(np.float32).tiny)
    np.testing.assert_array_equal(values, expected)
    dx = backend.call(OP, "soft_sort_vjp_rows", g, x, perm, ids, 1e45, "l2", True)
    np.testing.assert_array_equal(
        dx, cpu_result(OP, "soft_sort_vjp_rows", g, x, perm, ids, 1e45, "l2", True))
    assert np.count_nonzero(dx) == 11


@over_backends("shape", simulator=[(0, 5), (3, 0), (0, 0)])
def test_empty(backend, shape):
    x = np.zeros(shape, np.float32)
    for fwd, args in (("soft_rank_rows", (EPS, "kl", True)),
                      ("soft_sort_rows", (EPS, "l2", False)),
                      ("soft_top_k_mask_rows", (0, EPS))):
        values, perm, _ = backend.call(OP, fwd, x, *args)
        assert values.shape == shape and perm.dtype == np.int32
    i = np.zeros(shape, np.int32)
    for vjp, args in (("soft_rank_vjp_rows", (x, x, x, i, i, EPS, "l2", False)),
                      ("soft_sort_vjp_rows", (x, x, i, i, EPS, "kl", True)),
                      ("soft_top_k_mask_vjp_rows", (x, x, i, i, EPS))):
        assert backend.call(OP, vjp, *args).shape == shape


# --- the Numba kernels compile for the real target (NVVM, no GPU needed) ------------------------

# --- module surface ---------------------------------------------------------------------------

def test_cuda_sources_listed():
    """soft.cu's instantiations are listed for the NVRTC compile test and the loader."""
    expressions = soft_cupy.CUDA_SOURCES["soft.cu"]
    assert len(set(expressions)) == len(expressions) == 12
    assert soft_cupy.DTYPES == ("float32", "float64")
