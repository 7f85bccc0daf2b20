"""The perceptual loss: frozen features of the dataset's classifier or of a VGG-16 read from a local file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vae_core.errors import ConfigError
from vae_core.model.config import PerceptualConfig
from vae_core.model.feature_net import (FeatureNet, feature_net_url, load_feature_net, load_or_train_feature_net,
                                        save_feature_net)
from vae_core.model.tv import import_torchvision
from vae_core.training.perceptual import (DEFAULT_LAYERS, PerceptualLoss, PerceptualWeightsError,
                                          check_perceptual_weights, load_perceptual)

SHAPE = (1, 8, 8)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet's, as VGG-16 was trained with
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def images(n: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """(n, C, H, W) floats in [0, 1]."""
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory) -> str:
    """A randomly initialised FeatureNet for (1, 8, 8) images, saved as evaluate-vae would."""
    torch.manual_seed(0)
    url = str(tmp_path_factory.mktemp("classifier") / "feature_net.safetensors")
    save_feature_net(FeatureNet(SHAPE, 10), url, {"dataset": "test"})
    return url


@pytest.fixture(scope="module")
def vgg_state() -> dict[str, torch.Tensor]:
    """A randomly initialised VGG-16 `features` state dict, keys as in torchvision's full state dict."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        features = import_torchvision().models.vgg16(weights=None).features
    return {f"features.{k}": v for k, v in features.state_dict().items()}


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory, vgg_state) -> str:
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"  # ~59 MB, written once
    torch.save(vgg_state, path)
    return str(path)


def vgg_features(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """VGG-16's `features` holding `state` (built on the meta device: no time spent on random weights)."""
    with torch.device("meta"):
        features = import_torchvision().models.vgg16(weights=None).features
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items()}, assign=True)
    return features


def vgg_cfg(weights: str | None, **kw) -> PerceptualConfig:
    return PerceptualConfig(weight=1.0, network="vgg16", weights=weights, **kw)


def assert_frozen_and_fake_only(loss: PerceptualLoss, shape: tuple[int, int, int]) -> None:
    parent = nn.Sequential(nn.Conv2d(shape[0], shape[0], 1), loss)
    parent.train()
    assert loss.training and parent[0].training  # the caller's mode is followed ...
    assert not any(m.training for m in loss.extractor.modules())  # ... but never by the network
    fake = images(2, shape, seed=1).requires_grad_(True)
    loss(fake, images(2, shape, seed=2)).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    params = list(loss.parameters())
    assert params and all(p.grad is None and not p.requires_grad for p in params)


def test_classifier_loss_matches_features_by_hand(classifier_file):
    loss = load_perceptual(PerceptualConfig(weight=1.0), SHAPE, default_weights=classifier_file)
    real, fake = images(4, SHAPE, seed=0), images(4, SHAPE, seed=1)
    assert loss(real.clone(), real).item() == 0.0
    got = loss(fake, real).item()
    assert got > 0
    net, meta = load_feature_net(classifier_file)
    assert meta["dataset"] == "test"
    want, a, b = 0.0, fake, real
    with torch.no_grad():
        for i, module in enumerate(net.body[:6]):  # body.1, body.3, body.5: the ReLUs
            a, b = module(a), module(b)
            want += F.mse_loss(a, b).item() if f"body.{i}" in DEFAULT_LAYERS["classifier"] else 0.0
    assert got == pytest.approx(want, rel=1e-5)


def test_classifier_is_frozen_in_eval_mode_and_only_fake_gets_gradients(classifier_file):
    loss = load_perceptual(PerceptualConfig(weight=1.0, weights=classifier_file), SHAPE,
                           default_weights="/no/such/feature_net.safetensors")  # the setting wins
    assert_frozen_and_fake_only(loss, SHAPE)


def test_classifier_of_another_input_shape_is_refused(classifier_file):
    with pytest.raises(PerceptualWeightsError, match=r"\(1, 8, 8\).*\(3, 8, 8\)"):
        load_perceptual(PerceptualConfig(weight=1.0), (3, 8, 8), default_weights=classifier_file)


def test_missing_classifier_says_where_it_comes_from(tmp_path):
    with pytest.raises(PerceptualWeightsError, match="default_weights.*objective.perceptual.weights"):
        load_perceptual(PerceptualConfig(weight=1.0), SHAPE)
    missing = str(tmp_path / "feature_net.safetensors")
    for call in (lambda: load_perceptual(PerceptualConfig(weight=1.0), SHAPE, default_weights=missing),
                 lambda: check_perceptual_weights(PerceptualConfig(weight=1.0), default_weights=missing)):
        with pytest.raises(PerceptualWeightsError, match="no feature classifier at"):
            call()


