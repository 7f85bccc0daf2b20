"""Ingestion as plain functions: any image source -> validated rows -> splits -> shards + manifest.

    req = IngestRequest(name="mnist", source="/data/mnist", data_root="s3://bucket/datasets")
    result = run_ingest(req)   # = find_unchanged(req, source) or publish(build(source, req), req)

Steps and why they are ordered this way:

1. `open_source_for` opens and validates the source as a whole (missing, empty, wrong magic,
   count mismatch): those fail at once with the file named, before anything is decoded.
   `find_unchanged` then looks for a version made from this very input (a fingerprint of the
   listed files and the options, kept in each manifest) and returns it without decoding anything.
2. `build` decodes every item exactly once (worker processes for encoded files), checks that shapes
   agree, drops exact pixel duplicates (the first in source order is kept), assigns splits and
   writes zstd Parquet shards to a local staging folder, hashing the rows as they pass. Each item
   ends as exactly one of ok, duplicate or quarantined. The version is the hash of the rows and of
   the options that shaped them, so it is known only once everything was seen.
3. `publish` finds that version under the data root and stops there if it exists (a re-run writes
   nothing); otherwise it uploads the shards and then the manifest, each atomically. A crash before
   the manifest leaves an unfinished version folder that readers ignore and the next run completes.

Where the parts live: `vae_core.ingestion.builder` (decoding, dedup, the version), `vae_core.data.splits` (which
split an item goes to), `vae_core.data.shard_writer` (shards and row hashes).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vae_core import settings
from vae_core.data.shards import (MANIFEST, SPLITS, Manifest, ShardInfo, dataset_dir, list_versions, read_manifest,
                                  sha256_hex)
from vae_core.data.sources.base import RawBatch, Source
from vae_core.data.sources.decode import ShapeSpec
from vae_core.data.sources.detect import open_source
from vae_core.data.sources.parallel import decode_stream
from vae_core.errors import IngestError
from vae_core.ingestion.builder import DatasetBuilder, input_fingerprint
from vae_core.requests import IngestRequest
from vae_core.results import IngestResult
from vae_core.storage import (atomic_put_file, atomic_write_bytes, is_local, remove_temporaries, resolve,
                              temporary_name, to_url, writer_gone)

# ------------------------------------------------------------------------------------------ results


@dataclass
class StagedDataset:
    """A fully built dataset in local staging, not yet published. `manifest.created_at` is set at publish."""

    manifest: Manifest
    staging: Path

    def cleanup(self) -> None:
        remove_staging(self.staging)


@dataclass
class Published:
    """A dataset version under the data root: made by this run (`created`) or found there."""

    name: str
    version: str
    url: str
    created: bool  # False when this version already existed and nothing was written
    manifest: Manifest

    def summary(self) -> IngestResult:
        """The stage's result (what `vae ingest --json` prints)."""
        m, items = self.manifest, self.manifest.items
        return IngestResult(name=self.name, version=self.version, path=self.url, created=self.created,
                            counts=m.counts, shape=(m.height, m.width, m.channels), seen=items.seen,
                            duplicates=items.duplicates, label_conflicts=m.label_conflicts,
                            quarantined=items.quarantined)


# ------------------------------------------------------------------------------------------ staging

DATA_ROOT_STAGING = ".staging"  # not a dataset name (see NAME_RULE): no reference or listing sees it


def staging_root(cfg: IngestRequest) -> Path:
    """The local folder that holds staging folders: `cfg.staging_dir`; else `.staging` in the data root when
    that is local (the disk the version goes to); else `staging` in VAE_HOME when that is local; else the
    system temp folder. Never a shared system folder by default, where a killed run's leftovers would
    stay unnoticed: the next run in the same place removes them (`remove_stale_staging`)."""
    if cfg.staging_dir:
        return Path(cfg.staging_dir)
    for url, options, folder in ((cfg.root(), cfg.data_root_options, DATA_ROOT_STAGING), (settings.vae_home(), {}, "staging")):
        fs, path = resolve(url, options)
        if is_local(fs):
            return Path(path) / folder
    return Path(tempfile.gettempdir())


