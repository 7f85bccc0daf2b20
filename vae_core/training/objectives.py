"""What a training step minimises, from `config.objective`: one loop trains every variant.

The VAE's loss for a batch is

    recon_weight * E[-log p(x|z)] + beta * KL                        (the ELBO's terms; no KL for an AE)
      + perceptual.weight * dims * perceptual distance               (DFC-VAE, Hou et al. 2016)
      + adversarial.feature_weight * dims * discriminator-feature distance   (VAE-GAN, Larsen et al. 2016)
      + adversarial.weight * lambda * generator loss                 (lambda: the adaptive weight)

with `dims` = C*H*W: the feature distances are means over elements, so scaling by the pixel count puts
weight 1 on the same per-image scale as the likelihood, which is summed over pixels. The adaptive
weight is the latent-diffusion autoencoders' (Esser et al. 2021, Rombach et al. 2022):
lambda = |grad_w rec| / (|grad_w adv| + 1e-4) at the decoder's last weight w, clamped and detached, where
rec is everything but the adversarial term; under data parallelism the two gradients are averaged over
ranks first, so every rank uses the lambda that one process with the whole batch would.

The discriminator takes its own step after the VAE's, on the same images and the VAE's (detached)
outputs, with its own optimizer; while the VAE steps its parameters do not require gradients, and
while it steps nothing reaches the VAE. Its gradients are averaged over ranks by hand, not by a DDP
wrapper: it runs in both steps, and DDP expects one forward per backward.

The named objectives (`--objective ae`, `vae-gan`, ...) are settings of these terms, one YAML layer each in
`vae_core/presets/objectives/`: that file is an objective's one declaration. `model.config.list_objectives`
reads the folder for `TrainRequest.objective`'s help and `load_config`'s errors (not this module, which
would pull torch into the requests' import).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from vae_core.model.config import ObjectiveConfig
from vae_core.model.discriminator import PatchDiscriminator, discriminator_loss, generator_loss
from vae_core.model.losses import free_bits_kl
from vae_core.model.vae import ConvVAE, Posterior
from vae_core.training.device_metrics import FiniteGuard

_EPS = 1e-4


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The average of each tensor over the ranks of the process group (as they are without one)."""
    world = _world()
    if world == 1:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def adaptive_weight(rec: torch.Tensor, adv: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """|grad rec| / (|grad adv| + 1e-4) at `last_layer`, clamped to [0, max_weight] and detached (scalar).

    The gradients are averaged over ranks before their norms are taken. `rec` may not depend on the
    layer at all (a KL-only objective): then the weight is 0.
    """
    def grad(loss: torch.Tensor) -> torch.Tensor:
        # One call per loss: given several outputs, autograd.grad would return the gradient of their sum.
        g = torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)[0] \
            if loss.requires_grad else None
        return torch.zeros_like(last_layer) if g is None else g.detach()

    g_rec, g_adv = mean_over_ranks([grad(rec), grad(adv)])
    return (g_rec.norm() / (g_adv.norm() + _EPS)).clamp(0.0, max_weight).detach()


def sync_gradients(module: torch.nn.Module) -> None:
    """Average `module`'s gradients over ranks (what DDP's all-reduce does), in one collective."""
    params = [p for p in module.parameters() if p.grad is not None]
    if _world() > 1 and params:
        for p, g in zip(params, mean_over_ranks([p.grad for p in params])):
            p.grad.copy_(g)


