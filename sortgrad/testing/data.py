"""Adversarial test data and bit-exact comparisons, shared by the tests and the benchmarks.

Written once here instead of once per test file. Needs only NumPy and ml_dtypes (no pytest,
hypothesis or JAX): this module ships in the wheel. Every generator draws from the
`numpy.random.Generator` it is given, in a fixed order, so a seed gives the same data
everywhere; options that change what is drawn say so.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

# ---------------------------------------------------------------------------------------------
# Sizes and dtypes

SIZES = (0, 1, 31, 32, 33, 1023, 1025, 4097)
"""Row lengths at the edges: empty, one element, around a warp (31, 32, 33), around 1024 and
past 4096."""

FLOAT_DTYPES = (np.float16, ml_dtypes.bfloat16, np.float32, np.float64)
"""The float key dtypes (ml_dtypes.bfloat16 is what jnp.bfloat16 compares equal to)."""

INT_DTYPES = (np.int8, np.int32, np.int64, np.uint8, np.uint32)
"""The integer key dtypes: both signednesses, 8 to 64 bits."""

UINT_BY_ITEMSIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
"""The unsigned integer dtype of each width in bytes (the dtype `bits` views an array as)."""

PAYLOAD_NANS = {"float16": (0x7E01, 0xFE03), "bfloat16": (0x7FC1, 0xFFC3),
                "float32": (0x7FC00001, 0xFFC00003),
                "float64": (0x7FF8000000000001, 0xFFF8000000000003)}
"""Raw bits of two quiet NaNs with a nonzero payload, (positive, negative), per dtype name."""


def dtype_id(dtype) -> str:
    """The dtype's name ("float32", "bfloat16", ...): a readable pytest id."""
    return np.dtype(dtype).name


# ---------------------------------------------------------------------------------------------
# Generators

