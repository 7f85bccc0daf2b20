"""A folder tree of image files at any fsspec URL; the first-level subfolder is the class.

    root/cat/001.png   -> id "cat/001.png", label index of "cat"
    root/loose.jpg     -> id "loose.jpg", no label

When every first-level folder is a split name (train, val/valid/validation, test), those are the
source's own splits and the class is the second level: ``root/train/cat/001.png``.

Every file under the root is an item, whatever its extension: files that are not images end up in
the quarantine with the reason, so nothing is silently skipped. Bytes are read here, in batches;
decoding happens in ingestion's worker processes. A file above the size limit is quarantined unread.

A local file name that is not valid UTF-8 keeps its bytes: each byte that does not decode appears in the
id as ``%XX`` (``bad\xff.png`` -> ``bad%FF.png``); should that equal another file's name, the later one
is quarantined as a repeated id.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
from collections.abc import Iterator

import fsspec
import numpy as np

from vae_core.data.sources.base import (Format, LocalFile, RawBatch, Source, SourceError, SourceOptions, printable,
                                        split_from_name)
from vae_core.data.sources.limits import SourceLimits
from vae_core.data.sources.remote import open_fs
from vae_core.storage import is_local, to_url

BATCH = 512


def _relative(root: str, path: str) -> str:
    return posixpath.relpath(path, root) if root not in ("", "/") else path.lstrip("/")


def _layout(rels: list[str]) -> tuple[bool, list[str]]:
    """-> (whether the first level names splits, sorted class names)."""
    top = {r.split("/", 1)[0] for r in rels if "/" in r}
    loose = any("/" not in r for r in rels)
    by_split = bool(top) and not loose and all(split_from_name(t) for t in top)
    level = 1 if by_split else 0
    classes = sorted({r.split("/")[level] for r in rels if r.count("/") > level})
    return by_split, classes


def open_folder(url: str, options: SourceOptions = SourceOptions()) -> Source:
    """Folder URL -> Source over every file below it, in sorted path order."""
    fs, root = open_fs(url, options.storage_options)
    if not fs.isdir(root):
        raise SourceError(f"{url}: not a folder")
    sizes = _list_files(fs, root)
    files = sorted(sizes)
    if not files:
        raise SourceError(f"{url}: empty source (no files in the folder tree)")
    rels = [printable(_relative(root, p)) for p in files]
    by_split, classes = _layout(rels)
    class_index = {c: i for i, c in enumerate(classes)}
    level = 1 if by_split else 0

    def label_of(rel: str) -> int:
        parts = rel.split("/")
        return class_index[parts[level]] if len(parts) > level + 1 else -1

    def batches() -> Iterator[RawBatch]:
        for start in range(0, len(files), BATCH):
            paths = files[start : start + BATCH]
            batch_rels = rels[start : start + BATCH]
            encoded, errors = _read(fs, paths, sizes, options.limits)
            yield RawBatch(
                ids=batch_rels,
                sources=[printable(to_url(fs, p)) for p in paths],
                labels=np.array([label_of(r) for r in batch_rels], dtype=np.int32),
                splits=[split_from_name(r.split("/", 1)[0]) for r in batch_rels] if by_split else None,
                encoded=encoded,
                errors=errors,
            )

    return Source(
        kind="folder", url=url, batches=batches, size=len(files), label_names=classes or None,
        splits=tuple(sorted({split_from_name(r.split('/', 1)[0]) for r in rels})) if by_split else (),  # type: ignore[arg-type]
        ids_unique=len(set(rels)) == len(rels),  # an escaped name may equal a real one
        details={"files": len(files), "classes": len(classes), "split_folders": by_split},
    )


# A folder tree of images: any folder that no other format claims.
FORMAT = Format("folder", open_folder, any_folder=True)


def _read(fs: fsspec.AbstractFileSystem, paths: list[str], sizes: dict[str, int | None],
          limits: SourceLimits) -> tuple[list[bytes | LocalFile | None], list[str | None]]:
    """Read a batch of files (local ones are left for the decoder to read); a file that cannot be read,
    is empty or is above the size limit becomes an error, not an exception, and is not read."""
    errors: dict[str, str | None] = {p: _size_problem(sizes[p], limits) for p in paths}
    want = [p for p in paths if errors[p] is None]
    # The decoder reads local files itself (in parallel, without piping bytes).
    got = {p: LocalFile(p) for p in want} if is_local(fs) else dict(zip(want, _cat_all(fs, want, sizes, limits)))
    for p in want:
        if isinstance(data := got[p], BaseException):
            errors[p] = f"cannot read: {_describe(data)}"
        elif not isinstance(data, LocalFile):
            errors[p] = _size_problem(len(data), limits)
    return [None if errors[p] else got[p] for p in paths], [errors[p] for p in paths]


def _describe(error: BaseException) -> str:
    """One line: the error and what caused it (fsspec's HTTP filesystem reports a refused or failed request
    as FileNotFoundError, from the real one)."""
    text = f"{type(error).__name__}: {' '.join(str(error).split())}"
    cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return f"{text} ({_describe(cause)})" if cause is not None else text


def _size_problem(size: int | None, limits: SourceLimits) -> str | None:
    """Why a file of `size` bytes (None: unknown until read) is not decoded, or None."""
    if size == 0:
        return "empty file (0 bytes)"
    return None if size is None else limits.file_problem(size)


def _list_files(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, int | None]:
    """Every file below root -> its size in bytes (None where the filesystem cannot say: an HTTP server
    whose responses carry no length)."""
    if is_local(fs):  # os.walk is ~10x faster than fsspec's generic find for big local trees
        out: dict[str, int | None] = {}
        for d, _, names in os.walk(root):
            for n in names:
                p = os.path.join(d, n)
                try:
                    out[p] = os.stat(p).st_size
                except OSError:  # a dangling link: keep it, reading it will say what is wrong
                    out[p] = -1
        return out
    entries = fs.find(root, detail=True)
    sizes = {p: e.get("size") for p, e in entries.items() if e.get("type", "file") == "file"}
    return {**sizes, **_ask_sizes(fs, [p for p, size in sizes.items() if size is None])}


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


def _cat_all(fs: fsspec.AbstractFileSystem, paths: list[str], sizes: dict[str, int | None],
             limits: SourceLimits) -> list[bytes | BaseException]:
    """Contents of each path, or the exception reading it raised. A file of unknown size is read as a
    stream, at most one byte past the size limit.

    Object stores (async filesystems) fetch the whole batch concurrently. `fs.cat(list)` is not used
    because it expands glob characters, and file names may legitimately contain ``[``, ``*`` or ``?``.
    """
    known = [p for p in paths if sizes[p] is not None]
    got: dict[str, bytes | BaseException] = {p: _read_capped(fs, p, limits.max_file_bytes + 1)
                                             for p in paths if sizes[p] is None}
    if getattr(fs, "async_impl", False) and known:
        from fsspec.asyn import sync

        async def gather() -> list[bytes | BaseException]:
            return await asyncio.gather(*(fs._cat_file(p) for p in known), return_exceptions=True)

        got.update(zip(known, sync(fs.loop, gather)))
    else:
        got.update((p, _read_capped(fs, p, None)) for p in known)
    return [got[p] for p in paths]


def _read_capped(fs: fsspec.AbstractFileSystem, path: str, most: int | None) -> bytes | BaseException:
    """The file's bytes (at most `most` of them), or the exception reading it raised."""
    try:
        if most is None:
            return fs.cat_file(path)
        with fs.open(path, "rb") as f:
            return f.read(most)
    except Exception as e:  # recorded per file: one unreadable file must not stop the run
        return e
