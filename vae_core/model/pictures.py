"""Image grids people look at: samples, reconstructions, interpolations.

Every grid is scaled up by `upscale` (a whole factor, nearest neighbour) to at least `MIN_WIDTH` pixels, so the
saved PNG of 8x8 digits is readable as it is and each source pixel stays a sharp square.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vae_core.model.tv import import_torchvision

if TYPE_CHECKING:
    from vae_core.model.vae import ConvVAE

MIN_WIDTH = 256  # pixels: an 8x8 digit grid of 8 columns is 82 wide before scaling
ROW_NAMES = ("original", "recon")  # the labels at the left of a reconstruction grid's rows, in turn
_LABEL_PT = 11  # font size of those labels, in pixels


def upscale(image: Image.Image, min_width: int = MIN_WIDTH) -> Image.Image:
    """`image` scaled by the smallest whole factor that makes it at least `min_width` wide (nearest neighbour,
    so pixel edges stay sharp); unchanged when it is wide enough already."""
    factor = math.ceil(min_width / max(image.width, 1))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def _tiles(images: torch.Tensor, nrow: int, padding: int) -> Image.Image:
    """Images (B, C, H, W) in [0, 1] -> one PIL image at their own size, tiled `nrow` per row on white."""
    make_grid = import_torchvision().utils.make_grid
    g = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=padding, pad_value=1.0)
    arr = (g.mul(255).round().byte().permute(1, 2, 0).numpy())
    if images.shape[1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(np.ascontiguousarray(arr))


def grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> Image.Image:
    """Images (B, C, H, W) in [0, 1] -> one PIL image tiled `nrow` per row, scaled up by `upscale`."""
    return upscale(_tiles(images, nrow, padding))


def _label_rows(image: Image.Image, names: list[str], row_height: int, pitch: int, top: int) -> Image.Image:
    """`image` with a white strip at its left naming each row: row r (`row_height` pixels tall, starting at
    `top + r * pitch`) is labelled names[r]."""
    font = ImageFont.load_default(size=max(6, min(_LABEL_PT, row_height)))
    measure = ImageDraw.Draw(image)
    strip = max(math.ceil(measure.textlength(n, font=font)) for n in names) + 6
    out = Image.new(image.mode, (image.width + strip, image.height), "white")
    out.paste(image, (strip, 0))
    draw = ImageDraw.Draw(out)
    for r, name in enumerate(names):
        draw.text((3, top + r * pitch + row_height / 2), name, fill="black", font=font, anchor="lm")
    return out


def reconstruction_grid(originals: torch.Tensor, recons: torch.Tensor, nrow: int = 8,
                        padding: int = 2) -> Image.Image:
    """Alternating rows of originals and their reconstructions, (B, C, H, W) each in [0, 1], every row
    labelled at the left ("original", then "recon" below it); at most 4 such pairs of rows."""
    n = min(len(originals), len(recons), nrow * 4)
    rows = []
    for i in range(0, n, nrow):
        rows += [originals[i : i + nrow], recons[i : i + nrow]]
    raw = _tiles(torch.cat(rows), nrow, padding)
    image = upscale(raw)
    scale = image.width // raw.width
    height = originals.shape[2]
    names = [ROW_NAMES[r % 2] for r in range(len(rows))]
    return _label_rows(image, names, height * scale, (height + padding) * scale, padding * scale)


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