def test_unknown_layer_is_refused_with_the_valid_names(classifier_file):
    cfg = PerceptualConfig(weight=1.0, weights=classifier_file, layers=["body.1", "head"])
    with pytest.raises(ConfigError, match=r"'head'.*body\.0, body\.1, .*body\.9") as err:
        load_perceptual(cfg, SHAPE)
    assert not isinstance(err.value, PerceptualWeightsError)


@pytest.mark.parametrize("weights", [None, "/no/such/dir/vgg16.pth"])
def test_missing_vgg_weights_say_how_to_provide_them(weights):
    for call in (lambda: load_perceptual(vgg_cfg(weights), (1, 28, 28)),
                 lambda: check_perceptual_weights(vgg_cfg(weights))):
        with pytest.raises(PerceptualWeightsError) as err:
            call()
        message = str(err.value)
        assert "objective.perceptual.weights" in message and "never downloaded" in message
        assert "IMAGENET1K_V1" in message and (weights is None or weights in message)
    check_perceptual_weights(PerceptualConfig(weight=0.0, network="vgg16"))  # the term is off: nothing needed


def test_vgg_on_grey_28px_images(vgg_file, vgg_state):
    loss = load_perceptual(vgg_cfg(vgg_file), (1, 28, 28))
    real, fake = images(3, (1, 28, 28), seed=0), images(3, (1, 28, 28), seed=1)
    assert loss(real.clone(), real).item() == 0.0
    got = loss(fake, real)
    assert torch.isfinite(got) and got.item() > 0
    # Grey is RGB with three equal channels.
    assert loss(fake.repeat(1, 3, 1, 1), real.repeat(1, 3, 1, 1)).item() == pytest.approx(got.item(), rel=1e-5)
    # By hand: upsampled to 32 px, ImageNet-normalised, relu1_2 + relu2_2 + relu3_3 of the stored weights.
    features = vgg_features(vgg_state)
    want = 0.0
    with torch.no_grad():
        a, b = [(F.interpolate(x.repeat(1, 3, 1, 1), size=(32, 32), mode="bilinear") - MEAN) / STD
                for x in (fake, real)]
        for i in range(16):
            a, b = features[i](a), features[i](b)
            want += F.mse_loss(a, b).item() if i in (3, 8, 15) else 0.0
    assert got.item() == pytest.approx(want, rel=1e-4)
    assert_frozen_and_fake_only(loss, (1, 28, 28))


def test_vgg_accepts_a_full_state_dict_and_refuses_missing_feature_keys(vgg_state, tmp_path):
    full = tmp_path / "full.pth"
    torch.save({**vgg_state, "classifier.6.bias": torch.zeros(1000)}, full)
    # A conv output followed by VGG's in-place ReLU must keep its own values (negative ones included).
    loss = load_perceptual(vgg_cfg(str(full), layers=["features.0", "features.1"]), (3, 32, 40))
    fake, real = images(2, (3, 32, 40), 0), images(2, (3, 32, 40), 1)
    conv = vgg_features(vgg_state)[0]
    with torch.no_grad():
        a, b = conv((fake - MEAN) / STD), conv((real - MEAN) / STD)
        want = F.mse_loss(a, b).item() + F.mse_loss(a.relu(), b.relu()).item()
    assert loss(fake, real).item() == pytest.approx(want, rel=1e-5)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in vgg_state.items() if not k.startswith(("features.17.", "features.28."))}, partial)
    with pytest.raises(PerceptualWeightsError, match=r"4 feature keys missing.*features\.17\.weight"):
        load_perceptual(vgg_cfg(str(partial)), (3, 32, 32))


def test_feature_net_helpers_share_one_cache_path(tmp_path):
    assert feature_net_url("digits", "v1", str(tmp_path) + "/") == f"{tmp_path}/digits/v1/feature_net.safetensors"
    with pytest.raises(ValueError, match="dataset name '..' must use only"):
        feature_net_url("..", "v1", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="memory://nowhere/feature_net.safetensors"):
        load_feature_net("memory://nowhere/feature_net.safetensors")
    rng = np.random.default_rng(0)
    train = (rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), np.arange(40) % 2)
    trained, info = load_or_train_feature_net("toy", "v1", train, None, root=str(tmp_path), epochs=1)
    assert info["path"] == feature_net_url("toy", "v1", str(tmp_path))
    loaded, meta = load_feature_net(info["path"])
    assert meta["dataset"] == "toy" and meta["classes"] == "2"
    x = images(3, SHAPE, seed=0)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
