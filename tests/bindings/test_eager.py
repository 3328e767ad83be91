"""Eager (un-jitted) calls reuse compiled programs: no re-tracing of the host callbacks per call,
and the callback mode still decides the path taken."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sortgrad
from sortgrad.bindings.jax import _call, hard, soft

OPS = {
    "sort": lambda x: sortgrad.sort(x, descending=True),
    "argsort": lambda x: sortgrad.argsort(x),
    "top_k": lambda x: sortgrad.top_k(x, 3),
    "soft_rank": lambda x: sortgrad.soft_rank(x, regularization="kl"),
    "soft_sort": lambda x: sortgrad.soft_sort(x, regularization_strength=0.5),
    "soft_top_k_mask": lambda x: sortgrad.soft_top_k_mask(x, 2),
    "soft_quantile": lambda x: sortgrad.soft_quantile(x, 0.25),
    "soft_quantile-vector": lambda x: sortgrad.soft_quantile(x, [0.1, 0.9], keepdims=True),
    "sort_multiple": lambda x: sortgrad.sort_multiple((x, -x), num_keys=1),
    "lexsort": lambda x: sortgrad.lexsort((x, -x)),
    "argsort-complex": lambda x: sortgrad.argsort(x + 1j * x),
    "perturbed_top_k": lambda x: sortgrad.perturbed_top_k(jax.random.key(0), x, 2,
                                                          num_samples=8),
}


@pytest.fixture
def traces(monkeypatch):
    """Counts the host callbacks staged (one per traced op), per mode."""
    counts = {"buffer": 0, "pure": 0}
    original = _call.kernel_call

    def counting(*args, **kwargs):
        counts[_call.get_callback_mode()] += 1
        return original(*args, **kwargs)

    for module in (hard, soft):
        monkeypatch.setattr(module, "kernel_call", counting)
    return counts


@pytest.mark.parametrize("name", sorted(OPS))
def test_second_eager_call_is_not_traced_again(name, traces):
    op = OPS[name]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 7)), jnp.float32)
    _call._staged.clear_cache()  # another op (or test) may have compiled the same program
    with sortgrad.callback_mode("buffer"):
        first = op(x)
        assert traces["buffer"] >= 1
        traces["buffer"] = 0
        second = op(x + 1.0)          # same shape and dtype: the cached program
        assert traces["buffer"] == 0
    want = jax.jit(op)(x + 1.0)
    for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(first) == jax.tree.structure(second)


@pytest.mark.parametrize("name", ["sort", "soft_rank"])
def test_eager_call_follows_the_callback_mode(name, traces):
    op = OPS[name]
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5)), jnp.float64)
    with sortgrad.callback_mode("buffer"):
        a = op(x)
    with sortgrad.callback_mode("pure"):
        b = op(x)                     # a different mode is a different program
    assert traces["pure"] >= 1
    np.testing.assert_array_equal(a, b)


def test_eager_gradient_matches_jitted():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 6)))
    w = jnp.arange(24.0).reshape(4, 6)
    eps = {"regularization_strength": 1.0}
    for op in (sortgrad.sort, partial(sortgrad.soft_rank, **eps),
               partial(sortgrad.soft_sort, **eps)):
        f = lambda v, op=op: jnp.sum(op(v) * w)  # noqa: E731
        np.testing.assert_array_equal(jax.grad(f)(x), jax.jit(jax.grad(f))(x))
    # the default (softness) differentiates through each row's spread with JAX ops, whose
    # fusion differs between the eager backward pass and one jitted program: rounding only
    for op in (sortgrad.soft_rank, sortgrad.soft_sort):
        f = lambda v, op=op: jnp.sum(op(v) * w)  # noqa: E731
        np.testing.assert_allclose(jax.grad(f)(x), jax.jit(jax.grad(f))(x), rtol=1e-13,
                                   atol=1e-13)
