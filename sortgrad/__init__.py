"""sortgrad: sorting, ranking and top-k you can differentiate through, in JAX.

Hard ops with exact gradients of the values (`sort`, `argsort`, `top_k`) and soft operators
after Blondel et al. 2020 (`soft_sort`, `soft_rank`, `soft_top_k_mask`, `soft_quantile`).
Array-level kernels (NumPy, and CuPy where installed) live in `sortgrad.kernels`.
"""

from .bindings import jax as _jax_bindings
from .bindings.jax import *  # noqa: F401,F403 (the public ops: see bindings/jax/__init__.py)

__version__ = "0.1.0"

__all__ = list(_jax_bindings.__all__)
