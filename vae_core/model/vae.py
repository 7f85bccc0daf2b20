"""The convolutional VAE, with one Gaussian latent layer or two (a top layer above it).

API in the manner of diffusers' `AutoencoderKL`: `encode(x) -> Posterior`, `decode(z)`, plus
`sample`, `reconstruct` and `interpolate` for the things people do with a trained VAE.
"""

from __future__ import annotations

import torch
from torch import nn

from vae_core.model.config import ModelConfig
from vae_core.model.likelihoods import Likelihood, make_likelihood
from vae_core.model.posterior import HierarchicalPosterior, Posterior, split_layers, standard_normal_log_prob

__all__ = ["ConvVAE", "Posterior", "HierarchicalPosterior", "ResBlock", "standard_normal_log_prob"]

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "silu": nn.SiLU, "gelu": nn.GELU}


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
        # A VAE's head emits mean and log-variance; an autoencoder's only the code. With a top layer the
        # head is the top layer's, and the bottom layer's comes from the features and the drawn z2.
        bottom, top = config.latent_dim, config.top_latent_dim
        self.to_posterior = nn.Linear(head_in, (1 if config.kind == "ae" else 2) * (top or bottom))
        if top:
            self.to_bottom = nn.Linear(head_in + top, 2 * bottom)
            width = max(2 * bottom, 64)
            self.prior_net = nn.Sequential(nn.Linear(top, width), act(), nn.Linear(width, 2 * bottom))
            # p(z1|z2) starts as N(0, I): a fresh two-layer model's prior is the one-layer model's.
            nn.init.zeros_(self.prior_net[-1].weight)
            nn.init.zeros_(self.prior_net[-1].bias)

        # The decoder sees the whole latent vector [z1 | z2]: a direct path from the top layer keeps it in use.
        dec_in = config.hidden_dim or flat
        self.from_latent = nn.Sequential(nn.Linear(self.latent_dim, dec_in), act())
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
        """Width of the latent vector z: `latent_dim`, plus `top_latent_dim` with a top layer ([z1 | z2])."""
        return self.config.latent_dim + self.config.top_latent_dim

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
        posterior = _gaussian(self.to_posterior(h))
        if not self.config.top_latent_dim:
            return posterior

        def bottom(z2: torch.Tensor) -> Posterior:  # q(z1 | x, z2); z2 may carry leading sample dims
            return _gaussian(self.to_bottom(torch.cat([h.expand(*z2.shape[:-1], h.shape[-1]), z2.to(h.dtype)], -1)))

        return HierarchicalPosterior.create(posterior, bottom, self.conditional_prior)

    def conditional_prior(self, z2: torch.Tensor) -> Posterior:
        """p(z1 | z2) for top-layer latents (..., B, L2) -> a Gaussian over (..., B, L1)."""
        return _gaussian(self.prior_net(z2))

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) for latent vectors (..., B, L) -> (..., B) nats."""
        top = self.config.top_latent_dim
        if not top:
            return standard_normal_log_prob(z)
        z1, z2 = split_layers(z, top)
        return standard_normal_log_prob(z2) + self.conditional_prior(z2).log_prob(z1)

    def prior_sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
                     ) -> torch.Tensor:
        """n latent vectors from the prior (ancestrally, top layer first), (n, L); `temperature` scales
        every layer's noise. `generator` lives on the model's device."""
        device = next(self.parameters()).device
        top = self.config.top_latent_dim
        z = torch.randn(n, top or self.latent_dim, generator=generator, device=device) * temperature
        if not top:
            return z
        p1 = self.conditional_prior(z)
        eps = torch.randn(p1.mean.shape, generator=generator, device=device)
        return torch.cat([p1.mean + temperature * p1.std * eps, z], -1)

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
        return self.likelihood.mean(self.decode(self.prior_sample(n, generator, temperature)))

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


def _gaussian(head: torch.Tensor) -> Posterior:
    """A head's output (..., 2L) -> the Gaussian with that mean and log-variance, in float32."""
    mean, logvar = head.float().chunk(2, dim=-1)
    # Clamp keeps exp(logvar) finite early in training without limiting a useful range.
    return Posterior(mean, logvar.clamp(-30.0, 20.0))
