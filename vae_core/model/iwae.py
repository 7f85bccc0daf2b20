"""Importance-weighted log-likelihood estimate (Burda et al. 2015).

log p(x) >= log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x). The bound tightens as k grows and
equals the ELBO at k = 1. Samples are drawn in chunks and combined with a running logsumexp, so memory
is bounded by `chunk` decoder passes, whatever k is.
"""

from __future__ import annotations

import math

import torch

from vae_core.model.vae import ConvVAE


@torch.no_grad()
def iwae_log_likelihood(
    model: ConvVAE,
    x: torch.Tensor,
    target: torch.Tensor,
    k: int = 1000,
    chunk: int = 100,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """IWAE estimate of log p(x) for prepared images x (B, C, H, W) and their targets -> (B,) nats."""
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be positive, got k={k}, chunk={chunk}")
    posterior = model.encode(x)
    b = x.shape[0]
    running = torch.full((b,), -math.inf, device=x.device)
    done = 0
    while done < k:
        n = min(chunk, k - done)
        z = posterior.sample_n(n, generator)  # (n, B, L)
        params = model.decode(z.reshape(n * b, -1))
        tgt = target.unsqueeze(0).expand(n, *target.shape).reshape(n * b, *target.shape[1:])
        log_px = model.likelihood.log_prob(params, tgt).view(n, b)
        log_w = log_px + model.prior_log_prob(z) - posterior.log_prob(z)  # (n, B)
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
        done += n
    return running - math.log(k)
