"""The function every Ray Train worker runs: load the data, train with DDP, checkpoint, log from rank 0.

Resumption contract: a checkpoint holds the weights, the optimiser and scheduler, the `TrainState`
(epochs done, steps done) and the metrics of its epoch. A restarted worker group continues from the
next epoch; rank 0 logs only steps and epochs that MLflow does not have yet, so the run gets every
epoch exactly once whatever the worker died in the middle of.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from vae_core import ConvVAE, VAEConfig
from vae_core.pictures import grid, reconstruction_grid
from vae_core.shards import DatasetInfo, open_dataset, read_split_u8
from vae_core.train import (
    TrainState,
    evaluate,
    iterate_batches,
    make_optimizer,
    make_scheduler,
    prepare_model,
    train_epoch,
    unwrap,
)
from vae_core.weights import load_model, save_model

WEIGHTS = "model.safetensors"
STATE = "trainer_state.pt"
METRICS = "metrics.json"


def _load_split(info: DatasetInfo, split: str) -> torch.Tensor:
    """A split as one uint8 tensor (N, H, W, C), read from the Parquet shards once per worker."""
    images, _, _ = read_split_u8(info, split)
    return torch.from_numpy(np.ascontiguousarray(images))


def _all_reduce_sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _validate(model: ConvVAE, val: torch.Tensor | None, spec: dict, rank: int, world: int, gen) -> dict[str, float]:
    """Validation -ELBO over the whole split, each rank scoring a disjoint slice, combined exactly."""
    cfg = spec["config"]["train"]
    if val is None or len(val) == 0:
        return {}
    batches = iterate_batches(val, cfg["batch_size"], shuffle=False, rank=rank, world_size=world)
    m = evaluate(model, batches, gen, iw_samples=cfg["eval_iw_samples"], amp=cfg["amp"])
    keys = [k for k in ("loss", "recon", "kl", "nll", "bits_per_dim") if k in m]
    sums = _all_reduce_sum([m[k] * m["images"] for k in keys] + [m["images"]], world)
    n = max(sums[-1], 1.0)
    return {f"val_{k}": v / n for k, v in zip(keys, sums[:-1])}


def _save_checkpoint(model: ConvVAE, opt, sched, state: TrainState, metrics: dict) -> str:
    d = tempfile.mkdtemp(prefix="vae-ckpt-")
    save_model(model, os.path.join(d, WEIGHTS))
    torch.save(
        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": state.epoch, "step": state.step},
        os.path.join(d, STATE),
    )
    with open(os.path.join(d, METRICS), "w") as f:
        json.dump(metrics, f)
    return d


def _restore(checkpoint, model: ConvVAE, opt, sched) -> tuple[TrainState, dict]:
    with checkpoint.as_directory() as d:
        model.load_state_dict(load_model(os.path.join(d, WEIGHTS)).state_dict())
        # weights_only: the trainer state is tensors and numbers; nothing arbitrary is unpickled.
        blob = torch.load(os.path.join(d, STATE), weights_only=True)
        with open(os.path.join(d, METRICS)) as f:
            metrics = json.load(f)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    return TrainState(epoch=blob["epoch"], step=blob["step"]), metrics


class _EpochLogger:
    """Rank 0's MLflow writer that never logs a step or an epoch twice (resumed runs re-run an epoch)."""

    def __init__(self, run_id: str, log_every: int):
        from flows.tracking import RunLogger

        self.run = RunLogger(run_id)
        self.log_every = log_every
        self.last_step = self.run.last_step("train/loss")
        self.last_epoch = self.run.last_step("epoch/loss")

    def on_step(self, metrics: dict[str, float], state: TrainState) -> None:
        if state.step % self.log_every == 0 and state.step > self.last_step:
            self.run.log_metrics({f"train/{k}": v for k, v in metrics.items()}, step=state.step)
            self.last_step = state.step

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch > self.last_epoch:
            self.run.log_metrics({f"epoch/{k}": v for k, v in metrics.items()}, step=epoch)
            self.last_epoch = epoch


def _log_pictures(run, model: ConvVAE, val: torch.Tensor | None, epoch: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    run.log_image(grid(model.sample(64, generator=gen)), f"samples/epoch_{epoch:04d}.png")
    if val is not None and len(val):
        batch = val[:32].permute(0, 3, 1, 2)
        device = next(model.parameters()).device
        recon = model.reconstruct(batch.to(device))
        run.log_image(reconstruction_grid(batch.float() / 255, recon.cpu()), f"reconstructions/epoch_{epoch:04d}.png")


def train_loop_per_worker(spec: dict[str, Any]) -> None:
    """Ray Train entry point. `spec` is plain data (see flows.train._worker_spec)."""
    config = VAEConfig.model_validate(spec["config"])
    tcfg = config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if spec.get("threads_per_worker"):
        torch.set_num_threads(spec["threads_per_worker"])

    info = open_dataset(spec["data_root"], spec["dataset"], spec["version"])
    train_x = _load_split(info, "train")
    val_x = _load_split(info, "val") if spec["has_val"] else None

    torch.manual_seed(tcfg.seed)  # same initial weights on every rank
    model = prepare_model(ConvVAE(config.model), tcfg, device)
    ddp_model: torch.nn.Module = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = make_optimizer(model, tcfg)
    steps_per_epoch = spec["steps_per_epoch"]
    sched = make_scheduler(opt, tcfg, steps_per_epoch * tcfg.epochs)
    gen = torch.Generator()
    state, last_metrics = TrainState(), {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state, last_metrics = _restore(checkpoint, model, opt, sched)

    logger = _EpochLogger(spec["run_id"], tcfg.log_every) if rank == 0 else None
    if logger is not None and last_metrics:
        logger.on_epoch(state.epoch, last_metrics)  # the crash may have come between checkpoint and log

    for epoch in range(state.epoch + 1, tcfg.epochs + 1):
        started = time.perf_counter()
        # Sampling noise (binarisation, eps) differs across ranks and epochs but is a function of
        # (seed, epoch, rank), so an epoch re-run after a restart draws exactly the same noise.
        gen.manual_seed(tcfg.seed * 1_000_003 + epoch * 1009 + rank)
        # Same permutation on every rank (same seed), each rank taking its own slice of it.
        shuffle = torch.Generator().manual_seed(tcfg.seed + epoch)
        batches = iterate_batches(train_x, tcfg.batch_size, generator=shuffle, rank=rank, world_size=world,
                                  drop_last=world > 1)
        m = train_epoch(ddp_model, opt, batches, state, tcfg, sched, gen,
                        on_step=logger.on_step if logger else None)
        images, seconds = _all_reduce_sum([m["images"], time.perf_counter() - started], world)
        metrics = {k: m[k] for k in ("loss", "recon", "kl", "elbo", "beta", "grad_norm", "lr")}
        metrics["images_per_s"] = images / (seconds / world)
        metrics.update(_validate(model, val_x, spec, rank, world, gen))
        if not all(math.isfinite(v) for v in metrics.values()):
            raise RuntimeError(f"non-finite metrics at epoch {epoch}: {metrics}")

        ckpt_dir = _save_checkpoint(model, opt, sched, state, metrics) if rank == 0 else None
        ray.train.report(
            {**metrics, "epoch": epoch},
            checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None,
        )
        if ckpt_dir:
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # report() has uploaded it (synchronously)
        if logger is not None:
            logger.on_epoch(epoch, metrics)
            if epoch % tcfg.image_every == 0 or epoch == tcfg.epochs:
                _log_pictures(logger.run, model, val_x, epoch, tcfg.seed)
