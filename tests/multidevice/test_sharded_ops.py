"""sortgrad ops on batch-sharded inputs, eight host devices: inside shard_map (check_vma), under
jit with explicit mesh axes, eagerly on NamedSharding arrays. Every result and gradient is
compared with the same op on the unsharded array (the reference: per-row kernels give the
same bits whatever the batch split), and the compiled programs hold no all-gather."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import sortgrad

assert jax.device_count() == 8, "run through tests/bindings/test_sharding.py (8 host devices)"

N = 12  # row length


def _ops():
    """name -> f(x) for x of shape (..., N) with rows on the last axis."""
    key = jax.random.key(3)
    return {
        "sort": lambda x: sortgrad.sort(x),
        "sort_desc": lambda x: sortgrad.sort(x, descending=True),
        "argsort": lambda x: sortgrad.argsort(x),
        "top_k": lambda x: sortgrad.top_k(x, 4),
        "soft_rank": lambda x: sortgrad.soft_rank(x, regularization_strength=0.3),
        "soft_rank_kl": lambda x: sortgrad.soft_rank(x, regularization_strength=0.3,
                                                     regularization="kl"),
        "soft_sort": lambda x: sortgrad.soft_sort(x, regularization_strength=0.5),
        "soft_sort_kl": lambda x: sortgrad.soft_sort(x, regularization_strength=0.5,
                                                     regularization="kl"),
        "mask": lambda x: sortgrad.soft_top_k_mask(x, 3, regularization_strength=0.5),
        "quantile": lambda x: sortgrad.soft_quantile(x, 0.7, regularization_strength=0.5),
        # quantile levels lead the result (as jnp.quantile): moved last to keep rows first
        "quantiles": lambda x: jnp.moveaxis(
            sortgrad.soft_quantile(x, (0.2, 0.9), regularization_strength=0.5), 0, -1),
        "quantile_traced_q": lambda x: jnp.moveaxis(sortgrad.soft_quantile(
            x, jnp.asarray([0.25, 0.5], x.dtype), regularization_strength=0.5, keepdims=True),
            0, -1),
        "traced_strength": lambda x: sortgrad.soft_rank(x, regularization_strength=jnp.asarray(
            0.4, x.dtype)),
        "perturbed": lambda x: sortgrad.perturbed_top_k(key, x, 2, num_samples=16, sigma=0.5),
        "sort_multiple": lambda x: sortgrad.sort_multiple((x, -x), num_keys=1),
        # the default strength: each row's eps from its own spread (softness)
        "soft_rank_default": lambda x: sortgrad.soft_rank(x),
        "quantile_default": lambda x: sortgrad.soft_quantile(x, 0.9, keepdims=True),
    }


OPS = _ops()
DIFFERENTIABLE = [n for n in OPS if n != "argsort"]


def _loss(f):
    def loss(x):
        leaves = [leaf for leaf in jax.tree_util.tree_leaves(f(x))
                  if jnp.issubdtype(leaf.dtype, jnp.floating)]
        # elementwise (the same per element whatever the split), nonlinear
        return sum(jnp.sum(jnp.sin(3 * leaf) + 0.1 * leaf ** 2) for leaf in leaves)
    return loss


def _data(shape, dtype=np.float64, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _equal(actual, expected):
    """Equal up to float64 rounding (XLA may fuse the surrounding elementwise math of a
    sharded program differently: a few ulps; the kernels' own results are the same bits)."""
    def check(a, b):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        if a.dtype != jax.dtypes.float0:
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)
    jax.tree_util.tree_map(check, actual, expected)


def _auto_mesh(shape=(8,), names=("b",)):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _explicit_mesh(shape=(8,), names=("b",)):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(shape))


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def _assert_no_all_gather(text: str):
    assert "all-gather" not in text and "all-to-all" not in text, \
        [line for line in text.splitlines() if "all-gather" in line or "all-to-all" in line][:3]


# --- inside shard_map: per shard, check_vma=True ---------------------------------------------

