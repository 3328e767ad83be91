"""Call plans (`sortgrad.kernels.record_call`, `_plans.py`): a CPU call recorded once and
replayed on new arrays of the same signature gives, bit for bit, what the normal call gives;
data checks are replayed; calls a plan cannot rebuild get none."""

import numpy as np
import pytest

from sortgrad import kernels
from sortgrad.kernels import _plans

RNG = np.random.default_rng(0)


def _data(shape, dtype, kind):
    if kind == "ties":
        return RNG.integers(-2, 3, shape).astype(dtype)
    x = RNG.standard_normal(shape).astype(dtype)
    if kind == "nan":
        x.flat[:: 3] = np.nan
        x.flat[-1] = -0.0
    return x


def _sort(x, out):
    return kernels.segmented_sort(x, out=out)


def _sort_reverse(x, out):
    return kernels.segmented_sort(x, reverse=True, out=out)


def _argsort_desc(x, out):
    return (kernels.segmented_argsort(x, descending=True, out=None if out is None else out[0]),)


def _top_k(k):
    def run(x, out):
        return kernels.top_k(x, k, out=out)
    return run


def _soft(name, *static, **options):
    def run(x, out):
        return getattr(kernels, name)(x, *static, out=out, **options)
    return run


def _outs(fn, x):
    """Fresh output arrays of the call's result specs (from a normal call)."""
    results = fn(x, None)
    return tuple(np.empty_like(r) for r in results)


FORWARDS = {
    "sort": _sort, "sort-reverse": _sort_reverse, "argsort-desc": _argsort_desc,
    "top_k-1": _top_k(1), "top_k-5": _top_k(5),
    "soft_rank-l2": _soft("soft_rank", 0.5), "soft_rank-kl": _soft("soft_rank", 2.0,
                                                                    regularization="kl"),
    "soft_sort-desc": _soft("soft_sort", 0.5, descending=True),
    "soft_top_k_mask": _soft("soft_top_k_mask", 3, 0.7),
}


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32"])
@pytest.mark.parametrize("shape", [(1,), (33,), (4, 31), (2, 3, 17)])
@pytest.mark.parametrize("name", sorted(FORWARDS))
def test_replay_equals_the_normal_call(name, shape, dtype):
    if name.startswith("soft") and dtype == "int32":
        pytest.skip("soft ops take floats")
    k = {"top_k-1": 1, "top_k-5": 5, "soft_top_k_mask": 3}.get(name, 0)
    if k > shape[-1]:
        pytest.skip("k > n")
    fn = FORWARDS[name]
    first = _data(shape, dtype, "normal")
    outs = _outs(fn, first)
    _, plan = kernels.record_call(fn, [first], outs)
    assert isinstance(plan, kernels.CallPlan), "a plain CPU call of these specs has a plan"
    for kind in ("normal", "ties", "nan"):
        if kind == "nan" and dtype == "int32":
            continue
        x = _data(shape, dtype, kind)
        want = fn(x, None)
        got = tuple(np.full_like(o, 7) for o in outs)  # garbage that must be overwritten
        plan([x], got)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes(), (name, kind)


