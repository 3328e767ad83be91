"""The buffer-mode CPU passes replay a recorded call plan from their second call on
(`_call._host_call`, `sortgrad.kernels.record_call`): every later call of a compiled program,
with new data, must give what jnp gives (hard ops, bit for bit) or what the pure-callback
path gives (soft ops and gradients: no plans there); vmap re-binds the callback with batched shapes (a second
plan); gradients run the scatter / VJP passes the same way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sortgrad
from sortgrad import kernels


def _rows(seed, shape=(3, 17), dtype=np.float32):
    rng = np.random.default_rng(seed)
    if seed % 3 == 1:   # ties
        return jnp.asarray(rng.integers(-2, 3, shape).astype(dtype))
    x = rng.standard_normal(shape).astype(dtype)
    if seed % 3 == 2:
        x[0, :: 4] = np.nan
        x[1, 0] = -0.0
    return jnp.asarray(x)


HARD = {
    "sort": (lambda x: sortgrad.sort(x), lambda x: jnp.sort(x)),
    "sort-desc": (lambda x: sortgrad.sort(x, descending=True),
                  lambda x: jnp.sort(x, descending=True)),
    "argsort": (lambda x: sortgrad.argsort(x), lambda x: jnp.argsort(x, stable=True)),
    "top_k": (lambda x: sortgrad.top_k(x, 4), lambda x: jax.lax.top_k(x, 4)),
}


@pytest.mark.parametrize("name", sorted(HARD))
def test_hard_ops_on_later_calls(name):
    op, ref = HARD[name]
    f = jax.jit(op)
    for seed in range(6):
        x = _rows(seed)
        for a, b in zip(jax.tree.leaves(f(x)), jax.tree.leaves(ref(x))):
            a, b = np.asarray(a), np.asarray(b)
            if a.dtype.kind == "f":   # the values' bits (NaN payloads, -0.0)
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (name, seed)
            else:                     # indices: int32 here, jnp's default int under x64
                np.testing.assert_array_equal(a, b)


SOFT = {
    "soft_rank": lambda x: sortgrad.soft_rank(x, regularization_strength=0.3),
    "soft_rank-kl": lambda x: sortgrad.soft_rank(x, regularization_strength=0.3,
                                                 regularization="kl"),
    "soft_sort": lambda x: sortgrad.soft_sort(x, regularization_strength=0.3),
    "mask": lambda x: sortgrad.soft_top_k_mask(x, 3, regularization_strength=0.3),
    "quantile": lambda x: sortgrad.soft_quantile(x, 0.3, regularization_strength=0.3),
}


@pytest.mark.parametrize("name", sorted(SOFT))
def test_soft_ops_and_gradients_on_later_calls(name):
    op = SOFT[name]
    w = jnp.asarray(np.random.default_rng(9).standard_normal((3, 17)), jnp.float64)
    loss = lambda v: jnp.sum(op(v) * (w if op(v).shape == w.shape else w[:, 0]))  # noqa: E731
    forward, backward = jax.jit(op), jax.jit(jax.grad(loss))
    with sortgrad.callback_mode("pure"):   # pure_callback passes: never planned
        pure_forward, pure_backward = jax.jit(op), jax.jit(jax.grad(loss))
        pure_forward(_rows(0, dtype=np.float64))   # traced here, in pure mode
        pure_backward(_rows(0, dtype=np.float64))
    for seed in (0, 1, 3, 4, 6):   # finite rows: random and tied
        x = _rows(seed, dtype=np.float64)
        want_value, want_grad = pure_forward(x), pure_backward(x)
        np.testing.assert_array_equal(forward(x), want_value)
        np.testing.assert_array_equal(backward(x), want_grad)


def test_vmap_and_a_new_shape_get_their_own_plans():
    f = jax.jit(jax.vmap(lambda x: sortgrad.sort(x)))
    g = jax.jit(lambda x: sortgrad.sort(x))
    for seed in range(4):
        x = _rows(seed, shape=(2, 3, 9))
        np.testing.assert_array_equal(f(x), jnp.sort(x))
        np.testing.assert_array_equal(g(x[0]), jnp.sort(x[0]))
        np.testing.assert_array_equal(g(x[0, 0]), jnp.sort(x[0, 0]))


def test_the_passes_do_replay_plans(monkeypatch):
    """The fast path is taken: the second call of a program replays a plan instead of calling
    the kernel API."""
    calls = {"record": 0, "replay": 0}
    record, replay = kernels.record_call, kernels.CallPlan.__call__

    def counting_record(*args, **kwargs):
        calls["record"] += 1
        return record(*args, **kwargs)

    def counting_replay(self, *args):
        calls["replay"] += 1
        return replay(self, *args)

    monkeypatch.setattr(kernels, "record_call", counting_record)
    monkeypatch.setattr(kernels.CallPlan, "__call__", counting_replay)
    f = jax.jit(jax.grad(lambda v: jnp.sum(sortgrad.soft_rank(v, regularization_strength=1.0)
                                           * jnp.arange(7.0))))
    x = jnp.linspace(-1.0, 1.0, 7)
    for _ in range(3):
        jax.block_until_ready(f(x))
    # forward and VJP: recorded once (with its one check replay), then replayed
    assert calls == {"record": 2, "replay": 2 + 4}


def test_a_kernel_error_on_a_replayed_call_names_the_pass(monkeypatch):
    f = jax.jit(lambda x: sortgrad.sort(x))
    x = jnp.arange(5.0)
    f(x)
    f(x)   # the plan exists

    def broken(self, arrays, out):
        raise RuntimeError("injected")

    monkeypatch.setattr(kernels.CallPlan, "__call__", broken)
    with pytest.raises(Exception, match="sortgrad segmented_sort: RuntimeError: injected"):
        jax.block_until_ready(f(x + 1.0))