@pytest.mark.parametrize("mode", ["buffer", "pure"])
@pytest.mark.parametrize("name", list(OPS))
def test_shard_map_values_and_grads(name, mode):
    f = OPS[name]
    x = _data((16, N))
    mesh = _auto_mesh()
    with sortgrad.callback_mode(mode):
        expected = f(x)
        if name == "perturbed":  # inside shard_map each shard draws Z for its own rows
            expected = jnp.concatenate([f(block) for block in jnp.split(x, 8)])
        mapped = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("b"), out_specs=P("b"),
                                       check_vma=True))
        _equal(mapped(x), expected)
        if name in DIFFERENTIABLE:
            loss = _loss(f)
            per_shard_grad = jax.jit(jax.shard_map(jax.grad(loss), mesh=mesh, in_specs=P("b"),
                                                   out_specs=P("b"), check_vma=True))
            tangent = _data((16, N), seed=1)
            per_shard_jvp = jax.jit(jax.shard_map(
                lambda x, t: jax.jvp(f, (x,), (t,))[1], mesh=mesh, in_specs=(P("b"), P("b")),
                out_specs=P("b"), check_vma=True))
            if name == "perturbed":
                blocks = zip(jnp.split(x, 8), jnp.split(tangent, 8))
                _equal(per_shard_grad(x),
                       jnp.concatenate([jax.grad(loss)(b) for b in jnp.split(x, 8)]))
                _equal(per_shard_jvp(x, tangent),
                       jnp.concatenate([jax.jvp(f, (b,), (t,))[1] for b, t in blocks]))
            else:
                _equal(per_shard_grad(x), jax.grad(loss)(x))
                _equal(per_shard_jvp(x, tangent), jax.jvp(f, (x,), (tangent,))[1])


@pytest.mark.parametrize("name", ["sort", "soft_rank", "top_k", "quantile"])
def test_shard_map_2d_mesh_and_vmap_inside(name):
    f = OPS[name]
    x = _data((4, 6, N))
    mesh = _auto_mesh((4, 2), ("b", "c"))
    expected = jax.vmap(f)(x)
    body = jax.vmap(f)
    mapped = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("b", "c"), out_specs=P("b", "c"),
                                   check_vma=True))
    _equal(mapped(x), expected)
    loss = _loss(body)
    grads = jax.jit(jax.shard_map(jax.grad(loss), mesh=mesh, in_specs=P("b", "c"),
                                  out_specs=P("b", "c"), check_vma=True))
    _equal(grads(x), jax.grad(loss)(x))


def test_shard_map_second_order():
    f = OPS["soft_rank"]
    x = _data((8, N))
    hvp = lambda x, v: jax.jvp(jax.grad(_loss(f)), (x,), (v,))[1]  # noqa: E731
    mapped = jax.jit(jax.shard_map(hvp, mesh=_auto_mesh(), in_specs=(P("b"), P("b")),
                                   out_specs=P("b"), check_vma=True))
    v = _data((8, N), seed=2)
    _equal(mapped(x, v), hvp(x, v))


# --- under jit with explicit axes: wrapped in shard_map by the op itself ----------------------

@pytest.mark.parametrize("name", list(OPS))
def test_explicit_batch_sharding(name):
    f = OPS[name]
    x = _data((16, N))
    expected = f(x)
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, P("b", None))
        out = jax.jit(f)(xs)
        _equal(out, expected)
        for leaf in jax.tree_util.tree_leaves(out):
            assert jax.typeof(leaf).sharding.spec[0] == "b", (name, jax.typeof(leaf))
        _assert_no_all_gather(_hlo(f, xs))
        if name in DIFFERENTIABLE:
            loss = _loss(f)
            grad = jax.jit(jax.grad(loss))(xs)
            _equal(grad, jax.grad(loss)(x))
            assert jax.typeof(grad).sharding.spec[0] == "b"
            _assert_no_all_gather(_hlo(jax.grad(loss), xs).replace(
                "all-reduce", ""))  # the loss's own sum reduces over devices


