"""Writes into an MLflow run that outlast a tracking server's outage: a queue that a sender thread empties in
order, each write tried again with backoff until the server takes it.

The writer (training's rank 0) never waits on the server: `put` returns at once. `flush` waits, up to a
stated bound, for the queue to empty, and returns what is still undelivered, so that the run's end can name
exactly what is missing. A write sent again after an answer got lost does not count twice: MLflow keeps one
copy of a metric point logged twice with the same key, step, timestamp and value, and tags and artifacts
are overwritten with the same content.

MLflow's own client retries a refused connection 7 times over about four minutes
(`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, `MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`), and waits 120 s for an answer
(`MLFLOW_HTTP_REQUEST_TIMEOUT`); the process that uses an outbox turns those down (`fail_fast`, unless the
environment sets them), so the queue's head is tried again every few seconds rather than behind minutes of
the client's own retries.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from flows.retries import is_transient
from vae_core.retry import backoff

log = logging.getLogger(__name__)

FLUSH_ENV = "VAE_TRACKING_FLUSH_S"  # how long the end of a run waits for the server to take the backlog
FLUSH_DEFAULT_S = 300.0
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0  # the sender's waits between tries of the queue's head
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@dataclass(frozen=True)
class Write:
    """One request to the run: `send()` makes it, `what` names it, `points` are its metric (key, step) pairs."""

    what: str
    send: Callable[[], None]
    points: tuple[tuple[str, int], ...] = ()


def fail_fast() -> None:
    """Turn MLflow's client retries and answer timeout in this process down to what `CLIENT_DEFAULTS` says,
    where the environment does not choose them: the outbox retries on its own."""
    for key, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def flush_timeout_s() -> float:
    """`$VAE_TRACKING_FLUSH_S`, else FLUSH_DEFAULT_S: the bound on waiting for a tracking server at a run's end."""
    return float(os.environ.get(FLUSH_ENV, FLUSH_DEFAULT_S))


class Outbox:
    """A FIFO of `Write`s and the daemon thread that delivers them one by one, in order, each once."""

    def __init__(self, name: str) -> None:
        fail_fast()
        self.name = name
        self._queue: deque[Write] = deque()
        self._dropped: list[Write] = []  # refused for good (a bad value, a deleted run): never retried
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def put(self, write: Write) -> None:
        """Queue `write` behind the others; the sender starts with the first one."""
        with self._cond:
            self._queue.append(write)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> list[Write]:
        """Wait until the queue is empty, at most `timeout_s`; returns the writes not delivered (queued or refused)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return [*self._dropped, *self._queue]

    def close(self) -> None:
        """Stop the sender (within one request); what is still queued is left undelivered: `flush` first."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                head = self._queue[0]
            delivered = self._deliver(head)
            if delivered is None:
                return
            with self._cond:
                self._queue.popleft()
                if not delivered:
                    self._dropped.append(head)
                self._cond.notify_all()

    def _deliver(self, write: Write) -> bool | None:
        """Send `write` until the server takes it (True), refuses it for good (False, with a warning) or the
        outbox is closed (None)."""
        waits = backoff(RETRY_FIRST_S, RETRY_MAX_S)
        failures = 0
        while True:
            try:
                write.send()
                if failures:
                    log.warning("tracking server back: %s delivered after %d failed tries", write.what, failures)
                return True
            except Exception as e:
                if not is_transient(e):
                    log.warning("tracking server refused %s: %s: %s", write.what, type(e).__name__, e)
                    return False
                if not failures:
                    log.warning("tracking server unreachable (%s); %s and what follows wait in the queue",
                                first_line(e), write.what)
                failures += 1
                if self._stop.wait(next(waits)):
                    return None


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for a one-line report."""
    text = str(exc).strip().split("\n")[0]
    return f"{type(exc).__name__}: {text[:300]}"


def describe(writes: Iterable[Write]) -> str:
    """What `writes` would have put in the run: metric keys with their steps, then the other writes by name,
    e.g. `train/loss steps 40, 50; epoch/loss step 3; artifact samples/epoch_0003.png`."""
    steps: dict[str, list[int]] = {}
    others: list[str] = []
    for w in writes:
        for key, step in w.points:
            steps.setdefault(key, []).append(step)
        if not w.points:
            others.append(w.what)
    parts = [f"{key} step{'s' if len(s) > 1 else ''} {', '.join(map(str, sorted(s)))}" for key, s in steps.items()]
    return "; ".join(parts + others)
