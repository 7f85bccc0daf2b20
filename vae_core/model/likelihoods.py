"""Decoder likelihoods p(x|z) over images.

Every likelihood turns a batch of raw uint8 images into the model's input and its target
(`prepare`), scores decoder outputs against the target (`log_prob`, nats per image), and turns decoder
outputs into a picture in [0, 1] (`mean`).

`log_prob` is a log-probability of the *discrete* data wherever that makes sense, so NLLs are
comparable across likelihoods and reportable as nats and bits/dim:

- Bernoulli on binarised pixels: exact log-probability of the binary image (the MNIST literature's
  figure, with dynamic binarisation as in Burda et al. 2015).
- Gaussian with a learned per-channel scale on uniformly dequantised pixels (x + u) / 256: the density
  in [0, 1] minus D*log(256), a lower bound on the log-probability of the 8-bit image (Theis et al. 2016).
- Discretised logistic (Salimans et al. 2017, one component): exact log-probability of each 8-bit value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_256 = math.log(256.0)


def to_unit(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1]."""
    return x_u8.float().div_(255.0)


class Likelihood(nn.Module):
    """Interface: see the module docstring."""

    #: decoder output channels per image channel
    params_per_channel: int = 1

    def prepare(
        self, x_u8: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, C, H, W) -> (model input (B, C, H, W) float, target (B, C, H, W))."""
        raise NotImplementedError

    def to_input(self, x01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the model's input scale; deterministic (for encoding, reconstruction)."""
        return x01

    def log_prob(self, params: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Decoder output (B, P*C, H, W) and target (B, C, H, W) -> log p(x|z), (B,) nats."""
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Decoder output (B, P*C, H, W) -> expected image (B, C, H, W) in [0, 1]."""
        raise NotImplementedError


class Bernoulli(Likelihood):
    """Pixels as Bernoulli variables; with `binarize`, targets are sampled from the grey levels."""

    def __init__(self, channels: int, binarize: bool = True) -> None:
        super().__init__()
        self.binarize = binarize

    def prepare(self, x_u8, generator=None):
        x = to_unit(x_u8)
        if self.binarize:
            # Dynamic binarisation: a fresh sample every time, in training and evaluation alike.
            x = torch.bernoulli(x, generator=generator)
        return x, x

    def log_prob(self, params, target):
        nll = F.binary_cross_entropy_with_logits(params.float(), target, reduction="none")
        return -nll.flatten(1).sum(1)

    def mean(self, params):
        return torch.sigmoid(params.float())


class Gaussian(Likelihood):
    """Gaussian with a learned per-channel scale on dequantised pixels (sigma-VAE style)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((channels,), math.log(0.1)))

    def prepare(self, x_u8, generator=None):
        u = torch.rand(x_u8.shape, generator=generator, device=x_u8.device)
        x = (x_u8.float() + u) / 256.0
        return x, x

    def log_prob(self, params, target):
        log_s = self.log_scale.clamp(min=-7.0).view(1, -1, 1, 1)
        z = (target - params.float()) * torch.exp(-log_s)
        lp = -0.5 * z.square() - log_s - 0.5 * math.log(2 * math.pi)
        return lp.flatten(1).sum(1) - target[0].numel() * LOG_256

    def mean(self, params):
        return params.float().clamp(0.0, 1.0)


class DiscretizedLogistic(Likelihood):
    """Exact log-probability of 8-bit pixels under a discretised logistic per sub-pixel."""

    params_per_channel = 2

    def __init__(self, channels: int) -> None:
        super().__init__()

    def prepare(self, x_u8, generator=None):
        x = self.to_input(to_unit(x_u8))  # bin centres in [-1, 1]
        return x, x

    def to_input(self, x01):
        return x01 * 2.0 - 1.0

    def log_prob(self, params, target):
        mu, log_s = params.float().chunk(2, dim=1)
        log_s = log_s.clamp(min=-7.0)
        return discretized_logistic_log_prob(target, mu, log_s).flatten(1).sum(1)

    def mean(self, params):
        mu, _ = params.float().chunk(2, dim=1)
        return ((mu.clamp(-1.0, 1.0) + 1.0) / 2.0)


def discretized_logistic_log_prob(x: torch.Tensor, mu: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    """log P(x) for x on the 256 bin centres in [-1, 1]; elementwise, numerically stable.

    The edge bins take the whole tails, so the 256 probabilities of a pixel sum to one.
    """
    centered = x - mu
    inv_s = torch.exp(-log_s)
    plus_in = inv_s * (centered + 1.0 / 255.0)
    min_in = inv_s * (centered - 1.0 / 255.0)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in), for the x = 0 edge
    log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - sigmoid(min_in)), for the x = 255 edge
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_s * centered
    # When the bin mass underflows, use the density at the centre times the bin width.
    log_pdf_mid = mid_in - log_s - 2.0 * F.softplus(mid_in) - math.log(127.5)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mid))


def make_likelihood(kind: str, channels: int, binarize: bool = True) -> Likelihood:
    """Build the likelihood named in `ModelConfig.likelihood`."""
    if kind == "bernoulli":
        return Bernoulli(channels, binarize=binarize)
    if kind == "gaussian":
        return Gaussian(channels)
    if kind == "logistic":
        return DiscretizedLogistic(channels)
    raise ValueError(f"unknown likelihood {kind!r}; choose bernoulli, gaussian or logistic")
