"""Every public op in JAX's default x32 mode (the rest of the suite runs with x64 enabled).

Under `jax.enable_x64(False)` a user's arrays are float32/int32 and Python scalars are weakly
typed; the ops must keep those dtypes, give the float32 results of the x64 run (computed here
on the same float32 data with x64 on, an independent path through JAX's own dtype rules) and
differentiate under jit, vmap and grad in both callback modes and on every route (the GPU
branch on the emulated devices too).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sortgrad
from sortgrad.selection import soft_selected_mean

KEY = jax.random.PRNGKey(3)

# name -> (op on a (rows, n) float32 array, differentiable?)
OPS = {
    "sort": (lambda x: sortgrad.sort(x), True),
    "sort_desc": (lambda x: sortgrad.sort(x, descending=True, axis=0), True),
    "argsort": (lambda x: sortgrad.argsort(x, descending=True), False),
    "top_k_values": (lambda x: sortgrad.top_k(x, 3)[0], True),
    "top_k_indices": (lambda x: sortgrad.top_k(x, 3)[1], False),
    "soft_rank_l2": (lambda x: sortgrad.soft_rank(x, regularization_strength=0.7), True),
    "soft_rank_kl": (lambda x: sortgrad.soft_rank(x, regularization="kl", axis=0), True),
    "soft_sort_l2": (lambda x: sortgrad.soft_sort(x, regularization_strength=0.3), True),
    "soft_sort_kl": (lambda x: sortgrad.soft_sort(x, regularization="kl", descending=True),
                     True),
    "soft_top_k_mask": (lambda x: sortgrad.soft_top_k_mask(x, 2, regularization_strength=0.5),
                        True),
    "soft_quantile": (lambda x: sortgrad.soft_quantile(x, (0.25, 0.9)), True),
    "perturbed_top_k": (lambda x: sortgrad.perturbed_top_k(KEY, x, 2, num_samples=64, sigma=0.5),
                        True),
    "soft_selected_mean": (lambda x: soft_selected_mean(x[::-1], x, 2), True),
}


def _data(seed=0, shape=(4, 9)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[0, :3] = x[0, 3]  # ties
    return x


def _in_x64(fn, *args):
    with jax.enable_x64(True):
        return jax.tree.map(np.asarray, fn(*args))


@pytest.fixture(params=["buffer", "pure"])
def mode(request):
    with sortgrad.callback_mode(request.param):
        yield request.param


@pytest.mark.parametrize("name", sorted(OPS))
def test_values_and_dtypes_match_the_x64_run(route, name, mode):
    op, _ = OPS[name]
    x = _data()
    want = _in_x64(lambda v: op(jnp.asarray(v, jnp.float32)), x)
    with jax.enable_x64(False):
        xj = jnp.asarray(x)
        eager, jitted = op(xj), jax.jit(op)(xj)
        vmapped = jax.vmap(op)(jnp.stack([xj, xj + 1]))
    for got in (eager, jitted):
        assert got.dtype == want.dtype and got.dtype in (jnp.float32, jnp.int32), got.dtype
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vmapped[0]), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(n for n, (_, d) in OPS.items() if d))
def test_gradients_match_the_x64_run(route, name, mode):
    op, _ = OPS[name]
    x = _data(1)
    weights = np.random.default_rng(2).standard_normal(
        _in_x64(lambda v: op(jnp.asarray(v, jnp.float32)), x).shape).astype(np.float32)

    def loss(v):
        return jnp.sum(op(v) * weights)

    want = _in_x64(lambda v: jax.grad(loss)(jnp.asarray(v, jnp.float32)), x)
    with jax.enable_x64(False):
        got = jax.jit(jax.grad(loss))(jnp.asarray(x))
        batched = jax.vmap(jax.grad(loss))(jnp.stack([jnp.asarray(x)] * 2))
    assert got.dtype == jnp.float32
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(batched[1]), want, rtol=1e-5, atol=1e-5 * scale)
    assert np.any(want != 0), "a zero gradient checks nothing"


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bfloat16, jnp.float16])
def test_other_dtypes_keep_their_dtype(dtype):
    x = (_data(4) * 4).astype(np.float32)
    with jax.enable_x64(False):
        xj = jnp.asarray(x).astype(dtype)
        ref = jnp.sort(xj, axis=-1)
        out = sortgrad.sort(xj)
        values, indices = sortgrad.top_k(xj, 4)
        ref_values, ref_indices = jax.lax.top_k(xj, 4)
    assert out.dtype == dtype and values.dtype == dtype and indices.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)),
                                  np.asarray(ref.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(values.astype(jnp.float32)),
                                  np.asarray(ref_values.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(indices), np.asarray(ref_indices))
    if dtype != jnp.int32:
        with jax.enable_x64(False):
            ranks = sortgrad.soft_rank(xj)
        assert ranks.dtype == dtype


def test_python_scalars_and_lists_are_weakly_typed():
    with jax.enable_x64(False):
        out = sortgrad.soft_sort([3.0, 1.0, 2.0])
        ranks = sortgrad.soft_rank(jnp.asarray([3.0, 1.0, 2.0]) * 2.0)
    assert out.dtype == jnp.float32 and ranks.dtype == jnp.float32
