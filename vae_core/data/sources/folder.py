"""A folder tree of image files at any fsspec URL; the first-level subfolder is the class.

    root/cat/001.png   -> id "cat/001.png", label index of "cat"
    root/loose.jpg     -> id "loose.jpg", no label

When every first-level folder is a split name (train, val/valid/validation, test) and no file lies beside
them, those are the source's own splits and the class is the second level: ``root/train/cat/001.png``.

Every file under the root is an item, whatever its extension: files that are not images end up in
the quarantine with the reason, so nothing is silently skipped. A file above the size limit is
quarantined unread.

The tree is listed in units (`listing.Unit`): each class folder is one, listed by its own task (in
parallel, on object stores too), and the files directly in the root (or in a split folder) are one more.
Only the first one or two levels are listed here, on opening.

A local file name that is not valid UTF-8 keeps its bytes: each byte that does not decode appears in the
id as ``%XX`` (``bad\\xff.png`` -> ``bad%FF.png``); should that equal another file's name in the same
folder, the later one is quarantined as a repeated id.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa

from vae_core.data.sources.base import Format, Source, SourceError, SourceOptions, printable, split_from_name
from vae_core.data.sources.listing import STAMPS, Unit, UnitListing, write_listing
from vae_core.data.sources.remote import open_fs
from vae_core.storage import is_local, resolve, to_url

BATCH = 4096  # files per listing batch


def relative(root: str, path: str) -> str:
    return posixpath.relpath(path, root) if root not in ("", "/") else path.lstrip("/")


@dataclass(frozen=True)
class FolderLister:
    """Lists a folder tree unit by unit (see the module docstring); picklable, so tasks can run it."""

    url: str
    root: str
    storage_options: dict[str, Any] | None
    units: tuple[Unit, ...]

    def list_unit(self, unit: Unit, out_url: str, out_options: dict | None) -> UnitListing:
        """List one unit's files, sorted by path, into the listing table at `out_url` (runs in a task)."""
        fs, _ = open_fs(self.url, self.storage_options)
        found = sorted(_walk(fs, unit.path, unit.deep))
        digest = hashlib.sha256()
        stamped = True
        seen: set[str] = set()

        def batches() -> Iterator[pa.RecordBatch]:
            nonlocal stamped
            for start in range(0, len(found), BATCH):
                chunk = found[start : start + BATCH]
                ids = [printable(relative(self.root, p)) for p, _, _ in chunk]
                errors = []
                for i in ids:  # an escaped name may equal a real one
                    errors.append(f"id {i!r} repeats an earlier item's id" if i in seen else None)
                    seen.add(i)
                for (p, size, stamp), i in zip(chunk, ids):
                    digest.update(json.dumps([i, size, stamp]).encode())
                    stamped = stamped and stamp is not None
                yield pa.record_batch({
                    "path": [os.fsencode(p if is_local(fs) else fs.unstrip_protocol(p)) for p, _, _ in chunk],
                    "id": ids,
                    "source": [printable(to_url(fs, p)) for p, _, _ in chunk],
                    "size": pa.array([s for _, s, _ in chunk], pa.int64()),
                    "label": pa.nulls(len(chunk), pa.int32()),
                    "error": pa.array(errors, pa.string()),
                })

        out_fs, out_path = resolve(out_url, out_options)
        rows = write_listing(out_fs, out_path, batches())
        return UnitListing(unit, out_url, rows, digest.hexdigest() if stamped else None)


