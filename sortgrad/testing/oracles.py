"""Independent reference implementations (oracles) for the tests and benchmarks.

Nothing here imports sortgrad.kernels or sortgrad.bindings: these are slow, plain Python /
float64 NumPy versions written straight from the definitions, so that a bug in a kernel cannot
hide in its own reference.
"""

from __future__ import annotations

import math

import numpy as np

# ---------------------------------------------------------------------------------------------
# Hard ops: orders written as Python sort keys.


def _is_float_dtype(dtype) -> bool:
    return np.dtype(dtype).kind == "f" or np.dtype(dtype).name == "bfloat16"


def _sort_order_key(v, dtype):
    """jnp.sort order on XLA:CPU: -0.0 == +0.0 == subnormals (float16's excepted: XLA widens
    float16 to float32 first); all NaNs equal and above +inf. Integers compare exactly."""
    if not _is_float_dtype(dtype):
        return (0, int(v))
    f = float(v)
    if math.isnan(f):
        return (1, 0.0)
    tiny = float(np.finfo(np.float32 if np.dtype(dtype).name == "bfloat16" else dtype).tiny)
    if abs(f) < tiny and np.dtype(dtype) != np.float16:
        return (0, 0.0)
    return (0, f + 0.0)  # + 0.0 maps -0.0 to +0.0


def _total_order_key(v, dtype):
    """IEEE totalOrder, as jax.lax.top_k: -NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN,
    NaNs of one sign ordered by payload -- but bfloat16's, which XLA:CPU compares after a
    float32 round trip that gives every NaN the canonical bits of its sign: ties there. Read
    off the sign and the magnitude bits; integers exactly."""
    if not _is_float_dtype(dtype):
        return (int(v),)
    width = np.dtype(dtype).itemsize * 8
    bits = int(np.asarray(v, dtype=dtype).reshape(1).view(f"u{width // 8}")[0])
    if np.dtype(dtype).name == "bfloat16" and math.isnan(float(v)):
        bits = (bits & 0x8000) | 0x7FC0
    magnitude = bits & ((1 << (width - 1)) - 1)
    return (-1, -magnitude) if bits >> (width - 1) else (1, magnitude)


def xla_cpu_sorted_values(values, n):
    """The bits XLA:CPU writes for sorted / top-k values taken from a row of n elements:
    float16/32/64 and integers keep their bits; bfloat16 NaNs become the quiet NaN of their
    sign, 0x7FC0 | sign (the payload is dropped), except in one-element rows (XLA leaves those
    unsorted). A copy."""
    values = np.array(values, copy=True)
    if values.dtype.name != "bfloat16" or n <= 1:
        return values
    flat = values.reshape(-1)
    raw = flat.view(np.uint16)
    for i in range(flat.size):
        if math.isnan(float(flat[i])):
            raw[i] = (int(raw[i]) & 0x8000) | 0x7FC0
    return values


def reference_argsort(row, descending=False):
    """Stable argsort of a 1-D row in jnp.sort order (ties keep their original order; every
    NaN, any sign or payload, ties with every other)."""
    row = np.asarray(row)
    keys = [_sort_order_key(v, row.dtype) for v in row]
    idx = range(len(keys))
    if descending:  # stable descending: larger first, ties by lower index
        return np.array(sorted(idx, key=lambda i: _negate(keys[i])), np.int64)
    return np.array(sorted(idx, key=lambda i: keys[i]), np.int64)


def _negate(key):
    return tuple(-k for k in key)


def reference_sort_rows(x, descending=False):
    """(values, perm) of a stable sort of each row (last axis) of x. Values have the bits
    jnp.sort gives on XLA:CPU: the input's, except bfloat16 NaNs in rows of more than one
    element, which become the quiet NaN of their sign (0x7FC0 | sign)."""
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension")
    rows = x.reshape(-1, x.shape[-1]) if x.size else np.zeros((0, x.shape[-1]), x.dtype)
    perm = np.zeros(rows.shape, np.int64)
    for r, row in enumerate(rows):
        perm[r] = reference_argsort(row, descending)
    perm = perm.reshape(x.shape)
    return xla_cpu_sorted_values(np.take_along_axis(x, perm, axis=-1), x.shape[-1]), perm


