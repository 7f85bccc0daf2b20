"""The last step of ingestion: the parts' and buckets' records -> the manifest, checked, and the version
published under the data root (shards moved from the work folder, long lists to Parquet side files, the
manifest last).

version = 16 hex digits of SHA-256 over the options that shaped the rows, the image shape, the label
names and the sorted shard checksums: the same input gives the same version however it was run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import posixpath
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vae_core.data.shards import (FORMAT, MANIFEST, SPLITS, DuplicateEntry, ItemCounts, Manifest, QuarantineEntry,
                                  ShardInfo, SourceDescription, SplitInfo, dataset_dir, read_manifest, sha256_hex)
from vae_core.data.shards.manifest import LIST_BOUND
from vae_core.errors import IngestError
from vae_core.ingestion.reducer import DUPLICATE_SCHEMA
from vae_core.ingestion.mapper import QUARANTINE_SCHEMA
from vae_core.ingestion.work import Job, digest
from vae_core.requests import IngestRequest
from vae_core.storage import atomic_write_bytes, remove_temporaries, resolve, temporary_name, to_url


def side_files(fs: Any, work: str, kind: str) -> list[str]:
    """The work folder's Parquet files of `kind` (quarantine or duplicates), in a fixed order."""
    found = []
    for folder in (f"{work}/parts/{kind}", f"{work}/shards/{kind}"):
        try:
            found += sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet")
                            and not posixpath.basename(p).startswith("."))
        except FileNotFoundError:
            pass
    return found


def read_entries(fs: Any, paths: list[str], limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Rows of list files, at most `limit` of them."""
    n = 0
    for p in paths:
        with fs.open(p, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    if limit is not None and n >= limit:
                        return
                    n += 1
                    yield row


def version_of(options: dict[str, Any], shape: tuple[int, int, int], names: list[str] | None,
               splits: dict[str, SplitInfo]) -> str:
    body = {"format": FORMAT, "options": options, "shape": list(shape), "label_names": names,
            "shards": {s: sorted(sh.sha256 for sh in info.shards) for s, info in splits.items()}}
    return digest(body)[:16]


def channel_stats(sums: dict[str, list[int]], shape: tuple[int, int, int]) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of pixel/255 over train (over every split when train is empty).
    sums: per split [rows, sum per channel..., sum of squares per channel...]."""
    c = shape[2]
    parts = [sums["train"]] if "train" in sums else list(sums.values())
    rows = sum(p[0] for p in parts)
    n = rows * shape[0] * shape[1]
    s = np.array([sum(p[1 + k] for p in parts) for k in range(c)], np.float64) / 255.0
    sq = np.array([sum(p[1 + c + k] for p in parts) for k in range(c)], np.float64) / 255.0**2
    mean = s / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 0.0))
    return [round(float(x), 6) for x in mean], [round(float(x), 6) for x in std]


def build_manifest(job: Job, source: Any, totals: dict[str, Any], buckets: list[dict[str, Any]],
                   options: dict[str, Any], details: dict[str, Any]) -> Manifest:
    """The manifest (version set, lists not yet attached, created_at set at publish), after the checks
    that fail a run: no usable image, too much quarantined, a label without a name."""
    cfg = job.request
    shape = tuple(totals["shape"])
    shards: dict[str, list[ShardInfo]] = {}
    sums: dict[str, list[int]] = {}
    for rec in buckets:
        for sh in rec["shards"]:
            shards.setdefault(sh["path"].split("/", 1)[0], []).append(ShardInfo(**sh))
        for split, v in rec["sums"].items():
            sums[split] = [a + b for a, b in zip(sums[split], v)] if split in sums else list(v)
    splits = {s: SplitInfo(rows=sum(x.rows for x in shards[s]), shards=sorted(shards[s], key=lambda x: x.path))
              for s in SPLITS if s in shards}
    ok = sum(info.rows for info in splits.values())
    duplicates = sum(r["duplicates"] for r in buckets)
    quarantined = totals["quarantined"] + sum(r["repeats"] for r in buckets)
    seen = totals["seen"]
    examples = "; ".join(f"{e['id']}: {e['reason']}" for e in read_entries(*_lists(job, "quarantine"), limit=5))
    if ok == 0:
        raise IngestError(f"{source.url}: no usable images among {seen} items"
                          + (f" ({quarantined} quarantined, e.g. {examples})" if quarantined else ""))
    if quarantined / seen > cfg.max_quarantine_fraction:
        raise IngestError(f"{source.url}: {quarantined} of {seen} items ({quarantined / seen:.1%}) were quarantined, "
                          f"above max_quarantine_fraction {cfg.max_quarantine_fraction:.1%}; e.g. {examples}")
    names = totals["label_names"]
    if names is None and totals["max_label"] >= 0:
        names = [str(i) for i in range(totals["max_label"] + 1)]
    if names is not None and totals["max_label"] >= len(names):
        raise IngestError(f"{source.url}: label {totals['max_label']} has no name ({len(names)} label names)")
    mean, std = channel_stats(sums, shape)  # type: ignore[arg-type]
    h, w, c = shape
    lists = _lists_for(job, quarantined, duplicates)
    return Manifest(**lists,
        name=cfg.name, version=version_of(options, shape, names, splits), created_at="",  # type: ignore[arg-type]
        height=h, width=w, channels=c, splits=splits, label_names=names, channel_mean=mean, channel_std=std,
        items=ItemCounts(seen=seen, ok=ok, duplicates=duplicates, quarantined=quarantined),
        conflicts=sum(r["label_conflicts"] for r in buckets),
        source=SourceDescription(kind=source.kind, url=source.url, details=details), options=options)


