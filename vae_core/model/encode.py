"""The batched encoder: uint8 images -> posterior mean and log-variance, and with `encode_and_score` each
image's outlier score.

One implementation for everything that turns images into latents: the registered model's `predict`,
evaluation and bulk encoding. Batches go to the model's device; on a GPU, `amp` runs the forward in
bf16 (the outputs are returned as float32 either way).

The score is the image's negative ELBO for one posterior sample, in nats: -log p(x|z) + KL(q(z|x) || p(z)),
scored on the likelihood's prepared input (binarised or dequantised, as in training and evaluation). Its
noise (binarisation or dequantisation, and the posterior draw) comes from a CPU generator seeded with a hash
of the image's bytes, so one image and one model give one number whatever batch, worker or device it is
scored in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from vae_core.model.precision import autocast
from vae_core.model.vae import ConvVAE

DEFAULT_BATCH_SIZE = 256


@dataclass(frozen=True)
class Encoded:
    """Latents and scores of N images, float32, rows in the input's order."""

    mean: np.ndarray  # (N, L) posterior mean of the image itself (no noise): the embedding
    logvar: np.ndarray  # (N, L)
    neg_elbo: np.ndarray | None  # (N,) -ELBO, nats; NaN for an autoencoder (a point posterior has no KL)
    recon_error: np.ndarray | None  # (N,) -log p(x|z) for the same sample, nats


@torch.no_grad()
def encode_images(model: ConvVAE, images: np.ndarray | torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE,
                  amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, C) -> (mean, logvar), float32 (N, L) each.

    Raises:
        ValueError: a batch size below 1, or images not of the model's (H, W, C) shape and uint8.
    """
    out = _encode(model, images, batch_size, amp, scored=False)
    return out.mean, out.logvar


@torch.no_grad()
def encode_and_score(model: ConvVAE, images: np.ndarray | torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE,
                     amp: bool = False) -> Encoded:
    """uint8 images (N, H, W, C) -> `Encoded`: what `encode_images` returns plus `neg_elbo` and `recon_error`.

    Costs a second encoder pass (of the prepared input) and a decoder pass per image. Raises as
    `encode_images` does.
    """
    return _encode(model, images, batch_size, amp, scored=True)


def _encode(model: ConvVAE, images: np.ndarray | torch.Tensor, batch_size: int, amp: bool, scored: bool) -> Encoded:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    c, h, w = model.config.input_shape
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (h, w, c):
        raise ValueError(f"expected uint8 images of shape (N, {h}, {w}, {c}), got {images.dtype} {tuple(images.shape)}")
    model.eval()
    device = next(model.parameters()).device
    mean, logvar = torch.empty(2, len(images), model.latent_dim)
    scores = torch.empty(2, len(images)) if scored else None
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        # NHWC -> NCHW by permuting strides: the batch stays channels_last in memory, no copy.
        x = model.prepare_eval(batch.permute(0, 3, 1, 2))
        with autocast(device, amp):
            posterior = model.encode(x)
            if scores is not None:
                scores[:, start : start + len(x)] = torch.stack(_score(model, batch)).float().cpu()
        mean[start : start + len(x)] = posterior.mean.float().cpu()
        logvar[start : start + len(x)] = posterior.logvar.float().cpu()
    return Encoded(mean.numpy(), logvar.numpy(), *(scores.numpy() if scores is not None else (None, None)))


def _score(model: ConvVAE, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, H, W, C) -> (-ELBO, -log p(x|z)), (B,) nats each, for one posterior sample per image
    drawn with that image's own noise (`_row_noise`)."""
    device = next(model.parameters()).device
    x, target, eps = (t.to(device, non_blocking=True) for t in _row_noise(model, images))
    posterior = model.encode(x)
    recon = -model.likelihood.log_prob(model.decode(posterior.sample(noise=eps)), target)
    kl = torch.full_like(recon, torch.nan) if posterior.is_point else posterior.kl()
    return recon + kl, recon


def _row_noise(model: ConvVAE, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images (B, H, W, C) -> (prepared input (B, C, H, W), target (B, C, H, W), eps (B, L)) on the CPU.

    Each image draws from a generator seeded with a hash of its own bytes (the likelihood's `prepare`, then
    the posterior's standard normal draw): a batch-wide generator would make an image's score depend on its
    neighbours. CPU generators also keep the draws the same on every device.
    """
    cpu = images.cpu()
    generator = torch.Generator()
    eps = torch.empty(len(cpu), model.latent_dim)
    inputs, targets = [], []
    for i, seed in enumerate(row_seeds(cpu.numpy())):
        generator.manual_seed(seed)
        x, target = model.likelihood.prepare(cpu[i : i + 1].permute(0, 3, 1, 2), generator=generator)
        inputs.append(x)
        targets.append(target)
        torch.randn(model.latent_dim, generator=generator, out=eps[i])
    return torch.cat(inputs), torch.cat(targets), eps


def row_seeds(images: np.ndarray) -> list[int]:
    """uint8 images (B, ...) -> one 63-bit seed per image from a hash (BLAKE2b) of its bytes."""
    return [int.from_bytes(hashlib.blake2b(np.ascontiguousarray(row).tobytes(), digest_size=8).digest(), "little")
            >> 1 for row in images]
