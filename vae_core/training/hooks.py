"""What a runner plugs into the epoch loop (`Fit.run`): the ranks it trains with and what it does with
each step and epoch. The defaults are one process that keeps nothing: what a benchmark or a notebook runs.

    fit.run(train, val)                                                      # one process
    fit.run(train, val, Hooks(ranks=Ranks(world, device), report=..., on_epoch=...), forward=ddp)   # Ray

The Ray worker (`flows.distributed.train_worker`) fills them with Ray Train's report and checkpoint and
rank 0's MLflow logging; the loop itself never learns where its metrics go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from vae_core.training.loop import TrainState


@dataclass(frozen=True)
class Ranks:
    """The processes training together (a torch.distributed group when `world` > 1) and the two collectives
    the epoch loop needs from them. `device` is where sums are reduced: NCCL reduces CUDA tensors only."""

    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over ranks, in float64 (the same list on every rank)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, value: str) -> list[str]:
        """Every rank's `value`, in rank order (the same list on every rank)."""
        if self.world == 1:
            return [value]
        values: list[str | None] = [None] * self.world
        dist.all_gather_object(values, value)
        return [str(v) for v in values]


def _nothing(*_: object) -> None:
    """A hook that does nothing."""


@dataclass(frozen=True)
class Hooks:
    """Callables the epoch loop calls; each defaults to doing nothing.

    on_step(metrics, state): every `train.log_every` steps, the means since the last call.
    on_rank_weights(digests): after each epoch, every rank's weights digest, before they are compared (so a
        run that fails the comparison still shows which rank differed).
    report(epoch, metrics): after each epoch's checks pass: where a checkpoint is written.
    on_epoch(epoch, metrics): after `report`: logging.
    pictures(epoch): every `train.image_every` epochs and after the last one.
    """

    ranks: Ranks = field(default_factory=Ranks)
    on_step: Callable[[dict[str, float], TrainState], None] | None = None
    on_rank_weights: Callable[[list[str]], None] = _nothing
    report: Callable[[int, dict[str, float]], None] = _nothing
    on_epoch: Callable[[int, dict[str, float]], None] = _nothing
    pictures: Callable[[int], None] = _nothing
