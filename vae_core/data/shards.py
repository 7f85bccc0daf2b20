"""The dataset shard format: Arrow schema, manifest, atomic writes, and the reader API other stages use.

Layout (any fsspec URL as the root)::

    <data_root>/<name>/<version>/manifest.json
    <data_root>/<name>/<version>/train/part-00000.parquet
    <data_root>/<name>/<version>/val/part-00000.parquet
    <data_root>/<name>/<version>/test/part-00000.parquet

One row per image (see `shard_schema`): ``id`` string, ``image`` fixed_size_binary[H*W*C] holding raw
uint8 pixels in HWC order, ``label`` int32 (null where the source has none), ``source`` string.
Shards are zstd-compressed Parquet. ``manifest.json`` is written last, so a version folder without a
manifest is an unfinished write and every reader ignores it.

Reader API (what training and encoding build on)::

    info = open_dataset("s3://bucket/datasets", "mnist")          # latest version
    images, labels, ids = read_split_u8(info, "train")            # (N,H,W,C) uint8, (N,) int32, list[str]
    urls = shard_paths(info, "val", urls=True)                     # full URLs, in row order
    info.shape, info.counts, info.manifest.label_names              # (H, W, C), rows per split, ...

`labels` uses -1 where a row has no label. A streaming reader (Ray Data in `train-vae`) reads
`shard_paths(info, split)` through `arrow_filesystem(info.fs)` and turns each batch into pixels with
`images_u8`.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from vae_core.requests import NAME_RULE, check_name
# Re-exported: the stages import the storage helpers with the reader API.
from vae_core.storage import (FOREIGN_TEMPORARY_AGE_S, TEMPORARY, arrow_filesystem, atomic_put_file,  # noqa: F401
                              atomic_write_bytes, is_local, is_temporary, remove_temporaries, resolve,
                              temporary_name, to_url, writer_gone)

FORMAT = "vae-shards/1"
SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST = "manifest.json"
COMPRESSION = "zstd"
# A shard's path in the manifest: a plain Parquet file name directly in its split's folder. Readers join it
# to the version folder, so anything else (absolute, '..', deeper folders) could make them read elsewhere.
SHARD_PATH = re.compile(r"(?P<split>train|val|test)/[A-Za-z0-9][A-Za-z0-9._-]*\.parquet")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # shard checksums also name files (encode's outputs)


# ---------------------------------------------------------------------------------------------- schema


def shard_schema(image_bytes: int) -> pa.Schema:
    """Arrow schema of one shard whose images are `image_bytes` = H*W*C bytes each."""
    if image_bytes < 1:
        raise ValueError(f"image_bytes must be positive, got {image_bytes}")
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(image_bytes), nullable=False),
        pa.field("label", pa.int32(), nullable=True),
        pa.field("source", pa.string(), nullable=False),
    ])


def build_table(ids: list[str], images: np.ndarray, labels: np.ndarray, sources: list[str]) -> pa.Table:
    """Rows -> Arrow table in the shard schema.

    images: uint8 (N, H, W, C), C-contiguous; labels: int32 (N,), -1 meaning "no label".
    The pixel buffer is handed to Arrow without a copy.
    """
    n = len(ids)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n:
        raise ValueError(f"images must be uint8 (N,H,W,C) with N={n}, got {images.dtype} {images.shape}")
    if labels.shape != (n,) or len(sources) != n:
        raise ValueError(f"{n} ids but labels {labels.shape} and {len(sources)} sources")
    row = int(np.prod(images.shape[1:]))
    pixels = np.ascontiguousarray(images)
    image_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(row), n, [None, pa.py_buffer(pixels)])
    labels = labels.astype(np.int32, copy=False)
    label_col = pa.array(labels, type=pa.int32(), mask=labels < 0)
    columns = [pa.array(ids, pa.string()), image_col, label_col, pa.array(sources, pa.string())]
    return pa.Table.from_arrays(columns, schema=shard_schema(row))


def writer_options() -> dict[str, Any]:
    """Keyword arguments for `pq.ParquetWriter` (and `pq.write_table`) used for every shard.

    Dictionary encoding and statistics are switched off for the pixel column: every value is distinct
    and min/max of raw pixels helps no reader, so both would only cost time.
    """
    return {"compression": COMPRESSION, "use_dictionary": ["label", "source"], "write_statistics": ["id", "label"]}


def row_group_rows(image_bytes: int) -> int:
    """Rows per Parquet row group: ~16 MiB of pixels, so a streaming reader never holds a whole shard."""
    return max(1, (16 << 20) // image_bytes)


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------------------------- manifest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardInfo(_Strict):
    """One Parquet file: its path relative to the version folder, rows, size and SHA-256 of its bytes."""

    path: str
    rows: int = Field(ge=1)
    bytes: int = Field(ge=1)
    sha256: str

    @field_validator("path")
    @classmethod
    def _inside_its_split(cls, v: str) -> str:
        if not SHARD_PATH.fullmatch(v):
            raise ValueError(f"shard path {v!r} is not SPLIT/FILE.parquet (a plain file name in the train, val or "
                             "test folder of the version)")
        return v

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        if not SHA256_HEX.fullmatch(v):
            raise ValueError(f"shard sha256 {v!r} is not 64 lowercase hex digits")
        return v

    @property
    def split(self) -> str:
        """The split folder the shard lies in."""
        return self.path.split("/", 1)[0]


class SplitInfo(_Strict):
    rows: int = Field(ge=0)
    shards: list[ShardInfo] = Field(default_factory=list)

    @model_validator(mode="after")
    def _rows_add_up(self) -> "SplitInfo":
        if sum(s.rows for s in self.shards) != self.rows:
            raise ValueError(f"split has {self.rows} rows but its shards hold {sum(s.rows for s in self.shards)}")
        return self


class QuarantineEntry(_Strict):
    """An input item that is not in the dataset, and why."""

    id: str
    source: str
    reason: str


class DuplicateEntry(_Strict):
    """An input item dropped because its pixels equal those of `duplicate_of`, which was kept.

    `label` and `kept_label` are recorded only where the two disagree (label noise; None there means "no
    label"); where they agree both keys are left out, so that such entries read as before.
    """

    id: str
    source: str
    duplicate_of: str
    label: int | None = None
    kept_label: int | None = None

    @property
    def label_conflict(self) -> bool:
        return self.label != self.kept_label

    @model_serializer(mode="wrap")
    def _conflict_only(self, handler: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        data = handler(self)
        if not self.label_conflict:
            data.pop("label", None)
            data.pop("kept_label", None)
        return data


class ItemCounts(_Strict):
    """Every item the source yielded is exactly one of ok, duplicate or quarantined."""

    seen: int = Field(ge=0)
    ok: int = Field(ge=0)
    duplicates: int = Field(ge=0)
    quarantined: int = Field(ge=0)

    @model_validator(mode="after")
    def _nothing_lost(self) -> "ItemCounts":
        if self.ok + self.duplicates + self.quarantined != self.seen:
            raise ValueError(
                f"items do not add up: ok {self.ok} + duplicates {self.duplicates} + "
                f"quarantined {self.quarantined} != seen {self.seen}"
            )
        return self


class SourceDescription(_Strict):
    kind: str
    url: str
    details: dict[str, Any] = Field(default_factory=dict)


class Manifest(_Strict):
    """Contents of ``manifest.json``: everything a reader needs without opening a shard.

    channel_mean / channel_std are per channel (length C) of pixel/255 over the train split.
    """

    format: Literal["vae-shards/1"] = FORMAT
    name: str
    version: str
    created_at: str
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    channels: Literal[1, 3]
    splits: dict[str, SplitInfo]
    label_names: list[str] | None = None
    channel_mean: list[float]
    channel_std: list[float]
    items: ItemCounts
    quarantine: list[QuarantineEntry] = Field(default_factory=list)
    duplicates: list[DuplicateEntry] = Field(default_factory=list)
    source: SourceDescription
    options: dict[str, Any] = Field(default_factory=dict, description="the ingest options that shaped the rows")

    @field_validator("name", "version")
    @classmethod
    def _named_by_the_rule(cls, v: str) -> str:
        return check_name(v, "name or version")  # both become folder names of every stage's outputs

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if unknown := set(self.splits) - set(SPLITS):
            raise ValueError(f"unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
        for split, info in self.splits.items():
            if strays := [sh.path for sh in info.shards if sh.split != split]:
                raise ValueError(f"split {split!r} lists shards outside its folder: {strays}")
        paths = [sh.path for info in self.splits.values() for sh in info.shards]
        if len(set(paths)) != len(paths):
            raise ValueError(f"shard paths repeat: {sorted({p for p in paths if paths.count(p) > 1})}")
        if len(self.channel_mean) != self.channels or len(self.channel_std) != self.channels:
            raise ValueError(f"channel stats must have {self.channels} entries")
        if sum(s.rows for s in self.splits.values()) != self.items.ok:
            raise ValueError(f"splits hold {sum(s.rows for s in self.splits.values())} rows, items.ok is {self.items.ok}")
        if len(self.quarantine) != self.items.quarantined or len(self.duplicates) != self.items.duplicates:
            raise ValueError("quarantine/duplicates lists do not match items counts")
        return self

    @property
    def counts(self) -> dict[str, int]:
        """Rows per split, every split present (0 where empty)."""
        return {s: (self.splits[s].rows if s in self.splits else 0) for s in SPLITS}

    @property
    def image_bytes(self) -> int:
        return self.height * self.width * self.channels

    @property
    def label_conflicts(self) -> int:
        """Duplicates whose label differs from the kept copy's (see DuplicateEntry)."""
        return sum(d.label_conflict for d in self.duplicates)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"


# -------------------------------------------------------------------------------------------- reading


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


def read_manifest(fs: fsspec.AbstractFileSystem, version_dir: str) -> Manifest:
    """Load and validate ``manifest.json`` of one version folder."""
    path = posixpath.join(version_dir, MANIFEST)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST} in {to_url(fs, version_dir)}: not a finished dataset version") from None
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'manifest'}: {x['msg'].removeprefix('Value error, ')}"
                             for x in e.errors())
        raise ValueError(f"{to_url(fs, path)} is not a valid manifest ({problems}): the dataset version is damaged; "
                         f"remove {to_url(fs, version_dir)} and ingest its source again") from None


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
                         f"{name}@{version}: {_DAMAGED.format(url=info.url)}")
    check_shard_files(info)
    check_shard_schema(info)
    return info


