"""The reduce step of ingestion: one content bucket's rows (from every part) -> deduplicated, split and
sorted rows in Parquet shards named by their SHA-256, then a commit record.

Duplicates are global because equal pixels share a bucket: of each set of equal images the copy with the
smallest source path is kept, and each other copy is listed with its label beside the kept one's (label
noise shows). The same entry read twice (a file list naming a file twice) is a repeated id, quarantined.
Rows are split by their id (`vae_core.data.splits`) and sorted by id, and each split's rows are cut into
shards of `rows_per_shard`: the shards depend on the input and options only, never on how many workers
ran or in which order the listing came, so the same input gives byte-identical shards.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vae_core.data.shards import SPLITS, build_table, row_group_rows, sha256_hex, writer_options
from vae_core.data.splits import assign_splits
from vae_core.ingestion.mapper import QUARANTINE_SCHEMA
from vae_core.ingestion.work import Job, bucket_dir, bucket_record, read_record, write_file, write_record

DUPLICATE_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("duplicate_of", pa.string()),
                              ("label", pa.int32()), ("kept_label", pa.int32())])
_STATS_CHUNK = 512  # images per chunk of the stats pass: small enough to stay in cache


def rows_per_shard(shard_mb: float, row_bytes: int) -> int:
    return max(1, int(shard_mb * (1 << 20)) // row_bytes)


def reduce_bucket(job: Job, bucket: int, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Write bucket `bucket`'s shards and commit it; -> its record (shards, statistics, duplicate counts).
    shape: (H, W, C) of every image."""
    fs, work = job.fs()
    record_path = bucket_record(work, bucket)
    if (done := read_record(fs, record_path)) is not None:
        return done
    table = _read_bucket(fs, bucket_dir(work, bucket))
    record: dict[str, Any] = {"bucket": bucket, "shards": [], "duplicates": 0, "label_conflicts": 0,
                              "repeats": 0, "sums": {}}
    if table is not None and len(table):
        # label last: an entry listed twice with two labels keeps the smaller one, whatever the listing order.
        # Only row numbers are sorted and filtered: the pixels are copied one shard at a time, when written,
        # so a reduce task holds its bucket and one shard, not several copies of the bucket.
        order = pc.sort_indices(table.select(["digest", "source", "label"]),
                                [("digest", "ascending"), ("source", "ascending"), ("label", "ascending")])
        sorted_digests = table.column("digest").take(order).combine_chunks()
        digests = np.frombuffer(sorted_digests.buffers()[1], np.uint8).reshape(-1, 32)
        first = np.ones(len(table), bool)
        first[1:] = (digests[1:] != digests[:-1]).any(axis=1)
        record.update(_drop_copies(fs, work, bucket, table.select(["id", "source", "label"]).take(order), first))
        record["shards"], record["sums"] = _write_shards(fs, work, job, table, order.to_numpy()[first], shape)
    write_record(fs, record_path, record)
    return record


