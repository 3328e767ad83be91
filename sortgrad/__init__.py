"""sortgrad: sorting, ranking and top-k you can differentiate through, in JAX.

Hard ops with exact gradients of the values (`sort`, `argsort`, `top_k`) and soft operators
after Blondel et al. 2020 (`soft_sort`, `soft_rank`, `soft_top_k_mask`, `soft_quantile`).
Array-level kernels (NumPy, and CuPy where installed) live in `sortgrad.kernels`, which
imports no JAX: the JAX ops (see bindings/jax/__init__.py) are imported on first use of any of
them, e.g. `sortgrad.sort`, or by `from sortgrad import *`.
"""

__version__ = "0.1.0"


def _bindings():
    from .bindings import jax as bindings
    return bindings


def __getattr__(name):
    if name == "__all__":
        return list(_bindings().__all__)
    if not name.startswith("__"):
        bindings = _bindings()
        if name in bindings.__all__:
            value = getattr(bindings, name)
            globals()[name] = value  # later lookups skip this function
            return value
    raise AttributeError(f"module 'sortgrad' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_bindings().__all__))