def test_vjps_and_scatter_replay():
    x = _data((3, 9), "float64", "normal")
    ranks, perm, blocks = kernels.soft_rank(x, 0.3)
    g = _data((3, 9), "float64", "normal")

    def vjp(g, x, ranks, perm, blocks, out):
        return (kernels.soft_rank_vjp(g, x, ranks, perm, blocks, 0.3, out=out[0]),)

    out = (np.empty_like(x),)
    _, plan = kernels.record_call(vjp, [g, x, ranks, perm, blocks], out)
    assert plan is not None
    x2 = _data((3, 9), "float64", "ties")
    r2, p2, b2 = kernels.soft_rank(x2, 0.3)
    g2 = _data((3, 9), "float64", "normal")
    plan([g2, x2, r2, p2, b2], out)
    assert out[0].tobytes() == kernels.soft_rank_vjp(g2, x2, r2, p2, b2, 0.3).tobytes()

    values = _data((2, 4), "float32", "normal")
    perm = np.array([[3, 0, 6, 1], [2, 5, 4, 0]], np.int32)

    def scatter(values, perm, out):
        return (kernels.permutation_scatter(values, perm, 7, out=out[0]),)

    dx = (np.empty((2, 7), np.float32),)
    _, plan = kernels.record_call(scatter, [values, perm], dx)
    assert plan is not None
    perm2 = np.array([[6, 5, 4, 3], [0, 1, 2, 3]], np.int32)
    values2 = _data((2, 4), "float32", "normal")
    plan([values2, perm2], dx)
    assert dx[0].tobytes() == kernels.permutation_scatter(values2, perm2, 7).tobytes()


def test_the_data_check_is_replayed():
    """Entries of perm outside [0, n) would write out of bounds: every replay checks them."""
    values = np.ones((1, 3), np.float32)

    def scatter(values, perm, out):
        return (kernels.permutation_scatter(values, perm, 4, out=out[0]),)

    out = (np.empty((1, 4), np.float32),)
    _, plan = kernels.record_call(scatter, [values, np.array([[0, 1, 2]], np.int32)], out)
    assert plan is not None
    for bad in ([[0, 1, 4]], [[-1, 1, 2]]):
        with pytest.raises(ValueError, match="outside"):
            plan([values, np.array(bad, np.int32)], out)


def test_calls_a_plan_cannot_rebuild_get_none():
    x = _data((2, 5), "float32", "normal")
    outs = _outs(_sort, x)
    # the same buffer twice
    g = _data((2, 5), "float64", "normal")
    r, p, b = kernels.soft_sort(g, 1.0)

    def vjp(g, x, perm, blocks, out):
        return (kernels.soft_sort_vjp(g, x, perm, blocks, 1.0, out=out[0]),)

    assert kernels.record_call(vjp, [g, g, p, b], (np.empty_like(g),))[1] is None
    # larger than MAX_ELEMENTS in all
    big = _data((1, _plans.MAX_ELEMENTS), "float32", "normal")
    assert kernels.record_call(_sort, [big], _outs(_sort, big))[1] is None
    # a converted copy (16-bit floats are computed in float32): nothing to rebuild it from
    h = x.astype(np.float16)
    soft = _soft("soft_rank", 1.0)
    assert kernels.record_call(soft, [h], _outs(soft, h))[1] is None
    # empty arrays
    e = np.zeros((2, 0), np.float32)
    assert kernels.record_call(_sort, [e], _outs(_sort, e))[1] is None
    # the recorded call itself is still made, and its results are returned
    result, plan = kernels.record_call(_sort, [x], outs)
    assert plan is not None and result[0] is outs[0]
    np.testing.assert_array_equal(outs[0], np.sort(x, axis=-1))


def test_a_call_with_effects_outside_its_steps_gets_none():
    """What a function does to its outputs outside the kernel API's steps is not replayed:
    the one-off replay on the recorded arrays sees the difference and refuses the plan."""
    x = _data((1, 6), "float64", "normal")

    def sort_then_double(x, out):
        kernels.segmented_sort(x, out=out)
        out[0][...] *= 2.0
        return out

    outs = _outs(_sort, x)
    result, plan = kernels.record_call(sort_then_double, [x], outs)
    assert plan is None
    np.testing.assert_array_equal(outs[0], 2.0 * np.sort(x))


def test_a_temporary_argument_refuses_the_plan():
    x = _data((1, 6), "float64", "normal")

    def sort_a_copy(x, out):
        return kernels.segmented_sort(x.copy(), out=out)   # a new writable array each call

    assert kernels.record_call(sort_a_copy, [x], _outs(_sort, x))[1] is None