@pytest.mark.parametrize("spec", [P("b", "c", None), P(("b", "c"), None, None),
                                  P(None, "b", None)])
def test_explicit_2d_mesh(spec):
    x = _data((8, 4, N))
    mesh = _explicit_mesh((4, 2), ("b", "c"))
    for name in ["sort", "soft_rank", "top_k", "perturbed"]:
        f = OPS[name]
        with jax.set_mesh(mesh):
            xs = jax.device_put(x, spec)
            _equal(jax.jit(f)(xs), f(x))
            _assert_no_all_gather(_hlo(f, xs))
            if name != "argsort":
                _equal(jax.jit(jax.grad(_loss(f)))(xs), jax.grad(_loss(f))(x))


def test_explicit_other_axis():
    """A batch dim that is not the leading one, the op on axis 0."""
    x = _data((N, 16))
    mesh = _explicit_mesh()
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, P(None, "b"))
        for f in [lambda v: sortgrad.sort(v, axis=0),
                  lambda v: sortgrad.soft_quantile(v, 0.3, axis=0, regularization_strength=0.5),
                  lambda v: sortgrad.soft_rank(v, axis=0)]:
            _equal(jax.jit(f)(xs), f(x))
            _assert_no_all_gather(_hlo(f, xs))


def test_explicit_sorted_axis_split_is_gathered_once():
    """The sorted axis itself split: that axis (only) is gathered, the batch stays split."""
    x = _data((8, 16))
    mesh = _explicit_mesh((4, 2), ("b", "c"))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, P("b", "c"))
        out = jax.jit(sortgrad.sort)(xs)
        _equal(out, sortgrad.sort(x))
        assert jax.typeof(out).sharding.spec[:2] == ("b", None)
        grad = jax.jit(jax.grad(_loss(sortgrad.sort)))(xs)
        _equal(grad, jax.grad(_loss(sortgrad.sort))(x))


# --- eager calls on NamedSharding arrays (auto axes) ------------------------------------------

@pytest.mark.parametrize("name", ["sort", "argsort", "top_k", "soft_rank", "quantiles",
                                  "perturbed"])
def test_eager_named_sharding(name):
    f = OPS[name]
    x = _data((16, N))
    mesh = _auto_mesh()
    xs = jax.device_put(x, NamedSharding(mesh, P("b")))
    out = f(xs)
    _equal(out, f(x))
    leaf = jax.tree_util.tree_leaves(out)[0]
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.spec[0] == "b", \
        leaf.sharding


def test_eager_named_sharding_grad():
    x = _data((16, N))
    xs = jax.device_put(x, NamedSharding(_auto_mesh(), P("b")))
    loss = _loss(OPS["soft_rank"])
    _equal(jax.grad(loss)(xs), jax.grad(loss)(x))


# --- auto axes under jit: invisible at trace time ---------------------------------------------

def test_auto_axes_under_mesh_context_warn_once():
    x = _data((16, N))
    mesh = _auto_mesh()
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("b")))
        with pytest.warns(RuntimeWarning, match="cannot see how its input is split"):
            out = jax.jit(lambda v: sortgrad.sort(v) + 0)(xs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            jax.jit(lambda v: sortgrad.sort(v) * 1)(xs)  # once per process and axes
    _equal(out, sortgrad.sort(x))


def test_readme_several_devices_snippet():
    import contextlib
    import io
    import pathlib
    import re
    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index("## Several devices")
    block = re.findall(r"```python\n(.*?)```", text[start:text.find("\n## ", start + 1)],
                       flags=re.S)[0]
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(block, "README.md", "exec"), namespace)
    assert printed.getvalue().strip() == "float32[64@batch,100]"
    grads = namespace["grads"]
    assert {s.data.shape for s in grads.addressable_shards} == {(8, 100)}
    expected = jax.grad(namespace["loss"])(np.asarray(namespace["scores"]))
    np.testing.assert_allclose(np.asarray(grads), np.asarray(expected), rtol=1e-6)
