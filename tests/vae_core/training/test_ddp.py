"""Data parallelism as the Ray worker runs it (`Fit` + DistributedDataParallel + gloo), without Ray: two
processes on 127.0.0.1, each training on its own half of the data."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.ports import free_port
from vae_core import load_config
from vae_core.training.fit import Fit, steps_per_epoch, weights_digest
from vae_core.training.hooks import Ranks
from vae_core.training.loop import iterate_batches

# Noise-free inputs: no binarisation, and Bernoulli targets are the grey levels themselves (Gaussian and
# logistic would add dequantisation noise), so validation's KL term is a function of the weights and
# images alone. The reconstruction term still depends on the posterior sample, which is seeded per rank.
OVERRIDES = ["model.hidden_channels=[8,16]", "model.hidden_dim=32", "model.binarize=false",
             "model.likelihood=bernoulli", "train.batch_size=16", "train.num_threads=1"]
TRAIN, VAL = 128, 64  # images; each rank gets half, in whole batches


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 8, 8, 1) training and validation images, made here."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (TRAIN + VAL, 8, 8, 1), generator=g, dtype=torch.uint8)
    return images[:TRAIN], images[TRAIN:]


# VAE-GAN: a discriminator beside the VAE, both in every step, the adaptive weight from averaged gradients.
GAN = ["objective.adversarial.weight=0.5", "objective.adversarial.feature_weight=1.0",
       "objective.adversarial.start_step=2", "objective.adversarial.channels=[8,16]"]


def _fit(rank: int, extra: tuple[str, ...] = ()) -> Fit:
    cfg = load_config("digits", [*OVERRIDES, *extra])
    return Fit.create(cfg, steps_per_epoch(TRAIN, cfg.train.batch_size, 2), "cpu", rank)


def _half_alone(extra: tuple[str, ...] = ()) -> Fit:
    """One epoch in a single process on rank 0's half only: where each rank would end if the other's
    gradients were not averaged in."""
    train, _ = _data()
    alone = _fit(0, extra)
    alone.train_epoch(iterate_batches(train[: TRAIN // 2], 16, generator=alone.order(1)))
    return alone


def _spawn(rank_fn: Callable[[int, int, list[str]], None], tmp_path: Path) -> list[dict]:
    """Run `rank_fn(rank, port, outs)` on two processes; returns what each rank saved to its `outs` file."""
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    mp.spawn(rank_fn, args=(free_port(), outs), nprocs=2, join=True)
    return [torch.load(o, weights_only=True) for o in outs]


@contextlib.contextmanager
def _group(rank: int, port: int) -> Iterator[None]:
    """A two-rank gloo process group on 127.0.0.1 for the block. Both ranks tear it down together: a rank that
    leaves while the other's pair threads still talk to it aborts the other ("terminate called without an
    active exception")."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _rank(rank: int, port: int, outs: list[str]) -> None:
    """One DDP rank: an epoch on its half, then validation on its half combined as the epoch loop combines it
    (`Fit.validate`: sums weighted by images, all-reduced in float64)."""
    with _group(rank, port):
        train, val = _data()
        fit = _fit(rank)
        ddp = torch.nn.parallel.DistributedDataParallel(fit.model)
        fit.train_epoch(iterate_batches(train, 16, generator=fit.order(1), rank=rank, world_size=2, drop_last=True),
                        forward=ddp)
        mine = fit.evaluate(iterate_batches(val, 16, shuffle=False, rank=rank, world_size=2), iw_samples=0)
        combined = fit.validate(iterate_batches(val, 16, shuffle=False, rank=rank, world_size=2),
                                Ranks(2, torch.device("cpu")))
        whole = fit.evaluate(iterate_batches(val, 16, shuffle=False), iw_samples=0)  # this rank alone, every image
        torch.save({"weights": fit.model.state_dict(), "images": mine["images"], "combined": combined,
                    "whole": whole}, outs[rank])


