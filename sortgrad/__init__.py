"""sortgrad: sorting, ranking and top-k you can differentiate through, in JAX.

Hard ops with exact gradients of the values (`sort`, `argsort`, `top_k`) and soft operators
after Blondel et al. 2020 (`soft_sort`, `soft_rank`, `soft_top_k_mask`, `soft_quantile`).
Array-level kernels (NumPy, and CuPy where installed) live in `sortgrad.kernels`.
"""

from .bindings.jax import (argsort, callback_mode, get_callback_mode, perturbed_top_k,
                           set_callback_mode, soft_quantile, soft_rank, soft_sort,
                           soft_top_k_mask, sort, top_k)

__version__ = "0.1.0"

__all__ = ["sort", "argsort", "top_k", "soft_sort", "soft_rank", "soft_top_k_mask",
           "soft_quantile", "perturbed_top_k", "set_callback_mode", "get_callback_mode",
           "callback_mode"]
