"""The scale-free strength of the soft ops ("softness"): each op's law, in this one place.

An explicit `regularization_strength` eps is in the units of x: rank and mask obey
op(c x, c eps) = op(x, eps), the L2 sort and quantile op(c x, eps / c) = c op(x, eps). So the
same eps is hard on one row and flat on another, and what it does also moves with n. A
softness s instead sets each row's eps from its own standard deviation sigma (population,
along the axis) and length n by the law that keeps the op's *relative* softness fixed: with
u = (x - mean) / sigma and phi the density of u, the isotonic problem pools sorted neighbours
where the gaps of x, about sigma / (n phi(u)), cross a threshold set by eps, and each law
makes that threshold a fixed density in u (n large; the README's table has the numbers):

- L2 soft rank, eps = s sigma / n (pools where gaps < eps, i.e. phi(u) > 1 / s): rank / n
  against u is the CDF, except that each stretch steeper than 1 / s lies inside a straight
  segment of slope 1 / s that starts and ends on the CDF (a pooled block). Below
  s = 1 / max phi only near neighbours pool (random gaps), a fraction of the entries that
  depends on s alone.
- KL soft rank, eps = s sigma (no n): pools where the gap of x / eps is below the gap of
  log rho at that rank m, log(m / (m - 1)) ~ 1 / m = 1 / (n F(u)): where phi(u) / F(u) > 1 / s
  (F the CDF of u, ascending ranks): the low ranks first.
- soft top-k mask, eps = s sigma (no n): clip(x / eps - tau, 0, 1) is fractional on a window
  of about s standard deviations at the k-th score, a fraction of about s phi(u_k) of the
  entries (for a fixed k / n). The same as standardising x (`sortgrad.selection`).
- L2 soft sort and quantile, eps = s n / sigma (pools where the sorted gaps exceed 1 / eps,
  i.e. phi(u) < s): the soft quantile function (value / sigma against q) is the hard one,
  except that each stretch steeper than 1 / s lies inside a straight segment of slope 1 / s
  that ends on it: the sparse tails first, the dense middle last. So on unimodal data a soft
  median stays the hard median until s passes the peak density (0.399 for the normal); then
  the whole row is one block (the soft sort is mean + an even ramp, the median the mean).
- KL soft sort and quantile: no law (their block values are log-sum-exps of x: for no eps'
  is op(c x, eps') = c op(x, eps)), so no softness: an absolute strength only (default 1.0).

The defaults give soft outputs and nonzero gradients on standard-normal rows of every n and
on integer rows: evenly spaced data (jnp.arange, density 1 / sqrt(12) = 0.289 in u, no random
gaps) pool at all only when the L2 rank's s > sqrt(12) ~ 3.46 and the sort's s > 0.289.

The op is then f(x) = op(x, eps(x)), differentiated as that composite (through sigma).
Numerics: the rows are first divided by m, the power of two at or below max|x| (exact: order
and ties kept; held constant, every expression being homogeneous in it, so derivatives of all
orders are exact), then the op runs at strength 1 on y = u / eps_u (rank, mask) or u * eps_u
(sort), eps_u the law in units of u = x / m: y depends on the data only through u, so nothing
overflows for any finite row; the sort comes back as sort(x) + m (soft(y) - sort(y)) / eps_u
(`homogeneous`: no reverse-mode intermediate of size m). A constant row (max == min, n == 1
included) takes sigma = 1 in units of u: the op's value there does not depend on eps, and its
derivatives stay finite (sigma is not differentiable there; the where() keeps NaN out). A
row holding NaN or +-inf gives a NaN row, as the ops do.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from ..._validate import check_one_strength, check_softness, check_traced_scalar

# law key -> (power of sigma, power of n, default softness): eps = s * sigma**a * n**b
LAWS = {
    "rank_l2": (1, -1, 4.0),
    "rank_kl": (1, 0, 1.0),
    "mask": (1, 0, 1.0),
    "sort_l2": (-1, 1, 0.3),
}
NO_LAW_STRENGTH = 1.0  # the KL soft sort and quantile: absolute default, as before softness


def law_key(op: str, regularization: str) -> str | None:
    """The law of `op` ("rank", "mask", "sort", "quantile"); None for the KL sort/quantile."""
    if op == "rank":
        return f"rank_{regularization}"
    if op == "mask":
        return "mask"
    return "sort_l2" if regularization == "l2" else None


def default_softness(op: str, regularization: str = "l2") -> float | None:
    """The softness an op uses when neither strength nor softness is given (None: no law)."""
    key = law_key(op, regularization)
    return None if key is None else LAWS[key][2]


def resolve(strength, softness, op: str, name: str, regularization: str = "l2"):
    """(strength, softness) with exactly one of them not None, checked: both None gives the
    op's default softness (the absolute NO_LAW_STRENGTH for the KL sort and quantile); an
    explicit strength is returned as given (checked by the caller, as before)."""
    check_one_strength(strength, softness)
    key = law_key(op, regularization)
    if softness is None:
        if strength is None and key is None:
            return NO_LAW_STRENGTH, None
        return strength, (None if strength is not None else LAWS[key][2])
    if key is None:
        raise ValueError(f"{name} with regularization='kl' takes no softness: the KL soft sort "
                         "has no scale law (for no strength is op(c x) = c op(x)); use "
                         "regularization='l2' with softness, or an explicit "
                         "regularization_strength")
    if isinstance(softness, jax.Array):
        check_traced_scalar(softness.shape, softness.dtype, "softness")
        return None, softness
    return None, check_softness(softness)


def _row_sigma(u, axis):
    """The population standard deviation of u along axis (kept, length 1); 1 on constant rows
    (max == min: exact, where a computed variance could be a rounding residue), whose
    derivative is then 0 rather than NaN."""
    constant = jnp.max(u, axis, keepdims=True) == jnp.min(u, axis, keepdims=True)
    centred = u - jnp.mean(u, axis, keepdims=True)
    var = jnp.mean(jnp.square(centred), axis, keepdims=True)
    return jnp.sqrt(jnp.where(constant, jnp.ones_like(var), var))


def unit_rows(x, axis):
    """(u, m1, m2): u = x / m with m = m1 * m2 the power of two with m <= max|x| < 2 m per row
    (1 for zero and non-finite rows), held constant (stop_gradient). m is kept as two normal
    powers of two (never subnormal, nor with a subnormal reciprocal: XLA's CPU flushes those
    to zero and may divide by multiplying with the reciprocal): dividing by them is exact, so
    u keeps x's order and ties, and u lies in (-2, 2). A non-finite row stays non-finite."""
    top = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis, keepdims=True))
    _, e = jnp.frexp(jnp.where(jnp.isfinite(top) & (top > 0), top, jnp.ones_like(top)))
    half = (e - 1) // 2
    m1, m2 = jnp.ldexp(jnp.ones_like(top), half), jnp.ldexp(jnp.ones_like(top), e - 1 - half)
    return x / m1 / m2, m1, m2


