"""`vae train`'s progress: a line on stderr per finished epoch, worker failure and resumption.

Neither the workers' nor Ray's output reaches the driver (log_to_driver=False keeps Ray's own chatter
out), but rank 0 logs every epoch to the MLflow run and Ray's controller tags every failure there
(`flows.distributed.train_worker.FailureRecorder`), so the driver reads the run.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from flows.tracking import runs as tracking


class Progress:
    """While Ray trains, a line on stderr per finished epoch, worker failure and resumption.

    A daemon thread polls the run in MLflow: rank 0 logs every epoch there and Ray's controller tags
    every failure there, while neither's output reaches this process (log_to_driver=False keeps Ray's
    own chatter out). Time left: the epochs to go times the mean time between the epochs seen so far.
    """

    def __init__(self, run_id: str, epochs: int, interval_s: float = 1.5):
        self.run, self.epochs, self.interval_s = tracking.RunLogger(run_id), epochs, interval_s
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
            print(f"(progress: {type(e).__name__}: {e})", file=sys.stderr, flush=True)

    def _history(self, key: str) -> dict[int, float]:
        return {m.step: m.value for m in self.run.client.get_metric_history(self.run.run_id, key)}

    def _show(self, key: Any, line: str) -> None:
        if key not in self.shown:
            self.shown.add(key)
            print(line, file=sys.stderr, flush=True)

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
        val, speed, images, planned = (self._history(f"epoch/{k}")
                                       for k in ("val_loss", "images_per_s", "images", "planned_epochs"))
        for epoch in sorted(loss.keys() - self.shown):
            total = round(planned.get(epoch, self.epochs))  # a time budget re-plans the last epoch as it goes
            self.seen_at.append(time.monotonic())
            # Until a second epoch is seen, the first one's training time: what came before it is start-up.
            per_epoch = (self.seen_at[-1] - self.seen_at[0]) / (len(self.seen_at) - 1) if len(self.seen_at) > 1 \
                else images.get(epoch, 0) / max(speed.get(epoch, 0), 1e-9)
            self._show(epoch, f"epoch {epoch}/{total}: loss {loss[epoch]:.3f}"
                              + (f", val loss {val[epoch]:.3f}" if epoch in val else "")
                              + f", {speed.get(epoch, 0):,.0f} images/s, "
                              f"{_duration((total - epoch) * per_epoch)} left")


def _duration(seconds: float) -> str:
    """`42 s`, `3 min 5 s`, `2 h 3 min`."""
    s = round(seconds)
    return f"{s // 3600} h {s % 3600 // 60} min" if s >= 3600 else f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"
