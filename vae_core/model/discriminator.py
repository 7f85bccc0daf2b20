"""The discriminator of the adversarial objective and its two losses.

A PatchGAN (Isola et al. 2017): stride-2 convolutions down to a grid of logits, one verdict per patch,
so it judges local texture and sharpness (what a blurry VAE lacks) rather than the whole image's
layout. No normalisation layer: under data parallelism each rank would keep its own batch statistics,
and the ranks' discriminators would drift apart.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AdversarialLoss = Literal["hinge", "non_saturating"]


class PatchDiscriminator(nn.Module):
    """Images (B, C, H, W) in [0, 1] -> patch logits (B, 1, H / 2^S, W / 2^S) and each stage's features."""

    def __init__(self, channels: int, widths: list[int]) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        prev = channels
        for width in widths:
            stages.append(nn.Sequential(nn.Conv2d(prev, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)))
            prev = width
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(prev, 1, 3, padding=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C, H, W) in [0, 1] -> (logits (B, 1, h, w), [features of each stage, (B, C_s, H_s, W_s)])."""
        h = images * 2.0 - 1.0  # centred inputs: the convolutions start unbiased
        features = []
        for stage in self.stages:
            h = stage(h)
            features.append(h)
        return self.head(h), features


def generator_loss(fake_logits: torch.Tensor, kind: AdversarialLoss) -> torch.Tensor:
    """What the VAE minimises to fool the discriminator; logits of its images, any shape -> scalar.

    hinge: -mean(D(fake)) (Lim & Ye 2017, as in the latent-diffusion autoencoders);
    non_saturating: mean softplus(-D(fake)) = -log sigmoid(D(fake)) (Goodfellow et al. 2014).
    """
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                       kind: AdversarialLoss) -> torch.Tensor:
    """What the discriminator minimises; logits of real and of generated images -> scalar.

    hinge: mean relu(1 - D(real)) + mean relu(1 + D(fake)); non_saturating: the binary cross-entropy
    mean softplus(-D(real)) + mean softplus(D(fake)). Halved, so a term is on the generator's scale.
    """
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())
