"""Image grids people look at: samples, reconstructions, interpolations, written as PNG."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from vae_core.tv import import_torchvision


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


def to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
