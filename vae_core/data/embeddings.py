"""The embeddings format: one Parquet file of VAE latents per dataset shard, and its manifest.

Layout (any fsspec URL as the root)::

    <root>/<model name>/<model version>/<dataset>/<dataset version>/manifest.json
    <root>/<model name>/<model version>/<dataset>/<dataset version>/<split>/<file_name(shard sha256, model)>

One row per image (see `embedding_schema`): ``id``, ``split``, ``label`` (null where the dataset has
none), the posterior ``mean`` and ``logvar`` as fixed_size_list<float32>[L], and the model and dataset
version that produced them. A file is named after the checksum of the input shard and the model that
encoded it (`ModelIdentity`: registered name, version and the SHA-256 of its weights), so a shard whose
bytes did not change between two dataset versions keeps its encoding: `reusable_files` finds it through
the manifests of sibling folders encoded by the same model, and `restamp` only rewrites the split and
dataset version. ``manifest.json`` is written last; readers go through it (`read_embeddings`), never
through a folder listing. `check_output_location` keeps an output folder away from the datasets.

    table = read_embeddings("s3://b/embeddings/vae-mnist/3/mnist/3f2a", splits=["test"])
    ids, mean, logvar = latents(table)                 # list[str], float32 (N, L), float32 (N, L)
    images = join_images(table, open_dataset(data_root, "mnist", "3f2a"))   # uint8 (N, H, W, C)
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from vae_core.model.config import Strict
from vae_core.requests import NAME_RULE, check_name
from vae_core.data.shards import (COMPRESSION, MANIFEST, SHA256_HEX, SPLITS, DatasetInfo, atomic_write_bytes, images_u8,
                             read_shard_table, resolve, sha256_hex, to_url)



# ---------------------------------------------------------------------------------------------- schema


def embedding_schema(latent_dim: int) -> pa.Schema:
    """Arrow schema of one embeddings file whose latents have `latent_dim` = L dimensions."""
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be positive, got {latent_dim}")
    vector = pa.list_(pa.float32(), latent_dim)
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=True),
        pa.field("mean", vector, nullable=False),
        pa.field("logvar", vector, nullable=False),
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.int32(), nullable=False),
        pa.field("dataset_version", pa.string(), nullable=False),
    ])


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    return split


def _check_version(model_version: int) -> int:
    if isinstance(model_version, bool) or not isinstance(model_version, (int, np.integer)) or model_version < 1:
        raise ValueError(f"model version {model_version!r} is not a positive whole number")
    return int(model_version)


def _vectors(x: np.ndarray) -> pa.FixedSizeListArray:
    """float32 (N, L) -> fixed_size_list<float32>[L]; a C-contiguous buffer goes to Arrow without a copy."""
    flat = np.ascontiguousarray(x).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), x.shape[1])


def _constant(value: Any, type_: pa.DataType, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(value, type_), n)


def build_table(ids: list[str], split: str, labels: np.ndarray, mean: np.ndarray, logvar: np.ndarray,
                model_name: str, model_version: int, dataset_version: str) -> pa.Table:
    """Latents of one shard's rows -> Arrow table in `embedding_schema(L)`.

    ids: N strings; labels: int (N,) with -1 meaning "no label" (stored as null); mean, logvar:
    float (N, L), both finite.
    """
    n = len(ids)
    # Cast first: a float64 beyond float32's range only becomes inf here.
    mean, logvar = np.asarray(mean, dtype=np.float32), np.asarray(logvar, dtype=np.float32)
    if mean.ndim != 2 or mean.shape[0] != n or mean.shape[1] < 1 or logvar.shape != mean.shape:
        raise ValueError(f"{n} ids need mean and logvar of shape ({n}, L), got {mean.shape} and {logvar.shape}")
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{n} ids but labels of shape {labels.shape}")
    # A NaN or inf latent means a broken model or input; stored, it would poison every downstream statistic.
    # The one exception is an autoencoder's logvar: -inf everywhere, its point mass's zero variance.
    point = logvar.size > 0 and bool(np.isneginf(logvar).all())
    for what, x in (("mean", mean),) + (() if point else (("logvar", logvar),)):
        if (bad := np.flatnonzero(~np.isfinite(x).all(axis=1))).size:
            raise ValueError(f"non-finite {what} for {bad.size} row(s), e.g. id {ids[bad[0]]!r}")
    _check_split(split)
    check_name(model_name, "model name")
    check_name(dataset_version, "dataset version")
    labels = labels.astype(np.int32, copy=False)
    columns = [
        pa.array(ids, pa.string()),
        _constant(split, pa.string(), n),
        pa.array(labels, type=pa.int32(), mask=labels < 0),
        _vectors(mean),
        _vectors(logvar),
        _constant(model_name, pa.string(), n),
        _constant(_check_version(model_version), pa.int32(), n),
        _constant(dataset_version, pa.string(), n),
    ]
    return pa.Table.from_arrays(columns, schema=embedding_schema(mean.shape[1]))


def restamp(table: pa.Table, split: str, dataset_version: str) -> pa.Table:
    """The same rows with `split` and `dataset_version` replaced: an encoding reused for another dataset
    version (same shard bytes, same model) needs no model work, only new stamps."""
    _check_split(split)
    check_name(dataset_version, "dataset version")
    for name, value in (("split", split), ("dataset_version", dataset_version)):
        i = table.schema.get_field_index(name)
        if i < 0:
            raise ValueError(f"table has no {name!r} column; columns are {table.column_names}")
        table = table.set_column(i, table.schema.field(i), _constant(value, pa.string(), table.num_rows))
    return table


# ------------------------------------------------------------------------------------------- files


@dataclass(frozen=True)
class ModelIdentity:
    """One model exactly: its registered name and version and the SHA-256 of its weights' bytes.

    Name and version alone can alias two models (a registry re-created from scratch numbers from 1 again,
    and two registries may share an output root), so every key built from a model holds the digest too.
    """

    name: str
    version: int
    weights_sha256: str

    def __post_init__(self) -> None:
        check_name(self.name, "model name")
        _check_version(self.version)
        if not SHA256_HEX.fullmatch(self.weights_sha256):
            raise ValueError(f"weights digest {self.weights_sha256!r} is not a lowercase hex SHA-256")

    @classmethod
    def of(cls, name: str, version: int, weights: bytes) -> "ModelIdentity":
        """The identity of the model whose serialised weights are `weights`."""
        return cls(name, int(version), sha256_hex(weights))

    @property
    def key(self) -> str:
        """16 hex digits of SHA-256 over name, version and weights digest: the model's part of a file name."""
        text = f"{self.name}\n{self.version}\n{self.weights_sha256}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __str__(self) -> str:
        return f"{self.name} v{self.version} (weights sha256 {self.weights_sha256[:12]})"