def open_folder(url: str, options: SourceOptions = SourceOptions()) -> Source:
    """Folder URL -> Source whose files are listed unit by unit (`FolderLister`)."""
    fs, root = open_fs(url, options.storage_options)
    if not fs.isdir(root):
        raise SourceError(f"{url}: not a folder")
    dirs, files = _level(fs, root)
    by_split = bool(dirs) and not files and all(split_from_name(printable(posixpath.basename(d))) for d in dirs)
    units: list[Unit] = []
    if by_split:
        for d in dirs:
            split = split_from_name(printable(posixpath.basename(d)))
            subdirs, _ = _level(fs, d)
            units += [Unit(0, s, True, printable(posixpath.basename(s)), split) for s in subdirs]
            units.append(Unit(0, d, False, None, split))
    else:
        units = [Unit(0, d, True, printable(posixpath.basename(d))) for d in dirs] + [Unit(0, root, False)]
    units = [Unit(i, u.path, u.deep, u.cls, u.split) for i, u in enumerate(units)]
    splits = tuple(sorted({u.split for u in units if u.split}))
    lister = FolderLister(url, root, options.storage_options, tuple(units))
    return Source(kind="folder", url=url, lister=lister, splits=splits, ids_unique=True,
                  details={"split_folders": by_split})


# A folder tree of images: any folder that no other format claims.
FORMAT = Format("folder", open_folder, any_folder=True, listed=True)


def _level(fs: fsspec.AbstractFileSystem, path: str) -> tuple[list[str], list[str]]:
    """The folders and the files directly in `path`, sorted."""
    if is_local(fs):
        with os.scandir(path) as it:
            entries = [(e.path, e.is_dir()) for e in it]
        return sorted(p for p, d in entries if d), sorted(p for p, d in entries if not d)
    fs.invalidate_cache(path)
    entries = fs.ls(path, detail=True)
    own = path.rstrip("/")
    dirs = sorted(e["name"].rstrip("/") for e in entries if e.get("type") == "directory")
    return [d for d in dirs if d != own], sorted(e["name"] for e in entries if e.get("type") != "directory")


def _walk(fs: fsspec.AbstractFileSystem, path: str, deep: bool) -> list[tuple[str, int | None, str | None]]:
    """(path, size, stamp) of every file below `path` (`deep`) or directly in it. Size None: the store
    cannot say (an HTTP index); -1: a dangling link (reading it says what is wrong). Stamp: the ETag or
    modification time, for the fingerprint."""
    if is_local(fs):  # os.walk is ~10x faster than fsspec's generic find for big local trees
        out = []
        for d, _, names in os.walk(path) if deep else [(path, None, [n for n in os.listdir(path)
                                                                       if not os.path.isdir(os.path.join(path, n))])]:
            for n in names:
                p = os.path.join(d, n)
                try:
                    st = os.stat(p)
                    out.append((p, st.st_size, str(st.st_mtime_ns)))
                except OSError:
                    out.append((p, -1, None))
        return out
    fs.invalidate_cache(path)
    entries = fs.find(path, detail=True) if deep else {e["name"]: e for e in fs.ls(path, detail=True)}
    files = {p: e for p, e in entries.items() if e.get("type", "file") == "file"}
    sizes = _ask_sizes(fs, [p for p, e in files.items() if e.get("size") is None])
    return [(p, e.get("size", sizes.get(p)) if e.get("size") is not None else sizes.get(p),
             next((str(e[k]) for k in STAMPS if e.get(k)), None)) for p, e in files.items()]


def _ask_sizes(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, int | None]:
    """Sizes a listing left out (an HTTP index page lists links only), asked of each file (a HEAD request),
    concurrently where the filesystem is asynchronous."""
    def size(info: dict | BaseException) -> int | None:
        return None if isinstance(info, BaseException) else info.get("size")

    if getattr(fs, "async_impl", False) and paths:
        from fsspec.asyn import sync

        async def gather() -> list[dict | BaseException]:
            return await asyncio.gather(*(fs._info(p) for p in paths), return_exceptions=True)

        return {p: size(i) for p, i in zip(paths, sync(fs.loop, gather))}
    out: dict[str, int | None] = {}
    for p in paths:
        try:
            out[p] = size(fs.info(p))
        except Exception as e:  # reading the file will say what is wrong with it
            out[p] = size(e)
    return out