def _read_bucket(fs: Any, folder: str) -> pa.Table | None:
    try:
        names = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet")
                       and not p.rsplit("/", 1)[-1].startswith("."))
    except FileNotFoundError:
        return None
    tables = []
    for p in names:
        with fs.open(p, "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if tables else None


def _drop_copies(fs: Any, work: str, bucket: int, table: pa.Table, first: np.ndarray) -> dict[str, int]:
    """List every row that is not the first of its pixels (sorted by digest, then source) as a duplicate of
    that first row, or as a repeated id where it is the same entry again."""
    kept_at = np.maximum.accumulate(np.where(first, np.arange(len(first)), 0))
    copies = np.flatnonzero(~first)
    if not len(copies):
        return {}
    ids, sources = table.column("id").to_pylist(), table.column("source").to_pylist()
    labels = table.column("label").to_pylist()
    dups: list[tuple] = []
    repeats: list[tuple] = []
    for i in copies.tolist():
        k = int(kept_at[i])
        if ids[i] == ids[k]:
            repeats.append((ids[i], sources[i], f"id {ids[i]!r} repeats an earlier item's id"))
        else:
            dups.append((ids[i], sources[i], ids[k], labels[i], labels[k]))
    if dups:
        columns = list(zip(*dups))
        write_file(fs, f"{work}/shards/duplicates/b-{bucket:05d}.parquet",
                   _parquet(pa.table([list(c) for c in columns], schema=DUPLICATE_SCHEMA)))
    if repeats:
        columns = list(zip(*repeats))
        write_file(fs, f"{work}/shards/quarantine/b-{bucket:05d}.parquet",
                   _parquet(pa.table([list(c) for c in columns], schema=QUARANTINE_SCHEMA)))
    return {"duplicates": len(dups), "repeats": len(repeats),
            "label_conflicts": sum(1 for d in dups if d[3] != d[4])}


def _write_shards(fs: Any, work: str, job: Job, table: pa.Table, kept: np.ndarray, shape: tuple[int, int, int]
                  ) -> tuple[list[dict[str, Any]], dict[str, list[int]]]:
    """Split, sort by id and cut the kept rows (row numbers of `table`) into shards; -> (shard entries, per
    split [rows, sum per channel..., sum of squares per channel...] of the pixels)."""
    req = job.request
    small = table.select(["id", "split"]).take(kept)
    own = small.column("split").to_pylist()
    codes = assign_splits(small.column("id").to_pylist(), None if all(s is None for s in own) else own,
                          req.val_fraction, req.test_fraction, job.carve_val)
    per_shard = rows_per_shard(req.shard_mb, shape[0] * shape[1] * shape[2])
    pixels = _Pixels(table.column("image"), shape)
    rest = table.select(["id", "label", "source"])
    shards, sums = [], {}
    for code, split in enumerate(SPLITS):
        rows = kept[codes == code]
        if not len(rows):
            continue
        rows = rows[pc.sort_indices(small.column("id").take(np.flatnonzero(codes == code))).to_numpy()]
        totals = np.zeros(2 * shape[2], np.uint64)
        for start in range(0, len(rows), per_shard):
            chosen = rows[start : start + per_shard]
            images = pixels.gather(chosen)  # one shard's pixels: the only copy the task makes
            part = rest.take(chosen)
            totals += np.array(_pixel_sums(images), np.uint64)
            data = _parquet(build_table(part.column("id").to_pylist(), images,
                                        part.column("label").fill_null(-1).to_numpy().astype(np.int32),
                                        part.column("source").to_pylist()), **writer_options())
            sha = sha256_hex(data)
            path = f"{split}/{sha}.parquet"
            write_file(fs, f"{work}/shards/{path}", data, replace=False)
            shards.append({"path": path, "rows": part.num_rows, "bytes": len(data), "sha256": sha})
        sums[split] = [len(rows), *(int(x) for x in totals)]
    return shards, sums


class _Pixels:
    """A bucket's image column as views of its chunks (one per bucket file, no copy), from which a shard's
    rows are gathered into one new array: Arrow's `take` on a chunked column first joins every chunk, a
    second copy of the whole bucket."""

    def __init__(self, column: pa.ChunkedArray, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self.width = width = shape[0] * shape[1] * shape[2]
        self.views = [np.frombuffer(c.buffers()[1], np.uint8, count=len(c) * width, offset=c.offset * width)
                      .reshape(len(c), width) for c in column.chunks]
        self.starts = np.cumsum([0] + [len(v) for v in self.views])

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (len(rows), H, W, C): the pixels of bucket rows `rows`, in that order."""
        rows = rows.astype(np.int64)  # Arrow's sort indices are unsigned
        out = np.empty((len(rows), self.width), np.uint8)
        chunk = np.searchsorted(self.starts, rows, side="right") - 1
        for c in np.unique(chunk):
            at = np.flatnonzero(chunk == c)
            out[at] = self.views[c][rows[at] - self.starts[c]]
        return out.reshape(len(rows), *self.shape)


def _pixel_sums(images: np.ndarray) -> list[int]:
    """Exact integer sums per channel of the pixels and of their squares (for mean and std).

    Each chunk is transposed to (C, pixels) first: summing a contiguous row is 4x faster than summing down
    the short last axis. Not BLAS: its threads spin, and on a busy machine a Gram matrix product here was
    measured 30x slower than these plain loops."""
    c = images.shape[3]
    s = np.zeros(c, np.uint64)
    sq = np.zeros(c, np.uint64)
    for start in range(0, len(images), _STATS_CHUNK):
        v = np.ascontiguousarray(images[start : start + _STATS_CHUNK].reshape(-1, c).T)  # (C, pixels)
        s += v.sum(axis=1, dtype=np.uint64)
        w = v.astype(np.uint16)
        sq += (w * w).sum(axis=1, dtype=np.uint64)  # 255**2 fits 16 bits
    return [int(x) for x in s] + [int(x) for x in sq]


def _parquet(table: pa.Table, **options: Any) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, **(options or {"compression": "zstd"}), row_group_size=_group_rows(table))
    return sink.getvalue()


def _group_rows(table: pa.Table) -> int:
    """~16 MiB of pixels per row group, so a streaming reader never holds a whole shard."""
    width = table.schema.field("image").type.byte_width if "image" in table.schema.names else 0
    return row_group_rows(width) if width else max(1, len(table))
