"""Training as plain functions: one step, one epoch, validation. A Ray worker calls these as they are.

Batches are uint8 image tensors (B, C, H, W); the likelihood turns them into inputs and targets on the
device, so the loader moves 1 byte per pixel and never decodes or normalises anything.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from vae_core.model.config import ObjectiveConfig, TrainConfig
from vae_core.model.iwae import iwae_log_likelihood
from vae_core.model.losses import beta_at, bits_per_dim, negative_elbo
from vae_core.model.precision import autocast
from vae_core.model.vae import ConvVAE
from vae_core.training.device_metrics import FiniteGuard, MetricSums, read_scalars
from vae_core.training.objectives import Objective


@dataclass
class TrainState:
    """Where training is: counters that checkpoints carry so a resumed run continues exactly."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps taken
    elapsed_s: float = 0.0  # seconds of training (and validation) so far: what a time budget counts


def iterate_batches(
    images: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Batches of an in-memory uint8 tensor (N, H, W, C) as (B, C, H, W) views in channels_last layout.

    With `world_size` > 1 each rank takes a disjoint slice of the (shuffled) order; all ranks must pass
    generators in the same state so they agree on the permutation. With `drop_last` (training under
    DDP, where ranks must take equal step counts) the slices are equal and the remainder is left out;
    without it (validation) they differ by at most one image and together cover every image.
    """
    n = images.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    # Images held on a GPU are gathered there: the order crosses over once per epoch, not once per batch.
    order = order.to(images.device, non_blocking=True)
    if drop_last:
        per_rank = n // world_size
        order = order[rank * per_rank : (rank + 1) * per_rank]
    else:
        order = order[rank * n // world_size : (rank + 1) * n // world_size]
    stop = (len(order) // batch_size) * batch_size if drop_last else len(order)
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        # NHWC -> NCHW as a view: the memory is already channels_last, no copy.
        yield images[idx].permute(0, 3, 1, 2)


def step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x_u8: torch.Tensor,
    state: TrainState,
    cfg: TrainConfig,
    guard: FiniteGuard,
    generator: torch.Generator | None = None,
    objective: Objective | None = None,
) -> dict[str, torch.Tensor]:
    """One optimiser step on a uint8 batch (B, C, H, W) (and the discriminator's, when the objective has
    one) that never waits for the device: returns every loss term and the gradient norm as device scalars.

    A non-finite loss or gradient norm sets `guard`'s flag, and `optimizer` (fused, armed with the flag)
    skips its update; the host finds out at its next read. `generator` (binarisation and the posterior
    sample) must live on the model's device. `model` may be a DistributedDataParallel wrapper: the forward
    goes through it (so gradients are all-reduced) and the likelihood is taken from the module inside.
    """
    device = next(model.parameters()).device
    objective = objective or Objective(ObjectiveConfig())
    model.train()
    vae: ConvVAE = getattr(model, "module", model)  # the ConvVAE inside a DDP wrapper
    x_u8 = x_u8.to(device, non_blocking=True)
    x, target = vae.likelihood.prepare(x_u8, generator=generator)
    beta = beta_at(state.step, cfg)
    with autocast(device, cfg.amp):
        params, posterior = model(x, generator=generator)
    log_px = vae.likelihood.log_prob(params, target)
    terms = objective.vae_loss(vae, x_u8, params, posterior, log_px, beta, cfg.free_bits, state.step, generator)
    optimizer.zero_grad(set_to_none=True)
    terms["objective"].backward()
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
    # Checked after backward: under DDP a NaN on one rank reaches every rank's gradients through the
    # all-reduce, so every rank skips the same steps and raises at the same read.
    guard.check(state.step, 0, terms["objective"], terms["grad_norm"])
    guard.before_step(optimizer, state.epoch + 1)
    optimizer.step()
    terms.update(objective.discriminator_step(state.step, guard))
    state.step += 1
    return terms


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x_u8: torch.Tensor,
    state: TrainState,
    cfg: TrainConfig,
    generator: torch.Generator | None = None,
    objective: Objective | None = None,
) -> dict[str, float]:
    """`step` on its own, read at once: every loss term, the gradient norm, beta and the learning rate.

    Raises:
        NonFiniteLossError: the loss or its gradient is NaN or infinite (the update was skipped).
    """
    device = next(model.parameters()).device
    guard = FiniteGuard(device)
    guard.arm(optimizer, objective.disc_optimizer if objective else None)
    beta = beta_at(state.step, cfg)
    try:
        terms = step(model, optimizer, x_u8, state, cfg, guard, generator, objective)
    finally:
        guard.disarm(optimizer, objective.disc_optimizer if objective else None)
    values = read_scalars([guard.first, *terms.values()])
    guard.raise_if_bad(values[:4], state.epoch + 1)
    out = dict(zip(terms, values[4:]))
    if "kl" in out:
        out["beta"] = beta
    out["lr"] = optimizer.param_groups[0]["lr"]
    return out


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[torch.Tensor],
    state: TrainState,
    cfg: TrainConfig,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[dict[str, float], TrainState], None] | None = None,
    objective: Objective | None = None,
) -> dict[str, float]:
    """Run one pass over `batches`; returns image-weighted means of the step metrics plus images/s.

    The host reads the device once every `cfg.log_every` steps and at the epoch's last step, when it calls
    `on_step` with the means over the steps since the last read (so a run shorter than `log_every` steps still
    has per-step metrics), and once at the end. A non-finite loss raises `NonFiniteLossError` at the read after
    it, naming its step; no update lands from that step on. A term that only some steps have (the adversarial
    ones, from their start step) is averaged over the steps that have it.
    """
    device = next(model.parameters()).device
    disc_opt = objective.disc_optimizer if objective else None
    guard = FiniteGuard(device)
    guard.arm(optimizer, disc_opt)
    epoch, window = MetricSums(), MetricSums()
    host: dict[str, float] = {}  # beta and lr: known on the host, averaged there
    seen = 0
    start = time.perf_counter()

    def read_window(beta: float, lr: float) -> None:
        """Read the steps since the last read, hand their means to `on_step`, and count them in the epoch."""
        nonlocal window
        values = read_scalars([guard.first, *window.tensors()])
        guard.raise_if_bad(values[:4], state.epoch + 1)
        if on_step is not None:
            means = window.means(values[4:])
            on_step({**means, **({"beta": beta} if "kl" in means else {}), "lr": lr}, state)
        epoch.merge(window)
        window = MetricSums()

    try:
        beta = lr = 0.0
        for x_u8 in batches:
            b = x_u8.shape[0]
            beta, lr = beta_at(state.step, cfg), optimizer.param_groups[0]["lr"]
            terms = step(model, optimizer, x_u8, state, cfg, guard, generator, objective)
            if scheduler is not None:
                scheduler.step()
            window.add(terms, b)
            seen += b
            if "kl" in terms:
                host["beta"] = host.get("beta", 0.0) + beta * b
            host["lr"] = host.get("lr", 0.0) + lr * b
            if state.step % cfg.log_every == 0:
                read_window(beta, lr)
        if window.images:  # the epoch's last steps since the last read
            read_window(beta, lr)
        values = read_scalars([guard.first, *epoch.tensors()])
    finally:
        guard.disarm(optimizer, disc_opt)
    guard.raise_if_bad(values[:4], state.epoch + 1)
    elapsed = time.perf_counter() - start
    state.epoch += 1
    out = epoch.means(values[4:])
    out.update({k: v / max(seen, 1) for k, v in host.items()})
    out["images_per_s"] = seen / elapsed if elapsed > 0 else 0.0
    out["images"] = float(seen)
    return out


@torch.no_grad()
def evaluate(
    model: ConvVAE,
    batches: Iterable[torch.Tensor],
    generator: torch.Generator | None = None,
    iw_samples: int = 0,
    amp: bool = False,
) -> dict[str, float]:
    """Mean -ELBO terms over `batches` (β = 1); with `iw_samples` > 0 also the IWAE NLL in nats and bits/dim.
    An autoencoder has neither: its `loss` is the reconstruction term alone."""
    model.eval()
    device = next(model.parameters()).device
    point = model.config.kind == "ae"
    sums = {"loss": 0.0, "recon": 0.0} if point else {"loss": 0.0, "recon": 0.0, "kl": 0.0}
    iw_samples = 0 if point else iw_samples
    nll_sum, seen = 0.0, 0
    for x_u8 in batches:
        x_u8 = x_u8.to(device, non_blocking=True)
        x, target = model.likelihood.prepare(x_u8, generator=generator)
        with autocast(device, amp):
            params, posterior = model(x, generator=generator)
        log_px = model.likelihood.log_prob(params, target)
        terms = {"loss": -log_px.mean(), "recon": -log_px.mean()} if point else \
            negative_elbo(log_px, posterior.kl_per_dim())
        b = x_u8.shape[0]
        seen += b
        for k in sums:
            sums[k] += terms[k].item() * b
        if iw_samples:
            nll_sum += -iwae_log_likelihood(model, x, target, k=iw_samples, generator=generator).sum().item()
    out = {k: v / max(seen, 1) for k, v in sums.items()}
    out["images"] = float(seen)
    if iw_samples:
        out["nll"] = nll_sum / max(seen, 1)
        out["bits_per_dim"] = bits_per_dim(out["nll"], math.prod(model.config.input_shape))
    return out
