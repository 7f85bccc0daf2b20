"""Sources of many files (a folder tree, a prefix, a file list) as listings: Parquet tables of the files to
read, cut into parts that tasks read independently.

A listing is written by whoever lists (a task per folder unit, or the driver streaming a file list) to the
run's work folder, one table per unit, with row groups of `PART_ROWS` files: a part is one row group. No
process holds a list of every file: the driver holds units and parts (one per `PART_ROWS` files).

Listing schema: path (what the filesystem opens, as bytes: `os.fsencode`), id (stable, unique per source), source (URL for people),
size (bytes; null when the store cannot say), label (int32; null for none), error (a reason found while
listing, such as a repeated id; null when the file is to be read).

Reading a part fetches the files' bytes (local files are left for the decoder to read itself); transient
storage errors are retried with backoff (`fetch`), and what still fails becomes that item's quarantine
reason, never an exception.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vae_core.data.sources.base import LocalFile, RawBatch
from vae_core.data.sources.limits import SourceLimits
from vae_core.data.sources.remote import open_fs
from vae_core.storage import is_local, resolve

PART_ROWS = 4096  # files per part: one decode task's work, and one row group of a listing
LISTING_SCHEMA = pa.schema([
    pa.field("path", pa.binary(), nullable=False),  # bytes: a local file name need not be valid UTF-8
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("size", pa.int64()),
    pa.field("label", pa.int32()),
    pa.field("error", pa.string()),
])
# Errors no retry can change: the file is missing, forbidden, a folder, or the request was refused.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)
# Keys of a listing entry that change when a file does (object stores' ETag, modification times): fingerprints.
STAMPS = ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created")
RETRY_TRIES = 5
RETRY_BASE_S = 0.2  # backoff: 0.2, 0.4, 0.8, 1.6 s, each with up to 50% jitter


@dataclass(frozen=True)
class Unit:
    """What one listing task lists: the files directly in `path`, or (`deep`) every file below it.

    cls and split: the class folder and the split folder every file it lists lies in, where there are such.
    """

    index: int
    path: str
    deep: bool
    cls: str | None = None  # the class folder it lists (its name is the label's name)
    split: str | None = None


@dataclass(frozen=True)
class UnitListing:
    """What listing a unit found: its row count, and a digest of (id, size, stamp) per file for the
    source's fingerprint (None when some file has no stamp)."""

    unit: Unit
    url: str  # the listing table
    rows: int
    digest: str | None
    names: tuple[str, ...] | None = None  # label names a file list gave as text, in index order


@dataclass(frozen=True)
class ListingPart:
    """One row group of a listing: `size` files starting at position `start` of the source order."""

    key: str
    url: str
    group: int
    start: int
    size: int
    split: str | None = None  # of every file in it (a split folder's), else None
    label: int | None = None  # of every file in it (a class folder's), else the listing's label column


def write_listing(fs: fsspec.AbstractFileSystem, path: str, batches: Iterator[pa.RecordBatch]) -> int:
    """Write listing batches (LISTING_SCHEMA) to `path` in row groups of PART_ROWS; -> rows written.
    Not atomic on purpose: a listing is rewritten by every run and read only after it is complete."""
    rows = 0
    pending: list[pa.RecordBatch] = []
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f, pq.ParquetWriter(f, LISTING_SCHEMA, compression="zstd") as writer:
        for batch in batches:
            pending.append(batch.select(LISTING_SCHEMA.names).cast(LISTING_SCHEMA))
            held = sum(len(b) for b in pending)
            while held >= PART_ROWS:
                table = pa.Table.from_batches(pending, LISTING_SCHEMA)
                writer.write_table(table.slice(0, PART_ROWS), row_group_size=PART_ROWS)
                rest = table.slice(PART_ROWS)
                pending, held = rest.to_batches(), len(rest)
                rows += PART_ROWS
        if held := sum(len(b) for b in pending):
            writer.write_table(pa.Table.from_batches(pending, LISTING_SCHEMA), row_group_size=PART_ROWS)
            rows += held
    return rows


def class_names(listings: list[UnitListing]) -> list[str] | None:
    """Label names: a file list's own, else the sorted names of the class folders that hold files."""
    for ul in listings:
        if ul.names is not None:
            return list(ul.names)
    return sorted({ul.unit.cls for ul in listings if ul.unit.cls is not None and ul.rows}) or None


def listing_parts(listings: list[UnitListing]) -> list[ListingPart]:
    """The parts of every unit's listing, in unit order; their positions count on across units."""
    names = class_names(listings) if not any(ul.names for ul in listings) else None
    index = {n: i for i, n in enumerate(names or [])}
    parts, start = [], 0
    for ul in listings:
        label = index.get(ul.unit.cls) if ul.unit.cls is not None else None
        for group, first in enumerate(range(0, ul.rows, PART_ROWS)):
            size = min(PART_ROWS, ul.rows - first)
            parts.append(ListingPart(f"u{ul.unit.index:05d}-{group:05d}", ul.url, group, start, size,
                                     ul.unit.split, label))
            start += size
    return parts


