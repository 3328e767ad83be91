"""Device backends ("cupy", "numba"): argument checks on metadata, then the backend module.

The public kernels (`segmented_sort`, `top_k`, ...) hand device inputs here. Checks use only
shape, dtype and layout, so they cost no device work and no synchronisation; the one exception
is CSR `offsets`, which are read on the host (a device array of offsets is copied there, a
synchronisation on the current stream). Data-dependent checks that would need a device pass
(permutation entries in range) are not made: the kernels skip out-of-range entries, so bad
indices give an unspecified result but never an out-of-bounds write.

Every backend module (`<op>/_cupy.py`, `<op>/_numba_cuda.py`) implements the row functions of
the CPU module (`sort_rows`, `sort_segments`, `top_k_rows`, `inverse_rows`, `scatter_rows`,
`isotonic_rows`, `isotonic_vjp_rows`) on C-contiguous 2-D device arrays with a `stream`
argument, and lists the dtypes it takes in `DTYPES`.
"""

from __future__ import annotations

import importlib
import math

import numpy as np

from ._common import INT32_MAX, array_kind

_MODULE_OF_BACKEND = {"cupy": "_cupy", "numba": "_numba_cuda"}


def backend_module(op: str, backend: str):
    """The module `sortgrad.kernels.<op>.<_cupy | _numba_cuda>`."""
    name = f"sortgrad.kernels.{op}.{_MODULE_OF_BACKEND[backend]}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if not err.name or not name.startswith(err.name):
            raise  # a dependency of the module is missing: that error says which
        raise NotImplementedError(f"backend={backend!r} has no {op} kernel in this build") from None


def device_input(x, name: str, backend: str):
    """`x` as a device array the backend takes, checked: on the device and C-contiguous.
    Raises TypeError / ValueError naming `name`.
    """
    kind = array_kind(x)
    if kind == "host":
        raise TypeError(f"{name} is a host array ({type(x).__name__}); backend={backend!r} takes "
                        "device arrays (cupy.asarray(x) or numba.cuda.to_device(x))")
    if backend == "cupy" and kind != "cupy":
        import cupy
        x = cupy.asarray(x)  # zero-copy view of any __cuda_array_interface__ object
    elif backend == "numba" and kind == "cuda":
        from numba import cuda
        x = cuda.as_cuda_array(x)
    if not _is_c_contiguous(x):
        raise ValueError(f"{name} must be C-contiguous on backend={backend!r} (copy it with "
                         "cupy.ascontiguousarray or .copy())")
    return x


def check_dtype(x, name: str, backend: str, dtypes) -> None:
    dtype = np.dtype(x.dtype)
    if dtype.name not in dtypes:
        raise TypeError(f"{name} has dtype {dtype}; backend={backend!r} takes {', '.join(dtypes)}")


def _is_c_contiguous(x) -> bool:
    flags = getattr(x, "flags", None)
    if flags is not None:
        try:
            return bool(flags["C_CONTIGUOUS"])
        except (KeyError, TypeError):
            contiguous = getattr(flags, "c_contiguous", None)
            if contiguous is not None:
                return bool(contiguous)
    if hasattr(x, "is_c_contiguous"):
        return bool(x.is_c_contiguous())
    strides = x.__cuda_array_interface__.get("strides")
    if strides is None:
        return True
    expected, itemsize = [], np.dtype(x.dtype).itemsize
    step = itemsize
    for dim in reversed(_shape(x)):
        expected.append(step)
        step *= dim
    return tuple(reversed(expected)) == tuple(strides) or math.prod(x.shape) <= 1


def to_host(x) -> np.ndarray:
    """A NumPy copy of a host or device array (synchronises for device arrays)."""
    kind = array_kind(x)
    if kind == "host":
        return np.asarray(x)
    if kind == "cupy":
        return x.get()
    if kind == "numba":
        return x.copy_to_host()
    from numba import cuda
    return cuda.as_cuda_array(x).copy_to_host()


def _shape(x) -> tuple:
    return tuple(x.shape)  # the simulator's shape objects refuse negative indices


def rows_of(x):
    """(rows, n) view of a C-contiguous device array, n = _shape(x)[-1]."""
    return x.reshape(math.prod(_shape(x)[:-1]), _shape(x)[-1])


def check_ndim(x, name: str) -> None:
    if len(x.shape) == 0:
        raise ValueError(f"{name} must have at least one dimension")
    if _shape(x)[-1] > INT32_MAX:
        raise ValueError(f"{name}: rows of {_shape(x)[-1]} elements exceed the int32 index range")


# --- the device paths of the public kernels ---------------------------------------------------

