"""Training's progress, both ends: rank 0 writes every step and epoch into the MLflow run (`EpochLog`,
never the same one twice), and the driver reads them back as a log line per finished epoch, worker
failure and resumption (`Progress`), handed to a line writer (the Prefect run's log: `flows.run_log`).

Neither the workers' nor Ray's output reaches the driver (log_to_driver=False keeps Ray's own chatter
out), but rank 0 logs every epoch to the MLflow run and Ray's controller tags every failure there
(`flows.distributed.train_worker.FailureRecorder`), so the driver reads the run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flows.tracking import runs as tracking
from flows.tracking.outbox import first_line

if TYPE_CHECKING:
    import torch

    from vae_core.training.fit import Fit
    from vae_core.training.loop import TrainState


class EpochLog:
    """Rank 0's writer of a training run: steps as `train/*`, epochs as `epoch/*`, pictures as artifacts.

    It never logs a step or an epoch twice: a resumed run re-runs the epoch its predecessor died in. Its
    writes are queued (`RunLogger(buffered=True)`): training goes on while the tracking server is away, and
    the backlog is delivered, in order, once it is back. After the last epoch's pictures (the loop's last
    call) it waits for the backlog, at most `$VAE_TRACKING_FLUSH_S`, and the run's tag `tracking.undelivered`
    names what did not arrive.
    """

    def __init__(self, run_id: str, images_per_step: int):
        self.run = tracking.RunLogger(run_id, buffered=True)
        self.images_per_step = images_per_step  # over all ranks
        self.last_step = self.run.last_step("train/loss")
        self.last_epoch = self.run.last_step("epoch/loss")
        self._mark: tuple[int, float] | None = None  # (step, time) of the last logged step in this epoch
        self.planned = 0  # the run's last epoch, as the latest epoch planned it

    def on_step(self, metrics: dict[str, float], state: TrainState) -> None:
        """The means since the last logged step (every `log_every` steps and each epoch's last), with the images/s
        over all ranks since then."""
        out = {f"train/{k}": v for k, v in metrics.items()}
        now = time.perf_counter()
        if self._mark is not None:  # throughput over the steps since the last log
            out["train/images_per_s"] = (state.step - self._mark[0]) * self.images_per_step / (now - self._mark[1])
        self._mark = (state.step, now)
        if state.step > self.last_step:
            self.run.log_metrics(out, step=state.step)
            self.last_step = state.step

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """An epoch's metrics, unless the run has them already."""
        self._mark = None  # validation and checkpointing are not training throughput
        self.planned = round(metrics.get("planned_epochs", 0))
        if epoch > self.last_epoch:
            self.run.log_metrics({f"epoch/{k}": v for k, v in metrics.items()}, step=epoch)
            self.last_epoch = epoch

    def rank_weights(self, digests: list[str]) -> None:
        """Every rank's weights digest after an epoch, as the tag `ray.rank_weights`; recorded before the ranks
        are compared, so a run that failed the check shows which rank differed."""
        self.run.set_tags({"ray.rank_weights": ",".join(d[:16] for d in digests)})

    def resumed(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        """A worker group starting again from the checkpoint of `epoch`: that epoch's metrics (the crash may
        have come between checkpoint and log) and a point of `resumed_from_epoch`."""
        self.on_epoch(epoch, metrics)
        self.run.log_metrics({"resumed_from_epoch": epoch}, step=step)
        if epoch >= self.planned:  # no epoch left to train: no pictures call will wait for the backlog
            self.run.close()

    def pictures(self, fit: Fit, preview: torch.Tensor | None, epoch: int) -> None:
        """Samples, reconstructions of uint8 previews (P, H, W, C) and an interpolation, as artifacts."""
        originals = preview.permute(0, 3, 1, 2) if preview is not None else None
        for kind, image in fit.previews(originals).items():
            self.run.log_image(image, f"{kind}/epoch_{epoch:04d}.png")
        if epoch >= self.planned:  # the loop's last call: nothing follows that could wait for the backlog
            self.run.close()


class Progress:
    """While Ray trains, a line to `say` per finished epoch, worker failure and resumption.

    A daemon thread polls the run in MLflow: rank 0 logs every epoch there and Ray's controller tags
    every failure there, while neither's output reaches this process (log_to_driver=False keeps Ray's
    own chatter out). Time left: the epochs to go times the mean time between the epochs seen so far.
    """

    def __init__(self, run_id: str, epochs: int, say: Callable[[str], None], interval_s: float = 1.5):
        self.run, self.epochs, self.say, self.interval_s = tracking.RunLogger(run_id), epochs, say, interval_s
        self.shown: set[Any] = set()  # epochs, failure tags and resume points already printed
        self.seen_at: list[float] = []  # when each epoch was first seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="train-progress", daemon=True)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # fit() returns after rank 0 logged the last epoch: show it even if the thread missed it

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def _poll(self) -> None:
        try:
            self.poll()
        except Exception as e:  # a store briefly unreachable must neither end the lines nor hide fit's error
            self.say(f"(progress: {first_line(e)})")

    def _history(self, key: str) -> dict[int, float]:
        return {m.step: m.value for m in self.run.client.get_metric_history(self.run.run_id, key)}

    def _show(self, key: Any, line: str) -> None:
        if key not in self.shown:
            self.shown.add(key)
            self.say(line)

    def poll(self) -> None:
        """Print what the run got since the last poll."""
        tags = self.run.client.get_run(self.run.run_id).data.tags
        for key in sorted((k for k in tags if k.startswith("failure/")), key=lambda k: int(k.split("/")[1])):
            self._show(key, f"worker failure: {tags[key]}")
        for step, epoch in self._history("resumed_from_epoch").items():
            self._show(("resumed", step), f"resumed from the checkpoint of epoch {epoch:.0f}")
        loss = self._history("epoch/loss")
        if not loss.keys() - self.shown:
            return
        val, beta, speed, images, planned = (self._history(f"epoch/{k}") for k in
                                             ("val_loss", "beta", "images_per_s", "images", "planned_epochs"))
        for epoch in sorted(loss.keys() - self.shown):
            total = round(planned.get(epoch, self.epochs))  # a time budget re-plans the last epoch as it goes
            self.seen_at.append(time.monotonic())
            # Until a second epoch is seen, the first one's training time: what came before it is start-up.
            per_epoch = (self.seen_at[-1] - self.seen_at[0]) / (len(self.seen_at) - 1) if len(self.seen_at) > 1 \
                else images.get(epoch, 0) / max(speed.get(epoch, 0), 1e-9)
            self._show(epoch, f"epoch {epoch}/{total}: loss {loss[epoch]:.3f}"
                              + (f", val loss {val[epoch]:.3f}" if epoch in val else "")
                              + (f", beta {beta[epoch]:.3g}" if epoch in beta else "")
                              + f", {speed.get(epoch, 0):,.0f} images/s, "
                              f"{duration((total - epoch) * per_epoch)} left")


def duration(seconds: float) -> str:
    """`42 s`, `3 min 5 s`, `2 h 3 min`."""
    s = round(seconds)
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"