def special_values(dtype, *, half=True, subnormals=True, tiny=True, more_subnormals=False):
    """The pool of special keys of `dtype` that `make_keys(pattern="special")` draws from.

    Floats, in this order: 0.0, -0.0, NaN, -NaN, +inf, -inf, 1.0, -1.0, 2.0, then 0.5 (if
    `half`), +max, -max, then +-smallest subnormal (if `subnormals`), the smallest normal (if
    `tiny`), 3 * smallest subnormal (if `more_subnormals`). Integers: min, min + 1, 0, 1, 2,
    max - 1, max (the options do not apply). Every option changes the pool's size, and so what
    is drawn from it.
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array([info.min, info.min + 1, 0, 1, 2, info.max - 1, info.max], dtype=dtype)
    if dtype.kind != "f" and dtype != ml_dtypes.bfloat16:
        raise TypeError(f"special_values: no pool for {dtype}")
    finfo = ml_dtypes.finfo(dtype)
    values = [0.0, -0.0, math.nan, math.copysign(math.nan, -1.0), math.inf, -math.inf,
              1.0, -1.0, 2.0]
    if half:
        values.append(0.5)
    values += [float(finfo.max), -float(finfo.max)]
    if subnormals:
        values += [float(finfo.smallest_subnormal), -float(finfo.smallest_subnormal)]
    if tiny:
        values.append(float(finfo.tiny))
    if more_subnormals:
        values.append(3 * float(finfo.smallest_subnormal))
    return np.array(values, dtype=dtype)


def make_keys(rng, shape, dtype, pattern="special", *, payloads=False, half=True,
              subnormals=True, tiny=True, more_subnormals=False):
    """Sort / top-k keys of `shape` and `dtype`, drawn from `rng`.

    pattern:
      "random"  integers: uniform over the dtype's whole range; floats: normal * 100.
      "ties"    the integers 0..3 (heavy ties), cast to `dtype`.
      "special" uniform draws from `special_values(dtype, half=, subnormals=, tiny=,
                more_subnormals=)`: signed zeros, NaNs of both signs, +-inf, +-max,
                subnormals..., with many ties; integers: the extremes and small values.
    payloads: with "special" floats of 4 or more elements, also overwrite about 1/16 of the
      entries (at least one) with the payload NaNs of `PAYLOAD_NANS`, either sign at random:
      values must keep their exact bits. (jnp.sort / lax.top_k of bfloat16 on CPU drop NaN
      payloads.)
    bool keys are True / False at random whatever the pattern (`rng.random(shape) < 0.5`).
    """
    dtype = np.dtype(dtype)
    if pattern not in ("random", "ties", "special"):
        raise ValueError(f"pattern must be 'random', 'ties' or 'special', got {pattern!r}")
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if pattern == "ties":
        return rng.integers(0, 4, size=shape).astype(dtype)
    if dtype.kind in "iu":
        if pattern == "random":
            info = np.iinfo(dtype)
            return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
        return rng.choice(special_values(dtype), size=shape)
    if pattern == "random":
        return (rng.standard_normal(shape) * 100).astype(dtype)
    pool = special_values(dtype, half=half, subnormals=subnormals, tiny=tiny,
                          more_subnormals=more_subnormals)
    out = rng.choice(pool, size=shape)
    flat = out.reshape(-1).view(UINT_BY_ITEMSIZE[dtype.itemsize])
    if payloads and flat.size >= 4:
        pos, neg = PAYLOAD_NANS[dtype.name]
        where = rng.choice(flat.size, size=max(1, flat.size // 16), replace=False)
        flat[where] = np.where(rng.random(where.size) < 0.5, pos, neg).astype(flat.dtype)
    return out


def random_perms(rng, batch, n, dtype=np.int64):
    """Independent random permutations of 0..n-1 along the last axis: shape batch + (n,).
    (The first m entries of each row, `[..., :m]`, are a random partial permutation.)"""
    rows = int(np.prod(batch, dtype=np.int64))
    p = np.stack([rng.permutation(n) for _ in range(rows)]) if rows else np.zeros((0, n))
    return p.reshape(tuple(batch) + (n,)).astype(dtype)


ISOTONIC_KINDS = ("random", "sorted", "ties", "increasing", "decreasing", "constant",
                  "staircase", "ramp", "flat_then_jump", "large_range")


def isotonic_inputs(rng, shape, dtype, regularization, kind="random", *, w_shape=None):
    """(s, w) for the decreasing isotonic regression: s of `shape`, w of `w_shape` (default
    `shape`; e.g. (1, n) for one w shared by every row), both cast to `dtype`.

    kind:
      "random"         s = normal * 3, w = normal: lots of pooling.
      "sorted"         the soft-op setting: s = normal * n / 4 sorted descending, w = rho
                       (regularization "l2") or log rho ("kl"), rho = (n, ..., 1).
      "ties"           s in {0, 1, 2}, w in {0, 1}: heavy ties, exact L2 means, equal
                       neighbouring blocks.
      "increasing"     s = cumsum(uniform + 0.1) along the row, w = 0: one block per row.
      "decreasing"     the negated "increasing": no pooling at all.
      "constant"       s = 1.5, w = 0: equal neighbours (they pool into one block).
      "staircase"      s = -1, -2, ... with the second half raised by 2n, w = 0: long stacks
                       that the last merges pool back into one block.
      "ramp"           s = 0, 1, ..., n-1 (no draws), w = 0: everything pools into one block.
      "flat_then_jump" s = 0, ..., 0, 1, w = 0: n - 1 equal singletons, then one pool through
                       all of them.
      "large_range"    s, w = normal * 300: KL exponents far beyond exp's range.
    """
    shape = tuple(shape)
    w_shape = shape if w_shape is None else tuple(w_shape)
    n = shape[-1]
    if kind == "random":
        s, w = rng.normal(size=shape) * 3, rng.normal(size=w_shape)
    elif kind == "sorted":
        s = -np.sort(-rng.normal(size=shape) * n / 4, axis=-1)
        rho = np.arange(n, 0, -1, dtype=np.float64)
        w = np.broadcast_to(rho if regularization == "l2" else np.log(rho), w_shape).copy()
    elif kind == "ties":
        s, w = rng.integers(0, 3, size=shape).astype(float), rng.integers(0, 2, size=w_shape) * 1.0
    elif kind == "increasing":
        s, w = np.cumsum(rng.random(shape) + 0.1, axis=-1), np.zeros(w_shape)
    elif kind == "decreasing":
        s, w = -np.cumsum(rng.random(shape) + 0.1, axis=-1), np.zeros(w_shape)
    elif kind == "constant":
        s, w = np.full(shape, 1.5), np.zeros(w_shape)
    elif kind == "staircase":
        s = -np.cumsum(np.ones(shape), axis=-1)
        s[..., n // 2:] += 2.0 * n
        w = np.zeros(w_shape)
    elif kind == "ramp":
        s, w = np.broadcast_to(np.arange(n, dtype=float), shape).copy(), np.zeros(w_shape)
    elif kind == "flat_then_jump":
        s, w = np.zeros(shape), np.zeros(w_shape)
        if n:
            s[..., -1] = 1.0
    elif kind == "large_range":
        s, w = rng.normal(size=shape) * 300, rng.normal(size=w_shape) * 300
    else:
        raise ValueError(f"kind must be one of {ISOTONIC_KINDS}, got {kind!r}")
    return s.astype(dtype), w.astype(dtype)


def filled_bytes(shape, dtype, byte=0xA5):
    """A host array of `shape` and `dtype` whose every byte is `byte`: given as `out=`, the
    entries a kernel does not write show up."""
    host = np.empty(shape, np.dtype(dtype))
    host.reshape(-1).view(np.uint8)[...] = byte
    return host


# ---------------------------------------------------------------------------------------------
# Orders and bit-exact comparison

def flush_subnormals(x):
    """The keys jnp.sort compares on XLA:CPU: `x` with the float32, float64 and bfloat16
    subnormals (both signs) replaced by +0.0. float16 subnormals stay (XLA widens float16 to
    float32 first), and integer, bool and float16 arrays come back as they are. Sort these
    keys, gather from `x`: the values keep their bits."""
    x = np.asarray(x)
    if (x.dtype.kind == "f" or x.dtype == ml_dtypes.bfloat16) and x.dtype != np.float16:
        tiny = float(ml_dtypes.finfo(x.dtype).tiny)
        with np.errstate(invalid="ignore"):
            small = np.abs(x.astype(np.float64)) < tiny
        x = np.where(small, np.zeros((), x.dtype), x)
    return x


def uint_dtype(dtype) -> np.dtype:
    """The unsigned integer dtype of `dtype`'s width (bool -> uint8)."""
    return np.dtype(UINT_BY_ITEMSIZE[np.dtype(dtype).itemsize])


def bits(a) -> np.ndarray:
    """The raw bits of `a` as unsigned integers of the same width, same shape (a view, no
    copy): arrays that differ only in -0.0 vs +0.0, a NaN's sign or its payload compare unequal
    here. bool gives uint8; complex gives two integers (real, imaginary) per entry."""
    a = np.asarray(a)
    if a.dtype.kind == "c":
        return a.view(UINT_BY_ITEMSIZE[a.dtype.itemsize // 2])
    return a.view(UINT_BY_ITEMSIZE[a.dtype.itemsize])


def assert_same_bits(actual, expected, msg=""):
    """Asserts the same dtype, the same shape and the same bits (`bits`) in every entry."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, (msg, actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    np.testing.assert_array_equal(bits(actual), bits(expected), err_msg=msg)


def same_bits(a, b, *, check_dtype=True) -> bool:
    """True when `a` and `b` have the same shape, the same bytes and (unless check_dtype is
    False) the same dtype: `assert_same_bits` as a bool, for benchmarks that record a check."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or (check_dtype and a.dtype != b.dtype):
        return False
    return bool(np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                               np.ascontiguousarray(b).reshape(-1).view(np.uint8)))
