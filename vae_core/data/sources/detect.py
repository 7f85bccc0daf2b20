"""Which kind of source a URL is, opening it, and a fingerprint of what it reads.

Detection (unless a format is named): ``builtin:NAME``; a path ending in ``.npz``; a path ending in
``.parquet`` / ``.pq``; an IDX file or a folder holding IDX files (``*-images-idx3-ubyte[.gz]``);
a folder whose files are all Parquet; otherwise a folder tree of images.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any, get_args

from vae_core.requests import SourceFormat as Format
from vae_core.data.sources.base import Source, SourceError
from vae_core.data.sources.builtin import open_builtin
from vae_core.data.sources.folder import open_folder
from vae_core.data.sources.idx import is_idx_name, open_idx
from vae_core.data.sources.npz import open_npz
from vae_core.data.sources.limits import SourceLimits
from vae_core.data.sources.parquet import open_parquet
from vae_core.data.sources.remote import open_fs, storage_errors, storage_hint

FORMATS: tuple[str, ...] = get_args(Format)
# What a filesystem's listing may say about a file's version, most telling first (object stores' ETags,
# local and other filesystems' modification or creation times).
_STAMPS = ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created")


def detect_format(url: str, storage_options: dict | None = None) -> str:
    """URL -> one of folder, idx, npz, parquet, builtin. SourceError when it does not exist."""
    if url.startswith("builtin:"):
        return "builtin"
    fs, path = open_fs(url, storage_options)
    if not fs.exists(path):
        raise SourceError(f"{url}: source not found")
    if not fs.isdir(path):
        name = posixpath.basename(path).lower()
        if name.endswith(".npz"):
            return "npz"
        if name.endswith((".parquet", ".pq")):
            return "parquet"
        if is_idx_name(name):
            return "idx"
        raise SourceError(f"{url}: cannot tell the format of this file (expected .npz, .parquet or an IDX file; "
                          "a folder of images is given as the folder)")
    files = [f for f in fs.find(path) if not posixpath.basename(f).startswith(".")]
    if any(is_idx_name(f) for f in files):
        return "idx"
    if files and all(f.endswith((".parquet", ".pq")) or posixpath.basename(f).lower().startswith("readme")
                     for f in files) and any(f.endswith((".parquet", ".pq")) for f in files):
        return "parquet"
    return "folder"


def open_source(url: str, format: Format = "auto", storage_options: dict | None = None,
                image_column: str | None = None, label_column: str | None = None,
                limits: SourceLimits = SourceLimits()) -> Source:
    """URL (and optional format) -> an opened, validated Source; SourceError names what is wrong, including
    a storage error (missing credentials, a bucket that does not exist, an unreachable endpoint)."""
    if format not in FORMATS:
        raise SourceError(f"unknown format {format!r}; formats are {', '.join(FORMATS)}")
    try:
        return _open(url, format, storage_options, image_column, label_column, limits)
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError(f"{url}: source not found") from None
    except storage_errors() as e:
        raise SourceError(f"{url}: cannot read the source ({type(e).__name__}: {' '.join(str(e).split())}); "
                          f"{storage_hint(e)}") from None


def _open(url: str, format: Format, storage_options: dict | None, image_column: str | None,
          label_column: str | None, limits: SourceLimits) -> Source:
    kind = detect_format(url, storage_options) if format == "auto" else format
    # Taken before anything is read: a file that changes while it is being read then differs next time.
    fingerprint = source_fingerprint(url, kind, storage_options)
    if kind == "builtin":
        source = open_builtin(url)
    elif kind == "parquet":
        source = open_parquet(url, storage_options, image_column=image_column, label_column=label_column,
                              limits=limits)
    else:
        source = {"folder": open_folder, "idx": open_idx, "npz": open_npz}[kind](url, storage_options, limits)
    source.fingerprint = fingerprint
    return source


def source_fingerprint(url: str, kind: str, storage_options: dict | None = None) -> str | None:
    """SHA-256 over the sorted (relative path, size, ETag or modification time) of every file the source
    may read: the files below a folder, one file, or the files beside a single IDX file (its labels file
    sits there). Listed, never read, so it costs a directory listing. A built-in source is its name.
    None when some file has no stamp or the listing fails (the opener then names the problem)."""
    if kind == "builtin":
        return url
    fs, path = open_fs(url, storage_options)
    try:
        root = posixpath.dirname(path) if kind == "idx" and not fs.isdir(path) else path
        fs.invalidate_cache(root)  # object stores cache listings; a changed file must be seen
        infos: dict[str, Any] = fs.find(root, detail=True) if fs.isdir(root) else {path: fs.info(path)}
    except storage_errors():
        return None
    rows = sorted((p[len(root):].lstrip("/"), i.get("size"), next((str(i[k]) for k in _STAMPS if i.get(k)), None))
                  for p, i in infos.items() if i.get("type", "file") == "file")
    if not rows or any(stamp is None for *_, stamp in rows):
        return None
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()