def segmented_sort(keys, offsets, descending: bool, backend: str, stream, check_offsets):
    keys = device_input(keys, "keys", backend)
    module = backend_module("segmented_sort", backend)
    check_dtype(keys, "keys", backend, module.DTYPES)
    check_ndim(keys, "keys")
    if offsets is None:
        values, perm = module.sort_rows(rows_of(keys), bool(descending), stream=stream)
        return values.reshape(keys.shape), perm.reshape(keys.shape)
    if len(keys.shape) != 1:
        raise ValueError(f"keys must be 1-D when offsets are given, got shape {keys.shape}")
    offsets = check_offsets(to_host(offsets), _shape(keys)[0])
    if _shape(offsets)[0] > 1 and int(np.max(np.diff(offsets))) > INT32_MAX:
        raise ValueError("segments: a segment exceeds the int32 index range")
    return module.sort_segments(keys, offsets, bool(descending), stream=stream)


def top_k(x, k: int, backend: str, stream, check_k):
    x = device_input(x, "x", backend)
    module = backend_module("top_k", backend)
    check_dtype(x, "x", backend, module.DTYPES)
    check_ndim(x, "x")
    k = check_k(k, _shape(x)[-1])
    values, indices = module.top_k_rows(rows_of(x), k, stream=stream)
    out_shape = tuple(_shape(x)[:-1]) + (k,)
    return values.reshape(out_shape), indices.reshape(out_shape)


def _int32_index_input(perm, name: str, backend: str):
    perm = device_input(perm, name, backend)
    if np.dtype(perm.dtype) != np.int32:
        raise TypeError(f"{name} must be int32 on backend={backend!r}, got dtype {perm.dtype}")
    return perm


def inverse_permutation(perm, backend: str, stream):
    perm = _int32_index_input(perm, "perm", backend)
    module = backend_module("permutation", backend)
    check_ndim(perm, "perm")
    return module.inverse_rows(rows_of(perm), stream=stream).reshape(perm.shape)


def permutation_scatter(values, perm, n: int, backend: str, stream):
    values = device_input(values, "values", backend)
    perm = _int32_index_input(perm, "perm", backend)
    module = backend_module("permutation", backend)
    check_dtype(values, "values", backend, module.DTYPES)
    if tuple(values.shape) != tuple(perm.shape):
        raise ValueError(f"values and perm must have the same shape, got {values.shape} and "
                         f"{perm.shape}")
    check_ndim(values, "values")
    if not _shape(values)[-1] <= n:
        raise ValueError(f"n = {n} is smaller than the row length m = {_shape(values)[-1]} of "
                         "values")
    if n > INT32_MAX:
        raise ValueError(f"n: rows of {n} elements exceed the int32 index range")
    out = module.scatter_rows(rows_of(values), rows_of(perm), n, stream=stream)
    return out.reshape(tuple(_shape(values)[:-1]) + (n,))


def _isotonic_inputs(module, backend, s, w):
    check_dtype(s, "s", backend, module.DTYPES)
    check_dtype(w, "w", backend, module.DTYPES)
    check_ndim(s, "s")
    if np.dtype(w.dtype) != np.dtype(s.dtype):
        raise TypeError(f"w must have the dtype of s ({s.dtype}) on backend={backend!r}, got "
                        f"{w.dtype}")
    if tuple(w.shape) == tuple(s.shape):
        w_rows = rows_of(w)
    elif tuple(w.shape) == tuple(_shape(s)[-1:]):
        w_rows = w.reshape(1, _shape(s)[-1])
    else:
        raise ValueError(f"w must have the shape of s {tuple(s.shape)} or of one row "
                         f"{tuple(_shape(s)[-1:])}, got {tuple(w.shape)}")
    return s, w_rows


def isotonic_regression(s, w, regularization: str, backend: str, stream):
    s, w = device_input(s, "s", backend), device_input(w, "w", backend)
    module = backend_module("isotonic", backend)
    s, w_rows = _isotonic_inputs(module, backend, s, w)
    solution, blocks = module.isotonic_rows(rows_of(s), w_rows, regularization, stream=stream)
    return solution.reshape(s.shape), blocks.reshape(s.shape)


def isotonic_regression_vjp(cotangent, s, w, block_ids, regularization: str, backend: str,
                            stream):
    s, w = device_input(s, "s", backend), device_input(w, "w", backend)
    g = device_input(cotangent, "cotangent", backend)
    blocks = _int32_index_input(block_ids, "block_ids", backend)
    module = backend_module("isotonic", backend)
    s, w_rows = _isotonic_inputs(module, backend, s, w)
    check_dtype(g, "cotangent", backend, module.DTYPES)
    if tuple(g.shape) != tuple(s.shape) or tuple(blocks.shape) != tuple(s.shape):
        raise ValueError(f"cotangent {tuple(g.shape)}, s {tuple(s.shape)} and block_ids "
                         f"{tuple(blocks.shape)} must have the same shape")
    if np.dtype(g.dtype) != np.dtype(s.dtype):
        raise TypeError(f"cotangent must have the dtype of s ({s.dtype}) on backend={backend!r}, "
                        f"got {g.dtype}")
    grad_s, grad_w = module.isotonic_vjp_rows(rows_of(g), rows_of(s), w_rows, rows_of(blocks),
                                              regularization, stream=stream)
    return grad_s.reshape(s.shape), grad_w.reshape(s.shape)
