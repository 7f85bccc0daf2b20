"""Ingestion as plain functions: any image source -> listed -> decoded by part -> shards by content
bucket -> manifest.

    req = IngestRequest(name="mnist", source="/data/mnist", data_root="s3://bucket/datasets")
    result = run_ingest(req)   # in this process; the flow runs the same steps on Ray Data

Steps, and why they are ordered this way:

1. `open_source_for` opens and validates the source as a whole (missing, empty, wrong magic, count
   mismatch): those fail at once with the file named, before anything is decoded.
2. `list_source` lists a source of many files (a folder, a prefix, a file list) into listing tables in
   the work folder (`work`), one task per unit; its parts are row groups of them. An in-process source
   (IDX, npz, one Parquet file, built-ins) is cut into parts as it is read. `find_unchanged` then looks
   for a version made from this very input (a fingerprint of the listed files and the options, kept in
   each manifest) and returns it without decoding anything.
3. `decode_parts` runs `mapper.map_part` on every part: read, decode, validate, conform, hash, and write
   the rows by content bucket; each part is committed by a record, and a part committed by an earlier run
   (killed, say) is skipped.
4. `write_shards` runs `reducer.reduce_bucket` on every bucket: global deduplication, splits by id, rows
   sorted by id, shards named by their SHA-256, each bucket committed.
5. `publish.publish` builds the manifest (the version hashes the options and the sorted shard checksums),
   moves the shards into the version folder and writes the manifest last; the work folder goes.

`Runner` is how steps 2-4 run their tasks: `serial` here, Ray Data in `flows.distributed.ingest`.
"""

from __future__ import annotations

import contextlib
import functools
import posixpath
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from vae_core.data.shards import Manifest, dataset_dir, list_versions, read_manifest
from vae_core.data.sources.base import RawBatch, Source, SourceError
from vae_core.data.sources.detect import open_source
from vae_core.data.sources.listing import ListingPart, UnitListing, class_names, listing_parts
from vae_core.errors import IngestError
from vae_core.ingestion import publish as pub
from vae_core.ingestion.mapper import BatchPart, limit_mask, map_part
from vae_core.ingestion.progress import Progress
from vae_core.ingestion.reducer import reduce_bucket, rows_per_shard
from vae_core.ingestion.work import UNKNOWN_TOTAL_BUCKETS, WORK_FORMAT, Job, buckets_for, digest, locked, work_root
from vae_core.requests import IngestRequest
from vae_core.results import IngestResult, NodeRows
from vae_core.storage import resolve, to_url

Runner = Callable[[Callable[[Any], dict[str, Any]], Iterable[Any]], Iterator[dict[str, Any]]]


def serial(fn: Callable[[Any], dict[str, Any]], items: Iterable[Any]) -> Iterator[dict[str, Any]]:
    """Run every task here, one after another."""
    return map(fn, items)


@dataclass
class Published:
    """A dataset version under the data root: made by this run (`created`) or found there."""

    name: str
    version: str
    url: str
    created: bool  # False when this version already existed and nothing was written
    manifest: Manifest
    nodes: list[NodeRows] = field(default_factory=list)  # rows decoded per Ray node by this run
    retries: int = 0  # storage reads retried by this run

    def summary(self) -> IngestResult:
        """The stage's result (what `vae ingest --json` prints)."""
        m, items = self.manifest, self.manifest.items
        return IngestResult(name=self.name, version=self.version, path=self.url, created=self.created,
                            counts=m.counts, shape=(m.height, m.width, m.channels), seen=items.seen,
                            duplicates=items.duplicates, label_conflicts=m.label_conflicts,
                            quarantined=items.quarantined, nodes=self.nodes, retries=self.retries)


@dataclass
class Listed:
    """A source made ready to decode: its parts, its item count, and the work folder of this input."""

    source: Source
    parts: Iterable[ListingPart | BatchPart]
    total: int | None
    base: str  # the request's work folder
    run: str  # this input's run folder in it
    label_names: list[str] | None
    fingerprint: str | None


def open_source_for(cfg: IngestRequest) -> Source:
    """Open and validate the source named by `cfg` (fails fast with the file and problem named)."""
    return open_source(cfg.source, cfg.format, cfg.source_options, cfg.image_column, cfg.label_column,
                       cfg.source_limits())