@dataclass
class Objective:
    """The loss terms of `config` and, when it has one, the discriminator and its optimizer.

    `perceptual` is a frozen network (`vae_core.training.perceptual.PerceptualLoss`): fake, real -> scalar.
    """

    config: ObjectiveConfig
    perceptual: torch.nn.Module | None = None
    discriminator: PatchDiscriminator | None = None
    disc_optimizer: torch.optim.Optimizer | None = None
    _pending: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def adversarial_on(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.config.adversarial.start_step

    def vae_loss(self, vae: ConvVAE, x_u8: torch.Tensor, params: torch.Tensor, posterior: Posterior,
                 log_px: torch.Tensor, beta: float, free_bits: float, step: int,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The VAE's loss and every term of it, scalars. `objective` is what is minimised (β-weighted, with
        free bits and any perceptual or adversarial term); `loss` is the -ELBO at β = 1 (an autoencoder's: its
        reconstruction term), the number validation's `val_loss` is, so the two compare.

        x_u8: the uint8 batch (B, C, H, W) on the device; params: the decoder's output for one posterior
        sample, (B, P*C, H, W); log_px: (B,) nats.
        """
        cfg = self.config
        recon = -log_px.mean()
        terms: dict[str, torch.Tensor] = {"recon": recon}
        loss = cfg.recon_weight * recon  # kept in the graph at weight 0: DDP wants every parameter used
        terms["loss"] = recon.detach()
        if not posterior.is_point:
            kl_per_dim = posterior.kl_per_dim()
            terms["kl"] = kl_per_dim.sum(-1).mean()
            terms["loss"] = (recon + terms["kl"]).detach()
            loss = loss + beta * free_bits_kl(kl_per_dim, free_bits)
        needs_images = self.perceptual is not None or self.discriminator is not None
        if not needs_images:
            terms["objective"] = loss
            return terms
        dims = math.prod(x_u8.shape[1:])
        real = x_u8.float() / 255.0
        fake = vae.likelihood.mean(params.float())
        if self.perceptual is not None and cfg.perceptual.weight > 0:
            terms["perceptual"] = self.perceptual(fake, real)
            loss = loss + cfg.perceptual.weight * dims * terms["perceptual"]
        if self.adversarial_on(step):
            loss = self._adversarial(vae, real, fake, loss, dims, terms, generator)
        terms["objective"] = loss
        return terms

    def _adversarial(self, vae: ConvVAE, real: torch.Tensor, fake: torch.Tensor, rec: torch.Tensor, dims: int,
                     terms: dict[str, torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
        """Add the feature-matching and generator terms to `rec`; remember the fakes for the discriminator."""
        adv_cfg, disc = self.config.adversarial, self.discriminator
        assert disc is not None
        fakes = fake
        if adv_cfg.prior_fakes:  # Larsen et al.: the discriminator also judges decodes of the prior
            z = vae.prior_sample(fake.shape[0], generator)
            fakes = torch.cat([fake, vae.likelihood.mean(vae.decode(z).float())])
        disc.requires_grad_(False)  # the VAE's step never updates the discriminator
        logits, features = disc(fakes)
        if adv_cfg.feature_weight > 0:
            with torch.no_grad():
                _, real_features = disc(real)
            n = fake.shape[0]  # reconstructions only: a prior sample has no image to be similar to
            terms["feature"] = sum(((f[:n] - r).square().mean() for f, r in zip(features, real_features)),
                                   torch.zeros((), device=fake.device))
            rec = rec + adv_cfg.feature_weight * dims * terms["feature"]
        if adv_cfg.weight > 0:
            terms["adversarial"] = generator_loss(logits, adv_cfg.loss)
            if adv_cfg.adaptive_weight:
                terms["adaptive_weight"] = adaptive_weight(rec, terms["adversarial"], vae.last_layer,
                                                           adv_cfg.max_adaptive_weight)
                scale = adv_cfg.weight * terms["adaptive_weight"]
            else:
                scale = adv_cfg.weight * dims
            rec = rec + scale * terms["adversarial"]
        self._pending = (real, fakes.detach())
        return rec

    def discriminator_step(self, step: int, guard: FiniteGuard) -> dict[str, torch.Tensor]:
        """One update of the discriminator on the images of the VAE's last step, as device scalars; {} when
        it is off. A non-finite loss or gradient sets `guard`'s flag and the (armed, fused) optimizer skips
        the update, as the VAE's step does."""
        if self._pending is None or self.discriminator is None or self.disc_optimizer is None:
            return {}
        real, fakes = self._pending
        self._pending = None
        disc = self.discriminator.requires_grad_(True)
        disc.train()
        real_logits, _ = disc(real)
        fake_logits, _ = disc(fakes)
        loss = discriminator_loss(real_logits, fake_logits, self.config.adversarial.loss)
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(disc)
        # The averaged gradients, not only this rank's loss: a NaN on one rank reaches all of them, so
        # every rank skips the same steps.
        grad_norm = torch.nn.utils.clip_grad_norm_(disc.parameters(), float("inf"), foreach=True)
        guard.check(step, 1, loss, grad_norm)
        guard.before_step(self.disc_optimizer, 0)
        self.disc_optimizer.step()
        return {"disc_loss": loss.detach(), "logits_real": real_logits.detach().mean(),
                "logits_fake": fake_logits.detach().mean()}