def file_name(shard_sha256: str, model: ModelIdentity) -> str:
    """Name of the embeddings file of the input shard with checksum `shard_sha256`, encoded by `model`:
    ``<shard sha256>-v<model version>-<model key>.parquet``."""
    if not SHA256_HEX.fullmatch(shard_sha256):
        raise ValueError(f"shard checksum {shard_sha256!r} is not a lowercase hex SHA-256")
    return f"{shard_sha256}-v{model.version}-{model.key}.parquet"


def _legacy_file_name(shard_sha256: str, model_version: int) -> str:
    """Format 1's name, keyed by the model version only: still read, never reused or written."""
    return f"{shard_sha256}-v{_check_version(model_version)}.parquet"


def default_dir(root: str, model_name: str, model_version: int, dataset: str, dataset_version: str) -> str:
    """`<root>/<model name>/<model version>/<dataset>/<dataset version>`; `root` may be a URL.

    The naming rule rules out '..' and '/', so the result cannot leave `root`.
    """
    parts = [check_name(model_name, "model name"), str(_check_version(model_version)),
             check_name(dataset, "dataset name"), check_name(dataset_version, "dataset version")]
    return posixpath.join(root, *parts)


def parquet_bytes(table: pa.Table) -> bytes:
    """One embeddings table as zstd Parquet bytes (a single row group below ~64 MiB of latents)."""
    row_bytes = 8 * max(1, table.schema.field("mean").type.list_size)  # mean + logvar, float32 each
    sink = pa.BufferOutputStream()
    # Dictionaries pay off only for the repeated stamps; the float vectors are all distinct.
    pq.write_table(table, sink, compression=COMPRESSION, row_group_size=max(1, (64 << 20) // row_bytes),
                   use_dictionary=["split", "label", "model_name", "model_version", "dataset_version"],
                   write_statistics=["id", "label"])
    return sink.getvalue().to_pybytes()


def write_file(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write `table` to `path` atomically: readers see the whole file or none."""
    atomic_write_bytes(fs, path, parquet_bytes(table))


def reusable_files(fs: fsspec.AbstractFileSystem, out_path: str, model: ModelIdentity) -> dict[str, str]:
    """{input shard sha256: path of its encoding} from the sibling folders of `out_path` whose manifest
    says they were encoded by exactly `model` (name, version and weights digest).

    `out_path` is a path on `fs` (as `resolve` gives it). Only files a finished sibling's manifest lists
    count: a folder without a manifest (an unfinished run), of another model or of a manifest format that
    recorded no weights digest offers nothing. The caller still checks a file's rows (`check_rows`) before
    copying it. Where several siblings hold a shard, the first folder in sorted order wins.
    """
    out_path = out_path.rstrip("/")
    parent = posixpath.dirname(out_path)
    fs.invalidate_cache(parent)  # object stores cache listings; another run may have published since
    found: dict[str, str] = {}
    for path in sorted(fs.glob(posixpath.join(parent, "*", MANIFEST))):
        folder = posixpath.dirname(path)
        if folder == out_path or not NAME_RULE.fullmatch(posixpath.basename(folder)):
            continue
        try:
            manifest = EmbeddingManifest.model_validate_json(fs.cat_file(path))
        except (ValueError, OSError):
            continue  # not an embeddings folder (or unreadable): nothing to reuse from it
        if manifest.identity != model:
            continue
        for files in manifest.splits.values():
            for f in files:
                found.setdefault(f.source_sha256, posixpath.join(folder, f.path))
    return found


def check_rows(table: pa.Table, model: ModelIdentity, rows: int, where: str) -> None:
    """ValueError naming `where` unless `table` has `rows` rows, every one stamped with `model`'s name and
    version (the columns `model_name` and `model_version` are enough; others may be left out)."""
    if table.num_rows != rows:
        raise ValueError(f"{where}: {table.num_rows} rows, its input shard has {rows}")
    names = pc.unique(table.column("model_name")).to_pylist()
    versions = pc.unique(table.column("model_version")).to_pylist()
    if names != [model.name] or versions != [model.version]:
        raise ValueError(f"{where}: rows of model {names} version {versions}, not {model.name} v{model.version}")


# -------------------------------------------------------------------------------------------- manifest


class EmbeddingFile(Strict):
    """One embeddings file: path relative to the output folder, rows, and the input shard's checksum."""

    path: str = Field(description="e.g. train/<shard sha256>-v<model version>.parquet")
    rows: int = Field(ge=1)
    source_sha256: str
    reused_from: str | None = Field(None, description="dataset version whose file was copied, if any")

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        if v.startswith("/") or posixpath.normpath(v) != v or v.startswith(".."):
            raise ValueError(f"file path {v!r} must be relative and normalised, like 'train/<name>.parquet'")
        return v

    @field_validator("source_sha256")
    @classmethod
    def _sha256(cls, v: str) -> str:
        if not SHA256_HEX.fullmatch(v):
            raise ValueError(f"source_sha256 {v!r} is not a lowercase hex SHA-256")
        return v


class EmbeddingManifest(Strict):
    """Contents of ``manifest.json`` of one embeddings folder; counts are rows per split."""

    format: Literal[1, 2] = 2
    model_name: str
    model_version: int = Field(ge=1)
    model_uri: str
    weights_sha256: str | None = Field(None, description="SHA-256 of the model's serialised weights (format 2 "
                                       "on; format 1 recorded none)")
    dataset: str
    dataset_version: str
    latent_dim: int = Field(ge=1)
    splits: dict[str, list[EmbeddingFile]]
    counts: dict[str, int]
    images_per_s: float | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @model_validator(mode="after")
    def _consistent(self) -> "EmbeddingManifest":
        check_name(self.model_name, "model name")
        if (self.format >= 2) != (self.weights_sha256 is not None):
            need = "need" if self.format >= 2 else "have no"
            raise ValueError(f"format {self.format} manifests {need} weights_sha256")
        if self.weights_sha256 is not None and not SHA256_HEX.fullmatch(self.weights_sha256):
            raise ValueError(f"weights_sha256 {self.weights_sha256!r} is not a lowercase hex SHA-256")
        check_name(self.dataset, "dataset name")
        check_name(self.dataset_version, "dataset version")
        if unknown := (set(self.splits) | set(self.counts)) - set(SPLITS):
            raise ValueError(f"unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
        for split in SPLITS:
            files = self.splits.get(split, [])
            if (held := sum(f.rows for f in files)) != self.counts.get(split, 0):
                raise ValueError(f"counts[{split!r}] is {self.counts.get(split, 0)} but its files hold {held} rows")
            if stray := [f.path for f in files if posixpath.dirname(f.path) != split]:
                raise ValueError(f"split {split!r} lists files outside its folder: {stray[:5]}")
            # The name is the contract that lets a later dataset version find and reuse the file.
            if misnamed := [f.path for f in files if posixpath.basename(f.path) != self.file_name(f.source_sha256)]:
                example = self.file_name("0" * 64).replace("0" * 64, "<source_sha256>")
                raise ValueError(f"files not named {example}: {misnamed[:5]}")
        return self

    @property
    def identity(self) -> ModelIdentity | None:
        """The model that wrote these files exactly; None for format 1, which recorded no weights digest."""
        if self.weights_sha256 is None:
            return None
        return ModelIdentity(self.model_name, self.model_version, self.weights_sha256)

    def file_name(self, source_sha256: str) -> str:
        """The name this manifest's model gives the encoding of input shard `source_sha256`."""
        identity = self.identity
        return file_name(source_sha256, identity) if identity else _legacy_file_name(source_sha256, self.model_version)

    @field_validator("created_at")
    @classmethod
    def _iso(cls, v: str) -> str:
        datetime.fromisoformat(v)  # ValueError naming the text when it is not ISO 8601
        return v

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def write_manifest(fs: fsspec.AbstractFileSystem, out_path: str, manifest: EmbeddingManifest) -> None:
    """Publish ``<out_path>/manifest.json`` atomically; write it after every file it lists."""
    atomic_write_bytes(fs, posixpath.join(out_path, MANIFEST), manifest.to_json().encode())


def read_manifest(url: str, storage_options: dict[str, Any] | None = None) -> EmbeddingManifest:
    """Load and validate the manifest of the embeddings folder `url`."""
    fs, path = resolve(url, storage_options)
    fs.invalidate_cache(path)
    try:
        raw = fs.cat_file(posixpath.join(path, MANIFEST))
    except FileNotFoundError:
        raise ValueError(f"no embeddings manifest at {url}") from None
    try:
        return EmbeddingManifest.model_validate_json(raw)
    except ValueError as e:
        raise ValueError(f"{url}/{MANIFEST} is not a valid embeddings manifest: {e}") from e


# --------------------------------------------------------------------------------------------- reading


def read_embeddings(url: str, splits: list[str] | None = None,
                    storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The rows of the files the manifest at `url` lists (of `splits`, default all), in manifest order.

    Every file must hold the rows the manifest says, in the manifest's schema (ValueError naming it).
    """
    manifest = read_manifest(url, storage_options)
    wanted = set(SPLITS if splits is None else [_check_split(s) for s in splits])
    fs, base = resolve(url, storage_options)
    files = [f for split, fl in manifest.splits.items() if split in wanted for f in fl]
    schema = embedding_schema(manifest.latent_dim)
    paths = [posixpath.join(base, f.path) for f in files]
    try:  # one call for all files: object stores fetch them concurrently
        data = fs.cat(paths) if paths else {}
    except FileNotFoundError:
        missing = [to_url(fs, p) for p in paths if not fs.exists(p)]
        raise ValueError(f"{url}: files listed in the manifest are missing: {missing[:5]}") from None
    tables = []
    for f, path in zip(files, paths):
        table = pq.read_table(pa.BufferReader(data[path]))
        if table.num_rows != f.rows:
            raise ValueError(f"{to_url(fs, path)}: manifest says {f.rows} rows, file has {table.num_rows}")
        if not table.schema.equals(schema):
            raise ValueError(f"{to_url(fs, path)}: schema is not the embeddings schema with latent_dim "
                             f"{manifest.latent_dim}:\n{table.schema}")
        tables.append(table)
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _matrix(table: pa.Table, column: str) -> np.ndarray:
    """A fixed_size_list<float32>[L] column as float32 (N, L), viewing Arrow's buffer where it is one chunk."""
    chunks = table.column(column)
    # combine_chunks copies even a single chunk, so that case takes the chunk itself.
    col = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()
    if not (pa.types.is_fixed_size_list(col.type) and col.type.value_type == pa.float32()):
        raise ValueError(f"column {column!r} is {col.type}, not fixed_size_list<float32>")
    if col.null_count:
        raise ValueError(f"column {column!r} has {col.null_count} null rows")
    # flatten() honours the array's offset (a slice of a table); `.values` would not.
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(col), col.type.list_size)


def latents(table: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Embeddings table -> (ids, mean float32 (N, L), logvar float32 (N, L)).

    The arrays are read-only views of Arrow's buffers when a column is one chunk (copies otherwise).
    """
    return table.column("id").to_pylist(), _matrix(table, "mean"), _matrix(table, "logvar")


def join_images(table: pa.Table, info: DatasetInfo, verify: bool = True) -> np.ndarray:
    """uint8 images (N, H, W, C) of the table's rows, in the table's order, from dataset version `info`.

    A row is matched by its split and id, reading only the shards of the splits present in the table,
    one at a time. Raises ValueError listing (up to 5) ids the dataset does not have.
    """
    ids = table.column("id").to_pylist()
    row_splits = table.column("split").to_pylist()
    if unknown := set(row_splits) - set(SPLITS):  # a split we cannot read could only end as "not found"
        raise ValueError(f"table has unknown split(s) {sorted(unknown)}; splits are {', '.join(SPLITS)}")
    first: dict[tuple[str, str], int] = {}  # (split, id) -> its first row in the table
    for i, key in enumerate(zip(row_splits, ids)):
        first.setdefault(key, i)
    out = np.empty((len(ids), *info.shape), dtype=np.uint8)
    filled = np.zeros(len(ids), dtype=bool)
    present = set(row_splits)
    for split in [s for s in SPLITS if s in present]:
        for shard in (info.manifest.splits[split].shards if split in info.manifest.splits else []):
            shard_table = read_shard_table(info, shard, verify)
            hits = [(r, first[(split, x)]) for r, x in enumerate(shard_table.column("id").to_pylist())
                    if (split, x) in first]
            if hits:
                rows, dest = (np.array(v, dtype=np.int64) for v in zip(*hits))
                out[dest] = images_u8(shard_table, info.shape)[rows]
                filled[dest] = True
    source = np.fromiter((first[k] for k in zip(row_splits, ids)), dtype=np.int64, count=len(ids))
    if missing := [ids[i] for i in np.flatnonzero(~filled[source])]:
        shown = list(dict.fromkeys(missing))
        raise ValueError(f"{len(shown)} id(s) not in dataset {info.name}@{info.version} under the split of their "
                         f"row: {shown[:5]}")
    repeated = source != np.arange(len(ids))
    out[repeated] = out[source[repeated]]  # rows whose (split, id) came earlier in the table
    return out