def list_source(source: Source, cfg: IngestRequest, runner: Runner = serial,
                progress: Progress | None = None) -> Listed:
    """List a source of many files (one task per unit) and cut it into parts; an in-process source's parts
    come from its batches as they are read."""
    base = work_base(cfg, source)
    if source.lister is None:
        fingerprint = input_fingerprint(cfg, source)
        run = f"{base}/run-{(fingerprint or uuid.uuid4().hex)[:16]}"  # no fingerprint: nothing to resume
        if source.parts is not None:  # positions of the whole source: the parts apply --limit themselves
            return Listed(source, source.parts(), source.size, base, run, source.label_names, fingerprint)
        total = source.size if cfg.limit is None or source.size is None else min(cfg.limit, source.size)
        return Listed(source, _batch_parts(source, cfg), total, base, run, source.label_names, fingerprint)
    task = functools.partial(_list_unit, source.lister, base, cfg.data_root_options)
    listings: list[UnitListing] = []
    for rec in runner(task, source.lister.units):
        listings.append(rec["listing"])
        if progress:
            progress.listed(rec["listing"].rows)
    listings.sort(key=lambda ul: ul.unit.index)
    total = sum(ul.rows for ul in listings)
    if total == 0:
        remove_work(cfg, base)
        raise SourceError(f"{source.url}: empty source (no files in the folder tree)" if source.kind == "folder"
                          else f"{source.url}: empty source (no items)")
    if source.fingerprint is None and all(ul.digest for ul in listings):
        source.fingerprint = digest([ul.digest for ul in listings])
    fingerprint = input_fingerprint(cfg, source)
    run_key = fingerprint or digest([ul.rows for ul in listings] + [ul.url for ul in listings] + [uuid.uuid4().hex])
    names = source.label_names or class_names(listings)
    source.splits = tuple(sorted({ul.unit.split for ul in listings if ul.unit.split and ul.rows})) or source.splits
    return Listed(source, listing_parts(listings), total, base, f"{base}/run-{run_key[:16]}", names, fingerprint)


def work_base(cfg: IngestRequest, source: Source) -> str:
    """The work folder of this request and source (see `work`)."""
    key = digest([WORK_FORMAT, source.kind, source.url, cfg.format, cfg.image_column, cfg.label_column,
                  cfg.shard_mb, pub.request_options(cfg), list(cfg.source_limits())])[:16]
    return work_root(cfg, key)


def _list_unit(lister: Any, base: str, options: dict, unit: Any) -> dict[str, Any]:
    return {"listing": lister.list_unit(unit, f"{base}/listing/u-{unit.index:05d}.parquet", options)}


def _batch_parts(source: Source, cfg: IngestRequest) -> Iterator[BatchPart]:
    """An in-process source's batches as parts (limited as `mapper.limit_mask` limits listed ones), with
    repeated ids quarantined here when the source does not guarantee unique ids."""
    assert source.batches is not None
    seen_ids: set[str] | None = None if source.ids_unique else set()
    start = 0
    for index, batch in enumerate(source.batches()):
        keep = limit_mask(start, len(batch), cfg.limit, source.size) if source.size is not None else (
            None if cfg.limit is None else np.arange(start, start + len(batch)) < cfg.limit)
        start += len(batch)
        if keep is not None:
            if not keep.any():
                if source.size is None:
                    return
                continue
            batch = batch.take(np.flatnonzero(keep))
        repeats: tuple[tuple[str, str, str], ...] = ()
        if seen_ids is not None:
            batch, repeats = _without_repeats(batch, seen_ids)
        yield BatchPart(f"b{index:06d}", batch, repeats)


def _without_repeats(batch: RawBatch, seen: set[str]) -> tuple[RawBatch, tuple[tuple[str, str, str], ...]]:
    """The batch less the items whose id was met before, and those items as quarantine entries."""
    repeated = []
    for i, id_ in enumerate(batch.ids):
        if id_ in seen:
            repeated.append(i)
        seen.add(id_)
    if not repeated:
        return batch, ()
    keep = np.setdiff1d(np.arange(len(batch)), repeated)
    return batch.take(keep), tuple((batch.ids[i], batch.sources[i], f"id {batch.ids[i]!r} repeats an earlier "
                                    "item's id") for i in repeated)


def input_fingerprint(cfg: IngestRequest, source: Source) -> str | None:
    """SHA-256 of the source's fingerprint (its files, listed but not read) and of everything else that
    shapes the rows and files, so that equal fingerprints mean equal datasets; None when the source has
    none. Kept in the manifest's source details, outside the version, for `find_unchanged`."""
    if source.fingerprint is None:
        return None
    return digest({"source": [source.kind, source.url, source.fingerprint], "format": "vae-shards/1",
                   "shard_mb": cfg.shard_mb, "columns": [cfg.image_column, cfg.label_column],
                   "options": pub.request_options(cfg), "limits": list(cfg.source_limits())})


