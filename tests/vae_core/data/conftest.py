"""Fixtures of the embeddings tests: scikit-learn's digits ingested into several small shards per split and
encoded (latents and scores) by a freshly initialised digits ConvVAE, and one published embeddings folder."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
import torch

from vae_core import load_config
from vae_core.data.embeddings import (EmbeddingFile, EmbeddingManifest, ModelIdentity, build_table, default_dir,
                                      file_name, write_file, write_manifest)
from vae_core.data.shards import DatasetInfo, open_dataset, read_shard_table, table_to_u8
from vae_core.ingestion.ingest import run_ingest
from vae_core.model.encode import encode_and_score
from vae_core.model.vae import ConvVAE
from vae_core.requests import IngestRequest
from vae_core.storage import resolve

MODEL = "vae-digits"


def identity(version: int = 1, weights: bytes = b"weights", name: str = MODEL) -> ModelIdentity:
    return ModelIdentity.of(name, version, weights)


@dataclass
class Encoded:
    """One input shard and its latents."""

    split: str
    sha256: str
    ids: list[str]
    labels: np.ndarray  # int32 (N,)
    mean: np.ndarray  # float32 (N, L)
    logvar: np.ndarray  # float32 (N, L)
    neg_elbo: np.ndarray  # float32 (N,)
    recon_error: np.ndarray  # float32 (N,)

    def table(self, dataset_version: str, model_version: int = 1) -> pa.Table:
        return build_table(self.ids, self.split, self.labels, self.mean, self.logvar, MODEL, model_version,
                           dataset_version, neg_elbo=self.neg_elbo, recon_error=self.recon_error)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> tuple[DatasetInfo, list[Encoded]]:
    root = tmp_path_factory.mktemp("embeddings") / "datasets"
    run_ingest(IngestRequest(source="builtin:digits", name="digits", data_root=str(root), shard_mb=0.02, workers=1))
    info = open_dataset(str(root), "digits")
    torch.manual_seed(0)
    model = ConvVAE(load_config("digits").model)
    encoded = []
    for split, s in info.manifest.splits.items():
        for shard in s.shards:
            images, labels, ids = table_to_u8(read_shard_table(info, shard), info.shape)
            out = encode_and_score(model, images)
            encoded.append(Encoded(split, shard.sha256, ids, labels, out.mean, out.logvar, out.neg_elbo,
                                   out.recon_error))
    assert sum(e.split == "train" for e in encoded) > 1, "the test needs several shards in a split"
    return info, encoded


def publish(fs, out: str, encoded: list[Encoded], dataset_version: str, model_version: int = 1,
            weights: bytes = b"weights") -> EmbeddingManifest:
    """Write one file per shard and then the manifest, as the encode flow does."""
    model = identity(model_version, weights)
    splits: dict[str, list[EmbeddingFile]] = {}
    for e in encoded:
        rel = posixpath.join(e.split, file_name(e.sha256, model))
        write_file(fs, posixpath.join(out, rel), e.table(dataset_version, model_version))
        splits.setdefault(e.split, []).append(EmbeddingFile(path=rel, rows=len(e.ids), source_sha256=e.sha256))
    manifest = EmbeddingManifest(
        model_name=MODEL, model_version=model_version, model_uri=f"models:/{MODEL}/{model_version}",
        weights_sha256=model.weights_sha256, dataset="digits",
        dataset_version=dataset_version, latent_dim=encoded[0].mean.shape[1], splits=splits,
        counts={s: sum(f.rows for f in files) for s, files in splits.items()}, images_per_s=1000.0,
    )
    write_manifest(fs, out, manifest)
    return manifest


@pytest.fixture(scope="session")
def published(digits, tmp_path_factory) -> tuple[str, EmbeddingManifest]:
    info, encoded = digits
    out = default_dir(str(tmp_path_factory.mktemp("embeddings_root")), MODEL, 1, "digits", info.version)
    fs, path = resolve(out)
    return out, publish(fs, path, encoded, info.version)
