"""Decode a source's batches, in parallel worker processes when there are encoded files.

Already-decoded batches (IDX, NumPy, built-ins) are conformed in this process with vectorised NumPy.
Encoded batches are cut into chunks and decoded by a process pool, a bounded number of chunks ahead,
and handed back in source order, so output order never depends on worker timing.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

from vae_core.data.sources.base import RawBatch
from vae_core.data.sources.decode import ShapeSpec, conform_pixels, decode_many

CHUNK = 64  # files per task: big enough to amortise the pipe, small enough to balance workers

Decoded = np.ndarray | list[np.ndarray | str]


def resolve_workers(workers: int) -> int:
    """0 means one worker per CPU this process may use."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _context() -> mp.context.BaseContext:
    # fork where the platform has it: workers inherit the imported modules instantly, whereas a spawned
    # worker would re-import this package (and torch with it, ~2 s) before decoding a single file.
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def exit_with_parent(parent: int, every_s: float = 0.5) -> None:
    """Pool initializer: the worker ends itself once `parent` is gone. A worker forked just as the
    command was interrupted can miss the signal and would otherwise wait on its queue forever."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _decode_in_process(batch: RawBatch, spec: ShapeSpec) -> Decoded:
    if batch.pixels is not None:
        return conform_pixels(batch.pixels, spec)
    assert batch.encoded is not None
    return _merge(batch, decode_many(_pending(batch), spec))


def _pending(batch: RawBatch) -> list:
    """Encoded items still to decode: those without an error from reading."""
    errors = batch.errors or [None] * len(batch)
    return [d for d, e in zip(batch.encoded or [], errors) if e is None]


def _merge(batch: RawBatch, decoded: list[np.ndarray | str]) -> list[np.ndarray | str]:
    """Decoded pending items + read errors -> one result per item, in batch order."""
    errors = batch.errors or [None] * len(batch)
    it = iter(decoded)
    return [next(it) if e is None else e for e in errors]


def decode_stream(batches: Iterator[RawBatch], spec: ShapeSpec, workers: int = 0,
                  ahead: int = 4) -> Iterator[tuple[RawBatch, Decoded]]:
    """(batch, decoded) pairs in source order.

    decoded is uint8 (n, H, W, C) for pixel batches, else per item an array (H, W, C) or the reason it
    could not be decoded. workers=1 decodes here; more uses a process pool with `ahead` batches in flight.
    """
    n_workers = resolve_workers(workers)
    if n_workers == 1:
        for batch in batches:
            yield batch, _decode_in_process(batch, spec)
        return
    pool: ProcessPoolExecutor | None = None
    # (batch, futures of its chunks, or None when already decoded, the decoded pixels)
    inflight: deque[tuple[RawBatch, list[Future] | None, Decoded | None]] = deque()
    try:
        for batch in batches:
            if batch.encoded is None:
                inflight.append((batch, None, conform_pixels(batch.pixels, spec)))  # type: ignore[arg-type]
            else:
                if pool is None:
                    pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=_context(),
                                               initializer=exit_with_parent, initargs=(os.getpid(),))
                items = _pending(batch)
                futures = [pool.submit(decode_many, items[i : i + CHUNK], spec) for i in range(0, len(items), CHUNK)]
                inflight.append((batch, futures, None))
            while len(inflight) > ahead or (inflight and inflight[0][1] is None):
                yield _finish(*inflight.popleft())
        while inflight:
            yield _finish(*inflight.popleft())
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _finish(batch: RawBatch, futures: list[Future] | None, ready: Decoded | None) -> tuple[RawBatch, Decoded]:
    if futures is None:
        return batch, ready  # type: ignore[return-value]
    return batch, _merge(batch, [item for f in futures for item in f.result()])
