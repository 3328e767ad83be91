"""sortgrad.kernels: array in, array out; no autodiff and no JAX.

Every kernel takes NumPy arrays (CPU backend) -- or, where a GPU backend is installed, CuPy or
Numba device arrays -- and returns arrays of the same kind; `out=` writes into given arrays and
`stream=` picks the launch stream on device backends. Rows are the last axis; leading dims are
batch. The backend follows the arrays unless `backend=` names one (`_backends.py`).
"""

from ._jit_cache import ensure_fresh as _ensure_fresh

_ensure_fresh()  # before any kernel runs: a cached kernel is never older than the sources

from .isotonic import isotonic_regression, isotonic_regression_vjp
from .permutation import inverse_permutation, permutation_scatter
from .segmented_sort import segmented_argsort, segmented_sort
from .soft import (soft_rank, soft_rank_vjp, soft_sort, soft_sort_vjp, soft_top_k_mask,
                   soft_top_k_mask_vjp)
from .top_k import top_k

__all__ = ["segmented_sort", "segmented_argsort", "top_k", "inverse_permutation", "permutation_scatter",
           "isotonic_regression", "isotonic_regression_vjp", "soft_rank", "soft_rank_vjp",
           "soft_sort", "soft_sort_vjp", "soft_top_k_mask", "soft_top_k_mask_vjp"]
