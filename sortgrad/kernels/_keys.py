"""Order-preserving maps from numbers to unsigned integer keys (CPU, Numba).

Two orders are used, matching JAX:
- sort order (`jnp.sort`, `jnp.argsort`): -0.0 == +0.0, every NaN (any sign, any payload) equal
  to every other NaN and above +inf;
- total order (`jax.lax.top_k`): IEEE 754 totalOrder on the bits, so -NaN < -inf < ... < -0.0 <
  +0.0 < ... < +inf < +NaN, NaNs of one sign ordered by their magnitude bits (payload) -- except
  bfloat16, which XLA:CPU compares after a float32 round trip that makes every NaN the quiet
  NaN of its sign (0x7FC0 | sign): there the NaNs of one sign are ties.
Unsigned comparison of the keys gives the order; equal keys are ties of the order. A
descending key is the bitwise complement of the ascending one, so an ascending stable sort of
it is a stable descending sort.

Numba kernels read the raw bits (the array viewed as unsigned integers of its width) and do all
arithmetic in uint64 (mixing signed and unsigned 64-bit integers would promote to float).
"""

from __future__ import annotations

import functools

import numba
import numpy as np

from .._validate import dtype_name
from ._rows import row_parallel

_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_EXPONENT_MASK = {"float16": 0x7C00, "bfloat16": 0x7F80, "float32": 0x7F800000,
                  "float64": 0x7FF0000000000000}
# Sort order flushes subnormals to zero, as XLA's CPU sort compares them (denormals-are-zero);
# float16 is compared after widening to float32, where its subnormals are normal numbers.
_SMALLEST_NORMAL_BITS = {"bfloat16": 0x0080, "float32": 0x00800000,
                         "float64": 0x0010000000000000}
# The quiet NaN (sign bit clear) that XLA:CPU writes for every NaN of a dtype whose sorts
# canonicalise NaNs: bfloat16 only (its sort comparator and values go through float32 and back;
# the sign is kept, the payload is not). jnp.sort / lax.top_k of float16/32/64 keep NaN bits.
_CANONICAL_NAN_BITS = {"bfloat16": 0x7FC0}

KIND_UNSIGNED, KIND_SIGNED, KIND_FLOAT = 0, 1, 2


@functools.lru_cache(maxsize=None)
def key_dtype(dtype) -> np.dtype:
    return np.dtype(_UINT_OF_SIZE[np.dtype(dtype).itemsize])


# A key spec is a read-only uint64 array (cheap for Numba to type on every call):
# [kind, canonical, descending, sign bit, all bits but the sign, bits of +inf, all bits,
#  bits of the smallest normal number (0: none flushed), canonical NaN bits (0: NaNs keep
#  their payloads in total order)].
# canonical (sort order) folds -0.0, +0.0 and the subnormals (but float16's) into the key of
# +0.0, and every NaN into one key above +inf. Total order folds the NaNs of each sign into the
# key of that sign's canonical NaN where the dtype has one (bfloat16).
KeySpec = np.ndarray


@functools.lru_cache(maxsize=None)
def key_spec(dtype, *, canonical: bool, descending: bool = False) -> KeySpec:
    dtype = np.dtype(dtype)
    width = dtype.itemsize * 8
    all_ones = (1 << width) - 1
    sign = 1 << (width - 1)
    if dtype.name in _EXPONENT_MASK:
        kind = KIND_FLOAT
    elif dtype.kind == "i":
        kind = KIND_SIGNED
    else:
        kind = KIND_UNSIGNED  # unsigned integers and bool
    spec = np.array([kind, canonical, descending, sign, all_ones ^ sign,
                     _EXPONENT_MASK.get(dtype.name, 0), all_ones,
                     _SMALLEST_NORMAL_BITS.get(dtype.name, 0),
                     _CANONICAL_NAN_BITS.get(dtype.name, 0)], dtype=np.uint64)
    spec.flags.writeable = False
    return spec


def raw_bits(x: np.ndarray) -> np.ndarray:
    return x.view(key_dtype(x.dtype))


