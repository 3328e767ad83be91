"""Perturbed top-k (Berthet et al. 2020, "Learning with Differentiable Perturbed Optimizers").

The smoothed selection P(x) = E_Z[Y(x + sigma Z)], Z ~ N(0, I), of the hard top-k selection
matrix Y, estimated by Monte Carlo with `num_samples` Gaussian draws. The forward pass runs all
draws through ONE batched call of `sortgrad.top_k` (one host callback per evaluation) and
averages the one-hot selections by an integer scatter-add of counts (no (S, k, n) one-hot is
ever built). The derivative is the Gaussian perturbation (score-function / Stein) estimator
on the same draws, with a sample-mean baseline, defined as a JVP (linear in the tangent, a
scatter-add of the centred projections <z_s, dx>) that JAX transposes for reverse mode; it
needs no further top-k call.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from ..._validate import check_k, check_positive_float, check_positive_int
from ._args import array_and_axis, compute_dtype
from ._call import staged_call
from ._linear import integer_tangent
from ._sharding import Layout, plan as sharding_plan
from .hard import top_k as _sortgrad_top_k

# Which top-k computes the hard selections of the perturbed batch. "sortgrad" is the public op;
# "lax" (jax.lax.top_k, the same results) exists for the benchmark's in-estimator comparison.
_SELECTORS = ("sortgrad", "lax")

__all__ = ["perturbed_top_k"]


# --- the estimator on the last axis -------------------------------------------------------------

def _selection_indices(perturbed, k: int, selector: str):
    """int32 indices (S, *batch, k) of the k largest of every perturbed row, largest first."""
    perturbed = jax.lax.stop_gradient(perturbed)
    if selector == "lax":
        return jax.lax.top_k(perturbed, k)[1].astype(jnp.int32)
    return _sortgrad_top_k(perturbed, k)[1]


def _average_selections(idx, k: int, n: int, dtype):
    """P[..., i, j] = #{s : idx[s, ..., i] == j} / S, by an int32 scatter-add of counts.

    Counting in integers makes P independent of the order in which the scatter visits the
    samples: one division per entry (XLA's CPU float division, within an ulp of count / S).
    """
    num_samples = idx.shape[0]
    batch = idx.shape[1:-1]
    rows = math.prod(batch)
    flat = idx.reshape(num_samples, rows, k)
    b = jnp.arange(rows, dtype=jnp.int32)[None, :, None]
    i = jnp.arange(k, dtype=jnp.int32)[None, None, :]
    counts = jnp.zeros((rows, k, n), jnp.int32).at[b, i, flat].add(
        1, indices_are_sorted=False, unique_indices=False, mode="promise_in_bounds")
    p = counts.astype(dtype) / jnp.asarray(num_samples, dtype)
    return p.reshape(batch + (k, n))


def _forward(x, z, k, sigma, selector):
    idx = _selection_indices(x[None] + jnp.asarray(sigma, x.dtype) * z, k, selector)
    p = _average_selections(idx, k, x.shape[-1], x.dtype)
    nan_rows = jnp.any(jnp.isnan(x), axis=-1)
    p = jnp.where(nan_rows[..., None, None], jnp.asarray(jnp.nan, x.dtype), p)
    return p, idx, nan_rows


@partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _perturbed_last(x, z, k, sigma, selector):
    """(P, idx, nan_rows). z gets no tangent (it comes from the key). The tangent is the
    perturbation estimator's linear map in dx (below); JAX transposes it for reverse mode."""
    return _forward(x, z, k, sigma, selector)


@_perturbed_last.defjvp
def _perturbed_last_jvp(k, sigma, selector, primals, tangents):
    x, z = primals
    p, idx, nan_rows = _perturbed_last(x, z, k, sigma, selector)
    dp = _estimator_tangent(jax.lax.stop_gradient(z), idx, nan_rows, tangents[0], sigma,
                            x.shape[-1])
    return (p, idx, nan_rows), (dp, integer_tangent(idx), integer_tangent(nan_rows))


def _estimator_tangent(z, idx, nan_rows, dx, sigma, n):
    """dP = sum_s (t_s - mean t) Y_s / ((S - 1) sigma), t_s = <z_s, dx> (S = 1: t_1 Y_1 / sigma),
    Y_s the one-hot selection of draw s: a scatter-add of the centred t_s at (i, idx[s, i]).
    Its transpose is the estimator of the docstring: dx = sum_s (f_s - mean f) z_s / ..., with
    f_s = <G, Y_s>. Rows of x holding a NaN give NaN (multiplied in: linear in dx)."""
    num_samples = z.shape[0]
    t = jnp.einsum("s...n,...n->s...", z, dx.astype(z.dtype))
    if num_samples > 1:
        t = t - t.mean(axis=0)
        denom = (num_samples - 1) * sigma
    else:
        denom = sigma
    t = t / jnp.asarray(denom, t.dtype)
    batch = idx.shape[1:-1]
    k = idx.shape[-1]
    rows = math.prod(batch)
    flat = idx.reshape(num_samples, rows, k)
    b = jnp.arange(rows, dtype=jnp.int32)[None, :, None]
    i = jnp.arange(k, dtype=jnp.int32)[None, None, :]
    weights = jnp.broadcast_to(t.reshape(num_samples, rows, 1), flat.shape)
    dp = jnp.zeros((rows, k, n), t.dtype).at[b, i, flat].add(
        weights, indices_are_sorted=False, unique_indices=False, mode="promise_in_bounds")
    nan_factor = jnp.where(nan_rows, jnp.asarray(jnp.nan, t.dtype), jnp.asarray(1, t.dtype))
    return (dp.reshape(batch + (k, n)) * nan_factor[..., None, None]).astype(dx.dtype)


# --- public op ----------------------------------------------------------------------------------

def _perturbed_impl(operands, k, sigma, axis, selector):
    x, z = operands
    xl = jnp.moveaxis(x, axis, -1).astype(z.dtype)
    return _perturbed_last(xl, z, k, sigma, selector)[0].astype(x.dtype)


def _perturbed_top_k(key, x, k, num_samples, sigma, axis, selector):
    """Checks the arguments (at trace time), draws Z and runs the estimator with `selector`."""
    if selector not in _SELECTORS:
        raise ValueError(f"selector must be one of {_SELECTORS}, got {selector!r}")
    x, axis = array_and_axis(x, axis)
    dtype = compute_dtype(x, op="perturbed_top_k")
    n = x.shape[axis]
    k = check_k(k, n)
    num_samples = check_positive_int(num_samples, "num_samples")
    sigma = check_positive_float(sigma, "sigma")
    batch = tuple(d for i, d in enumerate(x.shape) if i != axis)
    if k == 0 or x.size == 0:
        return jnp.zeros(batch + (k, n), x.dtype)
    rows = tuple(d for d in range(x.ndim) if d != axis)
    layout = Layout(axis, operands=(tuple(range(x.ndim)), (None,) + rows + (axis,)),
                    results=rows + (None, None))
    # Z is drawn outside the compiled core (eager calls then share JAX's cached sampler
    # program); for batch-sharded x it is drawn split like x's rows (the same numbers: the
    # sampler is partitionable), so no device holds all of it.
    plan = sharding_plan((x,), layout)
    shape = (num_samples,) + batch + (n,)
    if plan is None:
        z = jax.random.normal(key, shape, dtype)
    else:
        z = plan.create(partial(jax.random.normal, shape=shape, dtype=dtype),
                        layout.operands[1], key)
    return staged_call(_perturbed_impl, (x, z), k, sigma, axis, selector, layout=layout)


def perturbed_top_k(key, x, k: int, *, num_samples: int = 1000, sigma: float = 0.1,
                    axis: int = -1):
    """Soft top-k selection matrix by Gaussian perturbation (Berthet et al. 2020).

    P(x) = E_Z[Y(x + sigma * Z)],  Z ~ N(0, I_n), estimated with `num_samples` draws, where
    Y(v) is the hard top-k selection matrix of v: k x n, row i one-hot at the index of the i-th
    largest entry of v (rows in descending order of the selected values; ties to the lower
    index, as `jax.lax.top_k`). `P @ A` is then a smooth "top-k rows of A", differentiable in x.

    Args:
      key: a JAX PRNG key (`jax.random.key` or raw `PRNGKey`); it is the only source of
        randomness: the same key gives the same draws, in the forward and in the gradient.
        Batch keys with `vmap` for independent draws per problem.
      x: floating array with at least one dimension (float16/bfloat16 are computed in float32);
        `axis` is the selection axis of length n, every other dim is a batch dim. Integer or
        bool x raises TypeError.
      k: static int, 0 <= k <= n (else ValueError; non-integers TypeError). k = 0 gives an
        empty (..., 0, n) array.
      num_samples: static int >= 1, the number S of Gaussian draws.
      sigma: static float, finite and > 0: the perturbation scale.
      axis: the selection axis (static).

    Returns:
      P of shape x.shape without `axis`, followed by (k, n) (i.e. `moveaxis(x, axis, -1)`'s
      batch dims + (k, n)), x's dtype. Every entry is count / S (one float division, within an
      ulp), count being the number of draws in which row i selected index j; so entries lie in
      [0, 1], every row sums to 1 (up to rounding), every column to <= 1 (a doubly
      substochastic matrix), and P tends to the hard one-hot selection of `jax.lax.top_k(x, k)` as
      sigma -> 0 (when x has no ties).

    Draws: Z has shape (S,) + batch + (n,), from `jax.random.normal(key, ...)` in the compute
    dtype; all S perturbed problems go through one batched `sortgrad.top_k` call (one host
    callback per evaluation, also under `vmap`). Memory O(S * n) per problem for Z (kept as a
    residual of the gradient) plus O(S * k) int32 indices; compute O(S * n) plus the top-k.

    Gradient (the perturbation estimator): for a cotangent G of P, the returned dx is the
    Monte-Carlo estimate, on the SAME draws z_1..z_S as the forward, of the gradient of the
    smoothed objective F_sigma(x) = E_Z[<G, Y(x + sigma Z)>], namely
    grad F_sigma(x) = E_Z[<G, Y(x + sigma Z)> Z] / sigma. With f_s = <G, Y(x + sigma z_s)>, the
    estimator uses the sample mean as a baseline (variance reduction):
        dx = sum_s (f_s - mean_s f) z_s / ((S - 1) * sigma)      (S > 1),
        dx = f_1 z_1 / sigma                                        (S = 1),
    which is unbiased for grad F_sigma(x) (the (S - 1) is the sample-covariance correction:
    E[Z] = 0, so E[f Z] = Cov(f, Z)). It is NOT the derivative of the piecewise-constant
    finite-sample forward (that is zero almost everywhere); it is the derivative of the smoothed
    objective that the forward estimates. `key` gets no gradient. The backward calls no top-k
    (the selected indices are residuals). Forward mode gives the same linear map (jvp and vjp are
    transposes; jacfwd equals jacrev); second derivatives are zero (the estimator's weights do
    not depend on x given the draws). Works under jit, vmap (over x and/or key), grad, jvp,
    jacfwd, hessian.

    Sharding: for x split over explicit mesh axes (or an eager NamedSharding) along its batch
    dims, Z is drawn split the same way (the same numbers as unsplit) and each device runs
    its own rows. Inside `jax.shard_map` each shard draws Z for its own rows from `key` (the
    same stream on every shard: fold in `jax.lax.axis_index` for independent draws).

    Special values: if a row of x (along `axis`) contains a NaN, that row's whole (k, n) block
    of P is NaN, and so is its gradient (other rows are unaffected). +-inf entries are fine:
    they stay +-inf after perturbation and compare as in `jax.lax.top_k` (equal infinities
    resolved to the lower index), with finite gradient.
    """
    return _perturbed_top_k(key, x, k, num_samples, sigma, axis, "sortgrad")
