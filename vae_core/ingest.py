"""Ingestion as plain functions: any image source -> validated rows -> splits -> shards + manifest.

    cfg = IngestConfig(name="mnist", source="/data/mnist", data_root="s3://bucket/datasets")
    result = run_ingest(cfg)          # = publish(build(open_source_for(cfg), cfg), cfg)
    result = ingest("/data/mnist", IngestConfig(name="mnist"), data_root="/tmp/ds")   # the same

Steps and why they are ordered this way:

1. `open_source_for` opens and validates the source as a whole (missing, empty, wrong magic,
   count mismatch): those fail at once with the file named, before anything is decoded.
2. `build` decodes every item exactly once (worker processes for encoded files), checks that shapes
   agree, drops exact pixel duplicates (the first in source order is kept), assigns splits and
   writes zstd Parquet shards to a local staging folder, hashing the rows as they pass. Each item
   ends as exactly one of ok, duplicate or quarantined. The version is the hash of the rows and of
   the options that shaped them, so it is known only once everything was seen.
3. `publish` finds that version under the data root and stops there if it exists (a re-run writes
   nothing); otherwise it uploads the shards and then the manifest, each atomically. A crash before
   the manifest leaves an unfinished version folder that readers ignore and the next run completes.

Splits: an item keeps the source's own split (MNIST's train/t10k, folders named train/val/test,
Parquet files or a split column). Items without one are split by a hash of their id: test if
u < test_fraction, val if u < test_fraction + val_fraction, with u = hash(id) in [0, 1). When the
source has no val split of its own, val is carved from its train items the same way (u <
val_fraction). The split of an item therefore depends only on its id: adding items never moves old
ones between splits.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from tqdm.auto import tqdm

from vae_core.shards import (
    FORMAT,
    MANIFEST,
    SPLITS,
    DuplicateEntry,
    ItemCounts,
    Manifest,
    QuarantineEntry,
    ShardInfo,
    SourceDescription,
    SplitInfo,
    atomic_put_file,
    atomic_write_bytes,
    build_table,
    read_manifest,
    resolve,
    row_group_rows,
    sha256_hex,
    to_url,
    version_path,
    writer_options,
)
from vae_core.sources.base import RawBatch, Source
from vae_core.sources.decode import ShapeSpec
from vae_core.sources.detect import Format, open_source
from vae_core.sources.parallel import Decoded, decode_stream

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_STATS_CHUNK = 512  # images per chunk of the stats pass: small enough to stay in cache


class IngestError(RuntimeError):
    """The run cannot produce a dataset (mixed shapes, too much quarantined, nothing usable)."""


class IngestConfig(BaseModel):
    """Everything `run_ingest` needs; validated at the boundary (CLI, flow)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="dataset name: letters, digits, '.', '_', '-'")
    source: str | None = Field(None, description="source URL, or builtin:digits (required to run)")
    data_root: str | None = Field(None, description="where datasets live, any fsspec URL (required to run)")
    format: Format = "auto"
    image_size: tuple[int, int] | None = Field(None, description="(H, W); None keeps the source's when uniform")
    fit: Literal["crop", "pad"] = Field("crop", description="aspect ratio: centre crop, or pad with black")
    channels: Literal[1, 3] | None = Field(None, description="None keeps the source's when uniform")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1, description="used only for items without a split of their own")
    shard_mb: float = Field(64, gt=0, description="max uncompressed pixel MiB per shard")
    max_quarantine_fraction: float = Field(0.05, ge=0, le=1)
    workers: int = Field(0, ge=0, description="decode processes; 0 = one per CPU")
    limit: int | None = Field(None, ge=1, description="take only the first N items of the source (quick runs)")
    image_column: str | None = None
    label_column: str | None = None
    source_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the source")
    data_root_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for data_root")
    staging_dir: str | None = Field(None, description="local scratch folder (default: the system temp folder)")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"dataset name {v!r} must start with a letter or digit and use only letters, digits, '.', '_', '-'")
        return v

    @field_validator("image_size")
    @classmethod
    def _positive_size(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and (v[0] < 1 or v[1] < 1):
            raise ValueError(f"image_size must be positive, got {v[0]}x{v[1]}")
        return v

    @model_validator(mode="after")
    def _fractions(self) -> "IngestConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction {self.val_fraction} + test_fraction {self.test_fraction} leaves no train split")
        return self

    def require(self) -> tuple[str, str]:
        """-> (source, data_root), both of which a run needs."""
        missing = [k for k in ("source", "data_root") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"IngestConfig for {self.name!r} has no {' or '.join(missing)}")
        return self.source, self.data_root  # type: ignore[return-value]

    @property
    def spec(self) -> ShapeSpec:
        return ShapeSpec(self.image_size, self.channels, self.fit)


