"""Perceptual loss: squared distance between a fixed network's features of an image and of its reconstruction.

DFC-VAE (Hou et al. 2016) matches VGG activations instead of (or beside) pixels. Weights are never
downloaded: the network is the dataset version's feature classifier (`vae_core.model.feature_net`) or a
torchvision VGG-16 read from a local file.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vae_core.errors import ConfigError
from vae_core.model.config import PerceptualConfig
from vae_core.model.feature_net import load_feature_net
from vae_core.model.tv import import_torchvision
from vae_core.storage import resolve

# classifier: the outputs of its three conv ReLUs; vgg16: relu1_2, relu2_2, relu3_3 as in DFC-VAE and LPIPS.
DEFAULT_LAYERS: dict[str, list[str]] = {"classifier": ["body.1", "body.3", "body.5"],
                                        "vgg16": ["features.3", "features.8", "features.15"]}
# VGG-16 halves the image 5 times (max-pools features.4, .9, .16, .23, .30): from 32 px on every layer still
# has at least 1x1 pixel, and relu3_3 an 8x8 map. Smaller images are upsampled to that; larger ones are left
# alone, since upsampling further only costs time.
_VGG_MIN_SIDE = 32
_VGG_HOWTO = ("Weights are never downloaded at run time; on a machine with internet run `python -c \"import torch, "
              "torchvision; torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1').state_dict(), "
              "'vgg16.pth')\"`, copy vgg16.pth here and set objective.perceptual.weights=/path/vgg16.pth")


class PerceptualWeightsError(ConfigError):
    """The perceptual network's weights are missing or do not fit; the message says how to provide them."""


class PerceptualLoss(nn.Module):
    """Frozen feature extractor on chosen layers of `trunk` (an nn.Sequential); `forward` gives the loss.

    `name` is the trunk's attribute in its full network ("body" for FeatureNet, "features" for VGG-16), so
    layer names read as in that network ("body.1", "features.3"). network="vgg16" adds VGG's input handling.
    """

    def __init__(self, name: str, trunk: nn.Sequential, layers: Sequence[str],
                 network: Literal["classifier", "vgg16"] = "classifier") -> None:
        super().__init__()
        import_torchvision()  # through vae_core.model.tv: torchvision may lack its compiled extension here
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        for module in trunk.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False  # an in-place ReLU would overwrite a returned conv output (VGG's are)
        root = nn.Sequential(OrderedDict([(name, trunk)])).eval()
        valid = [n for n in get_graph_node_names(root)[1] if n != "input"]
        self.layers = list(dict.fromkeys(layers))
        unknown = [n for n in self.layers if n not in valid]
        if unknown or not self.layers:
            raise ConfigError(f"objective.perceptual.layers: unknown layer(s) {unknown or self.layers} for "
                              f"{network}; valid names: {', '.join(valid)}")
        # The extractor keeps only the modules up to the last chosen layer: VGG-16 up to relu3_3 is 1.7M of
        # its 138M parameters, and nothing after those layers is computed.
        self.extractor = create_feature_extractor(root, return_nodes=self.layers)
        self.extractor.requires_grad_(False)
        self.network = network
        # ImageNet's statistics, which VGG-16 was trained with; buffers so that `.to(device)` moves them.
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Follow `mode` on this module but keep the network in eval mode: its features must not change
        with the caller's mode (no dropout, no batch-norm statistics updates)."""
        super().train(mode)
        self.extractor.train(False)
        return self

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> what the network was trained on (float32; VGG: 3 normalised channels)."""
        x = x.to(self.mean.dtype)
        if self.network != "vgg16":
            return x  # FeatureNet was trained on [0, 1] images as they are
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey: the same value in R, G and B
        if min(x.shape[-2:]) < _VGG_MIN_SIDE:
            scale = _VGG_MIN_SIDE / min(x.shape[-2:])  # keeps the aspect ratio
            size = (max(_VGG_MIN_SIDE, round(x.shape[-2] * scale)), max(_VGG_MIN_SIDE, round(x.shape[-1] * scale)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """fake, real: (B, C, H, W) floats in [0, 1] -> scalar: sum over layers of the mean squared feature
        difference. Gradients flow to `fake` only; `real`'s features are computed without a graph."""
        if fake.shape != real.shape:
            raise ValueError(f"fake and real images differ in shape: {tuple(fake.shape)} vs {tuple(real.shape)}")
        with torch.no_grad():
            want = self.extractor(self._prepare(real))
        got = self.extractor(self._prepare(fake))
        return torch.stack([F.mse_loss(got[n], want[n]) for n in self.layers]).sum()


