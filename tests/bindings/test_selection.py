"""sortgrad.selection: soft A_high / A_low from scores and values, quantile counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sortgrad import selection


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 10, 11, 31, 32, 33, 100, 1023])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_quantile_count_matches_numpy_quantile(n, q):
    scores = np.random.default_rng(n).permutation(n).astype(np.float64)  # distinct
    want = 0 if n == 0 or q == 0 else int((scores >= np.quantile(scores, 1 - q)).sum())
    assert selection.quantile_count(n, q) == want


def test_quantile_count_rejects_bad_arguments():
    with pytest.raises(ValueError, match="q must be"):
        selection.quantile_count(10, 1.5)
    with pytest.raises(ValueError, match="n must be"):
        selection.quantile_count(-1, 0.5)


def test_standardize():
    x = jnp.array([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    z = np.asarray(selection.standardize(x))
    ref = (np.asarray(x[0]) - 3.0) / np.std(np.asarray(x[0]))
    np.testing.assert_allclose(z[0], ref, rtol=1e-12)
    np.testing.assert_array_equal(z[1], 0.0)
    # invariant to scale and shift
    np.testing.assert_allclose(selection.standardize(7.0 * x[0] - 3.0), z[0], rtol=1e-9)


def test_masks_select_top_and_bottom_sets_as_strength_shrinks():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((4, 13))
    k = 3
    top = np.asarray(selection.soft_selection_mask(scores, k, regularization_strength=1e-6))
    bottom = np.asarray(selection.soft_selection_mask(scores, k, largest=False,
                                                      regularization_strength=1e-6))
    order = np.argsort(scores, axis=-1)
    for r in range(4):
        np.testing.assert_array_equal(np.flatnonzero(top[r]), np.sort(order[r, -k:]))
        np.testing.assert_array_equal(np.flatnonzero(bottom[r]), np.sort(order[r, :k]))
    np.testing.assert_allclose(top.sum(-1), k)


@pytest.mark.parametrize("strength", [0.1, 1.0, 5.0])
def test_standardised_mask_is_scale_free(strength):
    scores = np.random.default_rng(5).standard_normal(9)
    m1 = selection.soft_selection_mask(scores, 4, regularization_strength=strength)
    m2 = selection.soft_selection_mask(1000.0 * scores + 7, 4, regularization_strength=strength)
    np.testing.assert_allclose(m1, m2, atol=1e-9)
    raw = selection.soft_selection_mask(1000.0 * scores, 4, regularization_strength=strength,
                                        standardize_scores=False)
    z = (scores - scores.mean()) / scores.std()
    manual = selection.soft_selection_mask(z, 4, regularization_strength=strength,
                                           standardize_scores=False)
    np.testing.assert_allclose(m1, manual, atol=1e-9)
    if strength >= 1.0:  # m1 is fractional there; unstandardised large scores give a hard mask
        assert not np.allclose(raw, m1)


def test_soft_selected_mean_tends_to_hard_means_of_quartiles():
    rng = np.random.default_rng(7)
    n = 41
    values, scores = rng.standard_normal(n), rng.standard_normal(n)
    k = selection.quantile_count(n, 0.25)
    order = np.argsort(scores)
    high = selection.soft_selected_mean(values, scores, k, regularization_strength=1e-6)
    low = selection.soft_selected_mean(values, scores, k, largest=False,
                                       regularization_strength=1e-6)
    assert float(high) == pytest.approx(values[order[-k:]].mean(), abs=1e-9)
    assert float(low) == pytest.approx(values[order[:k]].mean(), abs=1e-9)


def test_soft_selected_mean_gradient_matches_finite_differences():
    rng = np.random.default_rng(11)
    values, scores = rng.standard_normal(12), rng.standard_normal(12)
    f = lambda s: selection.soft_selected_mean(values, s, 3, regularization_strength=0.7)
    grad = np.asarray(jax.grad(f)(jnp.asarray(scores)))
    h = 1e-6
    fd = np.array([(f(scores + h * e) - f(scores - h * e)) / (2 * h) for e in np.eye(12)])
    assert np.abs(grad).max() > 1e-3
    np.testing.assert_allclose(grad, fd, atol=1e-7)


def test_batched_axis_and_vmap():
    rng = np.random.default_rng(13)
    values, scores = rng.standard_normal((3, 8)), rng.standard_normal((3, 8))
    batched = selection.soft_selected_mean(values, scores, 2, regularization_strength=0.5)
    looped = [selection.soft_selected_mean(values[i], scores[i], 2, regularization_strength=0.5)
              for i in range(3)]
    np.testing.assert_allclose(batched, looped, rtol=1e-12)
    mapped = jax.vmap(lambda v, s: selection.soft_selected_mean(
        v, s, 2, regularization_strength=0.5))(values, scores)
    np.testing.assert_allclose(mapped, looped, rtol=1e-12)
    on_axis0 = selection.soft_selected_mean(values.T, scores.T, 2, regularization_strength=0.5,
                                            axis=0)
    np.testing.assert_allclose(on_axis0, looped, rtol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must"):
        selection.soft_selection_mask(np.zeros(4), 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        selection.soft_selected_mean(np.zeros(4), np.zeros(4), 0)
    with pytest.raises(ValueError, match="regularization_strength"):
        selection.soft_selection_mask(np.zeros(4), 2, regularization_strength=0.0)
    with pytest.raises(ValueError, match="dimension"):
        selection.soft_selection_mask(np.float64(1.0), 1)
