"""The function every Ray Train worker runs: load the data, train with DDP, checkpoint, log from rank 0;
and the callback Ray Train's controller runs, which records worker failures in the run.

The training setup itself is `vae_core.training.fit.Fit`; this module adds what Ray brings: the rank's data,
DDP, checkpoints reported to Ray Train, and rank 0's MLflow logging.

Resumption contract: a checkpoint is the `Fit` bundle (modules, optimizers, schedulers, epochs and
steps done) and the metrics of its epoch. A restarted worker group continues from the next epoch;
rank 0 logs only steps and epochs that MLflow does not have yet, so the run gets every epoch exactly
once whatever the worker died in the middle of. Each failure is a run tag `failure/N` and each resumption
a point of the metric `resumed_from_epoch`: what `vae train` shows while it runs.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from vae_core.model.config import VAEConfig
from vae_core.errors import NonFiniteLossError, TrainError
from vae_core.training.fit import MODEL, Fit, weights_digest, weights_file
from vae_core.data.shards import DatasetInfo, images_u8, open_dataset, read_split_u8
from vae_core.training.loop import TrainState, iterate_batches

WEIGHTS = weights_file(MODEL)  # what registration loads from the final checkpoint
PREVIEW = 32  # images in the reconstruction grids
DataPlan = dict[str, Literal["memory", "stream"]]


@dataclass(frozen=True)
class WorkerSpec:
    """What the driver hands every worker: typed, pickled by Ray as it is."""

    config: VAEConfig
    run_id: str
    data_root: str
    dataset: str
    version: str
    data: DataPlan  # split -> how it reaches the worker
    steps_per_epoch: int
    threads_per_worker: int


class SplitSource:
    """One split as this rank sees it: held in memory, or this rank's Ray Data stream of it.

    In memory, every rank holds the whole split and takes its slice of a permutation shared by all
    ranks. Streamed, `streaming_split(equal=True)` has already given each rank a disjoint part of
    equal size, so every rank takes the same number of steps (DDP needs that).
    """

    def __init__(self, shape: tuple[int, int, int], tensor: torch.Tensor | None = None, stream: Any = None):
        self.shape, self.tensor, self.stream = shape, tensor, stream
        # uint8 (P, H, W, C): what the reconstruction grids show; a stream fills it on its first batch.
        self.preview = tensor[:PREVIEW] if tensor is not None else None

    @classmethod
    def open(cls, info: DatasetInfo, split: str, how: str, device: torch.device,
             device_data_mb: float = 0) -> "SplitSource":
        """On a GPU, a held split goes to the GPU when it fits `device_data_mb` (uint8: 47 MiB for MNIST's
        train split), so a batch is a gather on the device, not a copy from the host; else it is pinned,
        so copies run asynchronously."""
        if how == "stream":
            return cls(info.shape, stream=ray.train.get_dataset_shard(split))
        images, _, _ = read_split_u8(info, split)  # once per worker, checksums verified
        tensor = torch.from_numpy(np.ascontiguousarray(images))
        if device.type == "cuda":
            tensor = tensor.to(device) if tensor.nbytes <= device_data_mb * 2**20 else tensor.pin_memory()
        return cls(info.shape, tensor=tensor)

    def batches(self, batch_size: int, rank: int, world: int, shuffle_seed: int | None,
                drop_last: bool) -> Iterator[torch.Tensor]:
        """uint8 batches (B, C, H, W) for one pass; `shuffle_seed=None` keeps the stored order."""
        if self.tensor is not None:
            gen = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
            yield from iterate_batches(self.tensor, batch_size, shuffle=gen is not None, generator=gen, rank=rank,
                                       world_size=world, drop_last=drop_last)
            return
        shuffle = {"local_shuffle_buffer_size": 8 * batch_size, "local_shuffle_seed": shuffle_seed + rank} \
            if shuffle_seed is not None else {}
        for table in self.stream.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=drop_last,
                                              prefetch_batches=2, **shuffle):
            # A copy: Arrow's buffer is read-only and the batch is small.
            x = torch.from_numpy(images_u8(table, self.shape).copy())
            if self.preview is None:
                self.preview = x[:PREVIEW]
            yield x.permute(0, 3, 1, 2)


def _all_reduce_sum(values: list[float], world: int, device: torch.device) -> list[float]:
    """Sums over ranks; the tensor lives on the training device (NCCL reduces CUDA tensors only)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def close_epoch(fit: Fit, images: float, train_s: float, wall_s: float, world: int,
                device: torch.device) -> tuple[int, float, float]:
    """Count an epoch against the time budget and plan the run's last epoch, the same on every rank.

    Each rank measured its own epoch (`wall_s`, of which `train_s` training); the sums over ranks are
    all-reduced and every rank adds the mean wall time to `elapsed_s`, so all plan from one clock: ranks that
    planned from their own could disagree on the last epoch, and the one going on would wait forever in DDP's
    next all-reduce. Returns (last epoch, images over all ranks, their images/s)."""
    images, seconds, wall = _all_reduce_sum([images, train_s, wall_s], world, device)
    fit.state.elapsed_s += wall / world
    return fit.plan(), images, images / (seconds / world)


