"""Posteriors q(z|x) over a VAE's latent vector: a diagonal Gaussian, and a two-layer hierarchy.

Both expose what training, the likelihood bounds and the embeddings need: `sample` (one reparameterised
draw), `sample_n` (n draws at once, for importance weighting), `kl_per_dim` (the ELBO's KL, per latent
dimension), `log_prob` (the density of draws), and `mean` / `logvar` / `mode` (the embedding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dim."""
    return (-0.5 * (z.square() + LOG_2PI)).sum(-1)


def gaussian_kl_per_dim(q: "Posterior", p: "Posterior") -> torch.Tensor:
    """KL(q || p) between two diagonal Gaussians of the same shape (..., L), per dim -> (..., L) nats."""
    return 0.5 * (p.logvar - q.logvar + (q.logvar.exp() + (q.mean - p.mean).square()) / p.logvar.exp() - 1.0)


def split_layers(z: torch.Tensor, top_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A latent vector [z1 | z2] (..., L1 + L2) -> (z1 (..., L1), z2 (..., L2)), L2 = `top_dim`."""
    return z[..., :-top_dim], z[..., -top_dim:]


@dataclass
class Posterior:
    """Diagonal Gaussian q(z|x) = N(mean, exp(logvar)); tensors are (B, L).

    An autoencoder's posterior is a point mass: logvar is -inf (variance exactly 0), a sample is the
    mean, and it has no KL to the prior (infinite, so asking for it is an error, not a number).
    """

    mean: torch.Tensor
    logvar: torch.Tensor
    is_point: bool = False  # a flag, not a look at logvar: reading a GPU tensor would stall the step

    @classmethod
    def point(cls, mean: torch.Tensor) -> "Posterior":
        """The point mass at `mean` (B, L): an autoencoder's code."""
        return cls(mean, torch.full_like(mean, -math.inf), is_point=True)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised draw z = mean + std * eps, (B, L); differentiable in mean and logvar.
        `noise` (B, L), standard normal, is used as eps instead of drawing it (draws fixed per image).
        A point mass returns its mean and draws nothing."""
        if self.is_point:
            return self.mean
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype) \
            if noise is None else noise
        return self.mean + self.std * eps

    def sample_n(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n independent draws, (n, B, L)."""
        eps = torch.randn((n, *self.mean.shape), generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl_per_dim(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent dimension in closed form, (B, L) nats."""
        if self.is_point:
            raise ValueError("an autoencoder's point-mass posterior has no finite KL to the prior "
                             "(model.kind=ae has no KL term and no likelihood bound)")
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar)

    def kl(self) -> torch.Tensor:
        """KL(q || prior), (B,) nats."""
        return self.kl_per_dim().sum(-1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) for z of shape (..., B, L), summed over L -> (..., B)."""
        if self.is_point:
            raise ValueError("an autoencoder's point-mass posterior has no density (model.kind=ae)")
        return (-0.5 * ((z - self.mean).square() / self.logvar.exp() + self.logvar + LOG_2PI)).sum(-1)


Conditional = Callable[[torch.Tensor], Posterior]  # z2 (..., B, L2) -> a Gaussian over z1 (..., B, L1)


@dataclass
class HierarchicalPosterior(Posterior):
    """q(z2|x) q(z1|x, z2) over z = [z1 | z2], with the prior p(z2) = N(0, I), p(z1|z2) Gaussian.

    Inference is top-down (as in ladder VAEs): z2 is drawn first and the bottom layer's posterior is
    conditioned on it, as the prior is, so the KL of each layer is closed form given the drawn z2:
    KL = KL(q(z2|x) || N(0, I)) + KL(q(z1|x, z2) || p(z1|z2)). `kl_per_dim` is the single-sample ELBO's
    KL for the z2 of the latest `sample` (training draws, then asks). `mean` / `logvar` (the embedding)
    are the bottom layer's at z2 = its mean, next to the top layer's.
    """

    top: Posterior = field(default=None)  # type: ignore[assignment]
    bottom: Conditional = field(default=None, repr=False)  # type: ignore[assignment]
    prior: Conditional = field(default=None, repr=False)  # type: ignore[assignment]
    _drawn: tuple[Posterior, Posterior] | None = field(default=None, repr=False)

    @classmethod
    def create(cls, top: Posterior, bottom: Conditional, prior: Conditional) -> "HierarchicalPosterior":
        at_mean = bottom(top.mean)
        return cls(torch.cat([at_mean.mean, top.mean], -1), torch.cat([at_mean.logvar, top.logvar], -1),
                   top=top, bottom=bottom, prior=prior)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """[z1 | z2], top layer first; `noise` (B, L1 + L2) is [eps1 | eps2] (see `Posterior.sample`)."""
        eps1, eps2 = (None, None) if noise is None else split_layers(noise, self.top.mean.shape[-1])
        z2 = self.top.sample(generator, eps2)
        q1 = self.bottom(z2)
        self._drawn = (q1, self.prior(z2))
        return torch.cat([q1.sample(generator, eps1), z2], -1)

    def sample_n(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z2 = self.top.sample_n(n, generator)
        return torch.cat([self.bottom(z2).sample(generator), z2], -1)

    def kl_per_dim(self) -> torch.Tensor:
        """[KL(q(z1|x, z2) || p(z1|z2)) | KL(q(z2|x) || N(0, I))] for the latest draw's z2, (B, L1 + L2)."""
        if self._drawn is None:
            raise ValueError("a two-layer posterior's KL is that of a drawn z2: call sample() first")
        q1, p1 = self._drawn
        return torch.cat([gaussian_kl_per_dim(q1, p1), self.top.kl_per_dim()], -1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        z1, z2 = split_layers(z, self.top.mean.shape[-1])
        return self.top.log_prob(z2) + self.bottom(z2).log_prob(z1)
