"""Test support shared by the tests and the benchmarks (ships in the wheel; needs only NumPy and
ml_dtypes, never pytest or hypothesis).

- `sortgrad.testing.oracles`: independent reference implementations (slow, plain Python /
  float64 NumPy, written from the definitions; they never call sortgrad's kernels).
- `sortgrad.testing.data`: adversarial data generators (special values, payload NaNs, heavy
  ties, edge sizes) and bit-exact comparisons.

Every public name of both modules is importable from here.
"""

from sortgrad.testing.data import (FLOAT_DTYPES, INT_DTYPES, ISOTONIC_KINDS, PAYLOAD_NANS, SIZES,
                                   UINT_BY_ITEMSIZE, assert_same_bits, bits, dtype_id,
                                   filled_bytes, flush_subnormals, isotonic_inputs, make_keys,
                                   random_perms, same_bits, special_values, uint_dtype)
from sortgrad.testing.oracles import (apply_rows, finite_difference_jacobian, reference_argsort,
                                      reference_hard_ranks, reference_hard_top_k_mask,
                                      reference_isotonic, reference_isotonic_minmax,
                                      reference_isotonic_vjp, reference_segmented_sort,
                                      reference_soft_quantile, reference_soft_quantile_jacobian,
                                      reference_soft_rank, reference_soft_rank_jacobian,
                                      reference_soft_sort, reference_soft_sort_jacobian,
                                      reference_soft_top_k_mask,
                                      reference_soft_top_k_mask_closed_form,
                                      reference_soft_top_k_mask_jacobian, reference_sort_rows,
                                      reference_top_k)

__all__ = [
    # oracles
    "apply_rows", "finite_difference_jacobian", "reference_argsort", "reference_hard_ranks",
    "reference_hard_top_k_mask", "reference_isotonic", "reference_isotonic_minmax",
    "reference_isotonic_vjp", "reference_segmented_sort", "reference_soft_quantile",
    "reference_soft_quantile_jacobian", "reference_soft_rank", "reference_soft_rank_jacobian",
    "reference_soft_sort", "reference_soft_sort_jacobian", "reference_soft_top_k_mask",
    "reference_soft_top_k_mask_closed_form", "reference_soft_top_k_mask_jacobian",
    "reference_sort_rows", "reference_top_k",
    # data
    "FLOAT_DTYPES", "INT_DTYPES", "ISOTONIC_KINDS", "PAYLOAD_NANS", "SIZES", "UINT_BY_ITEMSIZE",
    "assert_same_bits", "bits", "dtype_id", "filled_bytes", "flush_subnormals",
    "isotonic_inputs", "make_keys", "random_perms", "same_bits", "special_values", "uint_dtype",
]
