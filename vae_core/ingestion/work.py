"""The work folder of an ingestion run, under the data root beside the versions it makes, and what every
task of the run is given (`Job`).

    <root>/<name>/.ingest-<key>/listing/u-00000.parquet      the source's listing (rewritten by each run)
    <root>/<name>/.ingest-<key>/run-<input>/parts/...         decoded rows by content bucket, per part
    <root>/<name>/.ingest-<key>/run-<input>/shards/...        finished shards, named by their SHA-256

`key` hashes the request's options that shape the rows and the source's URL; `input` is the source's
fingerprint (or its listing's digest), so a run killed at any point and started again on the same input
finds every part and shard it finished, each committed by a record written after its files. A changed
input gets a new run folder. The folder's name starts with a dot: no dataset reference or listing of
versions sees it. It is removed once the version is published.

One run at a time works in a work folder (`locked`): a second run of the same request and source while
the first is alive stops with an "in use" error; a lock whose process is gone (killed) is taken over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec

from vae_core.data.shards import dataset_dir
from vae_core.errors import IngestError
from vae_core.storage import atomic_write_bytes, is_local, resolve, temporary_name, to_url, writer_gone

if TYPE_CHECKING:
    from vae_core.requests import IngestRequest

# A content bucket is what one reduce task holds in memory: at most BUCKET_BYTES of pixels, at most
# BUCKET_ROWS rows. Sizing by bytes keeps big images' tasks bounded and lets small images share fewer,
# larger buckets (each part writes a file per bucket it has rows for: fewer buckets, fewer files). 64 MiB is
# reached from about 8 x 10^4 small images on, so a reduce task's memory is flat from there up (at 256 MiB it
# still grew 2.3x from 10^5 to 10^6 images); the price is 4x the bucket files (docs/ingest.md).
BUCKET_BYTES = 64 << 20
BUCKET_ROWS = 1 << 20
UNKNOWN_TOTAL_BUCKETS = 8  # for a source whose length is not known up front
# Part of every work folder's key: a change to how parts or buckets are laid out gets new work folders, so
# a run never resumes from files an older layout wrote.
WORK_FORMAT = "parts-buckets/2"  # 2: 64 MiB buckets


def work_root(req: IngestRequest, key: str) -> str:
    fs, root = resolve(req.root(), req.data_root_options)
    return to_url(fs, posixpath.join(dataset_dir(root, req.name), f".ingest-{key}"))


def buckets_for(items: int, row_bytes: int) -> int:
    """Content buckets for `items` rows of `row_bytes` pixels each: a function of the input alone, never of
    the workers."""
    per_bucket = max(1, min(BUCKET_ROWS, BUCKET_BYTES // max(1, row_bytes)))
    return max(1, -(-items // per_bucket))


@dataclass(frozen=True)
class Job:
    """What every map and reduce task of one run is given (picklable)."""

    request: IngestRequest
    work: str  # this run's folder (URL)
    buckets: int  # 0 until the image size is known (the first part that decodes an image sets it)
    total: int | None  # items in the source order (for --limit); None when unknown
    carve_val: bool  # whether val is carved from train (the source has no val split of its own)

    def fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return resolve(self.work, self.request.data_root_options)


def bucket_dir(work: str, bucket: int) -> str:
    return f"{work}/parts/b-{bucket:05d}"


def part_record(work: str, key: str) -> str:
    return f"{work}/parts/commit/{key}.json"


def bucket_record(work: str, bucket: int) -> str:
    return f"{work}/shards/commit/b-{bucket:05d}.json"


def write_file(fs: fsspec.AbstractFileSystem, path: str, data: bytes, replace: bool = True) -> bool:
    """Atomic write (temporary name, then rename), making the folder first where the store has folders."""
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    return atomic_write_bytes(fs, path, data, replace=replace)


def write_record(fs: fsspec.AbstractFileSystem, path: str, record: dict[str, Any]) -> None:
    """A commit record: written last, after the files it names, so its presence means they are complete."""
    write_file(fs, path, json.dumps(record, sort_keys=True).encode())


def read_record(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def locked(base: str, options: dict | None) -> Iterator[None]:
    """Hold the work folder `base` while the block runs (see the module docstring).

    The lock is a file named as a temporary of this process (`storage.temporary_name`), so whether its
    writer is gone is told as for any temporary. Two runs that lock at the same moment both see both
    locks; the one whose lock name sorts later gives way."""
    fs, path = resolve(base, options)
    mine = temporary_name(posixpath.join(path, "lock"))
    fs.makedirs(path, exist_ok=True)
    for other in _live_locks(fs, path, mine):
        raise _in_use(base, other)
    fs.pipe_file(mine, b"")
    try:
        if (first := min([mine, *_live_locks(fs, path, mine)])) != mine:
            raise _in_use(base, first)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(mine)


def _live_locks(fs: fsspec.AbstractFileSystem, path: str, mine: str) -> list[str]:
    """Lock files in `path` other than `mine` whose process is alive; those of gone processes are removed."""
    fs.invalidate_cache(path)
    now, live = time.time(), []
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:  # an object store has no empty folders: a prefix with no lock yet is not found
        return []
    for entry in entries:
        name = posixpath.basename(entry["name"])
        if not name.startswith(".lock.tmp-") or entry["name"] == mine:
            continue
        if writer_gone(name, entry.get("mtime") or entry.get("created"), now):
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(entry["name"])
        else:
            live.append(entry["name"])
    return live


def _in_use(base: str, lock: str) -> IngestError:
    return IngestError(f"{base} is in use by another ingestion run of this source ({posixpath.basename(lock)}); "
                       "wait for it to finish, then run again (a run that was killed is taken over)")