def rank_digests(fit: Fit, world: int) -> list[str]:
    """The digest of every rank's VAE parameters (`weights_digest`), in rank order; the same list on every rank."""
    digest = weights_digest(fit.model)
    if world == 1:
        return [digest]
    digests: list[str | None] = [None] * world
    dist.all_gather_object(digests, digest)
    return [str(d) for d in digests]


def check_in_step(digests: list[str], epoch: int) -> None:
    """Raise a TrainError, naming the epoch, when the ranks' digests differ.

    DDP keeps the ranks' weights bit-identical (the same averaged gradients into the same optimizer); ranks
    whose weights differ each trained on its own part of the data alone, and the checkpoint would hold only
    rank 0's. Every rank raises (they share the list), so none waits for the others."""
    if len(set(digests)) > 1:
        shown = ", ".join(d[:16] for d in digests)
        raise TrainError(f"the workers' weights differ after epoch {epoch} (digests by rank: {shown}): their "
                         "gradients were not averaged, so each trained on its own part of the data; "
                         "rerun with workers=1")


def _validate(fit: Fit, val: SplitSource | None, world: int) -> dict[str, float]:
    """Validation -ELBO over the whole split, each rank scoring a disjoint slice, combined exactly."""
    if val is None:
        return {}
    m = fit.evaluate(val.batches(fit.config.train.batch_size, fit.rank, world, shuffle_seed=None, drop_last=False))
    keys = [k for k in ("loss", "recon", "kl", "nll", "bits_per_dim") if k in m]
    sums = _all_reduce_sum([m[k] * m["images"] for k in keys] + [m["images"]], world, fit.device)
    n = max(sums[-1], 1.0)
    return {f"val_{k}": v / n for k, v in zip(keys, sums[:-1])}


class _EpochLogger:
    """Rank 0's MLflow writer that never logs a step or an epoch twice (resumed runs re-run an epoch)."""

    def __init__(self, run_id: str, log_every: int, images_per_step: int):
        from flows.tracking.runs import RunLogger

        self.run = RunLogger(run_id)
        self.log_every = log_every
        self.images_per_step = images_per_step  # over all ranks
        self.last_step = self.run.last_step("train/loss")
        self.last_epoch = self.run.last_step("epoch/loss")
        self._mark: tuple[int, float] | None = None  # (step, time) of the last logged step in this epoch

    def on_step(self, metrics: dict[str, float], state: TrainState) -> None:
        if state.step % self.log_every:
            return
        out = {f"train/{k}": v for k, v in metrics.items()}
        now = time.perf_counter()
        if self._mark is not None:  # throughput over the steps since the last log
            out["train/images_per_s"] = (state.step - self._mark[0]) * self.images_per_step / (now - self._mark[1])
        self._mark = (state.step, now)
        if state.step > self.last_step:
            self.run.log_metrics(out, step=state.step)
            self.last_step = state.step

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self._mark = None  # validation and checkpointing are not training throughput
        if epoch > self.last_epoch:
            self.run.log_metrics({f"epoch/{k}": v for k, v in metrics.items()}, step=epoch)
            self.last_epoch = epoch

    def pictures(self, fit: Fit, preview: torch.Tensor | None, epoch: int) -> None:
        """Samples, reconstructions of uint8 previews (P, H, W, C) and an interpolation, as artifacts."""
        originals = preview.permute(0, 3, 1, 2) if preview is not None else None
        for kind, image in fit.previews(originals).items():
            self.run.log_image(image, f"{kind}/epoch_{epoch:04d}.png")


def checkpoint_staging(run_id: str) -> str:
    """The folder in this node's temp dir where rank 0 stages run `run_id`'s checkpoints before Ray Train
    uploads them. One per run, named by it, so that whoever outlives a killed worker can remove it: Ray
    runs the training function in a thread of its worker process, which a Ctrl-C or Ray's shutdown ends
    without unwinding that thread (its `finally` blocks never run)."""
    return os.path.join(tempfile.gettempdir(), f"vae-ckpt-{run_id}")


