"""The feature classifier behind the offline Fréchet distance, on scikit-learn's real 8x8 digits."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vae_core.data.sources.digits import load_digits_u8
from vae_core.model.feature_net import (FeatureNet, FrechetScorer, accuracy, feature_net_url, load_or_train_feature_net,
                                        train_feature_net)

N_TRAIN = 1500


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """uint8 (1797, 8, 8, 1), int (1797,)."""
    return load_digits_u8()


@pytest.fixture(scope="module")
def net(digits) -> FeatureNet:
    images, labels = digits
    return train_feature_net(images[:N_TRAIN], labels[:N_TRAIN], 10, epochs=20, batch_size=64)


def darken(images_u8: torch.Tensor, factor: float) -> torch.Tensor:
    return images_u8.float() / 255.0 * factor


def test_classifier_generalises_to_held_out_digits(net, digits):
    images, labels = digits
    assert accuracy(net, images[N_TRAIN:], labels[N_TRAIN:]) > 0.85
    assert net.features(torch.zeros(3, 1, 8, 8)).shape == (3, net.num_features)
    assert net(torch.zeros(3, 1, 8, 8, dtype=torch.uint8)).shape == (3, 10)


def test_distance_is_zero_to_itself_and_grows_with_the_shift(net, digits_u8):
    scorer = FrechetScorer(net)
    scorer.add_real(digits_u8)
    same = scorer.distance(digits_u8.split(500))
    shifted = [scorer.distance([darken(digits_u8, f)]) for f in (0.8, 0.6, 0.4)]
    assert shifted[0] > 0
    assert abs(same) < 1e-3 * shifted[0]
    assert shifted[0] < shifted[1] < shifted[2]
    # Floats in [0, 1] and uint8 are the same images to the scorer.
    assert scorer.distance([digits_u8.float() / 255.0]) == pytest.approx(same, abs=1e-6 * shifted[0])


def frechet_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature rows a (N, F) and b (M, F)."""
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():
        # Units that never fire (ReLU) make the covariances singular; their rows add nothing to the sum.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2.0 * root))


def test_distance_matches_an_independent_computation(net, digits_u8):
    real = digits_u8[:1000]
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    fake = (real.float() / 255.0 + 0.15 * noise).clamp(0, 1)
    scorer = FrechetScorer(net)
    scorer.add_real(real)
    got = scorer.distance(fake.split(256))
    with torch.no_grad():
        want = frechet_reference(net.features(real).double().numpy(), net.features(fake).double().numpy())
    assert got == pytest.approx(want, rel=1e-3)


def test_trains_once_then_loads_from_the_cache(vae_home, digits):
    images, labels = digits
    train, test = (images[:N_TRAIN], labels[:N_TRAIN]), (images[N_TRAIN:], labels[N_TRAIN:])
    lines: list[str] = []
    first, info = load_or_train_feature_net("digits", "v1", train, test, epochs=2, progress=lines.append)
    path = vae_home / "feature_nets" / "digits" / "v1" / "feature_net.safetensors"
    assert info["cached"] is False and info["path"] == str(path) and path.is_file()
    assert info["accuracy_split"] == "test" and info["num_classes"] == 10 and info["train_rows"] == N_TRAIN
    assert len(lines) == 1 and "digits@v1" in lines[0] and "1,500 images" in lines[0]

    # Unlabelled train data would raise if it trained: the cached net must be used.
    unlabelled = (images[:N_TRAIN], np.full(N_TRAIN, -1))
    second, again = load_or_train_feature_net("digits", "v1", unlabelled, None, progress=lines.append)
    assert again["cached"] is True and again["test_accuracy"] == info["test_accuracy"] and len(lines) == 1
    for (k, a), (k2, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert k == k2 and torch.equal(a, b)

    weights = load_file(str(path))  # safetensors, no pickle
    assert weights.keys() == first.state_dict().keys()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["dataset"] == "digits" and meta["version"] == "v1" and meta["input_shape"] == "[1, 8, 8]"
    assert float(meta["test_accuracy"]) == info["test_accuracy"]


def test_a_cached_net_for_another_shape_is_retrained(vae_home, digits):
    images, labels = digits
    load_or_train_feature_net("digits", "v2", (images[:300], labels[:300]), None, epochs=1)
    padded = np.pad(images[:300], ((0, 0), (4, 4), (4, 4), (0, 0)))
    net, info = load_or_train_feature_net("digits", "v2", (padded, labels[:300]), None, epochs=1)
    assert info["cached"] is False and info["accuracy_split"] == "train"
    assert net.input_shape == (1, 16, 16)
    again, info = load_or_train_feature_net("digits", "v2", (padded, np.full(300, -1)), None)
    assert info["cached"] is True and again.input_shape == (1, 16, 16)


def test_cache_on_an_fsspec_url(digits):
    images, labels = digits
    root = "memory://feature-net-test"
    _, info = load_or_train_feature_net("digits", "v1", (images[:200], labels[:200]), None, root=root, epochs=1)
    assert info["path"] == f"{root}/digits/v1/feature_net.safetensors" and not info["cached"]
    _, info = load_or_train_feature_net("digits", "v1", (images[:200], np.full(200, -1)), None, root=root)
    assert info["cached"]


def test_errors_name_the_problem(net, digits, digits_u8, vae_home):
    images, labels = digits
    with pytest.raises(ValueError, match="no labelled rows"):
        train_feature_net(images[:50], np.full(50, -1), 10)
    with pytest.raises(ValueError, match="no labelled rows"):
        load_or_train_feature_net("digits", "v3", (images[:50], np.full(50, -1)), None)
    with pytest.raises(ValueError, match="at least 2 classes"):
        train_feature_net(images[:50], np.zeros(50, dtype=np.int64), 10)
    scorer = FrechetScorer(net)
    scorer.add_real(digits_u8[:1])
    with pytest.raises(ValueError, match="at least 2 real and 2 fake images, got 1 real"):
        scorer.distance([digits_u8[:10]])
    scorer.add_real(digits_u8[1:10])
    with pytest.raises(ValueError, match="got 10 real and 1 fake"):
        scorer.distance([digits_u8[:1]])
    for bad in ("..", "a/b", "digits\n", ".hidden"):  # a cache path never leaves its root, nor hides a newline
        with pytest.raises(ValueError, match="must use only"):
            feature_net_url(bad, "v3", "/cache")
        with pytest.raises(ValueError, match="must use only"):
            feature_net_url("digits", bad, "/cache")


def test_training_is_seeded_and_leaves_the_global_rng_alone(digits):
    images, labels = digits
    before = torch.random.get_rng_state()
    a = train_feature_net(images[:200], labels[:200], 10, epochs=1, seed=3)
    b = train_feature_net(images[:200], labels[:200], 10, epochs=1, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_test_images_are_read_only_when_a_classifier_is_trained(vae_home):
    images, labels = load_digits_u8()
    reads = []

    def test():
        reads.append(1)
        return images[1500:], labels[1500:]

    _, info = load_or_train_feature_net("digits", "v4", (images[:300], labels[:300]), test, epochs=1)
    assert reads == [1] and info["accuracy_split"] == "test" and not info["cached"]
    _, info = load_or_train_feature_net("digits", "v4", (images[:300], labels[:300]), test)
    assert reads == [1] and info["cached"]  # the cached classifier needed no test images
