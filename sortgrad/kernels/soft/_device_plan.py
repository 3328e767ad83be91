"""The device compositions' plan, shared by `_cupy.py` and `_numba_cuda.py`: which way each
op sorts, which fused prep / finish mode and isotonic regularization it runs, with which scale.

A backend supplies `forward(x, out, stream, descending_sort, prep_mode, fin_mode,
regularization, sign, eps, k=0)` (keys -> sort -> prep -> isotonic -> block sums -> finish ->
fallback; `sign` makes sign * x_sorted descending, the rank / mask scale is sign / eps) and
`backward(g, x, ranks, perm, block_ids, out, stream, vjp_mode, fin_mode, regularization,
scale)` (prep -> isotonic VJP -> finish); `row_functions` turns them into the six row functions
of the protocol, with the signatures of `_cpu.py` plus `stream`. The mode numbers are those of
`soft.cu` and of the Numba kernels.
"""

from __future__ import annotations

PREP_RANK_L2, PREP_RANK_KL, PREP_SORT_L2, PREP_SORT_KL, PREP_MASK = range(5)
VJP_RANK_L2, VJP_RANK_KL, VJP_SORT_L2, VJP_SORT_KL = range(4)
FIN_RANK_L2, FIN_RANK_KL, FIN_MASK, FIN_SORT, FIN_VJP_RANK, FIN_VJP_SORT, FIN_SORT_KL = range(7)
# soft_fallback's kinds (the rank / mask rows outside the fast path)
FB_RANK_L2, FB_RANK_KL, FB_MASK = range(3)
FALLBACK_KIND = {PREP_RANK_L2: FB_RANK_L2, PREP_RANK_KL: FB_RANK_KL, PREP_MASK: FB_MASK}
# The isotonic VJP that gives the finish step its block sums (`soft.cu`, "Exact limits"): KL
# (softmaxes) for the KL rank and the KL sort, L2 (block means) otherwise.
BLOCK_SUMS_KL = (PREP_RANK_KL, PREP_SORT_KL)

# The prep modes whose b (sign * x_sorted) is the isotonic step's tie keys or w-argument.
PREP_WITH_B = (PREP_SORT_L2, PREP_SORT_KL)


def tie_keys(prep_mode: int, a, b):
    """The isotonic step's tie keys (`isotonic._cpu.pools`, as `soft/_cpu.py` passes them):
    the sorted input values the op perturbs. Mask: a = x_sorted / eps (the PAV's s-argument);
    soft sort: b = sign * x_sorted (the PAV's arguments theta - s, theta are never tied); soft
    rank: None (tied s make s - rho strictly increasing, so equal values there only come from
    rounding and must pool)."""
    if prep_mode == PREP_MASK:
        return a
    if prep_mode in PREP_WITH_B:
        return b
    return None


def row_functions(forward, backward):
    """(soft_rank_rows, soft_sort_rows, soft_top_k_mask_rows, soft_rank_vjp_rows,
    soft_sort_vjp_rows, soft_top_k_mask_vjp_rows) over a backend's forward and backward."""

    def soft_rank_rows(x, eps: float, regularization: str, descending: bool, *, out=None,
                       stream=None):
        """Ranks in [1, n] (rank 1 = smallest when ascending) -> (ranks, perm, block_ids)."""
        sign = -1.0 if descending else 1.0
        kl = regularization == "kl"
        return forward(x, out, stream, sign > 0, PREP_RANK_KL if kl else PREP_RANK_L2,
                       FIN_RANK_KL if kl else FIN_RANK_L2, regularization, sign, eps)

    def soft_sort_rows(x, eps: float, regularization: str, descending: bool, *, out=None,
                       stream=None):
        """Soft sorted values (in sorted order) -> (values, perm, block_ids); ascending is
        -soft_sort_desc(-x)."""
        sign = 1.0 if descending else -1.0
        kl = regularization == "kl"
        return forward(x, out, stream, bool(descending), PREP_SORT_KL if kl else PREP_SORT_L2,
                       FIN_SORT_KL if kl else FIN_SORT, regularization, sign, eps)

    def soft_top_k_mask_rows(x, k: int, eps: float, *, out=None, stream=None):
        """Projection of x/eps onto the permutahedron of (1,...,1,0,...,0) with k ones (L2)."""
        return forward(x, out, stream, True, PREP_MASK, FIN_MASK, "l2", 1.0, eps, k=int(k))

    def soft_rank_vjp_rows(g, x, ranks, perm, block_ids, eps: float, regularization: str,
                           descending: bool, *, out=None, stream=None):
        """L2: dx[perm] = (g_s - blockmean(g_s)) / eps; KL: a = r_s * g_s,
        dx[perm] = (a - softmax(s_B) * blocksum(a)) / eps (signed scale when descending)."""
        scale = (-1.0 if descending else 1.0) / eps
        kl = regularization == "kl"
        return backward(g, x, ranks, perm, block_ids, out, stream,
                        VJP_RANK_KL if kl else VJP_RANK_L2, FIN_VJP_RANK, regularization, scale)

    def soft_sort_vjp_rows(g, x, perm, block_ids, eps: float, regularization: str,
                           descending: bool, *, out=None, stream=None):
        """L2: dx[perm] = blockmean(g); KL: dx[perm] = softmax(s_B) * blocksum(g), s the
        sorted (signed) input values."""
        sign = 1.0 if descending else -1.0
        kl = regularization == "kl"
        return backward(g, x, None, perm, block_ids, out, stream,
                        VJP_SORT_KL if kl else VJP_SORT_L2, FIN_VJP_SORT, regularization, sign)

    def soft_top_k_mask_vjp_rows(g, x, perm, block_ids, eps: float, *, out=None, stream=None):
        """dx[perm] = (g_s - blockmean(g_s)) / eps."""
        return backward(g, x, None, perm, block_ids, out, stream, VJP_RANK_L2, FIN_VJP_RANK,
                        "l2", 1.0 / eps)

    return (soft_rank_rows, soft_sort_rows, soft_top_k_mask_rows, soft_rank_vjp_rows,
            soft_sort_vjp_rows, soft_top_k_mask_vjp_rows)
