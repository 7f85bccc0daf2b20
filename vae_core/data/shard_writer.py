"""One split's rows -> fixed-size zstd Parquet shards in a local staging folder, hashing the rows as
they pass (the hashes become part of the dataset version) and summing their pixels for the channel
statistics.
"""

from __future__ import annotations

import hashlib
import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vae_core.data.shards import ShardInfo, SplitInfo, build_table, row_group_rows, sha256_hex, writer_options

_STATS_CHUNK = 512  # images per chunk of the stats pass: small enough to stay in cache


@dataclass
class Gather:
    """Rows `sel` of `base` (all of it when sel is None), copied only on the writer thread.

    Selecting a split's rows out of a batch is a copy of most of its pixels; deferring it to the writer
    thread (NumPy releases the GIL while copying) keeps it off the thread that hashes and deduplicates.
    """

    base: np.ndarray
    sel: np.ndarray | None = None

    def __getitem__(self, s: slice) -> "Gather":
        return Gather(self.base[s]) if self.sel is None else Gather(self.base, self.sel[s])

    def array(self) -> np.ndarray:
        return self.base if self.sel is None else self.base[self.sel]


class SplitWriter:
    """One split's rows -> fixed-size zstd Parquet shards in staging, plus the split's content hash
    and pixel sums.

    The main thread only buffers rows and cuts them into row groups; hashing, statistics and Parquet
    encoding run on the writer thread, where NumPy, hashlib and Arrow release the GIL, so on a
    multi-core machine they overlap with decoding and deduplicating the next batch. Every split
    shares one writer thread, which runs jobs in submission order.
    """

    def __init__(self, split: str, staging: Path, row_bytes: int, channels: int, rows_per_shard: int,
                 writer: ThreadPoolExecutor):
        self.split, self.staging, self.writer = split, staging, writer
        self.rows_per_shard = rows_per_shard
        self.group_rows = min(rows_per_shard, row_group_rows(row_bytes))
        self.rows = 0  # rows handed over so far
        self.in_shard = 0  # rows of the current shard already cut into row groups (main thread)
        self.buf: list[tuple[list[str], Gather, np.ndarray, list[str], list[bytes]]] = []
        self.buffered = 0
        self.jobs: list[Future[None]] = []
        # Writer-thread state.
        self.shards: list[ShardInfo] = []
        self.sink: pa.BufferOutputStream | None = None
        self.pq_writer: pq.ParquetWriter | None = None
        self.shard_rows = 0
        self.hashers = {k: hashlib.sha256() for k in ("id", "image", "label", "source")}
        self.sum = np.zeros(channels, dtype=np.uint64)
        self.sumsq = np.zeros(channels, dtype=np.uint64)

    def append(self, ids: list[str], images: Gather, labels: np.ndarray, sources: list[str],
               digests: list[bytes]) -> None:
        """images: m rows of uint8 (H, W, C); labels int32 (m,), -1 for none; digests: SHA-256 per image."""
        self.buf.append((ids, images, labels, sources, digests))
        self.buffered += len(ids)
        self.rows += len(ids)
        while self.buffered >= self._next_cut():
            self._cut(self._next_cut())

    def _next_cut(self) -> int:
        return min(self.group_rows, self.rows_per_shard - self.in_shard)

    def _cut(self, n: int) -> None:
        """Hand the first n buffered rows to the writer thread as one row group."""
        parts = []  # slices of buffered (ids, images, labels, sources, digests), in row order
        need = n
        while need:
            entry = self.buf[0]
            take = min(need, len(entry[0]))
            parts.append(tuple(col[:take] for col in entry))
            if take == len(entry[0]):
                self.buf.pop(0)
            else:
                self.buf[0] = tuple(col[take:] for col in entry)  # type: ignore[assignment]
            need -= take
        self.buffered -= n
        self.in_shard += n
        end = self.in_shard == self.rows_per_shard
        if end:
            self.in_shard = 0
        ids, images, labels, sources, digests = zip(*parts)
        flat = itertools.chain.from_iterable
        self.jobs.append(self.writer.submit(self._write, [*flat(ids)], images, labels, [*flat(sources)],
                                            [*flat(digests)], end))

    def _write(self, ids: list[str], image_parts: tuple[Gather, ...], label_parts: tuple[np.ndarray, ...],
               sources: list[str], digests: list[bytes], end: bool) -> None:
        """Writer thread: hash, sum and encode one row group; close the shard when it is full."""
        parts = [p.array() for p in image_parts]
        images = np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts))
        labels = label_parts[0] if len(label_parts) == 1 else np.concatenate(label_parts)
        # Each column is hashed as its own stream, so the hash does not depend on where batches or
        # row groups were cut, only on the rows and their order.
        self.hashers["id"].update("\0".join(ids).encode() + b"\0")
        self.hashers["image"].update(b"".join(digests))  # the rows' SHA-256s commit to every pixel
        self.hashers["label"].update(labels.astype("<i4").tobytes())
        self.hashers["source"].update("\0".join(sources).encode() + b"\0")
        self._stats(images)
        table = build_table(ids, images, labels, sources)
        if self.pq_writer is None:
            self.sink = pa.BufferOutputStream()
            self.pq_writer = pq.ParquetWriter(self.sink, table.schema, **writer_options())
        self.pq_writer.write_table(table, row_group_size=len(ids))
        self.shard_rows += len(ids)
        if end:
            self._close_shard()

    def _stats(self, images: np.ndarray) -> None:
        c = images.shape[3]
        for start in range(0, len(images), _STATS_CHUNK):
            # Exact integer sums. Not BLAS: its threads spin, and on a busy machine a Gram matrix
            # product here was measured 30x slower than these plain loops.
            v = images[start : start + _STATS_CHUNK].reshape(-1, c)
            self.sum += v.sum(axis=0, dtype=np.uint64)
            self.sumsq += np.square(v, dtype=np.uint16).sum(axis=0, dtype=np.uint64)  # 255**2 fits 16 bits

    def _close_shard(self) -> None:
        assert self.pq_writer is not None and self.sink is not None
        self.pq_writer.close()
        data = self.sink.getvalue()
        rel = f"{self.split}/part-{len(self.shards):05d}.parquet"
        path = self.staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.shards.append(ShardInfo(path=rel, rows=self.shard_rows, bytes=len(data), sha256=sha256_hex(data)))
        self.pq_writer, self.sink, self.shard_rows = None, None, 0

    def close(self) -> SplitInfo:
        """Write what is left and wait for the writer; re-raises the writer thread's errors."""
        if self.buffered:
            self.in_shard = self.rows_per_shard - self.buffered  # makes this last cut close the shard
            self._cut(self.buffered)
        elif self.in_shard:  # the rows ended exactly on a row-group boundary inside a shard
            self.in_shard = 0
            self.jobs.append(self.writer.submit(self._close_shard))
        for job in self.jobs:
            job.result()
        return SplitInfo(rows=self.rows, shards=self.shards)

    def content_hash(self) -> str:
        return hashlib.sha256("".join(self.hashers[k].hexdigest() for k in sorted(self.hashers)).encode()).hexdigest()