def read_part(part: ListingPart, listing_options: dict | None, source_options: dict | None,
              limits: SourceLimits, keep: np.ndarray | None = None) -> tuple[RawBatch, int]:
    """The part's files as one encoded RawBatch (only the rows `keep` selects, when given), and how many
    times a read was retried."""
    fs, path = resolve(part.url, listing_options)
    with fs.open(path, "rb") as f:
        table = pq.ParquetFile(f).read_row_group(part.group)
    if keep is not None:
        table = table.take(pa.array(np.flatnonzero(keep)))
    paths = [os.fsdecode(p) for p in table.column("path").to_pylist()]
    sizes = table.column("size").to_pylist()
    errors: list[str | None] = table.column("error").to_pylist()
    for i, size in enumerate(sizes):
        if errors[i] is None:
            errors[i] = size_problem(size, limits)
    encoded, retries = fetch(paths, sizes, errors, source_options, limits)
    labels = (np.full(len(paths), part.label, np.int32) if part.label is not None
              else table.column("label").fill_null(-1).to_numpy().astype(np.int32))
    return RawBatch(ids=table.column("id").to_pylist(), sources=table.column("source").to_pylist(), labels=labels,
                    splits=None if part.split is None else [part.split] * len(paths), encoded=encoded,
                    errors=errors), retries


def size_problem(size: int | None, limits: SourceLimits) -> str | None:
    """Why a file of `size` bytes (None: unknown until read) is not decoded, or None."""
    if size == 0:
        return "empty file (0 bytes)"
    return None if size is None or size < 0 else limits.file_problem(size)


def fetch(paths: list[str], sizes: list[int | None], errors: list[str | None], options: dict | None,
          limits: SourceLimits) -> tuple[list[Any], int]:
    """Bytes (or a LocalFile) of each path whose `errors` entry is None, filling `errors` for those that
    cannot be read; -> (per path bytes, LocalFile or None; retries made). Paths are grouped by filesystem
    (a file list may name several); object stores are read concurrently."""
    out: list[Any] = [None] * len(paths)
    retries = 0
    by_fs: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        if errors[i] is None:
            by_fs.setdefault(p.split("://", 1)[0] if "://" in p else "", []).append(i)
    for at in by_fs.values():
        fs, _ = open_fs(paths[at[0]], options)  # the request's checks: HTTP redirects to metadata refused
        if is_local(fs):
            for i in at:
                out[i] = LocalFile(fs._strip_protocol(paths[i]))
            continue
        got, n = read_with_retries(fs, [fs._strip_protocol(paths[i]) for i in at],
                                   [sizes[i] for i in at], limits)
        retries += n
        for i, data in zip(at, got):
            if isinstance(data, BaseException):
                errors[i] = f"cannot read: {describe(data)}"
            elif (problem := size_problem(len(data), limits)) is not None:
                errors[i] = problem
            else:
                out[i] = data
    return out, retries


def read_with_retries(fs: fsspec.AbstractFileSystem, paths: list[str], sizes: list[int | None],
                      limits: SourceLimits) -> tuple[list[bytes | BaseException], int]:
    """Each file's bytes, or the error that persisted; a transient error (throttling, a dropped connection,
    a 5xx) is retried RETRY_TRIES times with exponential backoff. -> (results, retries made)."""
    got: list[bytes | BaseException] = [RuntimeError("not read")] * len(paths)
    todo, retries = list(range(len(paths))), 0
    for attempt in range(RETRY_TRIES):
        if attempt:
            retries += len(todo)
            time.sleep(RETRY_BASE_S * 2 ** (attempt - 1) * (1 + random.random() / 2))
        results = _read_all(fs, [paths[i] for i in todo], [sizes[i] for i in todo], limits)
        for i, r in zip(todo, results):
            got[i] = r
        todo = [i for i in todo if isinstance(got[i], BaseException) and not isinstance(got[i], PERMANENT)]
        if not todo:
            break
    return got, retries


def _read_all(fs: fsspec.AbstractFileSystem, paths: list[str], sizes: list[int | None],
              limits: SourceLimits) -> list[bytes | BaseException]:
    """One attempt at every path; a file of unknown size is read as a stream, at most one byte past the limit.
    `fs.cat(list)` is not used: it expands glob characters, and file names may hold ``[``, ``*`` or ``?``."""
    if getattr(fs, "async_impl", False) and all(s is not None for s in sizes):
        from fsspec.asyn import sync

        async def gather() -> list[bytes | BaseException]:
            return await asyncio.gather(*(fs._cat_file(p) for p in paths), return_exceptions=True)

        return sync(fs.loop, gather)
    return [_read_capped(fs, p, None if s is not None else limits.max_file_bytes + 1) for p, s in zip(paths, sizes)]


def _read_capped(fs: fsspec.AbstractFileSystem, path: str, most: int | None) -> bytes | BaseException:
    try:
        if most is None:
            return fs.cat_file(path)
        with fs.open(path, "rb") as f:
            return f.read(most)
    except Exception as e:  # recorded per file: one unreadable file must not stop the run
        return e


def describe(error: BaseException) -> str:
    """One line: the error and what caused it (fsspec's HTTP filesystem reports a refused or failed request
    as FileNotFoundError, from the real one)."""
    text = f"{type(error).__name__}: {' '.join(str(error).split())}"
    cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return f"{text} ({describe(cause)})" if cause is not None else text
