"""The training setup and its one epoch loop, written once: what the Ray worker, `vae demo` and the benchmarks
all build and run.

    fit = Fit.create(config, steps_per_epoch(rows, config.train.batch_size), device)
    fit.run(lambda epoch: iterate_batches(images, batch, generator=fit.order(epoch)))   # every epoch planned
    fit.save(directory, metrics)          # every module, optimizer and scheduler, plus counters
    metrics = fit.restore(directory)      # the same bundle back, on the fit's device

`Fit` holds named modules, optimizers and schedulers: "model", and "discriminator" when the objective
is adversarial (its own optimizer, saved and restored beside the VAE's), plus the `Objective` that
turns them into losses: one trainer for every variant. Random
numbers are a function of (seed, epoch, rank) and live on the device they feed, so an epoch re-run
after a restart draws exactly the same noise, on a CPU or a GPU.

`Fit.run` is the epoch loop of every runner: train, validate, count the epoch against the time budget and
re-plan the last one, check that the ranks hold the same weights and that every metric is finite, then hand
the epoch to the runner's hooks (`vae_core.training.hooks`: Ray Train's report and checkpoint, MLflow).
Whatever acts on every epoch goes into `Fit._epoch`, once, for every runner: early stopping (a stop
beside the budget's re-planning), an EMA of the weights (validated and saved in place of the raw ones; its
per-step update goes into `loop.step`), a new epoch metric.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vae_core.errors import NonFiniteLossError, TrainError
from vae_core.model.config import TrainConfig, VAEConfig
from vae_core.model.discriminator import PatchDiscriminator
from vae_core.model.pictures import previews
from vae_core.model.vae import ConvVAE
from vae_core.model.weights import load_model, save_model
from vae_core.training.hooks import Hooks, Ranks
from vae_core.training.loop import TrainState, evaluate, train_epoch
from vae_core.training.objectives import Objective

MODEL = "model"  # the VAE's key in the bundle; its weights file is what registration reads
DISCRIMINATOR = "discriminator"
STATE = "trainer_state.pt"
METRICS = "metrics.json"


def steps_per_epoch(rows: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps in one epoch of `rows` images; ranks drop the last partial batch (DDP needs
    equal step counts), a single process keeps it."""
    per_rank = rows // world_size
    return max(1, per_rank // batch_size if world_size > 1 else math.ceil(per_rank / batch_size))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel for every parameter, on CPUs and GPUs alike): the fused kernels also take
    the non-finite guard's flag and skip the update on the device (`vae_core.training.device_metrics`)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


class LRSchedule:
    """The rate as a fraction of `lr` at optimizer step `step`: a cosine from 1 to `lr_floor` over `epochs`
    x `steps_per_epoch` steps, or 1, for LambdaLR. A time budget moves `epochs` as it measures them
    (`Fit.plan`); being a callable object of plain numbers, LambdaLR's state dict (and so the checkpoint)
    carries that horizon, and a resumed run picks it up."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int, epochs: int):
        self.cosine, self.floor = cfg.lr_schedule == "cosine", cfg.lr_floor
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs

    def __call__(self, step: int) -> float:
        if not self.cosine:
            return 1.0
        t = min(1.0, step / max(1, self.steps_per_epoch * self.epochs))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                   epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """An `LRSchedule` over `epochs` of `steps_per_epoch` optimizer steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(cfg, steps_per_epoch, epochs))


