"""sortgrad.kernels: array in, array out; no autodiff and no JAX.

Every kernel takes NumPy arrays (CPU backend) -- or, where a GPU backend is installed, CuPy
arrays -- and returns arrays of the same kind. Rows are the last axis; leading dims are batch.
"""

from .isotonic import isotonic_regression, isotonic_regression_vjp
from .permutation import inverse_permutation, permutation_scatter
from .segmented_sort import segmented_sort
from .top_k import top_k

__all__ = ["segmented_sort", "top_k", "inverse_permutation", "permutation_scatter",
           "isotonic_regression", "isotonic_regression_vjp"]