def reference_top_k(row, k):
    """(values, indices) of the k largest of a 1-D row in totalOrder, ties to the lower index,
    as jax.lax.top_k on XLA:CPU (bfloat16: NaNs of one sign tie and come back as the quiet NaN
    of their sign in rows of more than one element; see `_total_order_key`)."""
    row = np.asarray(row)
    keys = [_total_order_key(v, row.dtype) for v in row]
    idx = sorted(range(len(keys)), key=lambda i: (_negate(keys[i]), i))[:k]
    idx = np.array(idx, dtype=np.int64)
    return xla_cpu_sorted_values(row[idx], row.shape[0]), idx


def reference_segmented_sort(x, offsets, descending=False):
    """Stable sort of each CSR segment of 1-D x; perm relative to the segment start. Values as
    `reference_sort_rows` (a segment is a row)."""
    x = np.asarray(x)
    values = x.copy()
    perm = np.zeros(x.shape[0], np.int64)
    for a, b in zip(offsets[:-1], offsets[1:]):
        p = reference_argsort(x[a:b], descending)
        perm[a:b] = p
        values[a:b] = xla_cpu_sorted_values(x[a:b][p], b - a) if b > a else values[a:b]
    return values, perm


# ---------------------------------------------------------------------------------------------
# Soft ops (Blondel et al. 2020), written from DESIGN.md section 4.
#
# Everything below works on one 1-D row in float64 and uses plain Python / NumPy. The isotonic
# solver is not the kernel's block stack: it keeps a Python list of blocks and repeatedly merges
# the first adjacent violating pair it finds (restarting the scan next to the merge), with block
# values recomputed from scratch (math.fsum / a max-shifted log-sum-exp of the whole block).
# `reference_isotonic_minmax` is a second, formula-based solver (min-max of block values) used
# to check the first one on small rows. Gradients come from the block structure (exact
# Jacobians) and, independently, from central finite differences.

def _f64_row(x, name="x") -> np.ndarray:
    x = np.array(x, dtype=np.float64)  # a copy: never touches the caller's array
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    return x


def _logsumexp(a) -> float:
    a = np.asarray(a, dtype=np.float64)
    m = float(np.max(a))
    if not math.isfinite(m):
        return m
    return m + math.log(math.fsum(np.exp(a - m).tolist()))