def _report(fit: Fit, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
    """Hand the epoch's metrics (and, from rank 0, its checkpoint) to Ray Train."""
    if fit.rank != 0:
        ray.train.report({**metrics, "epoch": epoch}, checkpoint=None)
        return
    staging = checkpoint_staging(run_id)
    shutil.rmtree(staging, ignore_errors=True)  # what a killed predecessor of this rank left
    try:
        fit.save(staging, metrics)
        ray.train.report({**metrics, "epoch": epoch}, checkpoint=ray.train.Checkpoint.from_directory(staging))
    finally:  # report() has uploaded it (synchronously), or failed
        shutil.rmtree(staging, ignore_errors=True)


class FailureRecorder(ray.train.UserCallback):
    """Tags the run `failure/N` = each failed rank's error, from Ray Train's controller.

    The controller is the one process that sees every worker error (a killed worker's included)
    before it restarts the group; worker output never reaches the driver (log_to_driver=False), and a
    recovered failure leaves no other trace, so the run keeps it and `vae train` prints it from there.
    """

    def __init__(self, run_id: str, tracking_uri: str):
        self.run_id, self.tracking_uri, self.failures = run_id, tracking_uri, 0

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        from flows.tracking.runs import RunLogger

        self.failures += 1
        errors = []
        for rank, e in sorted(worker_exceptions.items()):
            first_line = str(e).strip().split("\n")[0]
            errors.append(f"rank {rank}: {type(e).__name__}: {first_line}"[:500])
        try:
            RunLogger(self.run_id, self.tracking_uri).set_tags({f"failure/{self.failures}": "; ".join(errors)})
        except Exception:  # a record lost must not turn a failure Ray would recover from into a failed run
            logging.getLogger(__name__).warning("could not record worker failure %d", self.failures, exc_info=True)


def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every rank, in rank order (the same list on every rank): where the group was placed."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    nodes: list[str | None] = [None] * world
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def train_loop_per_worker(spec: WorkerSpec) -> None:
    """Ray Train entry point."""
    tcfg = spec.config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(spec.threads_per_worker)

    info = open_dataset(spec.data_root, spec.dataset, spec.version)
    train = SplitSource.open(info, "train", spec.data["train"], device, tcfg.device_data_mb)
    val = SplitSource.open(info, "val", spec.data["val"], device, tcfg.device_data_mb) if "val" in spec.data else None

    fit = Fit.create(spec.config, spec.steps_per_epoch, device, rank)
    forward: torch.nn.Module = fit.model
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            fit.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    last_metrics: dict[str, float] = {}
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            last_metrics = fit.restore(d)

    nodes = _worker_nodes(world)
    logger = _EpochLogger(spec.run_id, tcfg.log_every, tcfg.batch_size * world) if rank == 0 else None
    if logger is not None:  # which node each rank ran on: what a multi-node run is checked by
        logger.run.set_tags({"ray.worker_nodes": ",".join(nodes), "ray.nodes": str(len(set(nodes)))})
    if logger is not None and last_metrics:
        logger.on_epoch(fit.state.epoch, last_metrics)  # the crash may have come between checkpoint and log
        logger.run.log_metrics({"resumed_from_epoch": fit.state.epoch}, step=fit.state.step)

    last = fit.plan()  # train.epochs, or what fits train.time_budget_minutes (re-planned every epoch)
    while fit.state.epoch < last:
        epoch = fit.state.epoch + 1
        started = time.perf_counter()
        # In memory: the same permutation on every rank (same seed), each rank taking its own slice of it.
        batches = train.batches(tcfg.batch_size, rank, world, shuffle_seed=fit.order(epoch).initial_seed(),
                                drop_last=world > 1)
        m = fit.train_epoch(batches, forward, on_step=logger.on_step if logger else None)
        train_s = time.perf_counter() - started
        validation = _validate(fit, val, world)
        last, images, rate = close_epoch(fit, m["images"], train_s, time.perf_counter() - started, world, device)
        digests = rank_digests(fit, world)
        if logger is not None:  # recorded before the check: a run that failed it shows which rank differed
            logger.run.set_tags({"ray.rank_weights": ",".join(d[:16] for d in digests)})
        check_in_step(digests, epoch)
        metrics = {k: v for k, v in m.items() if k not in ("images", "images_per_s")}  # every loss term
        metrics["images_per_s"] = rate
        metrics["images"] = images
        metrics.update(validation)
        metrics.update({"elapsed_s": fit.state.elapsed_s, "planned_epochs": last})
        if not all(math.isfinite(v) for v in metrics.values()):
            raise NonFiniteLossError(f"non-finite metrics at epoch {epoch}: {metrics}")
        _report(fit, spec.run_id, epoch, metrics)
        if logger is not None:
            logger.on_epoch(epoch, metrics)
            if epoch % tcfg.image_every == 0 or epoch == last:
                logger.pictures(fit, (val or train).preview, epoch)
