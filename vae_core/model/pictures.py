"""Image grids people look at: samples, reconstructions, interpolations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from vae_core.model.tv import import_torchvision

if TYPE_CHECKING:
    from vae_core.model.vae import ConvVAE


def grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> Image.Image:
    """Images (B, C, H, W) in [0, 1] -> one PIL image tiled `nrow` per row."""
    make_grid = import_torchvision().utils.make_grid
    g = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=padding, pad_value=1.0)
    arr = (g.mul(255).round().byte().permute(1, 2, 0).numpy())
    if images.shape[1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(np.ascontiguousarray(arr))


def reconstruction_grid(originals: torch.Tensor, recons: torch.Tensor, nrow: int = 8) -> Image.Image:
    """Alternating rows of originals and reconstructions, (B, C, H, W) each in [0, 1]."""
    n = min(len(originals), len(recons), nrow * 4)
    rows = []
    for i in range(0, n, nrow):
        rows += [originals[i : i + nrow], recons[i : i + nrow]]
    return grid(torch.cat(rows), nrow=nrow)


def previews(model: ConvVAE, originals_u8: torch.Tensor | None, generator: torch.Generator,
             samples: int = 64, steps: int = 10) -> dict[str, Image.Image]:
    """What a person looks at to judge a VAE: "samples" from the prior, "reconstructions" of uint8
    originals (P, C, H, W) and an "interpolation" between the first two of them.

    `generator` must live on the model's device.
    """
    out = {"samples": grid(model.sample(samples, generator=generator))}
    if originals_u8 is not None and len(originals_u8):
        recons = model.reconstruct(originals_u8).cpu()
        out["reconstructions"] = reconstruction_grid(originals_u8.cpu().float() / 255, recons)
    if originals_u8 is not None and len(originals_u8) >= 2:
        out["interpolation"] = grid(model.interpolate(originals_u8[0], originals_u8[1], steps), nrow=steps)
    return out
