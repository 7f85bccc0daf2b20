"""Decoded batches -> a staged dataset: the step of ingestion (`vae_core.ingestion.ingest.build`) that sees
every item.

`DatasetBuilder` takes the decoded batches in source order, checks that shapes agree, drops exact
pixel duplicates (the first in source order is kept; where a duplicate's label differs from the kept
copy's, the manifest's duplicate list records both), assigns splits (`vae_core.data.splits`) and hands
the rows to one `SplitWriter` per split (`vae_core.data.shard_writer`). Each item ends as exactly one of
ok, duplicate or quarantined. The version is the hash of the rows and of the options that shaped
them, so it is known only once everything was seen.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vae_core.data.shard_writer import Gather, SplitWriter
from vae_core.data.shards import (FORMAT, SPLITS, DuplicateEntry, ItemCounts, Manifest, QuarantineEntry,
                                  SourceDescription, SplitInfo)
from vae_core.data.sources.base import RawBatch, Source
from vae_core.data.sources.parallel import Decoded
from vae_core.data.splits import assign_splits
from vae_core.errors import IngestError

if TYPE_CHECKING:
    from vae_core.requests import IngestRequest


def _take(items: list, at: list[int] | np.ndarray) -> list:
    """items[at] for a Python list (map does the loop in C)."""
    return list(map(items.__getitem__, at if isinstance(at, list) else at.tolist()))


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
        if len(sel) == len(self.ids):  # every row: nothing to gather
            return replace(self, pixels=Gather(self.pixels))  # type: ignore[arg-type]
        pixels = Gather(self.pixels, sel) if 2 * len(sel) >= len(self.pixels) else Gather(self.pixels[sel])
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

    def __init__(self, source: Source, cfg: IngestRequest, staging: Path):
        self.source, self.cfg, self.staging = source, cfg, staging
        self.tally = _Tally()
        self.shape: tuple[int, int, int] | None = None
        self.shape_from = ""
        self.digests: dict[bytes, str] = {}
        self.ids_seen: set[str] | None = None if source.ids_unique else set()
        self.carve_val = "val" not in source.splits and cfg.val_fraction > 0
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self.splits: dict[str, SplitWriter] = {}

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
            hint = [opt for opt, differs in (("--image-size H,W", (h, w) != (H, W)), ("--channels 1|3", c != C))
                    if differs]
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
                    label = int(batch.labels[ok[k]])  # the kept copy's label is looked up once, in `finish`
                    self.tally.duplicates.append(DuplicateEntry(id=ids[k], source=batch.sources[ok[k]],
                                                                duplicate_of=firsts[k], label=label if label >= 0 else None))
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
            if len(sel):
                part, writer = rows.take(sel), self._writer(split, pixels)
                writer.append(part.ids, part.pixels, part.labels, part.sources, part.digests)  # type: ignore[arg-type]

    def _writer(self, split: str, pixels: np.ndarray) -> SplitWriter:
        if split not in self.splits:
            row = int(np.prod(pixels.shape[1:]))
            self.splits[split] = SplitWriter(split, self.staging, row, pixels.shape[3], self.rows_per_shard(row),
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
        details = {**self.source.details, "fingerprint": input_fingerprint(self.cfg, self.source)}
        m = Manifest(
            name=self.cfg.name, version="pending", created_at="", height=h, width=w, channels=c,
            splits=split_infos, label_names=names, channel_mean=mean, channel_std=std,
            items=ItemCounts(seen=t.seen, ok=ok, duplicates=len(t.duplicates), quarantined=len(t.quarantine)),
            quarantine=t.quarantine, duplicates=self._with_kept_labels(split_infos),
            source=SourceDescription(kind=self.source.kind, url=self.source.url, details=details),
            options=options,
        )
        return m.model_copy(update={"version": content_version(m, {s: w.content_hash() for s, w in self.splits.items()})})

    def _with_kept_labels(self, split_infos: dict[str, SplitInfo]) -> list[DuplicateEntry]:
        """The duplicates, each with the kept copy's label beside its own, so that duplicates that disagree
        on their label (label noise) show in the manifest. The kept labels are read back from the staged
        shards' id and label columns: nothing extra is held per row while the rows stream past."""
        duplicates = self.tally.duplicates
        if not duplicates or (self.tally.max_label < 0 and all(d.label is None for d in duplicates)):
            return duplicates  # no labels anywhere: every pair agrees
        wanted = pa.array(sorted({d.duplicate_of for d in duplicates}), pa.string())
        kept: dict[str, int | None] = {}
        for info in split_infos.values():
            for shard in info.shards:
                table = pq.read_table(self.staging / shard.path, columns=["id", "label"])
                table = table.filter(pc.is_in(table.column("id"), value_set=wanted))
                kept.update(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))
        return [d.model_copy(update={"kept_label": kept[d.duplicate_of]}) for d in duplicates]

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


def row_options(cfg: IngestRequest) -> dict[str, Any]:
    """The request's options that shape the rows."""
    return {
        "image_size": list(cfg.image_size) if cfg.image_size else None,
        "channels": cfg.channels,
        "fit": cfg.fit if cfg.image_size else None,
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "limit": cfg.limit,
    }


def options_for_version(cfg: IngestRequest, rows_per_shard: int) -> dict[str, Any]:
    """The options that shape the rows and files; recorded in the manifest and part of the version."""
    return {**row_options(cfg), "rows_per_shard": rows_per_shard}


def input_fingerprint(cfg: IngestRequest, source: Source) -> str | None:
    """SHA-256 of the source's fingerprint (its files, listed but not read) and of everything else that
    shapes the rows and files, so that equal fingerprints mean equal datasets; None when the source has
    none. Kept in the manifest's source details, outside the version, for `ingest.find_unchanged`."""
    if source.fingerprint is None:
        return None
    body = {"source": [source.kind, source.url, source.fingerprint], "format": FORMAT, "shard_mb": cfg.shard_mb,
            "columns": [cfg.image_column, cfg.label_column], "options": row_options(cfg),
            "limits": list(cfg.source_limits())}  # a raised limit admits items quarantined before
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def content_version(m: Manifest, split_hashes: dict[str, str]) -> str:
    """16 hex digits of SHA-256 over the rows of every split and everything the manifest says about
    them, except the version itself, the creation time and the source's details (which may hold
    incidental facts such as file counts already covered by the rows)."""
    body = m.model_dump(mode="json", exclude={"version", "created_at"})
    body["source"] = {"kind": m.source.kind}
    body["rows"] = split_hashes
    body["format"] = FORMAT
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
