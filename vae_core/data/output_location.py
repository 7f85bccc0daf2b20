"""Where an embeddings output may go: never where its writes could reach a dataset.

    check_output_location("s3://b/embeddings/mnist", data_root())   # ValueError naming both, or nothing
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

import fsspec

from vae_core.data.embeddings import EmbeddingManifest
from vae_core.data.shards import FORMAT as DATASET_FORMAT, MANIFEST
from vae_core.storage import is_local, resolve, to_url


def check_output_location(out_url: str, data_root_url: str) -> None:
    """Refuse an output folder whose writes could reach a dataset, before any work (ValueError naming both).

    Refused: the data root itself, any folder inside it or above it (compared as real paths for local
    files: `file://`, relative paths, `..` and symlinks all resolve first); a folder inside (or equal to)
    any dataset version folder, wherever it is (one holding a dataset manifest); and a folder whose
    ``manifest.json`` is not an embeddings manifest, which a run would replace.
    """
    fs, out = resolve(out_url)
    root_fs, root = resolve(data_root_url)
    real_out, real_root = _real_path(fs, out), _real_path(root_fs, root)
    if _protocol(fs) == _protocol(root_fs) and (how := _overlap(real_out, real_root)):
        raise ValueError(f"output {out_url} ({real_out}) {how} the data root {data_root_url} ({real_root}): "
                         "encoding there could overwrite datasets; choose an --out outside the data root")
    folder = out
    while True:
        if _is_dataset_folder(fs, folder):
            where = "is" if folder == out else "is inside"
            raise ValueError(f"output {out_url} {where} the dataset folder {to_url(fs, folder)} (data root "
                             f"{data_root_url}): encoding there would overwrite its files; choose another --out")
        parent = posixpath.dirname(folder)
        if parent == folder or not parent:
            break
        folder = parent
    _check_own_manifest(fs, out, out_url)


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    return "file" if is_local(fs) else (fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0])


def _real_path(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A local path with symlinks and '..' resolved (existing or not); any other store's path normalised."""
    if is_local(fs):
        return os.path.realpath(path)
    return posixpath.normpath(posixpath.join("/", path))


def _overlap(out: str, root: str) -> str | None:
    """How output path `out` overlaps `root` ("is", "is inside", "contains"), or None."""
    if out == root:
        return "is"
    if out.startswith(root.rstrip("/") + "/"):
        return "is inside"
    if root.startswith(out.rstrip("/") + "/"):
        return "contains"
    return None


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """The JSON in file `path`, or None where there is no such file or it is not JSON."""
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
        return None


def _is_dataset_folder(fs: fsspec.AbstractFileSystem, folder: str) -> bool:
    manifest = _read_json(fs, posixpath.join(folder, MANIFEST))
    return isinstance(manifest, dict) and manifest.get("format") == DATASET_FORMAT


def _check_own_manifest(fs: fsspec.AbstractFileSystem, out: str, out_url: str) -> None:
    """An existing ``manifest.json`` at the output must be an embeddings manifest (a run replaces it)."""
    path = posixpath.join(out, MANIFEST)
    if not fs.isfile(path):
        return
    try:
        EmbeddingManifest.model_validate_json(fs.cat_file(path))
    except ValueError:
        raise ValueError(f"output {out_url} holds a {MANIFEST} that is not an embeddings manifest: encoding "
                         "there would replace it; choose an empty folder or one this command wrote") from None