def _softmax(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    e = np.exp(a - np.max(a))
    return e / math.fsum(e.tolist())


def _block_value(s_b, w_b, regularization) -> float:
    if regularization == "l2":
        return math.fsum((s_b - w_b).tolist()) / len(s_b)
    if regularization == "kl":  # (max s - max w) + (log sum exp(s - max) - ...): the large
        # terms cancel first, so w_B = s_B - c (evenly spaced data) gives exactly c
        ms, mw = float(np.max(s_b)), float(np.max(w_b))
        if not (math.isfinite(ms) and math.isfinite(mw)):
            return _logsumexp(s_b) - _logsumexp(w_b)
        return (ms - mw) + (math.log(math.fsum(np.exp(s_b - ms).tolist()))
                            - math.log(math.fsum(np.exp(w_b - mw).tolist())))
    raise ValueError(f"regularization must be 'l2' or 'kl', got {regularization!r}")


def _blocks_to_ids(bounds, n) -> np.ndarray:
    ids = np.empty(n, dtype=np.int32)
    for b, (a, e) in enumerate(bounds):
        ids[a:e] = b
    return ids


def reference_isotonic(s, w, regularization="l2", pool_ties=True, tie_keys=None):
    """Decreasing isotonic regression of one row, by merging violating neighbours.

    Solves min over v_1 >= ... >= v_n of
      "l2": 1/2 ||v - (s - w)||^2          (a pooled block B takes mean(s_B - w_B)),
      "kl": <exp(s - v), 1> + <exp(w), v>  (a block takes logsumexp(s_B) - logsumexp(w_B)).
    Neighbouring blocks out of order (left value < right value) are merged, and with
    pool_ties=True (the default, the kernels' contract) so are neighbours of exactly equal
    value: the pooled side of a kink (DESIGN.md "Kinks"; blocks = the maximal runs of equal
    solution values). pool_ties=False keeps equal neighbours apart (the finest partition: the
    other one-sided derivative at a kink; the same solution).

    tie_keys (the soft ops' rule, with pool_ties): the sorted (descending) input values behind
    the row; two equal neighbours B1, B2 whose keys are all tied (tie_keys at B1's first entry
    == at B2's last) stay apart: no perturbation of the input makes them violate (a sort
    re-orders tied inputs), so they are no kink.

    Returns (solution float64 (n,), block_ids int32 (n,) numbered 0, 1, ... from the left).
    """
    s, w = _f64_row(s, "s"), _f64_row(w, "w")
    if s.shape != w.shape:
        raise ValueError(f"s {s.shape} and w {w.shape} differ")
    if tie_keys is not None:
        tie_keys = _f64_row(tie_keys, "tie_keys")
        if tie_keys.shape != s.shape:
            raise ValueError(f"tie_keys {tie_keys.shape} and s {s.shape} differ")
    if regularization not in ("l2", "kl"):
        raise ValueError(f"regularization must be 'l2' or 'kl', got {regularization!r}")
    n = s.shape[0]
    bounds = [[i, i + 1] for i in range(n)]
    values = [_block_value(s[i:i + 1], w[i:i + 1], regularization) for i in range(n)]

    def merges(j):
        if values[j] < values[j + 1]:
            return True
        if not (pool_ties and values[j] == values[j + 1]):
            return False
        return tie_keys is None or tie_keys[bounds[j][0]] != tie_keys[bounds[j + 1][1] - 1]

    j = 0
    while j + 1 < len(bounds):
        if merges(j):
            a, e = bounds[j][0], bounds[j + 1][1]
            bounds[j] = [a, e]
            del bounds[j + 1], values[j + 1]
            values[j] = _block_value(s[a:e], w[a:e], regularization)
            j = max(j - 1, 0)  # only the merged block's left neighbour can now merge
        else:
            j += 1
    solution = np.empty(n, dtype=np.float64)
    for (a, e), v in zip(bounds, values):
        solution[a:e] = v
    return solution, _blocks_to_ids(bounds, n)


def reference_isotonic_minmax(s, w, regularization="l2") -> np.ndarray:
    """Decreasing isotonic solution by the min-max formula, O(n^3): a check of the solver above.

    v_i = min over j <= i of max over k >= i of value(s[j..k], w[j..k]).
    """
    s, w = _f64_row(s, "s"), _f64_row(w, "w")
    n = s.shape[0]
    val = np.full((n, n), np.nan)
    for j in range(n):
        for k in range(j, n):
            val[j, k] = _block_value(s[j:k + 1], w[j:k + 1], regularization)
    return np.array([min(max(val[j, k] for k in range(i, n)) for j in range(i + 1))
                     for i in range(n)], dtype=np.float64)


def _block_ranges(block_ids):
    block_ids = np.asarray(block_ids)
    n = block_ids.shape[0]
    out, a = [], 0
    while a < n:
        e = a + 1
        while e < n and block_ids[e] == block_ids[a]:
            e += 1
        out.append((a, e))
        a = e
    return out


def reference_isotonic_vjp(cotangent, s, w, block_ids, regularization="l2"):
    """(grad_s, grad_w) of the isotonic solution for one row, from the blocks.

    Within a block B: "l2": grad_s = mean_B(g), grad_w = -mean_B(g);
    "kl": grad_s = softmax(s_B) sum_B(g), grad_w = -softmax(w_B) sum_B(g).
    """
    g, s, w = _f64_row(cotangent, "cotangent"), _f64_row(s, "s"), _f64_row(w, "w")
    grad_s, grad_w = np.zeros_like(g), np.zeros_like(g)
    for a, e in _block_ranges(block_ids):
        total = math.fsum(g[a:e].tolist())
        if regularization == "l2":
            grad_s[a:e] = total / (e - a)
            grad_w[a:e] = -total / (e - a)
        else:
            grad_s[a:e] = _softmax(s[a:e]) * total
            grad_w[a:e] = -_softmax(w[a:e]) * total
    return grad_s, grad_w


def finite_difference_jacobian(f, x, step: float) -> np.ndarray:
    """Central finite differences in float64: J[..., j] = (f(x + h e_j) - f(x - h e_j)) / 2h."""
    x = np.array(x, dtype=np.float64)
    cols = []
    for j in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[j] += step
        xm[j] -= step
        cols.append((np.asarray(f(xp), np.float64) - np.asarray(f(xm), np.float64)) / (2 * step))
    out_shape = np.shape(f(x))
    if not cols:
        return np.zeros(out_shape + x.shape)
    return np.stack(cols, axis=-1).reshape(out_shape + x.shape)


def _rho(n) -> np.ndarray:
    return np.arange(n, 0, -1, dtype=np.float64)


def _argsort_desc(z) -> np.ndarray:
    # any order of ties gives the same soft values (tied entries pool), so stability is moot
    return np.argsort(-z, kind="stable")


def _check_eps(eps) -> float:
    eps = float(eps)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps}")
    return eps


