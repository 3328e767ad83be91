"""Reliability of the callbacks: threads in pure mode, and errors raised inside a pass."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sortgrad
from sortgrad import kernels
from sortgrad.bindings.jax import _call, hard, soft

# --- pure mode from several threads ---------------------------------------------------------------

_THREADS_SCRIPT = textwrap.dedent("""
    import concurrent.futures, faulthandler, sys
    import jax, numpy as np, sortgrad
    x = np.random.default_rng(0).standard_normal((64, 400)).astype(np.float32)  # 100 KiB
    ops = [sortgrad.sort, sortgrad.soft_rank]
    with sortgrad.callback_mode("pure"):
        for op in ops:  # compile (and load the Numba kernels) before the clock starts
            jax.block_until_ready(op(x))
    faulthandler.dump_traceback_later(30, exit=True)  # a hang fails here, with the stacks

    def work(i):
        with sortgrad.callback_mode("pure"):
            for op, calls in zip(ops, (200, 20)):
                for _ in range(calls):
                    jax.block_until_ready(op(x + i))
        return i

    for _ in range(3):  # the hang is a race: several rounds make it (nearly) certain
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert list(pool.map(work, range(8))) == list(range(8))
    print("done")
""")


def test_pure_mode_eager_calls_from_threads_do_not_deadlock():
    env = dict(os.environ, SORTGRAD_CALLBACK="pure")
    try:
        run = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], capture_output=True,
                             text=True, timeout=240, env=env, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("pure-mode ops from 4 threads hung")
    assert run.returncode == 0 and "done" in run.stdout, run.stderr[-3000:]


# --- errors raised inside a pass ------------------------------------------------------------------

def _clear_pass_caches():
    soft._forward_kernel.cache_clear()
    soft._vjp_kernel.cache_clear()
    hard._sort_kernel.cache_clear()
    _call.pass_name.cache_clear()
    jax.clear_caches()


@pytest.fixture
def failing_kernel(monkeypatch):
    """failing_kernel(name, exc): sortgrad.kernels.<name> raises exc from now on (test only)."""
    def install(name, exc):
        def broken(*args, **kwargs):
            raise exc
        broken.__name__ = name
        broken.__module__ = kernels.__name__
        monkeypatch.setattr(kernels, name, broken)
        _clear_pass_caches()
    yield install
    monkeypatch.undo()
    _clear_pass_caches()


def _run(fn, jit, x):
    return jax.block_until_ready((jax.jit(fn) if jit else fn)(x))


X = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)


@pytest.mark.parametrize("mode", ["buffer", "pure"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("exc", [MemoryError("injected: no memory"),
                                 ValueError("injected: bad value")],
                         ids=["MemoryError", "ValueError"])
def test_forward_error_names_pass_and_type(failing_kernel, mode, jit, exc):
    failing_kernel("soft_rank", exc)
    with sortgrad.callback_mode(mode), pytest.raises(jax.errors.JaxRuntimeError) as info:
        _run(sortgrad.soft_rank, jit, jnp.asarray(X))
    text = str(info.value)
    assert f"sortgrad soft_rank: {type(exc).__name__}: {exc}" in text
    assert "float32[3, 4]" in text  # the arguments it was handed


@pytest.mark.parametrize("mode", ["buffer", "pure"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_backward_error_names_vjp_pass(failing_kernel, mode, jit):
    failing_kernel("soft_rank_vjp", MemoryError("injected"))
    loss = jax.grad(lambda x: jnp.sum(sortgrad.soft_rank(x) * jnp.arange(4.0)))
    with sortgrad.callback_mode(mode), pytest.raises(jax.errors.JaxRuntimeError) as info:
        _run(loss, jit, jnp.asarray(X))
    assert "sortgrad soft_rank_vjp: MemoryError: injected" in str(info.value)


@pytest.mark.parametrize("mode", ["buffer", "pure"])
def test_hard_op_error_names_pass(failing_kernel, mode):
    failing_kernel("segmented_sort", MemoryError("injected"))
    with sortgrad.callback_mode(mode), pytest.raises(jax.errors.JaxRuntimeError) as info:
        _run(sortgrad.sort, False, jnp.asarray(X))
    assert "sortgrad segmented_sort: MemoryError: injected" in str(info.value)


def test_kernel_error_chains_the_original():
    err = MemoryError("injected")

    def broken(x, *, out=None):
        raise err
    with pytest.raises(_call.KernelError) as info:
        _call._run_pass(broken, [np.zeros((2, 3), np.float32)], out=None)
    assert str(info.value).startswith("sortgrad ")
    assert ": MemoryError: injected (arguments float32[2, 3]" in str(info.value)
    assert info.value.__cause__ is err