def make_staging(root: Path) -> Path:
    """A new staging folder in `root`, named as a temporary of this process (see `shards.TEMPORARY`), so
    that a later run can tell whether its writer is gone."""
    for attempt in range(3):
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(temporary_name(str(root / "vae-ingest")))
        try:
            folder.mkdir()
            return folder
        except FileNotFoundError:  # a concurrent run removed the empty root just now: make it again
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def remove_stale_staging(root: Path) -> list[Path]:
    """Remove the staging folders in `root` whose writer is gone (a SIGKILL skips every clean-up) and
    return them; a live run's folder and anything not named by `make_staging` stay."""
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return []
    now = time.time()
    stale = [p for p in entries if p.is_dir() and p.name.startswith(".vae-ingest.tmp-")
             and writer_gone(p.name, p.stat().st_mtime, now)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def remove_staging(folder: Path) -> None:
    """Remove a staging folder, and the data root's staging root too when that is left empty (the data root
    then holds datasets only; a concurrent run's `make_staging` makes it again)."""
    shutil.rmtree(folder, ignore_errors=True)
    if folder.parent.name == DATA_ROOT_STAGING:
        with contextlib.suppress(OSError):  # not empty (another run stages there), or gone already
            folder.parent.rmdir()


# ----------------------------------------------------------------------------------------- pipeline


def open_source_for(cfg: IngestRequest) -> Source:
    """Open and validate the source named by `cfg` (fails fast with the file and problem named)."""
    return open_source(cfg.source, cfg.format, cfg.source_options, cfg.image_column, cfg.label_column,
                       cfg.source_limits())


def build(source: Source, cfg: IngestRequest, progress: bool = False) -> StagedDataset:
    """Decode, validate, dedup, split and shard `source` into a local staging folder (see `staging_root`),
    after removing the staging folders that killed runs left there."""
    root = staging_root(cfg)
    remove_stale_staging(root)
    staging = make_staging(root)
    builder: DatasetBuilder | None = None
    try:
        builder = DatasetBuilder(source, cfg, staging)
        spec = ShapeSpec(cfg.image_size, cfg.channels, cfg.fit, cfg.source_limits())
        total = source.size if cfg.limit is None else min(cfg.limit, source.size or cfg.limit)
        with tqdm(total=total, desc=f"ingest {cfg.name}", unit="img", disable=not progress, smoothing=0.1) as bar:
            for batch, decoded in decode_stream(_limited(source.batches(), cfg.limit, source.size), spec, cfg.workers):
                builder.add(batch, decoded)
                bar.update(len(batch))
        if builder.tally.seen == 0:
            raise IngestError(f"{source.url}: empty source (no items)")
        return StagedDataset(manifest=builder.finish(), staging=staging)
    except BaseException:
        if builder is not None:
            builder.writer.shutdown(wait=True, cancel_futures=True)
        remove_staging(staging)
        raise


def _limited(batches: Iterator[RawBatch], limit: int | None, size: int | None) -> Iterator[RawBatch]:
    """`limit` items of the stream (all when None). With the source's size known: exactly `limit` items
    spread evenly over the source order (item p is kept iff p*limit//size steps up at p), so that a
    sample of a source whose splits come one after another holds all of them, and re-runs keep the
    same items. With the size unknown: the first `limit` items."""
    if limit is None:
        yield from batches
        return
    start = 0
    for batch in batches:
        p = np.arange(start, start + len(batch))
        start += len(batch)
        keep = p < limit if size is None else p * limit // size != (p + 1) * limit // size
        if keep.all():
            yield batch
        elif keep.any():
            yield batch.take(np.flatnonzero(keep))
        elif size is None:
            return


def publish(staged: StagedDataset, cfg: IngestRequest) -> Published:
    """Write the staged version under the data root unless it is already there (then write nothing)."""
    fs, root = resolve(cfg.root(), cfg.data_root_options)
    m = staged.manifest
    vdir = dataset_dir(root, m.name, m.version)
    url = to_url(fs, vdir)
    if fs.exists(posixpath.join(vdir, MANIFEST)):
        return Published(m.name, m.version, url, created=False, manifest=read_manifest(fs, vdir))
    written = [vdir, *(posixpath.join(vdir, s) for s in m.splits)]  # the folders this run writes
    for folder in written:
        remove_temporaries(fs, folder)  # left by an earlier run that was killed mid-upload
    for split in m.splits.values():
        for shard in split.shards:
            dest = posixpath.join(vdir, shard.path)
            if _already_there(fs, dest, shard):
                continue  # left by an earlier run that stopped before its manifest
            atomic_put_file(fs, str(staged.staging / shard.path), dest)
    m = m.model_copy(update={"created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")})
    # A concurrent run of the same input may have finished meanwhile: its manifest stays (readers may have
    # seen its created_at), and this run reports the version as found.
    created = atomic_write_bytes(fs, posixpath.join(vdir, MANIFEST), m.to_json().encode(), replace=False)
    for folder in written:  # the version is final: temporaries of a run killed meanwhile go too
        remove_temporaries(fs, folder)
    return Published(m.name, m.version, url, created=created, manifest=m if created else read_manifest(fs, vdir))


