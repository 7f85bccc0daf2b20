from __future__ import annotations

import numpy as np
import pytest
import torch

from vae_core import ConvVAE, load_config
from vae_core.evaluation.latent_metrics import active_units, knn_accuracy, latent_probes, linear_probe_accuracy


def test_active_units_counts_dimensions_that_vary():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(500, 6))
    means[:, 1] = 3.0                                        # dead: constant
    means[:, 4] = -2.0 + 1e-3 * rng.normal(size=500)         # dead: variance ~1e-6
    means[:, 5] *= 0.05                                      # variance ~0.0025 < 0.01: inactive
    count, variances = active_units(means)
    assert count == 3
    assert variances.shape == (6,)
    np.testing.assert_allclose(variances, means.var(axis=0, ddof=0))
    assert variances[1] == 0.0
    assert active_units(means, threshold=0.001)[0] == 4


def test_active_units_uses_population_variance():
    means = np.array([[0.0], [1.0]])                          # ddof=0: 0.25, ddof=1: 0.5
    count, variances = active_units(means, threshold=0.3)
    assert variances[0] == pytest.approx(0.25) and count == 0


@pytest.mark.parametrize("bad", [np.zeros((1, 4)), np.zeros(5), np.zeros((2, 3, 4))])
def test_active_units_rejects_bad_shapes(bad):
    with pytest.raises(ValueError, match=r"N=1|2-D"):
        active_units(bad)


def test_active_units_of_a_model_with_dead_posterior_dimensions(digits_u8):
    torch.manual_seed(0)
    model = ConvVAE(load_config("digits").model).eval()
    dead = [1, 4, 6]
    live = [d for d in range(model.latent_dim) if d not in dead]
    with torch.no_grad():
        # The first latent_dim outputs of to_posterior are the posterior means. An untrained encoder's
        # means barely move across the data (variance ~1e-3); scaling the live rows stands in for the
        # spread a trained encoder gives them.
        model.to_posterior.weight[live] *= 30.0
        model.to_posterior.weight[dead] = 0.0
        model.to_posterior.bias[dead] = 0.5
        means = model.encode(model.prepare_eval(digits_u8[:400])).mean.numpy()
    count, variances = active_units(means)
    assert count == model.latent_dim - len(dead)
    assert np.all(variances[dead] == 0.0)
    assert np.all(variances[live] > 0.01)


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two well-separated Gaussian blobs in 4-D: (n, 4) latents and (n,) labels 0/1."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    z = rng.normal(size=(n, 4)) + 10.0 * y[:, None]
    return z, y


def test_knn_on_separated_blobs_is_perfect_and_on_random_labels_is_chance():
    train_z, train_y = _blobs(300, 0)
    test_z, test_y = _blobs(200, 1)
    assert knn_accuracy(train_z, train_y, test_z, test_y) == pytest.approx(1.0)
    rng = np.random.default_rng(2)
    z = rng.normal(size=(800, 4))
    y = rng.integers(0, 2, size=800)
    assert knn_accuracy(z[:400], y[:400], z[400:], y[400:]) < 0.7


def _brute_force_knn(train_z, train_y, test_z, k):
    """Majority vote of the k nearest train rows by Euclidean distance; ties go to the smallest label."""
    d = np.sqrt(((test_z[:, None, :] - train_z[None, :, :]) ** 2).sum(-1))
    nearest = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.array([np.bincount(train_y[row]).argmax() for row in nearest])


@pytest.mark.parametrize("k", [1, 4, 5])
def test_knn_matches_a_brute_force_majority_vote(k):
    rng = np.random.default_rng(3)
    train_z, test_z = rng.normal(size=(40, 3)), rng.normal(size=(25, 3))
    train_y, test_y = rng.integers(0, 3, size=40), rng.integers(0, 3, size=25)
    expected = float((_brute_force_knn(train_z, train_y, test_z, k) == test_y).mean())
    assert knn_accuracy(train_z, train_y, test_z, test_y, k=k) == expected


def test_knn_rejects_k_larger_than_the_train_set():
    z, y = _blobs(10, 0)
    with pytest.raises(ValueError, match="got 11"):
        knn_accuracy(z, y, z, y, k=11)


def test_linear_probe_on_linearly_separable_data():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(600, 5))
    y = (z @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) > 0.2).astype(int)
    acc = linear_probe_accuracy(z[:400], y[:400], z[400:], y[400:])
    assert acc > 0.95


def test_latent_probes_without_labels_returns_nothing_and_says_why():
    z, _ = _blobs(50, 0)
    none = np.full(50, -1)
    metrics, notes = latent_probes(z, none, z, none)
    assert metrics == {}
    assert len(notes) == 1 and "skipped" in notes[0] and "neither split has labels" in notes[0]
    _, y = _blobs(50, 0)
    metrics, notes = latent_probes(z, y, z, none)
    assert metrics == {} and "test split has no labels" in notes[0]
    metrics, notes = latent_probes(z, np.zeros(50, dtype=int), z, y)
    assert metrics == {} and "1 class" in notes[0]


def test_latent_probes_with_partial_labels_notes_the_rows_left_out():
    train_z, train_y = _blobs(200, 0)
    test_z, test_y = _blobs(100, 1)
    train_y, test_y = train_y.copy(), test_y.copy()
    train_y[:37] = -1
    test_y[:5] = -1
    metrics, notes = latent_probes(train_z, train_y, test_z, test_y, k=5)
    assert set(metrics) == {"knn_accuracy", "linear_probe_accuracy"}
    assert metrics["knn_accuracy"] == pytest.approx(1.0)
    assert metrics["linear_probe_accuracy"] == pytest.approx(1.0)
    assert any("37 unlabelled train rows" in n for n in notes)
    assert any("5 unlabelled test rows" in n for n in notes)


def test_latent_probes_caps_k_at_the_labelled_train_rows():
    train_z, train_y = _blobs(6, 0)
    train_y = np.array([0, 1, 0, 1, -1, -1])
    test_z, test_y = _blobs(20, 1)
    metrics, notes = latent_probes(train_z, train_y, test_z, test_y, k=10)
    assert "knn_accuracy" in metrics
    assert any("k=4" in n for n in notes)


def test_running_variance_of_batches_and_of_merged_parts_is_the_variance_of_all_rows():
    from vae_core.evaluation.latent_metrics import RunningVariance

    rows = np.random.default_rng(1).normal(5.0, [0.1, 1.0, 30.0], (1_000, 3))
    batched, merged = RunningVariance(), RunningVariance()
    for start in range(0, 1_000, 64):
        batched.add(rows[start : start + 64])
    for part in (rows[:10], rows[10:700], rows[700:]):
        other = RunningVariance()
        other.add(part)
        merged.merge(other)
    for r in (batched, merged):
        assert r.count == 1_000
        np.testing.assert_allclose(r.variance, rows.var(axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        RunningVariance().variance
