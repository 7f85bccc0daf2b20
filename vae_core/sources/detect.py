"""Which kind of source a URL is, and opening it.

Detection (unless a format is named): ``builtin:NAME``; a path ending in ``.npz``; a path ending in
``.parquet`` / ``.pq``; an IDX file or a folder holding IDX files (``*-images-idx3-ubyte[.gz]``);
a folder whose files are all Parquet; otherwise a folder tree of images.
"""

from __future__ import annotations

import posixpath
from typing import get_args

from vae_core.requests import SourceFormat as Format
from vae_core.shards import resolve
from vae_core.sources.base import Source, SourceError
from vae_core.sources.builtin import open_builtin
from vae_core.sources.folder import open_folder
from vae_core.sources.idx import is_idx_name, open_idx
from vae_core.sources.npz import open_npz
from vae_core.sources.parquet import open_parquet

FORMATS: tuple[str, ...] = get_args(Format)


def detect_format(url: str, storage_options: dict | None = None) -> str:
    """URL -> one of folder, idx, npz, parquet, builtin. SourceError when it does not exist."""
    if url.startswith("builtin:"):
        return "builtin"
    fs, path = resolve(url, storage_options)
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
                image_column: str | None = None, label_column: str | None = None) -> Source:
    """URL (and optional format) -> an opened, validated Source; SourceError names what is wrong."""
    if format not in FORMATS:
        raise SourceError(f"unknown format {format!r}; formats are {', '.join(FORMATS)}")
    kind = detect_format(url, storage_options) if format == "auto" else format
    if kind == "builtin":
        return open_builtin(url)
    if kind == "parquet":
        return open_parquet(url, storage_options, image_column=image_column, label_column=label_column)
    return {"folder": open_folder, "idx": open_idx, "npz": open_npz}[kind](url, storage_options)