def _block_matrix(block_ids, weights=None) -> np.ndarray:
    """M[i, j] = weight_j if i, j share a block, else 0 (weights default: 1/|B|)."""
    n = len(block_ids)
    m = np.zeros((n, n))
    for a, e in _block_ranges(block_ids):
        m[a:e, a:e] = (1.0 / (e - a)) if weights is None else weights[a:e][None, :]
    return m


def _perm_matrix(sigma) -> np.ndarray:
    """Pi with (Pi z)_i = z[sigma_i]."""
    n = len(sigma)
    p = np.zeros((n, n))
    p[np.arange(n), sigma] = 1.0
    return p


def _soft_rank_parts(x, eps, regularization, descending):
    x = _f64_row(x)
    eps = _check_eps(eps)
    z = (-x if descending else x) / eps
    sigma = _argsort_desc(z)
    s = z[sigma]
    n = x.shape[0]
    # Kinks: equal neighbours pool; no tie keys: tied s make s - rho (and s - log rho) strictly
    # increasing, so in exact arithmetic they always pool and equality over tied s is rounding.
    if regularization == "l2":
        v, blocks = reference_isotonic(s, _rho(n), "l2")
        r_sorted = s - v
    elif regularization == "kl":
        v, blocks = reference_isotonic(s, np.log(_rho(n)), "kl")
        r_sorted = np.exp(s - v)
    else:
        raise ValueError(f"regularization must be 'l2' or 'kl', got {regularization!r}")
    return sigma, s, r_sorted, blocks


def reference_soft_rank(x, eps, regularization="l2", descending=False) -> np.ndarray:
    """Soft ranks of a 1-D row in [1, n]; rank 1 = smallest (largest if descending).

    z = x/eps (descending: -x/eps), s = z sorted descending, rho = (n, ..., 1);
    L2: r_sorted = s - PAV(s - rho); KL: r_sorted = exp(s - PAV_KL(s, log rho)).
    """
    sigma, _, r_sorted, _ = _soft_rank_parts(x, eps, regularization, descending)
    r = np.empty_like(r_sorted)
    r[sigma] = r_sorted
    return r


def reference_soft_rank_jacobian(x, eps, regularization="l2", descending=False) -> np.ndarray:
    """d soft_rank / d x (n, n), exact from the block structure; at a kink the pooled side
    (equal neighbouring blocks pooled)."""
    sigma, s, r_sorted, blocks = _soft_rank_parts(x, eps, regularization, descending)
    n = len(sigma)
    if regularization == "l2":
        jac_sorted = np.eye(n) - _block_matrix(blocks)
    else:  # r_i = softmax(s_B)_i sum(rho_B): dr_i/ds_j = r_i (delta_ij - softmax(s_B)_j)
        p = np.zeros(n)
        for a, e in _block_ranges(blocks):
            p[a:e] = _softmax(s[a:e])
        jac_sorted = np.diag(r_sorted) - r_sorted[:, None] * _block_matrix(blocks, p)
    pi = _perm_matrix(sigma)
    sign = -1.0 if descending else 1.0
    return sign / float(eps) * pi.T @ jac_sorted @ pi