def _weights_url(cfg: PerceptualConfig, default_weights: str | None) -> str:
    """The weights file `cfg` names (classifier: else `default_weights`), checked to exist; nothing is read."""
    key = f"objective.perceptual.network={cfg.network}"
    url = cfg.weights or (default_weights if cfg.network == "classifier" else None)
    if not url and cfg.network == "classifier":
        raise PerceptualWeightsError(
            f"{key} needs the feature classifier of the dataset version: train-vae resolves it (training it if "
            "missing); in Python pass default_weights (e.g. vae_core.model.feature_net.feature_net_url(dataset, "
            "version)) or set objective.perceptual.weights=/path/feature_net.safetensors")
    if not url:
        raise PerceptualWeightsError(f"{key} needs torchvision's VGG-16 weights in a local file, and "
                                     f"objective.perceptual.weights is not set. {_VGG_HOWTO}")
    fs, path = resolve(url)
    if fs.exists(path):
        return url
    if cfg.network == "classifier":
        raise PerceptualWeightsError(f"{key}: no feature classifier at {url} (objective.perceptual.weights, or "
                                     "default_weights: the dataset version's classifier)")
    raise PerceptualWeightsError(f"{key} needs torchvision's VGG-16 weights in a local file: no file at {url}. "
                                 f"{_VGG_HOWTO}")


def check_perceptual_weights(cfg: PerceptualConfig, default_weights: str | None = None) -> None:
    """Raise PerceptualWeightsError if the term is on and its weights file is not set or not there.

    Only checks that the file exists (cheap: nothing is read), so a flow fails before expensive work.
    """
    if cfg.weight > 0:  # a term that is off needs nothing
        _weights_url(cfg, default_weights)


def _vgg16_features(url: str) -> nn.Sequential:
    """VGG-16's `features` (conv part) with the weights of the state dict at `url` (full or features only)."""
    fs, path = resolve(url)
    try:
        with fs.open(path, "rb") as f:
            state = torch.load(f, weights_only=True, map_location="cpu")
    except Exception as err:  # pickled modules, truncated files, ...: all mean "not a state dict we can read"
        raise PerceptualWeightsError(f"cannot read a VGG-16 state dict from {url} ({err}). {_VGG_HOWTO}") from err
    if not isinstance(state, dict):
        raise PerceptualWeightsError(f"{url} holds a {type(state).__name__}, not a VGG-16 state dict. {_VGG_HOWTO}")
    state = {k[len("features."):]: v for k, v in state.items() if isinstance(k, str) and k.startswith("features.")}
    # Built on the meta device: no memory for, nor random initialisation of, the 124M classifier parameters
    # that are thrown away; the loaded tensors then become the parameters (assign=True).
    with torch.device("meta"):
        features = import_torchvision().models.vgg16(weights=None).features
    expected = list(features.state_dict())
    missing, unexpected = [k for k in expected if k not in state], [k for k in state if k not in expected]
    if missing or unexpected:
        raise PerceptualWeightsError(
            f"{url} is not a VGG-16 state dict: {len(missing)} feature keys missing (e.g. "
            f"{['features.' + k for k in missing[:4]]}), {len(unexpected)} unexpected (e.g. "
            f"{['features.' + k for k in unexpected[:4]]}). {_VGG_HOWTO}")
    try:
        features.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # right names, wrong shapes (another VGG variant)
        raise PerceptualWeightsError(f"{url} does not fit VGG-16: {err}") from err
    return features


def load_perceptual(cfg: PerceptualConfig, input_shape: tuple[int, int, int], default_weights: str | None = None,
                    device: str | torch.device = "cpu") -> PerceptualLoss:
    """The perceptual loss `cfg` describes, for images of `input_shape` (C, H, W), on `device`.

    classifier: the FeatureNet file `cfg.weights` or else `default_weights`; its input shape must be
    `input_shape`. vgg16: the torchvision state dict file `cfg.weights`. Raises PerceptualWeightsError
    when the weights are missing or do not fit, ConfigError for an unknown layer.
    """
    layers = list(cfg.layers) or DEFAULT_LAYERS[cfg.network]
    url = _weights_url(cfg, default_weights)
    if cfg.network == "classifier":
        try:
            net, _ = load_feature_net(url)
        except (FileNotFoundError, ValueError) as err:  # gone since the check, or another kind of file
            raise PerceptualWeightsError(f"objective.perceptual.network=classifier: {err}") from err
        if tuple(net.input_shape) != tuple(input_shape):
            raise PerceptualWeightsError(
                f"the feature classifier at {url} takes images of shape (C, H, W)={tuple(net.input_shape)}, "
                f"the model's images are {tuple(input_shape)}: use the classifier of this dataset version")
        loss = PerceptualLoss("body", net.body, layers, "classifier")
    elif input_shape[0] not in (1, 3):
        raise ConfigError(f"objective.perceptual.network=vgg16 takes grey or RGB images, not {input_shape[0]} channels")
    else:
        loss = PerceptualLoss("features", _vgg16_features(url), layers, "vgg16")
    return loss.to(device)