def law(u, softness, key: str, axis: int):
    """(y, eps_u): the law `key` at `softness` (a scalar, or one per row: u's shape with the
    axis of length 1) on rows u of unit scale (`unit_rows`): eps_u = s * sigma**a * n**b,
    sigma the rows' standard deviation, and y the rows the op runs on at strength 1: u / eps_u
    for rank and mask (a > 0: op(x, eps) = op(u / eps_u, 1) with eps = m eps_u), u * eps_u for
    the sort (op(x, eps) = m op(u eps_u, 1) / eps_u). A softness that is not finite and > 0
    gives NaN."""
    a, b, _ = LAWS[key]
    n = u.shape[axis]
    # the barrier: a softness constant in the caller's program is not folded into the law,
    # so a jitted call rounds exactly as an eager one (where it is an operand)
    s = jax.lax.optimization_barrier(jnp.asarray(softness, u.dtype))
    s = jnp.where((s > 0) & jnp.isfinite(s), s, jnp.asarray(jnp.nan, u.dtype))
    eps_u = s * _row_sigma(u, axis) ** a * jnp.asarray(float(n) ** b, u.dtype)
    return (u / eps_u if a > 0 else u * eps_u), eps_u


@partial(jax.custom_jvp, nondiff_argnums=(0,))
def homogeneous(fn, x, m1, m2, s):
    """m1 * (m2 * fn(x / (m1 m2), s)) for a scale-free fn (its result in units of u), m1, m2
    from `unit_rows` and s one softness per row. Its derivative in x is fn's in u (m and 1 / m
    cancel), and in s, m times fn's: the rule applies exactly that, so that no intermediate of
    reverse mode is m times a cotangent (which overflows for rows near the dtype's maximum)."""
    return m1 * (m2 * fn(x / m1 / m2, s))


@homogeneous.defjvp
def _homogeneous_jvp(fn, primals, tangents):
    x, m1, m2, s = primals
    dx, _, _, ds = tangents
    out, tangent = jax.jvp(fn, (x / m1 / m2, s), (dx, ds * m1 * m2))
    return m1 * (m2 * out), tangent


def row_strength(x, softness, op: str, *, axis: int = -1, regularization: str = "l2"):
    """Each row's regularization_strength in the units of x (the axis kept, length 1) for a
    softness: what `op(x, softness=...)` uses. For inspection and tests."""
    key = law_key(op, regularization)
    if key is None:
        raise ValueError("the KL soft sort has no scale law")
    axis = axis % x.ndim
    u, m1, m2 = unit_rows(x, axis)
    _, eps_u = law(u, softness, key, axis)
    return m1 * (m2 * eps_u) if LAWS[key][0] > 0 else 1 / m1 / m2 * eps_u
