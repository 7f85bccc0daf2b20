"""The manifest of an embeddings folder (``manifest.json``): every file with its rows and input shard, the
model exactly, and the dataset version. It is written last, and readers go through it."""

from __future__ import annotations

import posixpath
from datetime import datetime, timezone
from typing import Any, Literal

import fsspec
from pydantic import Field, field_validator, model_validator

from vae_core.data.embeddings.format import FORMAT
from vae_core.data.embeddings.identity import ModelIdentity, file_name, legacy_file_name
from vae_core.data.shards import MANIFEST, SPLITS, check_sha256, load_manifest
from vae_core.model.config import Strict
from vae_core.names import check_name
from vae_core.storage import atomic_write_bytes, resolve


class EmbeddingFile(Strict):
    """One embeddings file: path relative to the output folder, rows, and the input shard's checksum."""

    path: str = Field(description="e.g. train/<shard sha256>-v<model version>-<model key>-f3.parquet")
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
        return check_sha256(v, "source_sha256")


class EmbeddingManifest(Strict):
    """Contents of ``manifest.json`` of one embeddings folder; counts are rows per split."""

    format: Literal[1, 2, 3] = FORMAT  # 3: files carry neg_elbo and recon_error
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
        if self.weights_sha256 is not None:
            check_sha256(self.weights_sha256, "weights_sha256")
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
        if identity is None:
            return legacy_file_name(source_sha256, self.model_version)
        return file_name(source_sha256, identity, self.format)

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
        return load_manifest(fs, path, EmbeddingManifest, "embeddings manifest")
    except FileNotFoundError:
        raise ValueError(f"no embeddings manifest at {url}") from None


def with_earlier_splits(manifest: EmbeddingManifest, url: str,
                        storage_options: dict[str, Any] | None = None) -> EmbeddingManifest:
    """`manifest` plus the splits it does not list that an earlier run of the same model on the same dataset
    version wrote into the folder `url` in the same format: a run encodes only the splits it is asked for, the
    others stay (files of an earlier format lack columns: they are left out, not listed beside the new ones)."""
    try:
        before = read_manifest(url, storage_options)
    except ValueError:
        return manifest  # no earlier manifest, or one no reader could use
    if (before.identity, before.dataset_version, before.format) != (manifest.identity, manifest.dataset_version,
                                                                    manifest.format):
        return manifest
    splits = {**{s: f for s, f in before.splits.items() if s not in manifest.splits}, **manifest.splits}
    counts = {s: sum(f.rows for f in files) for s, files in splits.items()}
    return EmbeddingManifest(**{**dict(manifest), "splits": splits, "counts": counts})
