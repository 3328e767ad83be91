"""Forward mode and higher order for every public op: jvp, jacfwd, hessian, grad of grad, jvp
of grad, under jit and vmap, against finite differences (`jax.test_util.check_grads`, both
modes, order 2), the float64 reference Jacobians of sortgrad.testing, and each other (a JVP
and a VJP are transposes). x64 (the suite's mode) and JAX's default x32 mode; the GPU branch
on the emulated devices too (forward mode there runs the same kernels)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import sortgrad
from sortgrad.testing import (reference_soft_rank_jacobian, reference_soft_sort_jacobian,
                              reference_soft_top_k_mask_jacobian)
from _routes import simulator_case

KEY = jax.random.PRNGKey(0)
MODES = ("fwd", "rev")

# name -> op on a (..., n) row batch; every op is differentiable in x (values outputs only)
OPS = {
    "sort": lambda x: sortgrad.sort(x),
    "sort_desc_axis0": lambda x: sortgrad.sort(x, axis=0, descending=True),
    "top_k": lambda x: sortgrad.top_k(x, 3)[0],
    "rank_l2": lambda x: sortgrad.soft_rank(x, regularization_strength=0.7),
    "rank_l2_desc": lambda x: sortgrad.soft_rank(x, regularization_strength=2.0,
                                                 descending=True),
    "rank_kl": lambda x: sortgrad.soft_rank(x, regularization="kl", regularization_strength=0.5),
    "rank_kl_desc_axis0": lambda x: sortgrad.soft_rank(x, regularization="kl", axis=0,
                                                       descending=True),
    "sort_l2": lambda x: sortgrad.soft_sort(x, regularization_strength=0.3),
    "sort_l2_desc": lambda x: sortgrad.soft_sort(x, regularization_strength=3.0,
                                                 descending=True),
    "sort_kl": lambda x: sortgrad.soft_sort(x, regularization="kl"),
    "sort_kl_desc": lambda x: sortgrad.soft_sort(x, regularization="kl", descending=True,
                                                 regularization_strength=0.4),
    "mask": lambda x: sortgrad.soft_top_k_mask(x, 2, regularization_strength=0.5),
    "quantile_l2": lambda x: sortgrad.soft_quantile(x, (0.25, 0.9)),
    "quantile_kl": lambda x: sortgrad.soft_quantile(x, 0.5, regularization="kl",
                                                    regularization_strength=0.2),
}


def _data(shape=(3, 6), seed=0, dtype=np.float64, axis=-1):
    """Distinct, well-separated values along `axis`: no kink within the finite-difference
    step."""
    if axis != -1:
        return np.moveaxis(_data(np.moveaxis(np.empty(shape), axis, -1).shape, seed, dtype),
                           -1, axis)
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.arange(shape[-1])) * 0.61 + rng.uniform(0, 0.2)
            for _ in range(int(np.prod(shape[:-1])))]
    return np.asarray(rows, dtype=dtype).reshape(shape) + rng.standard_normal(shape) * 0.01


def _squared(op):
    """A non-linear function of the op, so that second derivatives are not all zero."""
    return lambda x: jnp.sin(op(x)) * op(x)


@pytest.mark.parametrize("name", OPS)
def test_check_grads_order_2_both_modes(name):
    x = _data(axis=0 if "axis0" in name else -1)
    check_grads(_squared(OPS[name]), (x,), order=2, modes=MODES)


@pytest.mark.parametrize("name", OPS)
def test_check_grads_under_jit_and_vmap(name):
    f = jax.jit(jax.vmap(_squared(OPS[name])))
    check_grads(f, (_data((2, 3, 5), seed=1),), order=2, modes=MODES)


@pytest.mark.parametrize("name", OPS)
def test_check_grads_x32(name):
    x = _data(dtype=np.float32, seed=2, axis=0 if "axis0" in name else -1)
    with jax.enable_x64(False):
        f = _squared(OPS[name])
        assert f(x).dtype == jnp.float32
        assert jax.jvp(f, (x,), (x,))[1].dtype == jnp.float32
        check_grads(f, (x,), order=2, modes=MODES, eps=1e-2, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("name", OPS)
def test_jacfwd_equals_jacrev_and_hessians_agree(name):
    x = _data((5,), seed=3)
    if name == "sort_desc_axis0":
        x = x[:, None] * np.array([1.0, -1.0])
    op = OPS[name]
    np.testing.assert_allclose(jax.jacfwd(op)(x), jax.jacrev(op)(x), rtol=1e-12, atol=1e-12)
    scalar = lambda v: jnp.sum(_squared(op)(v))  # noqa: E731
    h = jax.hessian(scalar)(x)
    np.testing.assert_allclose(h, jax.jacrev(jax.jacrev(scalar))(x), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(h, jax.jacrev(jax.jacfwd(scalar))(x), rtol=1e-10, atol=1e-10)
    v = np.linspace(-1.0, 1.0, x.size).reshape(x.shape)
    hvp = jax.jvp(jax.grad(scalar), (x,), (v,))[1]  # forward over reverse
    np.testing.assert_allclose(hvp, np.tensordot(h, v, axes=v.ndim), rtol=1e-10, atol=1e-10)
    gg = jax.grad(lambda v: jnp.sum(jax.grad(scalar)(v) ** 2))(x)  # grad of grad
    assert np.all(np.isfinite(gg))


@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("descending", [False, True])
def test_forward_mode_matches_reference_jacobians(reg, descending):
    x = _data((7,), seed=4)
    for eps in (0.1, 1.0, 10.0):
        rank = jax.jacfwd(lambda v: sortgrad.soft_rank(
            v, regularization_strength=eps, regularization=reg, descending=descending))(x)
        np.testing.assert_allclose(rank, reference_soft_rank_jacobian(x, eps, reg, descending),
                                   rtol=1e-9, atol=1e-12)
        srt = jax.jacfwd(lambda v: sortgrad.soft_sort(
            v, regularization_strength=eps, regularization=reg, descending=descending))(x)
        np.testing.assert_allclose(srt, reference_soft_sort_jacobian(x, eps, reg, descending),
                                   rtol=1e-9, atol=1e-12)
    mask = jax.jacfwd(lambda v: sortgrad.soft_top_k_mask(v, 3, regularization_strength=2.0))(x)
    np.testing.assert_allclose(mask, reference_soft_top_k_mask_jacobian(x, 3, 2.0), atol=1e-12)


def test_hard_ops_forward_mode_is_the_gather():
    x = np.array([3.0, -1.0, 2.0, 2.0, 7.0])
    t = np.arange(5.0) + 1
    values, tangent = jax.jvp(sortgrad.sort, (x,), (t,))
    order = np.argsort(x, kind="stable")
    np.testing.assert_array_equal(values, x[order])
    np.testing.assert_array_equal(tangent, t[order])
    (v, i), (dv, di) = jax.jvp(lambda v: sortgrad.top_k(v, 2), (x,), (t,))
    np.testing.assert_array_equal(dv, t[np.asarray(i)])
    assert di.dtype == jax.dtypes.float0
    np.testing.assert_array_equal(jax.hessian(lambda v: jnp.sum(sortgrad.sort(v) ** 3))(x),
                                  np.diag(6 * x))


def _callbacks_and_xla_scatters(f, x):
    text = jax.jit(f).lower(x).as_text()
    return (len(re.findall(r"custom_call @xla_buffer_python_cpu_callback", text)),
            len(re.findall(r"stablehlo\.scatter", text)))


@pytest.mark.parametrize("name", ["sort", "top_k", "rank_l2", "rank_kl", "sort_l2", "sort_kl",
                                  "mask"])
def test_reverse_mode_is_one_forward_and_one_vjp_kernel(name):
    """Reverse mode runs the forward callback and the op's VJP kernel, nothing else (no XLA
    scatter: the transpose of the tangent map is the kernel, as fast as before)."""
    x = _data((4, 33), seed=5)

    def loss(v):
        y = OPS[name](v)
        return jnp.sum(y * jnp.cos(v[..., :y.shape[-1]]))
    assert _callbacks_and_xla_scatters(jax.grad(loss), x) == (2, 0)


def test_forward_mode_of_l2_rank_and_mask_runs_the_kernel():
    x = _data((4, 33), seed=6)
    for op in (OPS["rank_l2"], OPS["mask"]):
        assert _callbacks_and_xla_scatters(lambda v: jax.jvp(op, (v,), (v,))[1], x) == (2, 0)


@pytest.mark.simulator_route
@pytest.mark.parametrize("name", ["sort", "top_k", "rank_l2", "rank_kl", "sort_kl", "mask"])
def test_jvp_and_vjp_are_transposes_on_every_route(route, name):
    """<g, J v> == <J^T g, v>, under vmap, on the CPU and the emulated GPU branch."""
    simulator_case(route, name in ("sort", "rank_l2"))
    rng = np.random.default_rng(7)
    x = jnp.asarray(_data((2, 3, 9), seed=7))
    op = jax.vmap(OPS[name])
    v = rng.standard_normal(x.shape)
    y, jv = jax.jvp(op, (x,), (v,))
    g = rng.standard_normal(y.shape)
    (jtg,) = jax.vjp(op, x)[1](g)
    np.testing.assert_allclose(np.vdot(g, jv), np.vdot(jtg, v), rtol=1e-10)


def test_non_finite_rows_give_nan_tangents_and_cotangents():
    x = np.array([[1.0, np.nan, 3.0], [1.0, 2.0, 0.5]])
    for op in (OPS["rank_kl"], OPS["sort_l2"], OPS["sort_kl"], OPS["rank_l2"]):
        _, t = jax.jvp(op, (x,), (np.ones_like(x),))
        assert np.all(np.isnan(t[0])) and np.all(np.isfinite(t[1]))
        g = jax.vjp(op, x)[1](np.ones_like(x))[0]
        assert np.all(np.isnan(g[0])) and np.all(np.isfinite(g[1]))


def test_perturbed_top_k_forward_mode_is_the_estimators_transpose():
    """The perturbed op's derivative is the Monte-Carlo estimator (not the derivative of the
    piecewise-constant forward, so no finite differences): jvp and vjp are transposes, jacfwd
    equals jacrev, and the second derivative is zero (the estimator is linear in x's tangent
    with x-independent weights, given the draws)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 6))
    op = lambda v: sortgrad.perturbed_top_k(KEY, v, 2, num_samples=50, sigma=0.5)  # noqa: E731
    v = rng.standard_normal(x.shape)
    p, jv = jax.jvp(op, (x,), (v,))
    g = rng.standard_normal(p.shape)
    (jtg,) = jax.vjp(op, x)[1](g)
    np.testing.assert_allclose(np.vdot(g, jv), np.vdot(jtg, v), rtol=1e-10)
    np.testing.assert_allclose(jax.jacfwd(op)(x), jax.jacrev(op)(x), rtol=1e-10, atol=1e-12)
    scalar = lambda v: jnp.sum(op(v) * g)  # noqa: E731
    np.testing.assert_array_equal(jax.hessian(scalar)(x), np.zeros(x.shape * 2))
    x_nan = x.copy()
    x_nan[0, 1] = np.nan
    _, t = jax.jvp(op, (x_nan,), (v,))
    assert np.all(np.isnan(t[0])) and np.all(np.isfinite(t[1]))


