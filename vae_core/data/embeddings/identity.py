"""Which model wrote an embeddings file, and where it goes: `ModelIdentity`, file names keyed by the input
shard's checksum and the model, and the default output folder."""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

from vae_core.data.embeddings.format import FORMAT, check_model_version
from vae_core.data.shards import check_sha256, sha256_hex
from vae_core.names import check_name


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
        check_model_version(self.version)
        check_sha256(self.weights_sha256, "weights digest")

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


def file_name(shard_sha256: str, model: ModelIdentity, table_format: int = FORMAT) -> str:
    """Name of the embeddings file of the input shard with checksum `shard_sha256`, encoded by `model`:
    ``<shard sha256>-v<model version>-<model key>-f<format>.parquet`` (format 2: no ``-f2``). The format is
    part of the name so that a run never counts a file of another schema as done."""
    check_sha256(shard_sha256, "shard checksum")
    marker = f"-f{table_format}" if table_format >= 3 else ""
    return f"{shard_sha256}-v{model.version}-{model.key}{marker}.parquet"


def legacy_file_name(shard_sha256: str, model_version: int) -> str:
    """Format 1's name, keyed by the model version only: still read, never reused or written."""
    return f"{shard_sha256}-v{check_model_version(model_version)}.parquet"


def default_dir(root: str, model_name: str, model_version: int, dataset: str, dataset_version: str) -> str:
    """`<root>/<model name>/<model version>/<dataset>/<dataset version>`; `root` may be a URL.

    The naming rule rules out '..' and '/', so the result cannot leave `root`.
    """
    parts = [check_name(model_name, "model name"), str(check_model_version(model_version)),
             check_name(dataset, "dataset name"), check_name(dataset_version, "dataset version")]
    return posixpath.join(root, *parts)