def _soft_sort_desc_parts(x, eps, regularization):
    x = _f64_row(x)
    eps = _check_eps(eps)
    sigma = _argsort_desc(x)
    s = x[sigma]
    theta = _rho(x.shape[0]) / eps
    # Kinks: equal neighbours pool, except blocks over tied sorted inputs s (tie_keys=s, not
    # the PAV's own argument theta - s or theta, which is never tied)
    if regularization == "l2":  # block value mean(theta_B - s_B)
        v, blocks = reference_isotonic(theta, s, "l2", tie_keys=s)
        out = theta - v
    elif regularization == "kl":  # lse(theta_B) - lse(s_B)
        v, blocks = reference_isotonic(theta, s, "kl", tie_keys=s)
        out = np.empty_like(s)
        for a, e in _block_ranges(blocks):  # theta - v, with the big terms cancelled first
            out[a:e] = (theta[a:e] - _logsumexp(theta[a:e])) + _logsumexp(s[a:e])
    else:
        raise ValueError(f"regularization must be 'l2' or 'kl', got {regularization!r}")
    return sigma, s, out, blocks


def reference_soft_sort(x, eps, regularization="l2", descending=False) -> np.ndarray:
    """Soft sorted values of a 1-D row (ascending unless descending).

    Descending: s = x sorted descending, theta = rho/eps; L2: theta - PAV(theta - s);
    KL: theta - PAV_KL(theta, s) (block value lse(theta_B) - lse(s_B)).
    Ascending = -soft_sort_descending(-x).
    """
    if not descending:
        return -reference_soft_sort(-_f64_row(x), eps, regularization, True)
    return _soft_sort_desc_parts(x, eps, regularization)[2]


def reference_soft_sort_jacobian(x, eps, regularization="l2", descending=False) -> np.ndarray:
    """d soft_sort / d x (n, n): L2 blockmean; KL softmax of the sorted inputs per block; at a
    kink the pooled side (equal blocks over tied inputs stay apart)."""
    x = _f64_row(x)
    if not descending:  # d/dx [-f(-x)] = f'(-x)
        return reference_soft_sort_jacobian(-x, eps, regularization, True)
    sigma, s, _, blocks = _soft_sort_desc_parts(x, eps, regularization)
    if regularization == "l2":
        jac_sorted = _block_matrix(blocks)
    else:
        p = np.zeros(len(s))
        for a, e in _block_ranges(blocks):
            p[a:e] = _softmax(s[a:e])
        jac_sorted = _block_matrix(blocks, p)
    return jac_sorted @ _perm_matrix(sigma)


def _mask_parts(x, k, eps):
    x = _f64_row(x)
    eps = _check_eps(eps)
    n = x.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, {n}]")
    sigma = _argsort_desc(x)
    s = x[sigma] / eps
    w_k = (np.arange(n) < k).astype(np.float64)
    # Kinks: equal neighbours pool, except blocks over tied s = x/eps sorted (tie_keys=s):
    # e.g. tied entries saturated at 1 (or 0) stay apart, and the mask is flat there
    v, blocks = reference_isotonic(s, w_k, "l2", tie_keys=s)
    return sigma, s - v, blocks


def reference_soft_top_k_mask(x, k, eps) -> np.ndarray:
    """Projection of x/eps onto the permutahedron of (1,..,1,0,..,0) (k ones), via PAV."""
    sigma, m_sorted, _ = _mask_parts(x, k, eps)
    m = np.empty_like(m_sorted)
    m[sigma] = m_sorted
    return m


