"""Which kind of source a URL is, opening it, and a fingerprint of what it reads.

Detection (unless a format is named) follows the formats' declarations (`formats.REGISTRY`), which give:
``builtin:NAME``; a path ending in ``.npz``; a path ending in
``.parquet`` / ``.pq``; an IDX file or a folder holding IDX files (``*-images-idx3-ubyte[.gz]``);
a folder whose files are all Parquet; otherwise a folder tree of images.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

from vae_core.data.sources.base import Format, Source, SourceError, SourceOptions
from vae_core.data.sources.formats import BY_NAME, FORMATS, REGISTRY, SourceFormat
from vae_core.data.sources.limits import SourceLimits
from vae_core.data.sources.listing import STAMPS
from vae_core.data.sources.remote import open_fs, storage_errors, storage_hint

# What a filesystem's listing may say about a file's version, most telling first (object stores' ETags,
# local and other filesystems' modification or creation times).


def detect_format(url: str, storage_options: dict | None = None) -> str:
    """URL -> the name of its format (see `formats.REGISTRY`). SourceError when it does not exist. A folder is
    judged by its first DETECT_FILES files (`_some_files`)."""
    if by_prefix := next((f for f in REGISTRY if f.prefix and url.startswith(f.prefix)), None):
        return by_prefix.name
    fs, path = open_fs(url, storage_options)
    if not fs.exists(path):
        raise SourceError(f"{url}: source not found")
    if not fs.isdir(path):
        return _file_format(url, posixpath.basename(path).lower())
    files = _some_files(fs, path)
    claimed = next((f for f in REGISTRY if f.folder and f.folder(files)), None)
    return (claimed or next(f for f in REGISTRY if f.any_folder)).name


DETECT_FILES = 1000  # files a folder's detection looks at: a prefix of 10^8 objects is not listed to name its format


def _some_files(fs: Any, path: str) -> list[str]:
    """Up to DETECT_FILES files below `path` (hidden ones left out), folder by folder, shallowest first: what
    the formats' folder rules judge. Listing stops there; the source's own listing (in tasks) lists them all."""
    found: list[str] = []
    for folder, _, names in fs.walk(path):
        found += [posixpath.join(folder, n) for n in sorted(names) if not n.startswith(".")]
        if len(found) >= DETECT_FILES:
            break
    return found[:DETECT_FILES]


def _file_format(url: str, name: str) -> str:
    """A single file's lower-cased `name` -> its format's name: by suffix, else by name; else SourceError."""
    fmt = (next((f for f in REGISTRY if name.endswith(f.suffixes)), None)
           or next((f for f in REGISTRY if f.file_name and f.file_name(name)), None))
    if fmt is not None:
        return fmt.name
    hints = [f.suffixes[0] for f in REGISTRY if f.suffixes] + [f.file_hint for f in REGISTRY if f.file_name]
    raise SourceError(f"{url}: cannot tell the format of this file (expected {', '.join(hints[:-1])} or "
                      f"{hints[-1]}; a folder of images is given as the folder)")


def open_source(url: str, format: SourceFormat = "auto", storage_options: dict | None = None,
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


def _open(url: str, format: SourceFormat, storage_options: dict | None, image_column: str | None,
          label_column: str | None, limits: SourceLimits) -> Source:
    fmt = BY_NAME[detect_format(url, storage_options) if format == "auto" else format]
    # Taken before anything is read: a file that changes while it is being read then differs next time.
    fingerprint = None if fmt.listed else _fingerprint(url, fmt, storage_options)
    source = fmt.open(url, SourceOptions(storage_options, image_column, label_column, limits))
    source.fingerprint = fingerprint
    return source


def source_fingerprint(url: str, kind: str, storage_options: dict | None = None) -> str | None:
    """SHA-256 over the sorted (relative path, size, ETag or modification time) of every file the source
    may read: the files below a folder, one file, or the files beside a single IDX file (its labels file
    sits there). Listed, never read, so it costs a directory listing. A built-in source is its name.
    None when some file has no stamp or the listing fails (the opener then names the problem)."""
    return _fingerprint(url, BY_NAME[kind], storage_options)


def _fingerprint(url: str, fmt: Format, storage_options: dict | None) -> str | None:
    if fmt.prefix:  # recognised by its URL alone: no files to list
        return url
    fs, path = open_fs(url, storage_options)
    try:
        root = posixpath.dirname(path) if fmt.reads_siblings and not fs.isdir(path) else path
        fs.invalidate_cache(root)  # object stores cache listings; a changed file must be seen
        infos: dict[str, Any] = fs.find(root, detail=True) if fs.isdir(root) else {path: fs.info(path)}
    except storage_errors():
        return None
    rows = sorted((p[len(root):].lstrip("/"), i.get("size"), next((str(i[k]) for k in STAMPS if i.get(k)), None))
                  for p, i in infos.items() if i.get("type", "file") == "file")
    if not rows or any(stamp is None for *_, stamp in rows):
        return None
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()
