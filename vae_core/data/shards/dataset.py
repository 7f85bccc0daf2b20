"""A published dataset version: finding and opening it (`open_dataset`), the checks that its files are the
ones its manifest lists, and the check that a model fits its images (`fit_model`)."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from vae_core.data.shards.format import MANIFEST, shard_schema
from vae_core.data.shards.manifest import DAMAGED, Manifest, ShardInfo, read_manifest
from vae_core.errors import VAEError
from vae_core.model.config import ModelConfig, VAEConfig
from vae_core.names import NAME_RULE, check_name
from vae_core.storage import resolve, to_url


@dataclass(frozen=True)
class DatasetInfo:
    """One published dataset version: where it is and its manifest.

    url is the version folder (e.g. ``s3://b/datasets/mnist/3f2a...``); fs/path address it directly.
    """

    url: str
    manifest: Manifest
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    path: str = field(repr=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return (self.manifest.height, self.manifest.width, self.manifest.channels)

    @property
    def counts(self) -> dict[str, int]:
        return self.manifest.counts


def dataset_dir(root: str, name: str, version: str | None = None) -> str:
    """`root/name[/version]` for user-named `name` and `version`, or ValueError naming the bad value.

    The naming rule already rules out '..', '/' and absolute paths; the prefix check after normalising
    makes "no resolved path leaves the data root" hold by itself, whatever the rule allows in future.
    """
    parts = [check_name(name, "dataset name")]
    if version is not None:
        parts.append(check_name(version, "dataset version"))
    # Anchored at "/" so that roots without a leading slash (a bucket, memory://'s "") normalise alike.
    base = posixpath.normpath(posixpath.join("/", root))
    if not posixpath.normpath(posixpath.join(base, *parts)).startswith(base.rstrip("/") + "/"):
        raise ValueError(f"dataset {'@'.join(parts)!r} resolves outside the data root {root!r}")
    return posixpath.join(root, *parts)


def list_versions(root_url: str, name: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Finished versions of dataset `name`, oldest first (by the manifest's created_at)."""
    fs, root = resolve(root_url, storage_options)
    base = dataset_dir(root, name)
    # Object-store filesystems cache listings; a reader must see versions another process just wrote.
    fs.invalidate_cache(base)
    try:
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        return []
    found: list[tuple[str, str]] = []
    for entry in sorted(e["name"].rstrip("/") for e in entries if e.get("type") == "directory"):
        version = posixpath.basename(entry)
        if not NAME_RULE.fullmatch(version):
            continue  # temporary names of unfinished writes, or folders no reference could name
        try:
            m = read_manifest(fs, entry)
        except FileNotFoundError:
            continue
        found.append((m.created_at, version))
    return [v for _, v in sorted(found)]


def open_dataset(root_url: str, name: str, version: str | None = None,
                 storage_options: dict[str, Any] | None = None) -> DatasetInfo:
    """Find dataset `name` under `root_url`; `version=None` picks the most recently created one.

    Raises FileNotFoundError naming the dataset folder (and the versions that do exist) when there is
    nothing to open, and ValueError when `name` or `version` breaks the naming rule or leaves the root.
    """
    fs, root = resolve(root_url, storage_options)
    if version is None:
        versions = list_versions(root_url, name, storage_options)
        if not versions:
            raise FileNotFoundError(f"no dataset {name!r} under {root_url}: run `vae ingest SOURCE --name {name}` first")
        version = versions[-1]
    vdir = dataset_dir(root, name, version)
    fs.invalidate_cache(vdir)
    try:
        manifest = read_manifest(fs, vdir)
    except FileNotFoundError:
        have = list_versions(root_url, name, storage_options)
        raise FileNotFoundError(
            f"dataset {name!r} has no version {version!r} under {root_url} (versions: {have or 'none'})"
        ) from None
    info = DatasetInfo(url=to_url(fs, vdir), manifest=manifest, fs=fs, path=vdir)
    if (manifest.name, manifest.version) != (name, version):
        raise ValueError(f"{info.url}/{MANIFEST} names {manifest.name}@{manifest.version}, not the folder's "
                         f"{name}@{version}: {DAMAGED.format(url=info.url)}")
    check_shard_files(info)
    check_shard_schema(info)
    return info


def damaged(info: DatasetInfo, shard: ShardInfo, problem: str) -> str:
    """One line naming the shard, its dataset and what to do."""
    return (f"dataset {info.name}@{info.version}: shard {shard.path} {problem} "
            f"({to_url(info.fs, posixpath.join(info.path, shard.path))}); {DAMAGED.format(url=info.url)}")


def check_shard_files(info: DatasetInfo) -> None:
    """Every shard of the manifest is a file of its recorded size: one listing per split folder.

    FileNotFoundError naming the first missing shard, ValueError naming one of another size.
    """
    for split, sinfo in info.manifest.splits.items():
        folder = posixpath.join(info.path, split)
        info.fs.invalidate_cache(folder)
        try:
            sizes = {posixpath.basename(e["name"]): e.get("size") for e in info.fs.ls(folder, detail=True)
                     if e.get("type") == "file"}
        except FileNotFoundError:
            sizes = {}
        for shard in sinfo.shards:
            size = sizes.get(posixpath.basename(shard.path), -1)
            if size == -1:
                raise FileNotFoundError(damaged(info, shard, "is missing"))
            if size is not None and size != shard.bytes:
                raise ValueError(damaged(info, shard, f"holds {size} bytes, the manifest {shard.bytes}"))


def check_shard_schema(info: DatasetInfo) -> None:
    """The first shard's Parquet schema (read from its footer only) is the shard schema of the manifest's
    H*W*C: an edited height, width or channels that the pixels do not have fails here, before any work."""
    shard = next((sh for s in info.manifest.splits.values() for sh in s.shards), None)
    if shard is None:
        return
    try:
        with info.fs.open(posixpath.join(info.path, shard.path), "rb") as f:
            found = pq.read_schema(f).remove_metadata()
    except pa.ArrowInvalid as e:  # not Parquet at all (a storage error stays what it is)
        raise ValueError(damaged(info, shard, f"is not a Parquet file ({e})")) from None
    want = shard_schema(info.manifest.image_bytes)
    if not found.equals(want):
        h, w, c = info.shape
        got = found.field("image").type if "image" in found.names else "no image column"
        raise ValueError(damaged(info, shard, f"has images of {got}, the manifest's {h}x{w}x{c} needs "
                                  f"{want.field('image').type} (schema {found.types})"))


def fit_model(info: DatasetInfo, model: VAEConfig | ModelConfig, name: str, error: type[VAEError],
              advice: str = "") -> VAEConfig | ModelConfig:
    """`model` for the images of `info`, or `error` naming both shapes: every stage's one shape check.

    A preset (a VAEConfig; `name` the preset) is reshaped to the dataset's H x W x C and fails only where its
    architecture cannot take that shape. A trained model (a ModelConfig; `name` its URI) takes exactly the
    shape it was trained on, and `advice` says what to do instead. Returns the config that fits.
    """
    h, w, c = info.shape
    if isinstance(model, VAEConfig):
        try:
            return model.with_image_shape(h, w, c)
        except ValueError as e:
            raise error(f"dataset {info.name}@{info.version} has {h}x{w}x{c} images, which preset {name!r} "
                        f"cannot take: {e}") from None
    mc, mh, mw = model.input_shape
    if (mh, mw, mc) != info.shape:
        raise error(f"{name} takes {mh}x{mw}x{mc} images but dataset {info.name}@{info.version} has {h}x{w}x{c}: "
                    f"{advice}")
    return model