def planned_epochs(cfg: TrainConfig, done: int, elapsed_s: float) -> int:
    """The epoch a run ends at: `epochs`; with `time_budget_minutes`, after `done` epochs in `elapsed_s`
    seconds, the last one that at their mean duration still ends within the budget (never fewer than
    `done`, never more than `epochs`). Before any epoch is measured, `epochs`."""
    if cfg.time_budget_minutes is None or done == 0:
        return cfg.epochs
    per_epoch = elapsed_s / done
    left = cfg.time_budget_minutes * 60 - elapsed_s
    return max(done, min(cfg.epochs, done + int(left // per_epoch)))


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameters (names, dtypes, shapes and bytes, in registration order), whatever
    their device and memory format: equal digests mean bit-identical weights. Buffers are left out: DDP
    ranks each keep their own BatchNorm statistics."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        t = p.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def weights_file(name: str) -> str:
    """File name of module `name` inside a checkpoint directory."""
    return f"{name}.safetensors"


def check_in_step(digests: list[str], epoch: int) -> None:
    """Raise a TrainError, naming the epoch, when the ranks' weight digests (`weights_digest`) differ.

    DDP keeps the ranks' weights bit-identical (the same averaged gradients into the same optimizer); ranks
    whose weights differ each trained on its own part of the data alone, and the checkpoint would hold only
    rank 0's. Every rank raises (they share the list), so none waits for the others."""
    if len(set(digests)) > 1:
        shown = ", ".join(d[:16] for d in digests)
        raise TrainError(f"the workers' weights differ after epoch {epoch} (digests by rank: {shown}): their "
                         "gradients were not averaged, so each trained on its own part of the data; "
                         "rerun with workers=1")


@dataclass
class Fit:
    """A model being trained: modules, optimizers and schedulers by name, counters, device, rank.

    `modules["model"]` is the VAE; any other entry (a discriminator, say) is saved, restored and moved
    along with it, as are its optimizer and scheduler under the same name.
    """

    config: VAEConfig
    modules: dict[str, torch.nn.Module]
    device: torch.device
    rank: int = 0
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler] = field(default_factory=dict)
    state: TrainState = field(default_factory=TrainState)
    objective: Objective | None = None
    steps_per_epoch: int = 1
    #: `config.train` with the KL warm-up counted in steps for the epochs planned (`plan` keeps it current)
    schedule: TrainConfig = field(init=False)

    def __post_init__(self) -> None:
        self.schedule = self.config.train.for_run(self.steps_per_epoch, self.config.train.epochs)

    @classmethod
    def create(cls, config: VAEConfig, steps_per_epoch: int, device: str | torch.device = "cpu",
               rank: int = 0, perceptual_weights: str | None = None) -> Fit:
        """Model (same initial weights on every rank), AdamW and its schedule over all epochs; with an
        adversarial objective also the discriminator and its Adam; with a perceptual one its frozen network,
        read from `perceptual_weights` unless the config names a file (`vae_core.training.perceptual`).

        channels_last only on a GPU, where it speeds convolutions up.
        """
        device, tcfg, obj = torch.device(device), config.train, config.objective
        torch.manual_seed(tcfg.seed)
        modules: dict[str, torch.nn.Module] = {MODEL: ConvVAE(config.model)}
        if obj.adversarial.enabled:
            modules[DISCRIMINATOR] = PatchDiscriminator(config.model.channels, obj.adversarial.channels)
        for module in modules.values():  # Module.to works in place
            module.to(device)
            if tcfg.channels_last and device.type == "cuda":
                module.to(memory_format=torch.channels_last)
        if tcfg.num_threads and device.type == "cpu":
            torch.set_num_threads(tcfg.num_threads)
        opt = make_optimizer(modules[MODEL], config.train)
        optimizers = {MODEL: opt}
        schedulers = {MODEL: make_scheduler(opt, config.train, steps_per_epoch, config.train.epochs)}
        if DISCRIMINATOR in modules:
            optimizers[DISCRIMINATOR] = torch.optim.Adam(modules[DISCRIMINATOR].parameters(),
                                                         lr=obj.adversarial.lr, betas=obj.adversarial.betas,
                                                         fused=True)
        perceptual = None
        if obj.perceptual.weight > 0:
            from vae_core.training.perceptual import load_perceptual

            perceptual = load_perceptual(obj.perceptual, config.model.input_shape, perceptual_weights, device)
        objective = Objective(obj, perceptual, modules.get(DISCRIMINATOR),  # type: ignore[arg-type]
                              optimizers.get(DISCRIMINATOR))
        return cls(config, modules, device, rank, optimizers, schedulers, objective=objective,
                   steps_per_epoch=steps_per_epoch)

    @property
    def model(self) -> ConvVAE:
        return self.modules[MODEL]  # type: ignore[return-value]

    def plan(self) -> int:
        """The epoch this run ends at (`planned_epochs` from the counters); the learning rate's schedule now runs
        down to it, and a KL warm-up given as a fraction is a fraction of it."""
        last = planned_epochs(self.config.train, self.state.epoch, self.state.elapsed_s)
        self.schedulers[MODEL].lr_lambdas[0].epochs = last  # type: ignore[attr-defined]
        self.schedule = self.config.train.for_run(self.steps_per_epoch, last)
        return last

    def noise(self, epoch: int, stream: int = 0) -> torch.Generator:
        """Generator on the model's device for epoch `epoch`'s sampling (binarisation, eps);
        `stream` 1 is validation's, so scoring never shifts training's draws."""
        seed = self.config.train.seed * 1_000_003 + epoch * 1009 + self.rank + stream * 7919
        return torch.Generator(device=self.device).manual_seed(seed)

    def order(self, epoch: int) -> torch.Generator:
        """CPU generator for epoch `epoch`'s shuffle; the same on every rank, so ranks agree on the
        permutation and each takes its own slice of it."""
        return torch.Generator().manual_seed(self.config.train.seed + epoch)

    def train_epoch(
        self,
        batches: Iterable[torch.Tensor],
        forward: torch.nn.Module | None = None,
        on_step: Callable[[dict[str, float], TrainState], None] | None = None,
    ) -> dict[str, float]:
        """One pass over uint8 batches (B, C, H, W); `forward` is the DDP wrapper when there is one."""
        return train_epoch(forward or self.model, self.optimizers[MODEL], batches, self.state, self.schedule,
                           self.schedulers[MODEL], self.noise(self.state.epoch + 1), on_step, self.objective)

    def evaluate(self, batches: Iterable[torch.Tensor], iw_samples: int | None = None) -> dict[str, float]:
        """-ELBO terms (and IWAE NLL when `iw_samples`, default the config's) over uint8 batches."""
        k = self.config.train.eval_iw_samples if iw_samples is None else iw_samples
        return evaluate(self.model, batches, self.noise(self.state.epoch, stream=1), iw_samples=k,
                        amp=self.config.train.amp)

    def previews(self, originals_u8: torch.Tensor | None) -> dict[str, Image.Image]:
        """Samples, reconstructions and an interpolation of uint8 originals (P, C, H, W)."""
        gen = torch.Generator(device=self.device).manual_seed(self.config.train.seed)
        return previews(self.model, originals_u8, gen)

    # --- the epoch loop -----------------------------------------------------------------------

    def run(self, train: Callable[[int], Iterable[torch.Tensor]],
            val: Callable[[], Iterable[torch.Tensor]] | None = None, hooks: Hooks = Hooks(),
            forward: torch.nn.Module | None = None) -> dict[str, float]:
        """Train from the epoch after `state.epoch` to the last one planned (`plan`, re-planned after every
        epoch); returns the last epoch's metrics ({} when no epoch was left).

        train(epoch): that epoch's uint8 batches (B, C, H, W), this rank's part of them; val(): the validation
        split's, this rank's disjoint slice. `forward` is the DDP wrapper when there is one.

        Raises:
            NonFiniteLossError: a loss or gradient, or any epoch metric, is NaN or infinite.
            TrainError: the ranks' weights differ after an epoch.
        """
        metrics: dict[str, float] = {}
        last = self.plan()  # train.epochs, or what fits train.time_budget_minutes
        while self.state.epoch < last:
            metrics, last = self._epoch(train, val, hooks, forward)
        return metrics

    def _epoch(self, train: Callable[[int], Iterable[torch.Tensor]],
               val: Callable[[], Iterable[torch.Tensor]] | None, hooks: Hooks,
               forward: torch.nn.Module | None) -> tuple[dict[str, float], int]:
        """One epoch of `run`, checked and handed to the hooks; returns (its metrics, the last epoch planned)."""
        epoch = self.state.epoch + 1
        started = time.perf_counter()
        m = self.train_epoch(train(epoch), forward, hooks.on_step)
        train_s = time.perf_counter() - started
        validation = self.validate(val(), hooks.ranks) if val is not None else {}
        last, images, rate = self.close_epoch(m["images"], train_s, time.perf_counter() - started, hooks.ranks)
        digests = hooks.ranks.gather(weights_digest(self.model))
        hooks.on_rank_weights(digests)
        check_in_step(digests, epoch)
        metrics = {k: v for k, v in m.items() if k not in ("images", "images_per_s")}  # every loss term
        metrics["images_per_s"] = rate
        metrics["images"] = images
        metrics.update(validation)
        metrics.update({"elapsed_s": self.state.elapsed_s, "planned_epochs": last})
        if not all(math.isfinite(v) for v in metrics.values()):
            raise NonFiniteLossError(f"non-finite metrics at epoch {epoch}: {metrics}")
        hooks.report(epoch, metrics)
        hooks.on_epoch(epoch, metrics)
        if epoch % self.config.train.image_every == 0 or epoch == last:
            hooks.pictures(epoch)
        return metrics, last

    def validate(self, batches: Iterable[torch.Tensor], ranks: Ranks = Ranks()) -> dict[str, float]:
        """Validation -ELBO terms (`val_loss`, `val_recon`, `val_kl`; `val_nll` and `val_bits_per_dim` with
        IWAE) over the whole split: each rank scores its own disjoint slice of uint8 `batches` and the
        image-weighted sums are added over ranks, so the means are exactly the whole split's."""
        m = self.evaluate(batches)
        keys = [k for k in ("loss", "recon", "kl", "nll", "bits_per_dim") if k in m]
        sums = ranks.sum([m[k] * m["images"] for k in keys] + [m["images"]])
        n = max(sums[-1], 1.0)
        return {f"val_{k}": v / n for k, v in zip(keys, sums[:-1])}

    def close_epoch(self, images: float, train_s: float, wall_s: float,
                    ranks: Ranks = Ranks()) -> tuple[int, float, float]:
        """Count an epoch against the time budget and plan the run's last epoch, the same on every rank.

        Each rank measured its own epoch (`wall_s`, of which `train_s` training); the sums over ranks are
        added and every rank adds the mean wall time to `elapsed_s`, so all plan from one clock: ranks that
        planned from their own could disagree on the last epoch, and the one going on would wait forever in
        DDP's next all-reduce. Returns (last epoch, images over all ranks, their images/s)."""
        images, seconds, wall = ranks.sum([images, train_s, wall_s])
        self.state.elapsed_s += wall / ranks.world
        return self.plan(), images, images / (seconds / ranks.world)

    # --- the checkpoint bundle ----------------------------------------------------------------

    def save(self, directory: str, metrics: dict[str, float]) -> None:
        """Write every module (safetensors), optimizer, scheduler and the counters into `directory`."""
        os.makedirs(directory, exist_ok=True)
        for name, module in self.modules.items():
            path = os.path.join(directory, weights_file(name))
            if isinstance(module, ConvVAE):
                save_model(module, path)  # carries its config: registration rebuilds it from this
            else:
                save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, path)
        torch.save({
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "epoch": self.state.epoch,
            "step": self.state.step,
            "elapsed_s": self.state.elapsed_s,
        }, os.path.join(directory, STATE))
        with open(os.path.join(directory, METRICS), "w") as f:
            json.dump(metrics, f)

    def restore(self, directory: str) -> dict[str, float]:
        """Load a bundle written by `save` onto this fit's device; returns the metrics saved with it."""
        for name, module in self.modules.items():
            path = os.path.join(directory, weights_file(name))
            state = load_model(path).state_dict() if isinstance(module, ConvVAE) else load_file(path)
            module.load_state_dict(state)
        # weights_only: the trainer state is tensors and numbers; nothing arbitrary is unpickled.
        blob = torch.load(os.path.join(directory, STATE), weights_only=True, map_location=self.device)
        for k, opt in self.optimizers.items():
            opt.load_state_dict(blob["optimizers"][k])
        for k, sched in self.schedulers.items():
            sched.load_state_dict(blob["schedulers"][k])
        self.state = TrainState(epoch=blob["epoch"], step=blob["step"], elapsed_s=float(blob.get("elapsed_s", 0.0)))
        with open(os.path.join(directory, METRICS)) as f:
            return json.load(f)