def _already_there(fs: Any, dest: str, shard: ShardInfo) -> bool:
    try:
        return fs.size(dest) == shard.bytes and sha256_hex(fs.cat_file(dest)) == shard.sha256
    except FileNotFoundError:
        return False


def find_unchanged(cfg: IngestRequest, source: Source) -> Published | None:
    """The newest existing version of `cfg.name` made from this very input (same fingerprint: see
    `builder.input_fingerprint`), found without reading or decoding the source; None if there is none."""
    fingerprint = input_fingerprint(cfg, source)
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


def run_ingest(cfg: IngestRequest, progress: bool = False) -> Published:
    """Source -> published (or found) dataset version."""
    source = open_source_for(cfg)
    if (found := find_unchanged(cfg, source)) is not None:
        return found
    staged = build(source, cfg, progress)
    try:
        return publish(staged, cfg)
    finally:
        staged.cleanup()


# ----------------------------------------------------------------------------------------- summary


def summary_markdown(result: Published) -> str:
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
    lines += [f"| {s} | {m.counts[s]:,} | {len(m.splits[s].shards) if s in m.splits else 0} |" for s in SPLITS]
    stats = ", ".join(f"{a:.4f} / {b:.4f}" for a, b in zip(m.channel_mean, m.channel_std))
    i = m.items
    lines += [
        "",
        f"Channel mean / std (pixel/255, train): {stats}",
        "",
        f"Items: {i.seen:,} seen = {i.ok:,} ok + {i.duplicates:,} duplicates + {i.quarantined:,} quarantined"
        + (f"; {m.label_conflicts:,} duplicates disagree with the kept copy's label" if m.label_conflicts else ""),
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
    return "\n".join(lines + _label_conflict_lines(m)) + "\n"


def _label_conflict_lines(m: Manifest) -> list[str]:
    """Markdown lines listing the duplicates whose label differs from the kept copy's (none: no lines)."""
    conflicts = [d for d in m.duplicates if d.label_conflict]
    if not conflicts:
        return []
    names = m.label_names or []

    def label(y: int | None) -> str:
        return "none" if y is None else f"{y} ({names[y]})" if 0 <= y < len(names) else str(y)

    lines = ["", f"{len(conflicts):,} duplicates disagree with the kept copy on their label (label noise; "
             "only the kept copy's label is in the dataset):", "",
             "| duplicate | its label | kept | kept label |", "|---|---|---|---|"]
    lines += [f"| `{d.id}` | {label(d.label)} | `{d.duplicate_of}` | {label(d.kept_label)} |" for d in conflicts[:20]]
    if len(conflicts) > 20:
        lines.append(f"| ... | | | {len(conflicts) - 20} more in manifest.json |")
    return lines
