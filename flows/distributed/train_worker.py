"""The function every Ray Train worker runs: load the data, train with DDP, checkpoint, log from rank 0;
and the callback Ray Train's controller runs, which records worker failures in the run.

The training setup and its epoch loop are `vae_core.training.fit.Fit` (`Fit.run`); this module opens the
rank's data, wraps the model in DDP and fills the loop's hooks with what Ray brings: the ranks' process
group, checkpoints reported to Ray Train, and rank 0's MLflow logging (`flows.tracking.progress.EpochLog`).

Resumption contract: a checkpoint is the `Fit` bundle (modules, optimizers, schedulers, epochs and
steps done) and the metrics of its epoch. A restarted worker group continues from the next epoch;
rank 0 logs only steps and epochs that MLflow does not have yet, so the run gets every epoch exactly
once whatever the worker died in the middle of. Each failure is a run tag `failure/N` and each resumption
a point of the metric `resumed_from_epoch`: what `vae train` shows while it runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import ray.train
import ray.train.torch
import torch

from vae_core.data.shards import DatasetInfo, images_u8, open_dataset, read_split_u8
from vae_core.evaluation.sample import stratified_rows
from vae_core.model.config import VAEConfig
from vae_core.training.fit import MODEL, Fit, weights_file
from vae_core.training.hooks import Hooks, Ranks
from vae_core.training.loop import iterate_batches

if TYPE_CHECKING:
    from flows.tracking.progress import EpochLog

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

    def __init__(self, shape: tuple[int, int, int], tensor: torch.Tensor | None = None, stream: Any = None,
                 preview: torch.Tensor | None = None):
        self.shape, self.tensor, self.stream = shape, tensor, stream
        # uint8 (P, H, W, C): what the reconstruction grids show; a stream fills it on its first batch.
        self.preview = preview

    @classmethod
    def open(cls, info: DatasetInfo, split: str, how: str, device: torch.device,
             device_data_mb: float = 0) -> "SplitSource":
        """On a GPU, a held split goes to the GPU when it fits `device_data_mb` (uint8: 47 MiB for MNIST's
        train split), so a batch is a gather on the device, not a copy from the host; else it is pinned,
        so copies run asynchronously."""
        if how == "stream":
            return cls(info.shape, stream=ray.train.get_dataset_shard(split))
        images, labels, ids = read_split_u8(info, split)  # once per worker, checksums verified
        tensor = torch.from_numpy(np.ascontiguousarray(images))
        # Every class, by a seeded sample: a split stored one class after another starts with one class only.
        preview = tensor[torch.from_numpy(stratified_rows(ids, labels, PREVIEW, seed=0))]
        if device.type == "cuda":
            tensor = tensor.to(device) if tensor.nbytes <= device_data_mb * 2**20 else tensor.pin_memory()
        return cls(info.shape, tensor=tensor, preview=preview)

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


def _hooks(fit: Fit, spec: WorkerSpec, ranks: Ranks, log: EpochLog | None,
           preview: Callable[[], torch.Tensor | None]) -> Hooks:
    """Ray Train's report (with rank 0's checkpoint) on every rank; rank 0 alone logs into the MLflow run."""
    report = partial(_report, fit, spec.run_id)
    if log is None:
        return Hooks(ranks=ranks, report=report)
    return Hooks(ranks=ranks, report=report, on_step=log.on_step, on_epoch=log.on_epoch,
                 on_rank_weights=log.rank_weights, pictures=lambda epoch: log.pictures(fit, preview(), epoch))


def _epoch_log(run_id: str, images_per_step: int) -> EpochLog:
    """Rank 0's MLflow writer; imported here, so the other ranks never load MLflow."""
    from flows.tracking.progress import EpochLog

    return EpochLog(run_id, images_per_step)


def _fit(spec: WorkerSpec, device: torch.device, rank: int,
         world: int) -> tuple[Fit, torch.nn.Module, dict[str, float]]:
    """(this rank's fit, the module its batches go through: DDP's wrapper when there are ranks to average
    over, the metrics of the checkpoint it resumed from, {} when it starts afresh)."""
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
    return fit, forward, last_metrics


def train_loop_per_worker(spec: WorkerSpec) -> None:
    """Ray Train entry point: this rank's data and model, then `Fit.run` with Ray's hooks."""
    tcfg = spec.config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(spec.threads_per_worker)

    info = open_dataset(spec.data_root, spec.dataset, spec.version)
    train = SplitSource.open(info, "train", spec.data["train"], device, tcfg.device_data_mb)
    val = SplitSource.open(info, "val", spec.data["val"], device, tcfg.device_data_mb) if "val" in spec.data else None
    fit, forward, last_metrics = _fit(spec, device, rank, world)

    ranks = Ranks(world, device)
    nodes = ranks.gather(ray.get_runtime_context().get_node_id())  # where the group was placed
    log = _epoch_log(spec.run_id, tcfg.batch_size * world) if rank == 0 else None
    if log is not None:  # which node each rank ran on: what a multi-node run is checked by
        log.run.set_tags({"ray.worker_nodes": ",".join(nodes), "ray.nodes": str(len(set(nodes)))})
        if last_metrics:
            log.resumed(fit.state.epoch, fit.state.step, last_metrics)

    bs = tcfg.batch_size
    fit.run(
        # In memory: the same permutation on every rank (same seed), each rank taking its own slice of it.
        lambda epoch: train.batches(bs, rank, world, shuffle_seed=fit.order(epoch).initial_seed(), drop_last=world > 1),
        (lambda: val.batches(bs, rank, world, shuffle_seed=None, drop_last=False)) if val is not None else None,
        _hooks(fit, spec, ranks, log, lambda: (val or train).preview),
        forward,
    )
