"""The batched encoder: uint8 images -> posterior mean and log-variance.

One implementation for everything that turns images into latents: the registered model's `predict`,
evaluation and bulk encoding. Batches go to the model's device; on a GPU, `amp` runs the forward in
bf16 (the outputs are returned as float32 either way).
"""

from __future__ import annotations

import numpy as np
import torch

from vae_core.model.precision import autocast
from vae_core.model.vae import ConvVAE

DEFAULT_BATCH_SIZE = 256


@torch.no_grad()
def encode_images(model: ConvVAE, images: np.ndarray | torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE,
                  amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, C) -> (mean, logvar), float32 (N, L) each.

    Raises:
        ValueError: a batch size below 1, or images not of the model's (H, W, C) shape and uint8.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    c, h, w = model.config.input_shape
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (h, w, c):
        raise ValueError(f"expected uint8 images of shape (N, {h}, {w}, {c}), got {images.dtype} {tuple(images.shape)}")
    model.eval()
    device = next(model.parameters()).device
    mean, logvar = torch.empty(2, len(images), model.latent_dim)
    for start in range(0, len(images), batch_size):
        # NHWC -> NCHW by permuting strides: the batch stays channels_last in memory, no copy.
        x = model.prepare_eval(images[start : start + batch_size].permute(0, 3, 1, 2))
        with autocast(device, amp):
            posterior = model.encode(x)
        mean[start : start + len(x)] = posterior.mean.float().cpu()
        logvar[start : start + len(x)] = posterior.logvar.float().cpu()
    return mean.numpy(), logvar.numpy()