def _lists_for(job: Job, quarantined: int, duplicates: int) -> dict[str, Any]:
    """Lists of up to LIST_BOUND entries inline (sorted by id), longer ones named as side files."""
    out: dict[str, Any] = {}
    for kind, model, count in (("quarantine", QuarantineEntry, quarantined), ("duplicates", DuplicateEntry, duplicates)):
        if count <= LIST_BOUND:
            rows = sorted(read_entries(*_lists(job, kind)), key=lambda r: r["id"])
            out[kind] = [model(**{k: v for k, v in r.items() if k in model.model_fields}) for r in rows]
        else:
            out[f"{kind}_file"] = f"{kind}.parquet"
    return out


def _lists(job: Job, kind: str) -> tuple[Any, list[str]]:
    fs, work = job.fs()
    return fs, side_files(fs, work, kind)


def publish(job: Job, m: Manifest) -> tuple[str, bool, Manifest]:
    """Publish the version unless it is there already (then nothing is written); -> (url, created, manifest).

    Shards move from the work folder (a rename; a server-side copy on object stores); lists of up to
    LIST_BOUND entries go inline, longer ones to Parquet files beside the manifest; the manifest is last.
    """
    cfg = job.request
    fs, root = resolve(cfg.root(), cfg.data_root_options)
    work_fs, work = job.fs()
    vdir = dataset_dir(root, m.name, m.version)
    if fs.exists(posixpath.join(vdir, MANIFEST)):
        return to_url(fs, vdir), False, read_manifest(fs, vdir)
    written = [vdir, *(posixpath.join(vdir, s) for s in m.splits)]  # the folders this step writes
    for folder in written:
        remove_temporaries(fs, folder)  # left by an earlier run that was killed mid-write
    for info in m.splits.values():
        for sh in info.shards:
            _move(fs, f"{work}/shards/{sh.path}", posixpath.join(vdir, sh.path), sh)
    for kind, schema in (("quarantine", QUARANTINE_SCHEMA), ("duplicates", DUPLICATE_SCHEMA)):
        if (file := getattr(m, f"{kind}_file")) is not None:
            _concat(work_fs, side_files(work_fs, work, kind), schema, fs, posixpath.join(vdir, file))
    m = m.model_copy(update={"created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")})
    # A concurrent run of the same input may have finished meanwhile: its manifest stays (readers may have
    # seen its created_at), and this run reports the version as found.
    created = atomic_write_bytes(fs, posixpath.join(vdir, MANIFEST), m.to_json().encode(), replace=False)
    for folder in written:  # the version is final: temporaries of a run killed meanwhile go too
        remove_temporaries(fs, folder)
    return to_url(fs, vdir), created, m if created else read_manifest(fs, vdir)


def _move(fs: Any, src: str, dest: str, shard: ShardInfo) -> None:
    """Move a finished shard into the version folder (a rename; a server-side copy on object stores), unless
    the very same bytes are there already (moved by an earlier run that stopped before its manifest)."""
    if _already_there(fs, dest, shard):
        return
    fs.makedirs(posixpath.dirname(dest), exist_ok=True)
    try:
        fs.mv(src, dest)
    except FileNotFoundError:
        if not _already_there(fs, dest, shard):  # else a concurrent run moved it first
            raise


def _already_there(fs: Any, dest: str, shard: ShardInfo) -> bool:
    try:
        return fs.size(dest) == shard.bytes and sha256_hex(fs.cat_file(dest)) == shard.sha256
    except FileNotFoundError:
        return False


def _concat(src_fs: Any, paths: list[str], schema: pa.Schema, fs: Any, dest: str) -> None:
    """Write every list file's rows to one Parquet file `dest`, batch by batch (memory bounded by a batch),
    under a temporary name renamed at the end."""
    tmp = temporary_name(dest)
    try:
        with fs.open(tmp, "wb") as out, pq.ParquetWriter(out, schema, compression="zstd") as writer:
            for p in paths:
                with src_fs.open(p, "rb") as f:
                    for batch in pq.ParquetFile(f).iter_batches(batch_size=1 << 16):
                        writer.write_batch(batch.cast(schema) if batch.schema != schema else batch)
        fs.mv(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(tmp)
        raise


def manifest_entries(url: str, m: Manifest, kind: str, options: dict | None = None,
                     limit: int | None = None) -> list[dict[str, Any]]:
    """A version's quarantine or duplicates entries, inline or from their side file (at most `limit`), in
    the same form either way (the entry model's: a duplicate's labels only where they disagree)."""
    file = m.quarantine_file if kind == "quarantine" else m.duplicates_file
    if file is None:
        entries = m.quarantine if kind == "quarantine" else m.duplicates
        return [e.model_dump() for e in entries[:limit]]
    fs, vdir = resolve(url, options)
    model = QuarantineEntry if kind == "quarantine" else DuplicateEntry
    return [model(**row).model_dump() for row in read_entries(fs, [posixpath.join(vdir, file)], limit)]


def request_options(cfg: IngestRequest) -> dict[str, Any]:
    """The request's options that shape the rows."""
    return {"image_size": list(cfg.image_size) if cfg.image_size else None, "channels": cfg.channels,
            "fit": cfg.fit if cfg.image_size else None, "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction, "limit": cfg.limit}
