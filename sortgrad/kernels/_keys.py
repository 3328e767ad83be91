"""Order-preserving maps from numbers to unsigned integer keys (CPU, vectorised NumPy).

Two orders are used, matching JAX:
- sort order (`jnp.sort`, `jnp.argsort`): -0.0 == +0.0, every NaN (any sign, any payload) equal
  to every other NaN and after +inf;
- total order (`jax.lax.top_k`): IEEE 754 totalOrder on the bits, so -NaN < -inf < ... < -0.0 <
  +0.0 < ... < +inf < +NaN.
Unsigned comparison of the keys gives the order; ties in the key are ties of the order.
"""

from __future__ import annotations

import numpy as np

_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def key_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(_UINT_OF_SIZE[np.dtype(dtype).itemsize])


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _float_bits_to_key(bits: np.ndarray) -> np.ndarray:
    """Sign-magnitude float bits -> unsigned keys in IEEE totalOrder."""
    width = bits.dtype.itemsize * 8
    sign_bit = bits.dtype.type(1 << (width - 1))
    negative = (bits & sign_bit) != 0
    return np.where(negative, ~bits, bits | sign_bit)


def total_order_keys(x: np.ndarray) -> np.ndarray:
    """Keys in IEEE totalOrder for floats, numeric order for integers."""
    dtype = x.dtype
    if dtype == np.bool_:
        return x.view(np.uint8)
    kdt = key_dtype(dtype)
    bits = x.view(kdt)
    if _is_float(dtype):
        return _float_bits_to_key(bits)
    if dtype.kind == "i":
        return bits ^ kdt.type(1 << (kdt.itemsize * 8 - 1))
    return bits


def sort_keys(x: np.ndarray, descending: bool = False) -> np.ndarray:
    """Keys in the order of `jnp.sort` (zeros equal, NaNs equal and last); complemented when
    descending, so that an ascending stable sort of the keys is a stable descending sort."""
    keys = total_order_keys(x)
    if _is_float(x.dtype):
        kdt = keys.dtype.type
        keys = np.where(x == 0, kdt(1 << (keys.dtype.itemsize * 8 - 1)), keys)
        keys = np.where(np.isnan(x), kdt(np.iinfo(keys.dtype).max), keys)
    if descending:
        keys = ~keys
    return keys