def parse_image_size(text: str) -> tuple[int, int]:
    """'28,28' / '28x28' / '28' -> (H, W)."""
    parts = [p for p in re.split(r"[,x\s]+", text.strip().lower()) if p]
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise ValueError(f"image size {text!r} is not H,W (e.g. 28,28)")


# ------------------------------------------------------------------------------------------ results


@dataclass
class StagedDataset:
    """A fully built dataset in local staging, not yet published. `manifest.created_at` is set at publish."""

    manifest: Manifest
    staging: Path

    def cleanup(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


@dataclass
class IngestResult:
    name: str
    version: str
    url: str
    created: bool  # False when this version already existed and nothing was written
    manifest: Manifest

    def summary(self) -> dict[str, Any]:
        """The JSON `vae ingest --json` prints."""
        items = self.manifest.items
        return {
            "name": self.name,
            "version": self.version,
            "path": self.url,
            "created": self.created,
            "counts": self.manifest.counts,
            "shape": [self.manifest.height, self.manifest.width, self.manifest.channels],
            "seen": items.seen,
            "duplicates": items.duplicates,
            "quarantined": items.quarantined,
        }


# ------------------------------------------------------------------------------------------- splits


def id_hash_unit(ids: list[str]) -> np.ndarray:
    """ids -> float64 (n,) in [0, 1), a fixed function of each id alone.

    h = FNV-1a (64-bit) over the id's Unicode code points, xor its length, then MurmurHash3's 64-bit
    finaliser for avalanche; u = (h >> 11) / 2**53. Vectorised over the batch (a per-id cryptographic
    hash costs more than everything else ingestion does to an MNIST image), and simple to recompute.
    Changing it would move items between splits.
    """
    n = len(ids)
    if n == 0:
        return np.zeros(0)
    codes = np.array(ids, dtype=str)
    points = codes.view(np.uint32).reshape(n, -1)  # zero-padded to the longest id
    h = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    for j in range(points.shape[1]):
        h ^= points[:, j]
        h *= prime
    h ^= np.fromiter(map(len, ids), dtype=np.uint64, count=n)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    return (h >> np.uint64(11)).astype(np.float64) / 2.0**53


_SPLIT_CODE: dict[str | None, int] = {None: -1, **{s: i for i, s in enumerate(SPLITS)}}


def assign_splits(ids: list[str], source_splits: list[str | None] | None, val_fraction: float,
                  test_fraction: float, carve_val: bool) -> np.ndarray:
    """-> int8 (n,) split codes (index into SPLITS: 0 train, 1 val, 2 test). See the module docstring."""
    u = id_hash_unit(ids)
    hashed = np.where(u < test_fraction, 2, np.where(u < test_fraction + val_fraction, 1, 0)).astype(np.int8)
    if source_splits is None:
        return hashed
    own = np.fromiter(map(_SPLIT_CODE.__getitem__, source_splits), dtype=np.int8, count=len(source_splits))
    if carve_val:
        own = np.where((own == 0) & (u < val_fraction), 1, own).astype(np.int8)
    return np.where(own < 0, hashed, own).astype(np.int8)


# ------------------------------------------------------------------------------------------ writing


@dataclass
class _Gather:
    """Rows `sel` of `base` (all of it when sel is None), copied only on the writer thread.

    Selecting a split's rows out of a batch is a copy of most of its pixels; deferring it to the writer
    thread (NumPy releases the GIL while copying) keeps it off the thread that hashes and deduplicates.
    """

    base: np.ndarray
    sel: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.base) if self.sel is None else len(self.sel)

    def __getitem__(self, s: slice) -> "_Gather":
        return _Gather(self.base[s]) if self.sel is None else _Gather(self.base, self.sel[s])

    def array(self) -> np.ndarray:
        return self.base if self.sel is None else self.base[self.sel]


