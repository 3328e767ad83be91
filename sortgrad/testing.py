"""Independent reference implementations (oracles) for the tests.

Nothing here imports sortgrad.kernels or sortgrad.bindings: these are slow, plain Python /
float64 NumPy versions written straight from the definitions, so that a bug in a kernel cannot
hide in its own reference.
"""

from __future__ import annotations

import math

import numpy as np

# ---------------------------------------------------------------------------------------------
# Hard ops: orders written as Python sort keys.


def _sort_order_key(v):
    """jnp.sort order: -0.0 == +0.0; all NaNs equal and above +inf."""
    f = float(v)
    if math.isnan(f):
        return (1, 0.0)
    return (0, f + 0.0)  # + 0.0 maps -0.0 to +0.0


def _total_order_key(v):
    """IEEE totalOrder, as jax.lax.top_k: -NaN < -inf < ... < -0.0 < +0.0 < ... < +inf < +NaN."""
    f = float(v)
    if math.isnan(f):
        return (2, 0.0) if math.copysign(1.0, f) > 0 else (-2, 0.0)
    if f == 0.0:
        return (0, 0.0, 1 if math.copysign(1.0, f) > 0 else -1)
    return (0, f, 0)


def reference_argsort(row, descending=False):
    """Stable argsort of a 1-D row in jnp.sort order (ties keep their original order)."""
    row = list(np.asarray(row).tolist())
    idx = list(range(len(row)))
    if descending:
        # stable descending: larger first, ties by lower index
        return np.array(sorted(idx, key=lambda i: _negate(_sort_order_key(row[i]))), np.int64)
    return np.array(sorted(idx, key=lambda i: _sort_order_key(row[i])), np.int64)


def _negate(key):
    return tuple(-k for k in key)


def reference_sort_rows(x, descending=False):
    """(values, perm) of a stable sort of each row (last axis) of x."""
    x = np.asarray(x)
    rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    perm = np.stack([reference_argsort(r, descending) for r in rows]) if rows.shape[0] else \
        np.zeros(rows.shape, np.int64)
    perm = perm.reshape(x.shape)
    return np.take_along_axis(x, perm, axis=-1), perm


def reference_top_k(row, k):
    """(values, indices) of the k largest of a 1-D row in totalOrder, ties to the lower index."""
    row = np.asarray(row)
    vals = row.tolist()
    idx = sorted(range(len(vals)), key=lambda i: (_negate(_total_order_key(vals[i])), i))[:k]
    idx = np.array(idx, dtype=np.int64)
    return row[idx], idx


def reference_segmented_sort(x, offsets, descending=False):
    """Stable sort of each CSR segment of 1-D x; perm relative to the segment start."""
    x = np.asarray(x)
    values = x.copy()
    perm = np.zeros(x.shape[0], np.int64)
    for a, b in zip(offsets[:-1], offsets[1:]):
        p = reference_argsort(x[a:b], descending)
        perm[a:b] = p
        values[a:b] = x[a:b][p] if b > a else values[a:b]
    return values, perm