# --- kinks: the pooled side --------------------------------------------------------------------

def _fd_jacobian(f, x, step=1e-6):
    cols = [(np.asarray(f(x + step * e)) - np.asarray(f(x - step * e))) / (2 * step)
            for e in np.eye(x.size)]
    return np.stack(cols, axis=-1)


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("x, inside", [
    # eps = 1, integer data: sorted gaps of exactly 1 are PAV merge thresholds
    ([5.0, 1.0, 2.0], [0.0, 1e-3, 0.0]),   # s - rho = [2, 0, 0]: the last two pool
    ([1.0, 2.0, 3.0, 4.0, 5.0], [1e-3, 0.0, 0.0, 0.0, -1e-3]),  # torchsort's README data
    ([3.0, 1.0, 2.0, 0.0], [-2e-3, 0.0, 0.0, 1e-3]),  # s - rho = [-1, -1, -1, -1]
])
def test_soft_rank_kink_returns_the_pooled_side(x, inside, descending):
    """At the kink the Jacobian is the one of the pooled side: equal to the (unique) Jacobian
    at a point just inside the pooled region, never the zero of the unpooled side."""
    x, inside = np.asarray(x), np.asarray(inside)
    if descending:
        x, inside = -x, -inside
    op = lambda v: sortgrad.soft_rank(v, descending=descending,  # noqa: E731
                                      regularization_strength=1.0)
    pooled = _fd_jacobian(op, x + inside)
    assert np.abs(pooled).sum() > 0.5
    for jac in (jax.jacrev(op)(x), jax.jacfwd(op)(x)):
        np.testing.assert_allclose(jac, pooled, atol=1e-6)


