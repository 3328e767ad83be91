"""Soft selection by rank: "the mean of A over the top (or bottom) k of the scores C".

A hard selection `A[top_k(C, k)]` is piecewise constant in C, so its gradient with respect to
whatever produced C is zero almost everywhere. These helpers weight A by a soft top-k mask of
C instead (Blondel et al. 2020), which is differentiable and becomes the hard selection as
the regularization strength goes to 0. For a differentiable selection of the k values
themselves (any downstream f, not only sums and means) use `sortgrad.perturbed_top_k`.

The strength of a soft mask acts on the scale of the scores: a mask of scores C at strength
eps is the mask of C / c at strength eps / c. Standardising the scores (zero mean, unit standard
deviation along the axis, the default here) makes one strength mean the same thing for every
problem: with unit-variance scores, entries within about `regularization_strength` of the
k-th score get fractional weights, the rest 0 or 1. This is the mask's scale-free `softness`
(`soft_top_k_mask(C, k, softness=s)`, its default, s = 1, is the same mask as here at strength
s); the helpers keep their explicit strength on standardised scores (README, "Choosing the
strength").

Choosing the strength: small strengths (0.05-0.3) make the mask nearly hard, a faithful
estimate of the hard objective whose gradient reaches only the entries near the k-th score;
large ones (1-3) spread weight over many entries, so gradients reach every score and an
optimiser does not stall on a saturated mask, at the cost of a biased objective. For
optimising a selection, start large (the demo uses 2.0) and lower it if the soft objective
should track the hard one more closely.
"""

from __future__ import annotations

import math
import operator

import jax.numpy as jnp

from ._validate import check_k
from .bindings.jax import soft_top_k_mask
from .bindings.jax._args import array_and_axis


def standardize(scores, *, axis: int = -1, eps: float = 1e-12):
    """(scores - mean) / (std + eps) along `axis`: scale- and shift-free scores.

    Differentiable (the mean and standard deviation are part of the graph). A constant row
    becomes all zeros, whose soft mask is k/n everywhere.
    """
    scores, axis = array_and_axis(scores, axis, "scores")
    centred = scores - jnp.mean(scores, axis=axis, keepdims=True)
    return centred / (jnp.std(scores, axis=axis, keepdims=True) + eps)


def quantile_count(n: int, q: float) -> int:
    """How many of n distinct scores lie at or above their (1 - q)-quantile (NumPy's linear
    interpolation): the size of the "top q" set, e.g. the top quartile is quantile_count(n,
    0.25). Between 1 and n for 0 < q <= 1 and n >= 1; 0 when q = 0 or n = 0.
    """
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if n == 0 or q == 0.0:
        return 0
    position = (1.0 - q) * (n - 1)  # of the quantile among the ascending scores
    below = math.ceil(round(position, 9))  # scores strictly below it
    return n - below


def soft_selection_mask(scores, k: int, *, largest: bool = True,
                        regularization_strength: float = 1.0, standardize_scores: bool = True,
                        axis: int = -1):
    """Soft indicator of the k largest (`largest=True`) or k smallest entries of `scores`.

    Values in [0, 1] summing to k along `axis`; with strength -> 0 it is 1 exactly on the
    selected entries (ties: see `soft_top_k_mask`). The bottom set is the top set of -scores.
    `standardize_scores` (default) applies `standardize` first, so the strength is in units of
    the scores' standard deviation. A NaN score makes its row NaN.
    """
    scores, axis = array_and_axis(scores, axis, "scores")
    k = check_k(k, scores.shape[axis])
    if standardize_scores:
        scores = standardize(scores, axis=axis)
    if not largest:
        scores = -scores
    return soft_top_k_mask(scores, k, axis=axis, regularization_strength=regularization_strength)


def soft_selected_mean(values, scores, k: int, *, largest: bool = True,
                       regularization_strength: float = 1.0, standardize_scores: bool = True,
                       axis: int = -1):
    """Soft mean of `values` over the k largest (or smallest) `scores`: sum(mask * values) / k.

    `values` and `scores` have the same shape (or broadcast along `axis`); the result drops
    `axis`. Differentiable in both; equals mean(values[top_k(scores)]) as the strength -> 0.
    k must be >= 1.
    """
    scores, axis_ = array_and_axis(scores, axis, "scores")
    if check_k(k, scores.shape[axis_]) == 0:
        raise ValueError("k must be >= 1 for a mean over the selection, got k = 0")
    mask = soft_selection_mask(scores, k, largest=largest,
                               regularization_strength=regularization_strength,
                               standardize_scores=standardize_scores, axis=axis)
    return jnp.sum(mask * values, axis=axis) / k