_DAMAGED = "the dataset version is damaged; remove {url} and ingest its source again"


def _damaged(info: DatasetInfo, shard: ShardInfo, problem: str) -> str:
    """One line naming the shard, its dataset and what to do."""
    return (f"dataset {info.name}@{info.version}: shard {shard.path} {problem} "
            f"({to_url(info.fs, posixpath.join(info.path, shard.path))}); {_DAMAGED.format(url=info.url)}")


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
                raise FileNotFoundError(_damaged(info, shard, "is missing"))
            if size is not None and size != shard.bytes:
                raise ValueError(_damaged(info, shard, f"holds {size} bytes, the manifest {shard.bytes}"))


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
        raise ValueError(_damaged(info, shard, f"is not a Parquet file ({e})")) from None
    want = shard_schema(info.manifest.image_bytes)
    if not found.equals(want):
        h, w, c = info.shape
        got = found.field("image").type if "image" in found.names else "no image column"
        raise ValueError(_damaged(info, shard, f"has images of {got}, the manifest's {h}x{w}x{c} needs "
                                  f"{want.field('image').type} (schema {found.types})"))


def _split_shards(info: DatasetInfo, split: str) -> list[ShardInfo]:
    """The manifest's shards of `split`, in row order (empty for an empty split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    s = info.manifest.splits.get(split)
    return s.shards if s else []


def shard_paths(info: DatasetInfo, split: str, urls: bool = False) -> list[str]:
    """Paths of the Parquet shards of `split` on `info.fs` (full URLs with `urls`), in row order."""
    paths = [posixpath.join(info.path, sh.path) for sh in _split_shards(info, split)]
    return [to_url(info.fs, p) for p in paths] if urls else paths


def read_shard_table(info: DatasetInfo, shard: ShardInfo, verify: bool = True) -> pa.Table:
    """One shard as an Arrow table; with verify, its SHA-256 must match the manifest."""
    try:
        data = info.fs.cat_file(posixpath.join(info.path, shard.path))
    except FileNotFoundError:
        raise FileNotFoundError(_damaged(info, shard, "is missing")) from None
    if verify and sha256_hex(data) != shard.sha256:
        raise ValueError(_damaged(info, shard, "does not match the manifest's checksum (corrupt or replaced)"))
    return pq.read_table(pa.BufferReader(data))


def images_u8(table: pa.Table, shape: tuple[int, int, int]) -> np.ndarray:
    """The `image` column of a shard table (or of any slice of one) as uint8 (N, H, W, C), without a copy.

    The array is read-only: it views Arrow's buffer.
    """
    n = table.num_rows
    col = table.column("image").combine_chunks()
    width = col.type.byte_width
    if width != int(np.prod(shape)):
        raise ValueError(f"image column holds {width} bytes per row, manifest shape {shape} needs {int(np.prod(shape))}")
    pixels = np.frombuffer(col.buffers()[1], dtype=np.uint8, count=n * width, offset=col.offset * width)
    return pixels.reshape(n, *shape)


def table_to_u8(table: pa.Table, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Shard table -> (images uint8 (N,H,W,C), labels int32 (N,) with -1 for null, ids)."""
    labels = table.column("label").fill_null(-1).to_numpy().astype(np.int32, copy=False)
    return images_u8(table, shape), labels, table.column("id").to_pylist()


def read_split_u8(info: DatasetInfo, split: str, verify: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Whole split in memory: images uint8 (N, H, W, C), labels int32 (N,) with -1 for "no label", ids.

    Rows come in shard order, which is the order ingestion wrote them (stable across reads).
    With verify (default), every shard's SHA-256 is checked against the manifest.
    """
    shards = _split_shards(info, split)
    n = sum(sh.rows for sh in shards)
    images = np.empty((n, *info.shape), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int32)
    ids: list[str] = []
    at = 0
    for sh in shards:
        x, y, i = table_to_u8(read_shard_table(info, sh, verify), info.shape)
        if len(i) != sh.rows:
            raise ValueError(_damaged(info, sh, f"holds {len(i)} rows, the manifest {sh.rows}"))
        images[at : at + len(i)] = x
        labels[at : at + len(i)] = y
        ids.extend(i)
        at += len(i)
    return images, labels, ids