def test_soft_sort_and_mask_kinks():
    x = np.array([5.0, 1.0, 2.0])
    sort = lambda v: sortgrad.soft_sort(v, regularization_strength=1.0)  # noqa: E731
    # theta - s = [1 - 5, 2 - 2, 3 - 1] ascending-signed: gaps of 1/eps = 1 are kinks as well
    np.testing.assert_allclose(jax.jacrev(sort)(x), jax.jacfwd(sort)(x), atol=1e-12)
    mask = lambda v: sortgrad.soft_top_k_mask(v, 1, regularization_strength=1.0)  # noqa: E731
    z = np.array([2.0, 1.0, 1.0])  # s - w = [1, 1, 1]: the pooled side of a real kink
    np.testing.assert_allclose(jax.jacrev(mask)(z), _fd_jacobian(mask, z - [1e-3, 0, 0]),
                               atol=1e-6)
    # inputs tied where the mask saturates are not a kink: no perturbation separates them
    for v, k in (([5.0, 5.0, 0.0], 2), ([3.0, 0.0, 0.0], 1)):
        f = lambda u, k=k: sortgrad.soft_top_k_mask(u, k, regularization_strength=1.0)  # noqa
        np.testing.assert_array_equal(jax.jacrev(f)(np.asarray(v)), np.zeros((3, 3)))


def test_torchsort_readme_spearman_gradient_is_nonzero():
    """torchsort's README example: a Spearman loss on ranks of integer-valued data."""
    pred = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    target = jnp.array([[5.0, 6.0, 7.0, 8.0, 7.0]])

    def spearman(p):
        p, t = sortgrad.soft_rank(p), sortgrad.soft_rank(target)
        p, t = p - p.mean(), t - t.mean()
        return (p / jnp.linalg.norm(p) * t / jnp.linalg.norm(t)).sum()
    grad = jax.grad(spearman)(pred)
    assert np.abs(grad).max() > 1e-3
    np.testing.assert_allclose(grad, _fd_jacobian(spearman, np.asarray(pred) +
                                                  np.array([[1e-3, 0, 0, 0, -1e-3]]))[None, :]
                               .reshape(grad.shape), atol=5e-4)  # 1e-3 from the kink
