"""Multi-key sorts and complex keys, composed from sortgrad's stable `argsort` and gathers.

- `sort_multiple`: `jax.lax.sort(operands, dimension=axis, num_keys=..., is_stable=True)`.
- `lexsort`: `jnp.lexsort` (the last key is the primary one), int32 indices.
- `complex_argsort` / `complex_sort`: `jnp.argsort(stable=True)` / `jnp.sort` of complex keys.

How: a least-significant-digit chain of stable sorts. The permutation starts as the stable
argsort of the least significant key; each more significant key, gathered by the current
permutation, is argsorted stably and the two permutations are composed (a gather). A stable
sort by key j of an array already ordered by keys j+1.. keeps that order among the ties of key
j, so the result is the lexicographic order, full ties in their original order. A complex key
is two keys, its real part then its imaginary part: this is what `jax.lax.sort` itself compares
(`_operands_to_keys`), so the NaN and signed-zero rules of each part are those of a float key
(see `complex_argsort`). Every output value is a `jnp.take_along_axis` gather of its input, so
gradients (reverse and forward mode, any order) are JAX's gather gradients: the cotangent of
an output goes back to the position the value came from.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..._validate import check_axis, check_bool, check_int, check_key_dtype, check_same_shape
from ._args import array_and_axis, as_jax_array
from .hard import argsort

__all__ = ["lexsort", "sort_multiple"]  # complex_sort / complex_argsort: reached through sort / argsort


# --- helpers ---------------------------------------------------------------------------------

def _is_complex(dtype) -> bool:
    return np.dtype(dtype).kind == "c"


def _key_columns(key, name: str) -> list:
    """The real keys one sort key stands for, most significant first: a complex key is its
    (real, imaginary) parts; every other key must be a key dtype of `argsort`."""
    if _is_complex(key.dtype):
        return [jnp.real(key), jnp.imag(key)]
    check_key_dtype(key.dtype, name)
    return [key]


def _gather(x, perm, axis: int):
    return jnp.take_along_axis(x, perm, axis=axis, mode="promise_in_bounds")


def _lsd_perm(columns, axis: int, descending: bool):
    """int32 permutation sorting along `axis` lexicographically by `columns` (real key arrays
    of one shape, MOST significant first), stably; descending reverses the order of keys, not
    of full ties. The columns carry no gradient into the permutation."""
    columns = [jax.lax.stop_gradient(c) for c in columns]
    perm = argsort(columns[-1], axis=axis, descending=descending)
    for column in reversed(columns[:-1]):
        step = argsort(_gather(column, perm, axis), axis=axis, descending=descending)
        perm = _gather(perm, step, axis)
    return perm


def _as_operand_list(operands, name: str):
    """(list of jax arrays, whether one array was given instead of a sequence)."""
    single = not isinstance(operands, Sequence)
    arrays = [operands] if single else list(operands)
    if not arrays:
        raise ValueError(f"{name} must be a non-empty sequence of arrays, got an empty one")
    many = len(arrays) > 1 or not single
    arrays = [as_jax_array(a, f"{name}[{i}]" if many else name) for i, a in enumerate(arrays)]
    if len(arrays) > 1:
        check_same_shape({f"{name}[{i}]": a.shape for i, a in enumerate(arrays)})
    return arrays, single


# --- public ops ------------------------------------------------------------------------------

def sort_multiple(operands, *, num_keys: int = 1, axis: int = -1, descending: bool = False):
    """Sorts same-shape arrays together along `axis` by their first `num_keys` arrays.

    The result of `jax.lax.sort(operands, dimension=axis, is_stable=True, num_keys=num_keys)`:
    one permutation per slice along `axis`, the lexicographic order of the keys
    `operands[0], ..., operands[num_keys - 1]` (operands[0] the most significant), applied to
    every operand.

    Args:
      operands: an array, or a non-empty sequence of arrays of one shape (at least one
        dimension; dtypes may differ). Keys: bool, integer, float16/bfloat16/float32/float64 or
        complex; the other operands may have any dtype.
      num_keys: how many leading operands are keys, 1 <= num_keys <= len(operands) (static).
      axis: the axis to sort along (static int; bool refused); the other dims are batch.
      descending: (static) the reverse lexicographic order, with full ties (equal in every
        key) still in their original order -- like `argsort(descending=True)`, and unlike
        reversing the ascending result (which would reverse the order of ties).

    Returns: a list of arrays, operands' shapes and dtypes, each permuted along `axis` (for a
      single array: that array sorted, as lax.sort returns it). Values keep their exact bits.

    Order of a key: that of `jnp.argsort(stable=True)`: -0.0 == +0.0 (and subnormals equal zero
    where XLA's sort flushes them, not float16's), NaNs of either sign equal to each other and
    after +inf (first when descending). A complex key orders by its real part, then its
    imaginary part, each with those rules (as lax.sort: see `complex_argsort`). bool: False
    before True.

    Gradient: every output is a gather of its operand, so float (and complex) operands -- keys
    included -- get JAX's gather gradients in reverse and forward mode, to any order: the
    cotangent of an output goes to the position its value came from. The permutation itself
    is piecewise constant (no gradient); integer operands have none. Works under jit, vmap,
    grad, jvp.

    Size 0 along `axis` (or elsewhere) returns the empty operands; 0-d operands raise a
    ValueError (lax.sort raises for them too).
    """
    arrays, single = _as_operand_list(operands, "operands")
    num_keys = check_int(num_keys, "num_keys")
    if not 1 <= num_keys <= len(arrays):
        raise ValueError(f"num_keys must satisfy 1 <= num_keys <= len(operands) = {len(arrays)},"
                         f" got num_keys = {num_keys}")
    axis = check_axis(arrays[0].shape, axis)
    columns = []
    for i, key in enumerate(arrays[:num_keys]):
        columns += _key_columns(key, "operands" if single else f"operands[{i}]")
    perm = _lsd_perm(columns, axis, check_bool(descending, "descending"))
    out = [_gather(a, perm, axis) for a in arrays]
    return out[0] if single else out


def lexsort(keys, *, axis: int = -1):
    """Indices that sort by several keys, the LAST key the primary one: `jnp.lexsort(keys,
    axis=axis)`, as int32.

    Args:
      keys: a non-empty sequence of arrays of one shape (or an array, whose first axis indexes
        the keys, as jnp.lexsort takes it). bool, integer, float16/bfloat16/float32/float64 or
        complex keys (a complex key orders by real, then imaginary part).
      axis: the axis to sort along (static int; bool refused).

    Returns: int32 indices of the keys' shape: `keys[-1]` sorted ascending, ties broken by
      `keys[-2]`, ..., full ties in their original order (stable). Each key orders as in
      `sort_multiple` (-0.0 == +0.0, NaNs equal and last). 0-d keys give the 0-d index 0 (as
      jnp.lexsort). No gradient (integer output).
    """
    if isinstance(keys, (jax.Array, np.ndarray)):
        keys = as_jax_array(keys, "keys")
        keys = [keys[i] for i in range(keys.shape[0])]
    elif not isinstance(keys, Sequence):
        raise TypeError(f"keys must be a sequence of arrays, got {type(keys).__name__}")
    if not keys:
        raise ValueError("keys must be a non-empty sequence of arrays, got an empty one")
    arrays = [jnp.asarray(k) for k in keys]
    check_same_shape({f"keys[{i}]": a.shape for i, a in enumerate(arrays)})
    if arrays[0].ndim == 0:
        check_int(axis, "axis")
        return jnp.zeros((), jnp.int32)
    axis = check_axis(arrays[0].shape, axis)
    columns = []
    for i, key in reversed(list(enumerate(arrays))):
        columns += _key_columns(key, f"keys[{i}]")
    return _lsd_perm(columns, axis, False)


def _prepare_complex(x, axis):
    x, axis = array_and_axis(x, axis)
    if not _is_complex(x.dtype):
        check_key_dtype(x.dtype)
    return x, axis


def complex_argsort(x, *, axis: int = -1, descending: bool = False):
    """Indices (int32) that sort a complex array along `axis`: `jnp.argsort(x, axis=axis,
    stable=True, descending=descending)`.

    Order (what jax.lax.sort compares, checked against it): lexicographic by the real part,
    then the imaginary part; each part is compared like a float key of `argsort`:
    -0.0 == +0.0 (so 0+0j, -0+0j, 0-0j, -0-0j are all ties), NaN of either sign (any payload)
    equal to every NaN and greater than +inf. So a NaN real part sorts after every finite or
    infinite real part, and the entries with a NaN real part are ordered among themselves by
    their imaginary part (nan-inf j < nan+0j < nan+inf j < nan+nan j); a NaN imaginary part
    sorts last among its equal real parts (1+2j < 1+nan j < inf+0j). Subnormal parts compare
    as zero where XLA's sort flushes them (XLA:CPU, float32/float64), again as lax.sort.

    Stable both ways: ties keep their original order, also when descending (which is the
    reverse of the lexicographic order, NaN parts first). Real (bool, integer, float) x is
    accepted and sorted as `argsort` sorts it. 0-d x raises a ValueError (as jnp.argsort
    does); size 0 gives empty indices. Integer output: no gradient.
    """
    x, axis = _prepare_complex(x, axis)
    return _lsd_perm(_key_columns(x, "x"), axis, check_bool(descending, "descending"))


def complex_sort(x, *, axis: int = -1, descending: bool = False):
    """`jnp.sort(x, axis=axis, descending=descending)` of a complex array, bit for bit.

    The ascending values are x gathered in the order of `complex_argsort` (see there: real
    part, then imaginary part, -0.0 == +0.0, NaNs last). descending=True is, as `jnp.sort`,
    the ascending result reversed along `axis`: tied entries (which may differ in bits, e.g.
    0+0j and -0+0j, or NaN payloads) come in reverse original order. Values keep their exact
    bits; shape and dtype are x's. Real x is accepted (sorted like `sort`).

    Gradient: a gather, so the cotangent of an output goes back to the position its value
    came from (JAX's gradient of jnp.sort of complex input, which is the same gather);
    reverse and forward mode, any order. 0-d x raises a ValueError (as jnp.sort with an
    axis); size 0 returns x.
    """
    x, axis = _prepare_complex(x, axis)
    out = _gather(x, _lsd_perm(_key_columns(x, "x"), axis, False), axis)
    return jnp.flip(out, axis) if descending else out