def reference_soft_top_k_mask_jacobian(x, k, eps) -> np.ndarray:
    """d mask / d x (n, n); at a kink the pooled side. Tied inputs both among (or both
    outside) the top k that sit at 1 (or 0) are separate blocks here: any perturbation orders
    them and the mask stays flat."""
    sigma, _, blocks = _mask_parts(x, k, eps)
    n = len(sigma)
    pi = _perm_matrix(sigma)
    return pi.T @ (np.eye(n) - _block_matrix(blocks)) @ pi / float(eps)


def reference_soft_top_k_mask_closed_form(x, k, eps) -> np.ndarray:
    """The same mask as clip(x/eps - tau, 0, 1) with tau such that the mask sums to k.

    tau by bisection, then solved exactly on the set of unclipped entries.
    """
    z = _f64_row(x) / _check_eps(eps)
    n = z.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k={k} outside [0, {n}]")
    if k == 0:
        return np.zeros(n)
    if k == n:
        return np.ones(n)

    def total(tau):
        return math.fsum(np.clip(z - tau, 0.0, 1.0).tolist())

    lo, hi = float(z.min()) - 1.0, float(z.max())  # total(lo) = n >= k >= 0 = total(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if total(mid) > k:
            lo = mid
        else:
            hi = mid
    tau = 0.5 * (lo + hi)
    free = (z - tau > 0.0) & (z - tau < 1.0)
    ones = z - tau >= 1.0
    if free.any():  # sum_free (z - tau) + #ones = k
        tau = (math.fsum(z[free].tolist()) - (k - int(ones.sum()))) / int(free.sum())
    return np.clip(z - tau, 0.0, 1.0)


def _quantile_weights(n, q) -> np.ndarray:
    """(len(q), n) interpolation weights at positions q * (n - 1) of an ascending row."""
    qs = np.atleast_1d(np.asarray(q, dtype=np.float64))
    wts = np.zeros((qs.shape[0], n))
    for i, qi in enumerate(qs):
        if not 0.0 <= qi <= 1.0:
            raise ValueError(f"q must lie in [0, 1], got {qi}")
        pos = qi * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        wts[i, lo] += 1.0 - frac
        wts[i, hi] += frac
    return wts


def reference_soft_quantile(x, q, eps, regularization="l2"):
    """Linear interpolation at position q * (n - 1) of the ascending soft sort of a 1-D row.

    q a float -> a float; q a 1-D sequence -> an array of len(q).
    """
    x = _f64_row(x)
    if x.shape[0] == 0:
        raise ValueError("soft_quantile needs a non-empty row")
    out = _quantile_weights(x.shape[0], q) @ reference_soft_sort(x, eps, regularization)
    return float(out[0]) if np.ndim(q) == 0 else out


def reference_soft_quantile_jacobian(x, q, eps, regularization="l2") -> np.ndarray:
    """d soft_quantile / d x: (n,) for a float q, (len(q), n) for a sequence."""
    x = _f64_row(x)
    jac = _quantile_weights(x.shape[0], q) @ reference_soft_sort_jacobian(x, eps, regularization)
    return jac[0] if np.ndim(q) == 0 else jac


def reference_hard_ranks(x, descending=False) -> np.ndarray:
    """1-based ranks of distinct values (rank 1 = smallest, or largest if descending)."""
    x = _f64_row(x)
    order = np.argsort(-x if descending else x, kind="stable")
    r = np.empty(x.shape[0])
    r[order] = np.arange(1, x.shape[0] + 1)
    return r


def reference_hard_top_k_mask(x, k) -> np.ndarray:
    """1.0 on the k largest entries of a row of distinct values, 0.0 elsewhere."""
    x = _f64_row(x)
    m = np.zeros(x.shape[0])
    m[np.argsort(-x, kind="stable")[:k]] = 1.0
    return m


def apply_rows(fn, x, axis=-1):
    """Applies a 1-D reference fn(row) -> (n,) array to every row of x along `axis`."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    rows = x.reshape(-1, x.shape[-1])
    out = np.stack([np.asarray(fn(r), np.float64) for r in rows]) if rows.shape[0] else \
        np.zeros(rows.shape)
    return np.moveaxis(out.reshape(x.shape[:-1] + out.shape[-1:]), -1, axis)
