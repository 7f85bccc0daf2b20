"""`Fit.run`, the one epoch loop, in one process: no Ray, hooks recording what they are handed."""

from __future__ import annotations

import math

import pytest
import torch

from vae_core import load_config
from vae_core.errors import NonFiniteLossError, TrainError
from vae_core.training.fit import Fit, check_in_step, steps_per_epoch, weights_digest
from vae_core.training.hooks import Hooks, Ranks
from vae_core.training.loop import iterate_batches

TRAIN, VAL, BATCH = 64, 32, 16


def _fit(overrides: tuple[str, ...] = ()) -> Fit:
    cfg = load_config("digits", ["model.hidden_channels=[8,16]", "model.hidden_dim=32", f"train.batch_size={BATCH}",
                                 "train.epochs=2", "train.image_every=5", "train.log_every=2", *overrides])
    return Fit.create(cfg, steps_per_epoch(TRAIN, BATCH))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 8, 8, 1) training and validation images."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (TRAIN + VAL, 8, 8, 1), generator=g, dtype=torch.uint8)
    return images[:TRAIN], images[TRAIN:]


def _run(fit: Fit, hooks: Hooks = Hooks()) -> dict[str, float]:
    train, val = _data()
    return fit.run(lambda epoch: iterate_batches(train, BATCH, generator=fit.order(epoch)),
                   lambda: iterate_batches(val, BATCH, shuffle=False), hooks)


class Calls:
    """Every hook call, in order, as (hook, epoch or step, what it was handed)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def hooks(self) -> Hooks:
        return Hooks(on_step=lambda m, state: self.calls.append(("step", state.step, m)),
                     on_rank_weights=lambda digests: self.calls.append(("rank_weights", None, digests)),
                     report=lambda epoch, m: self.calls.append(("report", epoch, m)),
                     on_epoch=lambda epoch, m: self.calls.append(("epoch", epoch, m)),
                     pictures=lambda epoch: self.calls.append(("pictures", epoch, None)))

    def of(self, hook: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == hook]


def test_two_epochs_call_each_hook_once_per_epoch_in_order():
    fit, calls = _fit(), Calls()
    last = _run(fit, calls.hooks())

    assert fit.state.epoch == 2 and fit.state.step == 2 * TRAIN // BATCH
    assert [c[1] for c in calls.of("step")] == [2, 4, 6, 8]  # every log_every steps
    per_epoch = [c[0] for c in calls.calls if c[0] != "step"]
    # Pictures after the last epoch only (image_every=5); the digests come before the report, so a run whose
    # ranks differ has recorded them when the check raises.
    assert per_epoch == ["rank_weights", "report", "epoch", "rank_weights", "report", "epoch", "pictures"]
    assert [c[1] for c in calls.of("report")] == [c[1] for c in calls.of("epoch")] == [1, 2]
    assert calls.of("pictures") == [("pictures", 2, None)]
    assert calls.of("rank_weights")[-1][2] == [weights_digest(fit.model)]  # one process: its own digest

    reported = calls.of("report")[-1][2]
    assert reported is last and calls.of("epoch")[-1][2] is last  # one dict: what is checkpointed is what is logged
    for key in ("loss", "objective", "recon", "kl", "grad_norm", "beta", "lr", "val_loss", "val_recon", "val_kl"):
        assert math.isfinite(last[key]), key
    assert last["images"] == TRAIN and last["images_per_s"] > 0 and last["planned_epochs"] == 2
    assert last["elapsed_s"] == fit.state.elapsed_s > 0


def test_the_validation_metrics_are_the_whole_split_scored_by_evaluate():
    fit = _fit(("train.epochs=1",))
    last = _run(fit)
    _, val = _data()
    again = fit.evaluate(iterate_batches(val, BATCH, shuffle=False))  # the same weights and validation noise
    for k in ("loss", "recon", "kl"):
        assert last[f"val_{k}"] == pytest.approx(again[k], rel=1e-12), k


def test_a_non_finite_epoch_metric_raises_before_anything_is_reported():
    fit, calls = _fit(), Calls()

    def nan_when_scoring(module, inputs, output):  # training stays finite; validation does not
        return output if module.training else output * float("nan")

    fit.model.decoder.register_forward_hook(nan_when_scoring)
    with pytest.raises(NonFiniteLossError, match=r"non-finite metrics at epoch 1: .*'val_loss': nan"):
        _run(fit, calls.hooks())
    assert not calls.of("report") and not calls.of("epoch") and not calls.of("pictures")


class SecondRankDiverged(Ranks):
    """One process standing in for two ranks whose weights differ: rank 1's digest is all zeros."""

    def gather(self, value: str) -> list[str]:
        return [value, "0" * 64]


def test_ranks_whose_weights_differ_stop_the_run_after_recording_their_digests():
    fit, calls = _fit(), Calls()
    hooks = calls.hooks()
    with pytest.raises(TrainError, match=r"weights differ after epoch 1 \(digests by rank: \w{16}, 0{16}\)"):
        _run(fit, Hooks(ranks=SecondRankDiverged(), on_rank_weights=hooks.on_rank_weights, report=hooks.report))
    assert [c[0] for c in calls.calls] == ["rank_weights"]  # recorded, then nothing reported
    check_in_step([weights_digest(fit.model)] * 2, 1)  # equal digests pass


class Crash(Exception):
    """Stands in for a worker killed after its checkpoint."""


def test_a_run_resumed_from_an_epochs_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    whole = _fit()
    _run(whole)

    def checkpoint_then_crash(epoch: int, metrics: dict[str, float]) -> None:
        crashed.save(str(tmp_path), metrics)
        raise Crash(epoch)

    crashed = _fit()
    with pytest.raises(Crash):
        _run(crashed, Hooks(report=checkpoint_then_crash))
    resumed, calls = _fit(), Calls()
    assert resumed.restore(str(tmp_path))["planned_epochs"] == 2 and resumed.state.epoch == 1
    _run(resumed, calls.hooks())
    assert [c[1] for c in calls.of("epoch")] == [2]  # only the epochs left
    assert weights_digest(resumed.model) == weights_digest(whole.model)


def test_a_time_budget_ends_the_loop_at_the_planned_epoch():
    fit = _fit(("train.epochs=50", "train.time_budget_minutes=0.0001"))  # 6 ms: spent by the first epoch
    last = _run(fit)
    assert fit.state.epoch == 1 and last["planned_epochs"] == 1
    assert fit.schedulers["model"].lr_lambdas[0].epochs == 1  # the cosine ran down over that one epoch


def test_one_process_ranks_keep_what_they_are_given():
    ranks = Ranks()
    assert ranks.world == 1 and ranks.sum([1.5, 2.0]) == [1.5, 2.0] and ranks.gather("abc") == ["abc"]
