"""The map step of ingestion: one part of the source (a row group of its listing, or a batch of an
in-process source) -> its rows decoded, validated and conformed, hashed, and written to the work folder
by content bucket, then a commit record.

An item's bucket is a function of the SHA-256 of its pixels, so exact duplicates meet in one bucket
whatever part they came from, and the reduce step (`reducer`) deduplicates each bucket on its own. Every
item ends in a bucket file or in the part's quarantine file with the reason. A part whose record exists
was finished by an earlier run of the same input: it is neither read nor decoded again.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vae_core.data.sources.base import RawBatch
from vae_core.data.sources.decode import ShapeSpec, conform_pixels, decode_many
from vae_core.data.sources.listing import ListingPart, read_part
from vae_core.ingestion.work import (UNKNOWN_TOTAL_BUCKETS, Job, bucket_dir, buckets_for, part_record, read_record,
                                     write_file, write_record)

ROWS_SCHEMA_BASE = [("id", pa.string()), ("label", pa.int32()), ("source", pa.string()), ("split", pa.string())]
QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("reason", pa.string())])


@dataclass(frozen=True)
class BatchPart:
    """A batch of an in-process source (IDX, npz, one Parquet file, built-ins), already read and limited."""

    key: str
    batch: RawBatch
    repeats: tuple[tuple[str, str, str], ...] = ()  # (id, source, reason) of items dropped for a repeated id


def limit_mask(start: int, size: int, limit: int | None, total: int | None) -> np.ndarray | None:
    """Which of positions start..start+size-1 `--limit` keeps (None: all): item p is kept iff p*limit//total
    steps up at p, so the sample spreads evenly over the source order and re-runs keep the same items."""
    if limit is None or total is None or limit >= total:
        return None
    p = np.arange(start, start + size, dtype=np.int64)
    return p * limit // total != (p + 1) * limit // total


def decode(batch: RawBatch, spec: ShapeSpec) -> np.ndarray | list[np.ndarray | str]:
    """A batch's pixels: uint8 (n, H, W, C) for decoded sources, else per item an array (H, W, C) or the
    reason it could not be decoded (a read error found earlier included). The one decode path of ingestion."""
    if batch.pixels is not None:
        return conform_pixels(batch.pixels, spec)
    errors = batch.errors or [None] * len(batch)
    pending = [d for d, e in zip(batch.encoded or [], errors) if e is None]
    it = iter(decode_many(pending, spec))
    return [next(it) if e is None else e for e in errors]


def map_part(job: Job, part: Any) -> dict[str, Any]:
    """Decode one part (a `ListingPart`, a `BatchPart`, or a part with `read()` and positions) into bucket files
    and commit it (`job.buckets` 0: the bucket count follows from this part's image size, see `buckets_for`); -> its record plus `decoded` (items decoded by this
    call: 0 when an earlier run had finished the part). A part whose images differ in shape is not
    committed; its record names two of the shapes (`shapes`) for the driver's error."""
    fs, work = job.fs()
    if (done := read_record(fs, part_record(work, part.key))) is not None:
        return {**done, "decoded": 0}
    req = job.request
    retries = 0
    if isinstance(part, ListingPart):
        batch, retries = read_part(part, req.data_root_options, req.source_options, req.source_limits(),
                                   limit_mask(part.start, part.size, req.limit, job.total))
    elif isinstance(part, BatchPart):
        batch = part.batch
    else:  # a part the source reads itself (a Parquet row group)
        batch = part.read()
        if (keep := limit_mask(part.start, part.size, req.limit, job.total)) is not None:
            batch = batch.take(np.flatnonzero(keep))
    repeats = list(getattr(part, "repeats", ()))
    spec = ShapeSpec(req.image_size, req.channels, req.fit, req.source_limits())
    decoded = decode(batch, spec)
    if isinstance(decoded, np.ndarray):
        ok, pixels, quarantine = list(range(len(batch))), decoded, repeats
    else:
        ok = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        quarantine = repeats + [(batch.ids[i], batch.sources[i], d) for i, d in enumerate(decoded) if isinstance(d, str)]
        shapes: dict[tuple, str] = {}
        for i in ok:
            shapes.setdefault(decoded[i].shape, batch.sources[i])  # type: ignore[union-attr]
        if len(shapes) > 1:
            return {"key": part.key, "shapes": [[list(s), w] for s, w in list(shapes.items())[:2]],
                    "decoded": len(batch)}
        pixels = np.stack([decoded[i] for i in ok]) if ok else None  # type: ignore[misc]
    record: dict[str, Any] = {"key": part.key, "seen": len(batch) + len(repeats), "ok": len(ok),
                              "quarantined": len(quarantine), "retries": retries, "buckets": [], "bucket_count": None,
                              "max_label": -1, "shape": None, "shape_from": None}
    if ok:
        assert pixels is not None
        record.update(shape=list(pixels.shape[1:]), shape_from=batch.sources[ok[0]],
                      max_label=int(batch.labels[ok].max()))
        row = int(np.prod(pixels.shape[1:]))
        buckets = job.buckets or (buckets_for(job.total, row) if job.total else UNKNOWN_TOTAL_BUCKETS)
        record["buckets"] = _write_buckets(fs, work, buckets, part.key, batch, ok, pixels)
        record["bucket_count"] = buckets
    if quarantine:
        ids, sources, reasons = zip(*quarantine)
        table = pa.table([list(ids), list(sources), list(reasons)], schema=QUARANTINE_SCHEMA)
        write_file(fs, f"{work}/parts/quarantine/{part.key}.parquet", _parquet(table))
    write_record(fs, part_record(work, part.key), record)
    return {**record, "decoded": len(batch)}


def _write_buckets(fs: Any, work: str, buckets: int, key: str, batch: RawBatch, ok: list[int],
                   pixels: np.ndarray) -> list[int]:
    """Write the decoded rows to one file per content bucket they fall in; -> the buckets written.

    pixels: uint8 (len(ok), H, W, C), the images of the items at positions `ok` of the batch."""
    n, row = len(ok), int(np.prod(pixels.shape[1:]))
    flat = np.ascontiguousarray(pixels).reshape(n, row)
    digests = [hashlib.sha256(flat[k].data).digest() for k in range(n)]
    bucket = np.array([int.from_bytes(d[:8], "big") % buckets for d in digests], dtype=np.int64)
    at = np.asarray(ok)
    splits = batch.splits
    written = []
    for b in np.unique(bucket).tolist():
        sel = np.flatnonzero(bucket == b)
        rows = at[sel]
        labels = batch.labels[rows]
        table = pa.table({
            "id": [batch.ids[i] for i in rows],
            "label": pa.array(labels, pa.int32(), mask=labels < 0),
            "source": [batch.sources[i] for i in rows],
            "split": pa.nulls(len(rows), pa.string()) if splits is None else pa.array([splits[i] for i in rows],
                                                                                        pa.string()),
            "digest": pa.array([digests[k] for k in sel], pa.binary(32)),
            "image": pa.FixedSizeBinaryArray.from_buffers(pa.binary(row), len(sel),
                                                          [None, pa.py_buffer(np.ascontiguousarray(flat[sel]))]),
        })
        write_file(fs, f"{bucket_dir(work, b)}/{key}.parquet", _parquet(table))
        written.append(b)
    return written


def _parquet(table: pa.Table) -> bytes:
    """Work files are read once, by the reduce step: LZ4, which costs a fraction of zstd's time to write."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="lz4")
    return sink.getvalue()
