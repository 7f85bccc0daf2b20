"""The VAE objective as pure functions: negative ELBO with beta, KL schedules and free bits."""

from __future__ import annotations

import math
from typing import TypedDict

import torch

from vae_core.model.config import TrainConfig


class LossTerms(TypedDict):
    """Scalars for one batch; `loss` is what is minimised, the rest are for logging."""

    loss: torch.Tensor
    recon: torch.Tensor  # mean -log p(x|z), nats per image
    kl: torch.Tensor  # mean KL(q(z|x) || p(z)), nats per image
    elbo: torch.Tensor  # mean ELBO (beta = 1, no free bits), nats per image
    beta: float


def beta_at(step: int, cfg: TrainConfig) -> float:
    """KL weight at an optimiser step: constant, linear warm-up, or cyclical (Fu et al. 2019). A warm-up given
    in epochs or as a fraction is counted in steps first (`TrainConfig.for_run`, as `Fit` does)."""
    if cfg.kl_warmup_epochs or cfg.kl_warmup_fraction:
        raise ValueError("the KL warm-up is in epochs or a fraction of the run: count it in steps first "
                         "(TrainConfig.for_run(steps_per_epoch, epochs))")
    if cfg.kl_schedule == "linear" and cfg.kl_warmup_steps > 0:
        return cfg.beta * min(1.0, step / cfg.kl_warmup_steps)
    if cfg.kl_schedule == "cyclical":
        phase = (step % cfg.kl_cycle_steps) / cfg.kl_cycle_steps
        return cfg.beta * min(1.0, phase / cfg.kl_cycle_ratio)
    return cfg.beta


def kl_shortfall(cfg: TrainConfig, steps_per_epoch: int, epochs: int) -> str | None:
    """One sentence when a run of `epochs` epochs of `steps_per_epoch` optimizer steps ends with β below
    `cfg.beta` (a warm-up longer than the run, or a cyclical schedule stopped mid-ramp): such a model was
    trained on a weaker KL term than the one it is scored by. None when β reached its target."""
    steps = steps_per_epoch * epochs
    run = cfg.for_run(steps_per_epoch, epochs)
    end = beta_at(steps, run)
    if cfg.beta == 0 or end >= cfg.beta * (1 - 1e-6):
        return None
    why = (f"its KL warm-up is {run.kl_warmup_steps:,} steps and the run {steps:,}" if cfg.kl_schedule == "linear"
           else f"its {cfg.kl_schedule} KL schedule stopped mid-ramp")
    return (f"training ended with beta {end:.3g}, below its target {cfg.beta:g} ({why}): the KL term was "
            "under-weighted; train longer or shorten the warm-up (train.kl_warmup_fraction)")


def free_bits_kl(kl_per_dim: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Sum over latent dims of max(free_bits, batch-mean KL of that dim) (Kingma et al. 2016).

    kl_per_dim: (B, L) -> scalar. With free_bits = 0 it is the plain batch-mean KL.
    """
    per_dim = kl_per_dim.mean(0)
    if free_bits > 0:
        per_dim = per_dim.clamp(min=free_bits)
    return per_dim.sum()


def negative_elbo(
    log_px: torch.Tensor, kl_per_dim: torch.Tensor, beta: float = 1.0, free_bits: float = 0.0
) -> LossTerms:
    """-ELBO = E[-log p(x|z)] + beta * KL, averaged over the batch.

    log_px: (B,) nats; kl_per_dim: (B, L) nats.
    """
    recon = -log_px.mean()
    kl = kl_per_dim.sum(-1).mean()
    penalised = free_bits_kl(kl_per_dim, free_bits)
    return LossTerms(loss=recon + beta * penalised, recon=recon, kl=kl, elbo=-(recon + kl), beta=beta)


def bits_per_dim(nll_nats: float, dims: int) -> float:
    """Nats per image -> bits per dimension."""
    return nll_nats / (dims * math.log(2.0))