@numba.njit(cache=True, nogil=True, inline="always")
def spec_tuple(spec):
    """The spec as a tuple of scalars: kernels unpack it once, outside their element loops."""
    return (spec[0], spec[1], spec[2], spec[3], spec[4], spec[5], spec[6], spec[7], spec[8])


@numba.njit(cache=True, nogil=True, inline="always")
def key_of(bits, spec):
    """The uint64 key of one element given its raw bits (any unsigned width); `spec` is a key
    spec array or its `spec_tuple`."""
    b = np.uint64(bits)
    kind, canonical, descending = spec[0], spec[1] != 0, spec[2] != 0
    sign, abs_mask, exp_mask, all_ones, smallest_normal = spec[3], spec[4], spec[5], spec[6], spec[7]
    nan_bits = spec[8]
    if kind == np.uint64(KIND_FLOAT):
        magnitude = b & abs_mask
        # total order with canonical NaNs (bfloat16): a NaN takes the bits of its sign's
        # canonical NaN (a select, no branch; never taken where nan_bits is 0)
        b = (b & sign) | nan_bits if (magnitude > exp_mask) & (nan_bits != 0) else b
        if canonical and magnitude > exp_mask:
            key = all_ones                      # NaN: one key, above +inf
        elif canonical and magnitude < smallest_normal or canonical and magnitude == 0:
            key = sign                          # zeros (and subnormals): the key of +0.0
        else:
            # negative: complement (reverses the magnitude order); positive: set the sign bit.
            # Branch-free: (b >> (width - 1)) is 1 for negatives, so 0 - it is all ones.
            negative_mask = (np.uint64(0) - (b & sign) // sign) & all_ones
            key = b ^ (negative_mask | sign)
    elif kind == np.uint64(KIND_SIGNED):
        key = b ^ sign
    else:
        key = b
    if descending:
        key = key ^ all_ones
    return key


@row_parallel
def _keys_kernel(bits, spec, out):
    for i in numba.prange(bits.shape[0]):
        out[i] = key_of(bits[i], spec)


@row_parallel
def composite_keys(bits, spec, out):
    """out[r, j] = key(bits[r, j]) << 32 | j for keys of at most 32 bits: unique per row, so
    any sort of a row by them is the stable sort by key."""
    rows, n = bits.shape
    sp = spec_tuple(spec)
    for r in numba.prange(rows):
        for j in range(n):
            out[r, j] = (key_of(bits[r, j], sp) << np.uint64(32)) | np.uint64(j)


def canonical_nan_bits(dtype) -> int:
    """The quiet NaN (sign clear) that sorts and top-k of `dtype` write for every NaN, as
    XLA:CPU does (bfloat16: 0x7FC0, the sign kept); 0 where NaNs keep their bits."""
    return _CANONICAL_NAN_BITS.get(dtype_name(dtype), 0)


def canonicalize_nans(values: np.ndarray, where=None) -> None:
    """In place: every NaN of `values` (a NumPy array of a dtype with a canonical NaN, see
    `canonical_nan_bits`; others are left alone) becomes the canonical NaN of its sign; with
    `where` (a boolean array of values' shape, or broadcastable), only there."""
    nan_bits = canonical_nan_bits(values.dtype)
    if not nan_bits or values.size == 0:
        return
    b = raw_bits(values)
    width = values.dtype.itemsize * 8
    sign = 1 << (width - 1)
    nan = (b & (sign - 1)) > _EXPONENT_MASK[dtype_name(values.dtype)]
    if where is not None:
        nan &= where
    b[nan] = (b[nan] & sign) | nan_bits


def keys(x: np.ndarray, spec: KeySpec) -> np.ndarray:
    """Keys of every element, in the unsigned dtype of x's width."""
    out = np.empty(x.shape, dtype=key_dtype(x.dtype))
    if x.size:
        _keys_kernel(np.ascontiguousarray(raw_bits(x)).reshape(-1), spec, out.reshape(-1))
    return out