def test_ranks_on_different_data_end_with_the_same_weights_and_validate_the_whole_split(tmp_path: Path):
    ranks = _spawn(_rank, tmp_path)
    alone = _half_alone()

    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert w0.keys() == w1.keys() == alone.model.state_dict().keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "the ranks' weights diverged: gradients were not averaged"
    assert not all(torch.equal(w0[k], v) for k, v in alone.model.state_dict().items()), \
        "the ranks ended where one half alone leads: the other half's gradients were not used"

    # Validation: the combined KL over the two halves is the whole split's, scored by one process with the
    # same weights. Each rank's batches are the whole split's batches (contiguous halves, whole batches),
    # so every batch's KL is bit for bit the same: only the float64 sums are added in another order.
    assert sum(r["images"] for r in ranks) == VAL
    for r in ranks:
        assert r["whole"]["images"] == VAL
        combined, whole = r["combined"]["val_kl"], r["whole"]["kl"]
        assert abs(combined - whole) <= 1e-12 * abs(whole), (r["combined"], r["whole"])


def _gan_rank(rank: int, port: int, outs: list[str]) -> None:
    """One DDP rank of a VAE-GAN: the VAE wrapped in DDP as the Ray worker wraps it, the discriminator not."""
    with _group(rank, port):
        train, _ = _data()
        fit = _fit(rank, tuple(GAN))
        ddp = torch.nn.parallel.DistributedDataParallel(fit.model)
        m = fit.train_epoch(iterate_batches(train, 16, generator=fit.order(1), rank=rank, world_size=2,
                                            drop_last=True), forward=ddp)
        torch.save({name: module.state_dict() for name, module in fit.modules.items()} | {"metrics": m}, outs[rank])


def test_a_vae_gan_trains_in_step_on_every_rank(tmp_path: Path):
    ranks = _spawn(_gan_rank, tmp_path)
    assert "adaptive_weight" in ranks[0]["metrics"] and "disc_loss" in ranks[0]["metrics"]
    # One adaptive weight for the whole batch: from the gradients averaged over ranks, so equal on both.
    assert ranks[0]["metrics"]["adaptive_weight"] == ranks[1]["metrics"]["adaptive_weight"]

    alone = _half_alone(tuple(GAN))
    for name in ("model", "discriminator"):
        w0, w1 = ranks[0][name], ranks[1][name]
        assert all(torch.equal(w0[k], w1[k]) for k in w0), f"the ranks' {name} weights diverged"
        assert not all(torch.equal(w0[k], v) for k, v in alone.modules[name].state_dict().items()), \
            f"the {name} ended where one half alone leads: the other rank's gradients were not used"


# Two ranks, one epoch done: rank 1's clock says its epoch took five times rank 0's (a slower node, or one that
# waited). Budget 60 s: the mean (30 s) leaves room for one more epoch; rank 0's own clock (10 s) would plan
# five more, rank 1's (50 s) none.
WALL_S = (10.0, 50.0)
BUDGET = ["train.time_budget_minutes=1", "train.epochs=10"]


def _budget_rank(rank: int, port: int, outs: list[str]) -> None:
    """One rank closing its first epoch as the epoch loop does, with its own measured times."""
    with _group(rank, port):
        fit = _fit(rank, tuple(BUDGET))
        fit.state.epoch = 1
        last, images, rate = fit.close_epoch(images=64.0, train_s=0.8 * WALL_S[rank], wall_s=WALL_S[rank],
                                             ranks=Ranks(2, torch.device("cpu")))
        horizon = fit.schedulers["model"].lr_lambdas[0].epochs  # the cosine runs down to the planned epoch
        torch.save({"last": last, "images": images, "rate": rate, "elapsed": fit.state.elapsed_s,
                    "horizon": horizon}, outs[rank])


def test_ranks_with_different_clocks_plan_the_same_last_epoch(tmp_path: Path):
    """Every rank counts the mean of the ranks' epoch times against the budget, so all stop at the same epoch
    (one going on alone would wait forever in DDP's next all-reduce)."""
    ranks = _spawn(_budget_rank, tmp_path)
    mean = sum(WALL_S) / 2
    for r in ranks:
        assert r["elapsed"] == mean and r["last"] == r["horizon"] == 2, ranks
        assert r["images"] == 128 and abs(r["rate"] - 128 / (0.8 * mean)) < 1e-9, ranks


def test_the_weights_digest_tells_one_ulp_apart_whatever_the_layout():
    """What the Ray worker compares across ranks after every epoch (`ray.rank_weights`)."""
    model = _fit(0).model
    other = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert weights_digest(other) == weights_digest(model)
    with torch.no_grad():
        weight = other.last_layer.view(-1)
        weight[0] = torch.nextafter(weight[0], torch.tensor(1.0))
    assert weights_digest(other) != weights_digest(model)