class _SplitWriter:
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
        self.buf: list[tuple[list[str], _Gather, np.ndarray, list[str], list[bytes]]] = []
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

    def append(self, ids: list[str], images: _Gather, labels: np.ndarray, sources: list[str],
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
        ids: list[str] = []
        sources: list[str] = []
        digests: list[bytes] = []
        images, labels = [], []
        need = n
        while need:
            i, x, y, s, d = self.buf[0]
            take = min(need, len(i))
            ids += i[:take]
            sources += s[:take]
            digests += d[:take]
            images.append(x[:take])
            labels.append(y[:take])
            if take == len(i):
                self.buf.pop(0)
            else:
                self.buf[0] = (i[take:], x[take:], y[take:], s[take:], d[take:])
            need -= take
        self.buffered -= n
        self.in_shard += n
        end = self.in_shard == self.rows_per_shard
        if end:
            self.in_shard = 0
        self.jobs.append(self.writer.submit(self._write, ids, images, labels, sources, digests, end))

    def _write(self, ids: list[str], image_parts: list[_Gather], label_parts: list[np.ndarray],
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
            n = self.buffered
            self.in_shard = self.rows_per_shard - n  # makes this last cut close the shard
            self._cut(n)
        elif self.in_shard:  # the rows ended exactly on a row-group boundary inside a shard
            self.in_shard = 0
            self.jobs.append(self.writer.submit(self._close_shard))
        for job in self.jobs:
            job.result()
        return SplitInfo(rows=self.rows, shards=self.shards)

    def content_hash(self) -> str:
        return hashlib.sha256("".join(self.hashers[k].hexdigest() for k in sorted(self.hashers)).encode()).hexdigest()


# ----------------------------------------------------------------------------------------- building


def _take(items: list, at: list[int] | np.ndarray) -> list:
    """items[at] for a Python list (itemgetter does the loop in C)."""
    at = list(at) if isinstance(at, list) else at.tolist()
    if len(at) == 1:
        return [items[at[0]]]
    return list(itemgetter(*at)(items)) if at else []


@dataclass
class _Rows:
    """Rows bound for the split writers: n ids, sources, labels int32 (n,), own splits, pixels (n,H,W,C)."""

    ids: list[str]
    sources: list[str]
    labels: np.ndarray
    splits: list[str | None] | None
    pixels: np.ndarray  # uint8 (n, H, W, C)
    digests: list[bytes]  # SHA-256 of each image's pixels

    def take(self, sel: np.ndarray) -> "_Rows":
        """The rows at sel. A large selection's pixels stay a view plus indices until the writer thread
        copies them; a small one is copied now, so that a split holding a few rows of each batch does
        not keep whole batches alive while it fills a row group."""
        pixels = _Gather(self.pixels, sel) if 2 * len(sel) >= len(self.pixels) else _Gather(self.pixels[sel])
        return _Rows(_take(self.ids, sel), _take(self.sources, sel), self.labels[sel],
                     None if self.splits is None else _take(self.splits, sel), pixels,  # type: ignore[arg-type]
                     _take(self.digests, sel))


@dataclass
class _Tally:
    seen: int = 0
    quarantine: list[QuarantineEntry] = field(default_factory=list)
    duplicates: list[DuplicateEntry] = field(default_factory=list)
    max_label: int = -1


class DatasetBuilder:
    """Consumes decoded batches in source order; every item becomes ok, duplicate or quarantined."""

    def __init__(self, source: Source, cfg: IngestConfig, staging: Path):
        self.source, self.cfg, self.staging = source, cfg, staging
        self.tally = _Tally()
        self.shape: tuple[int, int, int] | None = None
        self.shape_from = ""
        self.digests: dict[bytes, str] = {}
        self.ids_seen: set[str] | None = None if source.ids_unique else set()
        self.carve_val = "val" not in source.splits and cfg.val_fraction > 0
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.splits: dict[str, _SplitWriter] = {}

    def add(self, batch: RawBatch, decoded: Decoded) -> None:
        """One batch and its decoded pixels: array (n, H, W, C), or per item an array or a reason."""
        self.tally.seen += len(batch)
        if isinstance(decoded, np.ndarray):
            ok = list(range(len(batch)))
            self._check_shape(tuple(decoded.shape[1:]), batch.sources[0])  # type: ignore[arg-type]
            pixels = decoded
        else:
            ok, arrays = [], []
            for i, d in enumerate(decoded):
                if isinstance(d, str):
                    self._quarantine(batch, i, d)
                else:
                    self._check_shape(d.shape, batch.sources[i])
                    ok.append(i)
                    arrays.append(d)
            pixels = np.stack(arrays) if arrays else np.empty((0, *(self.shape or (1, 1, 1))), np.uint8)
        if self.ids_seen is not None:
            ok, pixels = self._drop_repeated_ids(batch, ok, pixels)
        self._add_rows(batch, ok, pixels)

    def _check_shape(self, shape: tuple[int, int, int], where: str) -> None:
        if self.shape is None:
            self.shape, self.shape_from = shape, where
        elif shape != self.shape:
            h, w, c = shape
            H, W, C = self.shape
            hint = []
            if (h, w) != (H, W):
                hint.append("--image-size H,W")
            if c != C:
                hint.append("--channels 1|3")
            raise IngestError(
                f"images differ in shape: {where} is {h}x{w}x{c} but {self.shape_from} is {H}x{W}x{C}; "
                f"choose one with {' and '.join(hint)}"
            )

    def _quarantine(self, batch: RawBatch, i: int, reason: str) -> None:
        self.tally.quarantine.append(QuarantineEntry(id=batch.ids[i], source=batch.sources[i], reason=reason))

    def _drop_repeated_ids(self, batch: RawBatch, ok: list[int], pixels: np.ndarray) -> tuple[list[int], np.ndarray]:
        assert self.ids_seen is not None
        keep = []
        for j, i in enumerate(ok):
            if batch.ids[i] in self.ids_seen:
                self._quarantine(batch, i, f"id {batch.ids[i]!r} repeats an earlier item's id")
            else:
                self.ids_seen.add(batch.ids[i])
                keep.append(j)
        return [ok[j] for j in keep], pixels[keep] if len(keep) < len(ok) else pixels

    def _add_rows(self, batch: RawBatch, ok: list[int], pixels: np.ndarray) -> None:
        """Dedup by SHA-256 of the pixels, assign splits, hand rows to the split writers.

        ok: positions in the batch of the decoded items; pixels: their images, uint8 (len(ok), H, W, C).
        """
        if not ok:
            return
        n, row = len(ok), int(np.prod(pixels.shape[1:]))
        flat = memoryview(np.ascontiguousarray(pixels).reshape(-1))
        sha = hashlib.sha256
        digests = [sha(flat[k * row : (k + 1) * row]).digest() for k in range(n)]
        ids = batch.ids if n == len(batch) else _take(batch.ids, ok)
        before = len(self.digests)
        # setdefault returns the id stored first: the item's own id object when its pixels are new.
        firsts = list(map(self.digests.setdefault, digests, ids))
        if len(self.digests) - before == n:
            kept = list(range(n))  # positions into ok / pixels
        else:
            kept = [k for k in range(n) if firsts[k] is ids[k]]
            for k in range(n):
                if firsts[k] is not ids[k]:
                    self.tally.duplicates.append(
                        DuplicateEntry(id=ids[k], source=batch.sources[ok[k]], duplicate_of=firsts[k]))
        if not kept:
            return
        if len(kept) == len(batch):  # the common case: every item decoded and new, so no gathering
            rows = _Rows(batch.ids, batch.sources, batch.labels, batch.splits, pixels, digests)
        else:
            at = [ok[k] for k in kept]
            rows = _Rows(_take(batch.ids, at), _take(batch.sources, at), batch.labels[at],
                         None if batch.splits is None else _take(batch.splits, at),
                         pixels if len(kept) == n else pixels[kept], _take(digests, kept))
        self.tally.max_label = max(self.tally.max_label, int(rows.labels.max()))
        codes = assign_splits(rows.ids, rows.splits, self.cfg.val_fraction, self.cfg.test_fraction, self.carve_val)
        for code, split in enumerate(SPLITS):
            sel = np.flatnonzero(codes == code)
            if not len(sel):
                continue
            if len(sel) == len(rows.ids):
                self._writer(split, pixels).append(rows.ids, _Gather(rows.pixels), rows.labels, rows.sources,
                                                   rows.digests)
            else:
                part = rows.take(sel)
                self._writer(split, pixels).append(part.ids, part.pixels, part.labels, part.sources,  # type: ignore[arg-type]
                                                   part.digests)

    def _writer(self, split: str, pixels: np.ndarray) -> _SplitWriter:
        if split not in self.splits:
            row = int(np.prod(pixels.shape[1:]))
            self.splits[split] = _SplitWriter(split, self.staging, row, pixels.shape[3], self.rows_per_shard(row),
                                              self.writer)
        return self.splits[split]

    def rows_per_shard(self, row_bytes: int) -> int:
        return max(1, int(self.cfg.shard_mb * (1 << 20)) // row_bytes)

    def finish(self) -> Manifest:
        """Close the shards and build the manifest (version set; created_at set at publish)."""
        try:
            split_infos = {s: self.splits[s].close() for s in SPLITS if s in self.splits}
        finally:
            self.writer.shutdown(wait=True)
        t = self.tally
        ok = sum(si.rows for si in split_infos.values())
        self._check_quarantine(ok)
        mean, std = self._channel_stats()
        h, w, c = self.shape  # type: ignore[misc]
        names = self.source.label_names
        if names is None and t.max_label >= 0:
            names = [str(i) for i in range(t.max_label + 1)]
        if names is not None and t.max_label >= len(names):
            raise IngestError(f"{self.source.url}: label {t.max_label} has no name ({len(names)} label names)")
        options = options_for_version(self.cfg, self.rows_per_shard(h * w * c))
        m = Manifest(
            name=self.cfg.name, version="pending", created_at="", height=h, width=w, channels=c,
            splits=split_infos, label_names=names, channel_mean=mean, channel_std=std,
            items=ItemCounts(seen=t.seen, ok=ok, duplicates=len(t.duplicates), quarantined=len(t.quarantine)),
            quarantine=t.quarantine, duplicates=t.duplicates,
            source=SourceDescription(kind=self.source.kind, url=self.source.url, details=self.source.details),
            options=options,
        )
        return m.model_copy(update={"version": content_version(m, {s: w.content_hash() for s, w in self.splits.items()})})

    def _check_quarantine(self, ok: int) -> None:
        t = self.tally
        q = len(t.quarantine)
        examples = "; ".join(f"{e.id}: {e.reason}" for e in t.quarantine[:5])
        if ok == 0:
            raise IngestError(f"{self.source.url}: no usable images among {t.seen} items"
                              + (f" ({q} quarantined, e.g. {examples})" if q else ""))
        if t.seen and q / t.seen > self.cfg.max_quarantine_fraction:
            raise IngestError(
                f"{self.source.url}: {q} of {t.seen} items ({q / t.seen:.1%}) were quarantined, above "
                f"max_quarantine_fraction {self.cfg.max_quarantine_fraction:.1%}; e.g. {examples}"
            )

    def _channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean/std of pixel/255 over train (over all rows if train is empty)."""
        parts = [self.splits["train"]] if "train" in self.splits else list(self.splits.values())
        n = sum(p.rows for p in parts) * (self.shape[0] * self.shape[1])  # type: ignore[index]
        s = sum(p.sum for p in parts) / 255.0
        sq = sum(p.sumsq for p in parts) / 255.0**2
        mean = s / n
        var = np.maximum(sq / n - mean**2, 0.0)
        return [round(float(x), 6) for x in mean], [round(float(x), 6) for x in np.sqrt(var)]


def options_for_version(cfg: IngestConfig, rows_per_shard: int) -> dict[str, Any]:
    """The options that shape the rows and files; recorded in the manifest and part of the version."""
    return {
        "image_size": list(cfg.image_size) if cfg.image_size else None,
        "channels": cfg.channels,
        "fit": cfg.fit if cfg.image_size else None,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "rows_per_shard": rows_per_shard,
        "limit": cfg.limit,
    }


def content_version(m: Manifest, split_hashes: dict[str, str]) -> str:
    """16 hex digits of SHA-256 over the rows of every split and everything the manifest says about
    them, except the version itself, the creation time and the source's details (which may hold
    incidental facts such as file counts already covered by the rows)."""
    body = m.model_dump(mode="json", exclude={"version", "created_at"})
    body["source"] = {"kind": m.source.kind}
    body["rows"] = split_hashes
    body["format"] = FORMAT
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- pipeline


def open_source_for(cfg: IngestConfig) -> Source:
    """Open and validate the source named by `cfg` (fails fast with the file and problem named)."""
    source, _ = cfg.require()
    return open_source(source, cfg.format, cfg.source_options, cfg.image_column, cfg.label_column)


def build(source: Source, cfg: IngestConfig, progress: bool = False) -> StagedDataset:
    """Decode, validate, dedup, split and shard `source` into a local staging folder."""
    staging = Path(tempfile.mkdtemp(prefix="vae-ingest-", dir=cfg.staging_dir))
    builder: DatasetBuilder | None = None
    try:
        builder = DatasetBuilder(source, cfg, staging)
        with tqdm(total=source.size, desc=f"ingest {cfg.name}", unit="img", disable=not progress,
                  smoothing=0.1) as bar:
            for batch, decoded in decode_stream(_limited(source.batches(), cfg.limit), cfg.spec, cfg.workers):
                builder.add(batch, decoded)
                bar.update(len(batch))
        if builder.tally.seen == 0:
            raise IngestError(f"{source.url}: empty source (no items)")
        return StagedDataset(manifest=builder.finish(), staging=staging)
    except BaseException:
        if builder is not None:
            builder.writer.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _limited(batches: Iterator[RawBatch], limit: int | None) -> Iterator[RawBatch]:
    """The first `limit` items of the stream (all when None), cut at a batch boundary if need be."""
    left = limit
    for batch in batches:
        if left is None:
            yield batch
            continue
        if left <= 0:
            return
        yield batch if len(batch) <= left else batch.head(left)
        left -= len(batch)


def publish(staged: StagedDataset, cfg: IngestConfig) -> IngestResult:
    """Write the staged version under the data root unless it is already there (then write nothing)."""
    _, data_root = cfg.require()
    fs, root = resolve(data_root, cfg.data_root_options)
    m = staged.manifest
    vdir = version_path(fs, root, m.name, m.version)
    url = to_url(fs, vdir)
    if fs.exists(posixpath.join(vdir, MANIFEST)):
        return IngestResult(m.name, m.version, url, created=False, manifest=read_manifest(fs, vdir))
    for split in m.splits.values():
        for shard in split.shards:
            dest = posixpath.join(vdir, shard.path)
            if _already_there(fs, dest, shard):
                continue  # left by an earlier run that stopped before its manifest
            atomic_put_file(fs, str(staged.staging / shard.path), dest)
    m = m.model_copy(update={"created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")})
    atomic_write_bytes(fs, posixpath.join(vdir, MANIFEST), m.to_json().encode())
    return IngestResult(m.name, m.version, url, created=True, manifest=m)


def _already_there(fs: Any, dest: str, shard: ShardInfo) -> bool:
    try:
        if fs.size(dest) != shard.bytes:
            return False
    except FileNotFoundError:
        return False
    return sha256_hex(fs.cat_file(dest)) == shard.sha256


def run_ingest(cfg: IngestConfig, progress: bool = False) -> IngestResult:
    """Source -> published (or found) dataset version."""
    source = open_source_for(cfg)
    staged = build(source, cfg, progress)
    try:
        return publish(staged, cfg)
    finally:
        staged.cleanup()


def ingest(source: str, cfg: IngestConfig, data_root: str | None = None, progress: bool = False) -> IngestResult:
    """`run_ingest` with the source (and optionally the data root) given apart from the options."""
    update: dict[str, Any] = {"source": source}
    if data_root is not None:
        update["data_root"] = data_root
    return run_ingest(IngestConfig.model_validate({**cfg.model_dump(), **update}), progress)


# ----------------------------------------------------------------------------------------- summary


def summary_markdown(result: IngestResult) -> str:
    """A short Markdown report: counts per split, shape, channel stats, duplicates and quarantine."""
    m = result.manifest
    lines = [
        f"# Dataset `{m.name}` version `{m.version}`",
        "",
        f"{'Created' if result.created else 'Already existed (nothing written)'}: `{result.url}`  ",
        f"Source: {m.source.kind} `{m.source.url}`  ",
        f"Shape: {m.height} x {m.width} x {m.channels} (H x W x C), labels: "
        f"{len(m.label_names) if m.label_names else 'none'}",
        "",
        "| split | rows | shards |",
        "|---|---:|---:|",
    ]
    for s in SPLITS:
        info = m.splits.get(s)
        lines.append(f"| {s} | {info.rows if info else 0:,} | {len(info.shards) if info else 0} |")
    stats = ", ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(m.channel_mean, m.channel_std))
    i = m.items
    lines += [
        "",
        f"Channel mean / std (pixel/255, train): {stats}",
        "",
        f"Items: {i.seen:,} seen = {i.ok:,} ok + {i.duplicates:,} duplicates + {i.quarantined:,} quarantined",
    ]
    if m.quarantine:
        lines += ["", "| quarantined | reason |", "|---|---|"]
        lines += [f"| `{q.id}` | {q.reason} |" for q in m.quarantine[:50]]
        if len(m.quarantine) > 50:
            lines.append(f"| ... | {len(m.quarantine) - 50} more in manifest.json |")
    if m.duplicates:
        lines += ["", "| duplicate | kept |", "|---|---|"]
        lines += [f"| `{d.id}` | `{d.duplicate_of}` |" for d in m.duplicates[:20]]
        if len(m.duplicates) > 20:
            lines.append(f"| ... | {len(m.duplicates) - 20} more in manifest.json |")
    return "\n".join(lines) + "\n"
