"""The convolutional VAE and its Gaussian posterior.

API in the manner of diffusers' `AutoencoderKL`: `encode(x) -> Posterior`, `decode(z)`, plus
`sample`, `reconstruct` and `interpolate` for the things people do with a trained VAE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vae_core.config import ModelConfig
from vae_core.likelihoods import Likelihood, make_likelihood

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "silu": nn.SiLU, "gelu": nn.GELU}
LOG_2PI = math.log(2 * math.pi)


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

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw z = mean + std * eps, (B, L); differentiable in mean and logvar.
        A point mass returns its mean and draws nothing."""
        if self.is_point:
            return self.mean
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
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
        """KL(q || N(0, I)), (B,) nats."""
        return self.kl_per_dim().sum(-1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) for z of shape (..., B, L), summed over L -> (..., B)."""
        if self.is_point:
            raise ValueError("an autoencoder's point-mass posterior has no density (model.kind=ae)")
        return (-0.5 * ((z - self.mean).square() / self.logvar.exp() + self.logvar + LOG_2PI)).sum(-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last dim."""
    return (-0.5 * (z.square() + LOG_2PI)).sum(-1)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels) if channels % min(32, channels) == 0 else 1, channels)
    return nn.Identity()


class ResBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))) at a fixed width and size, (B, C, H, W) -> same.

    The second conv starts at zero, so a fresh block is the identity and a deep stack starts as the
    shallow one it wraps: residual VAEs otherwise blow up early at the learning rates plain ones take.
    """

    def __init__(self, width: int, norm: str, act: type[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(_norm(norm, width), act(), nn.Conv2d(width, width, 3, padding=1),
                                  _norm(norm, width), act(), nn.Conv2d(width, width, 3, padding=1))
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvVAE(nn.Module):
    """Conv encoder/decoder VAE; each hidden stage halves (encoder) or doubles (decoder) H and W.

    Input is the likelihood's prepared image (B, C, H, W); `decode` returns likelihood parameters
    (B, P*C, H, W) (logits, means or logistic mean/log-scale).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c, h, w = config.input_shape
        act = _ACTIVATIONS[config.activation]
        widths = config.hidden_channels
        self.likelihood: Likelihood = make_likelihood(config.likelihood, c, binarize=config.binarize)

        def res(width: int) -> list[nn.Module]:
            return [ResBlock(width, config.norm, act) for _ in range(config.res_blocks)]

        enc: list[nn.Module] = []
        prev = c
        for width in widths:
            enc += [nn.Conv2d(prev, width, 4, stride=2, padding=1), _norm(config.norm, width), act(), *res(width)]
            prev = width
        self.encoder = nn.Sequential(*enc, nn.Flatten())

        factor = 2 ** len(widths)
        self._bottleneck = (widths[-1], h // factor, w // factor)
        flat = widths[-1] * (h // factor) * (w // factor)
        head_in = flat
        self.enc_dense: nn.Module = nn.Identity()
        self.dec_dense: nn.Module = nn.Identity()
        if config.hidden_dim:
            self.enc_dense = nn.Sequential(nn.Linear(flat, config.hidden_dim), act())
            head_in = config.hidden_dim
        # A VAE's head emits mean and log-variance; an autoencoder's only the code.
        self.to_posterior = nn.Linear(head_in, (1 if config.kind == "ae" else 2) * config.latent_dim)

        dec_in = config.hidden_dim or flat
        self.from_latent = nn.Sequential(nn.Linear(config.latent_dim, dec_in), act())
        if config.hidden_dim:
            self.dec_dense = nn.Sequential(nn.Linear(config.hidden_dim, flat), act())

        # Mirror of the encoder; the last transposed conv emits likelihood parameters directly
        # (an extra full-resolution conv would double the decoder's cost for little gain).
        out_ch = c * self.likelihood.params_per_channel
        rev = list(reversed(widths))
        dec: list[nn.Module] = []
        for width, nxt in zip(rev[:-1], rev[1:]):
            dec += [*res(width), nn.ConvTranspose2d(width, nxt, 4, stride=2, padding=1), _norm(config.norm, nxt), act()]
        self.decoder = nn.Sequential(*dec, *res(rev[-1]), nn.ConvTranspose2d(rev[-1], out_ch, 4, stride=2, padding=1))

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's last weight: where the adaptive adversarial weight compares gradient norms."""
        return self.decoder[-1].weight

    def _check_input(self, x: torch.Tensor) -> None:
        expected = self.config.input_shape
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> Posterior:
        """Prepared images (B, C, H, W) -> q(z|x) with (B, L) mean and logvar."""
        self._check_input(x)
        h = self.enc_dense(self.encoder(x))
        if self.config.kind == "ae":
            return Posterior.point(self.to_posterior(h).float())
        mean, logvar = self.to_posterior(h).float().chunk(2, dim=-1)
        # Clamp keeps exp(logvar) finite early in training without limiting a useful range.
        return Posterior(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, L) -> likelihood parameters (B, P*C, H, W)."""
        h = self.dec_dense(self.from_latent(z))
        return self.decoder(h.view(-1, *self._bottleneck))

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Posterior]:
        """Prepared images (B, C, H, W) -> (decoder output for one posterior sample, posterior)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior

    # --- the things users do with a trained VAE; images in and out are in [0, 1] or uint8 ---

    def prepare_eval(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images, or floats in [0, 1], -> the model's input scale on its device (no noise)."""
        images = images.to(next(self.parameters()).device, non_blocking=True)
        x01 = images.float() / 255.0 if images.dtype == torch.uint8 else images
        return self.likelihood.to_input(x01)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
        """n images from the prior, (n, C, H, W) in [0, 1]; `generator` lives on the model's device."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device) * temperature
        return self.likelihood.mean(self.decode(z))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W), uint8 or [0, 1] floats -> reconstructions (B, C, H, W) in [0, 1] via the mode."""
        return self.likelihood.mean(self.decode(self.encode(self.prepare_eval(images)).mode()))

    @torch.no_grad()
    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Decode the straight line between the posterior means of two images, (steps, C, H, W) in [0, 1]."""
        if steps < 2:
            raise ValueError(f"steps must be at least 2, got {steps}")
        pair = self.prepare_eval(torch.stack([x_a, x_b]))
        za, zb = self.encode(pair).mode()
        t = torch.linspace(0.0, 1.0, steps, device=za.device).unsqueeze(1)
        return self.likelihood.mean(self.decode((1 - t) * za + t * zb))