def find_unchanged(cfg: IngestRequest, fingerprint: str | None) -> Published | None:
    """The newest existing version of `cfg.name` made from this very input (same fingerprint: see
    `input_fingerprint`), found without reading or decoding the source; None if there is none."""
    if fingerprint is None:
        return None
    fs, root = resolve(cfg.root(), cfg.data_root_options)
    for version in reversed(list_versions(cfg.root(), cfg.name, cfg.data_root_options)):
        vdir = dataset_dir(root, cfg.name, version)
        m = read_manifest(fs, vdir)
        # Under a stricter max_quarantine_fraction than it was made with, a full run must fail as usual.
        within = m.items.quarantined / m.items.seen <= cfg.max_quarantine_fraction
        if within and m.source.details.get("fingerprint") == fingerprint:
            return Published(m.name, m.version, to_url(fs, vdir), created=False, manifest=m)
    return None


@dataclass
class Decoded:
    """What the map step found, summed over the parts."""

    job: Job
    totals: dict[str, Any]
    nodes: dict[tuple[str, str], int]
    retries: int


def decode_parts(listed: Listed, cfg: IngestRequest, runner: Runner = serial,
                 progress: Progress | None = None) -> Decoded:
    """Run the map step on every part (skipping those an earlier run committed) and sum what they found."""
    with removed_on_rejection(cfg, listed.base):
        return _decode_parts(listed, cfg, runner, progress)


def _decode_parts(listed: Listed, cfg: IngestRequest, runner: Runner, progress: Progress | None) -> Decoded:
    carve_val = "val" not in listed.source.splits and cfg.val_fraction > 0
    job = Job(cfg, listed.run, _known_buckets(cfg, listed.total), listed.total, carve_val)
    totals: dict[str, Any] = {"seen": 0, "quarantined": 0, "max_label": -1, "shape": None, "shape_from": None,
                              "label_names": listed.label_names}
    nodes: dict[tuple[str, str], int] = {}
    retries = 0
    parts = iter(listed.parts)
    while not job.buckets and (part := next(parts, None)) is not None:
        # The bucket count follows from the image size: the first part that decodes an image sets it, alone.
        rec = next(runner(functools.partial(map_part, job), [part]))
        retries += _add(rec, totals, nodes, progress)
        if totals["shape"] is not None:
            job = replace(job, buckets=_known_buckets(cfg, listed.total, totals["shape"]))
            _same_buckets(rec, job)
    for rec in runner(functools.partial(map_part, job), parts):
        _same_buckets(rec, job)
        retries += _add(rec, totals, nodes, progress)
    if totals["seen"] == 0:
        raise IngestError(f"{listed.source.url}: empty source (no items)")
    return Decoded(job, totals, nodes, retries)


def _same_buckets(rec: dict[str, Any], job: Job) -> None:
    """IngestError for a part committed under another bucket count (its rows would sit in buckets no reduce
    task of this run reads); `removed_on_rejection` then clears the work folder for the next run."""
    if rec.get("bucket_count") not in (None, job.buckets):
        raise IngestError(f"{job.work}: part {rec['key']} was written for {rec['bucket_count']} buckets, this run "
                          f"has {job.buckets}; the work folder is removed, run again")


def _known_buckets(cfg: IngestRequest, total: int | None, shape: list[int] | None = None) -> int:
    """The bucket count, where the image size is known (from the request, or decoded): else 0."""
    if shape is None and (cfg.image_size is None or cfg.channels is None):
        return 0
    row = int(np.prod(shape)) if shape is not None else cfg.image_size[0] * cfg.image_size[1] * cfg.channels
    return buckets_for(total, row) if total else UNKNOWN_TOTAL_BUCKETS


def _add(rec: dict[str, Any], totals: dict[str, Any], nodes: dict[tuple[str, str], int],
         progress: Progress | None) -> int:
    """Add one part's record to the totals (an error for images that differ in shape); -> its retries."""
    if "shapes" in rec:
        (a, wa), (b, wb) = rec["shapes"]
        _shape_error(tuple(b), wb, tuple(a), wa)
    totals["seen"] += rec["seen"]
    totals["quarantined"] += rec["quarantined"]
    totals["max_label"] = max(totals["max_label"], rec["max_label"])
    if rec["shape"] is not None:
        if totals["shape"] is None:
            totals["shape"], totals["shape_from"] = rec["shape"], rec["shape_from"]
        elif rec["shape"] != totals["shape"]:
            _shape_error(tuple(rec["shape"]), rec["shape_from"], tuple(totals["shape"]), totals["shape_from"])
    if rec["decoded"]:
        where = (rec.get("node_id", "local"), rec.get("address", socket.gethostname()))
        nodes[where] = nodes.get(where, 0) + rec["decoded"]
    if progress:
        progress.decoded(rec["seen"], fresh=bool(rec["decoded"]))
    return rec["retries"] if rec["decoded"] else 0


def _shape_error(shape: tuple, where: str, other: tuple, other_from: str) -> None:
    (h, w, c), (H, W, C) = shape, other
    hint = [opt for opt, differs in (("--image-size H,W", (h, w) != (H, W)), ("--channels 1|3", c != C)) if differs]
    raise IngestError(f"images differ in shape: {where} is {h}x{w}x{c} but {other_from} is {H}x{W}x{C}; "
                      f"choose one with {' and '.join(hint)}")


def write_shards(decoded: Decoded, runner: Runner = serial, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Run the reduce step on every bucket; -> their records."""
    if decoded.totals["shape"] is None:  # nothing decoded: build_manifest names what was quarantined
        return []
    shape = tuple(decoded.totals["shape"])
    records = []
    for rec in runner(functools.partial(_reduce, decoded.job, shape), range(decoded.job.buckets)):
        records.append(rec)
        if progress:
            progress.shards(len(rec["shards"]))
    return sorted(records, key=lambda r: r["bucket"])


def _reduce(job: Job, shape: tuple[int, int, int], bucket: int) -> dict[str, Any]:
    return reduce_bucket(job, bucket, shape)


def finish(listed: Listed, decoded: Decoded, buckets: list[dict[str, Any]]) -> Published:
    """Build, check and publish the manifest; remove the work folder once the version is there."""
    cfg, job = decoded.job.request, decoded.job
    totals = decoded.totals
    if totals["shape"] is None:
        totals = {**totals, "shape": [1, 1, 1]}
    h, w, c = totals["shape"]
    options = {**pub.request_options(cfg), "rows_per_shard": rows_per_shard(cfg.shard_mb, h * w * c)}
    details = {**listed.source.details, "fingerprint": listed.fingerprint}
    with removed_on_rejection(cfg, listed.base):
        m = pub.build_manifest(job, listed.source, totals, buckets, options, details)
    url, created, m = pub.publish(job, m)
    remove_work(cfg, listed.base)
    nodes = [NodeRows(node_id=n, address=a, rows=r) for (n, a), r in sorted(decoded.nodes.items())]
    return Published(m.name, m.version, url, created, m, nodes, decoded.retries)


@contextlib.contextmanager
def removed_on_rejection(cfg: IngestRequest, base: str) -> Iterator[None]:
    """Remove the work folder when the block rejects the input (an IngestError: mixed shapes, too much
    quarantined, no usable image): running again cannot change that, so nothing is kept for a resume.
    Any other failure (a kill, a storage error) keeps it, and the next run resumes from it."""
    try:
        yield
    except IngestError:
        remove_work(cfg, base)
        raise


def remove_work(cfg: IngestRequest, base: str) -> None:
    """Remove this request's work folder (it holds only what ingestion wrote there)."""
    fs, path = resolve(base, cfg.data_root_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    parent = posixpath.dirname(path)
    try:
        if not fs.ls(parent):
            fs.rmdir(parent)
    except (FileNotFoundError, OSError):
        pass


def run_ingest(cfg: IngestRequest, progress: bool = False, runner: Runner = serial) -> Published:
    """Source -> published (or found) dataset version, every task run by `runner`."""
    bar = Progress(cfg.name, enabled=progress)
    started = time.monotonic()
    try:
        source = open_source_for(cfg)
        # A source read in process has its fingerprint already: an unchanged one writes nothing at all.
        if source.lister is None and (found := find_unchanged(cfg, input_fingerprint(cfg, source))) is not None:
            return found
        with locked(work_base(cfg, source), cfg.data_root_options):
            listed = list_source(source, cfg, runner, bar)
            if (found := find_unchanged(cfg, listed.fingerprint)) is not None:
                remove_work(cfg, listed.base)
                return found
            bar.start_decoding(listed.total)
            decoded = decode_parts(listed, cfg, runner, bar)
            buckets = write_shards(decoded, runner, bar)
            return finish(listed, decoded, buckets)
    finally:
        bar.close(time.monotonic() - started)
