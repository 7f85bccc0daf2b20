"""Per-image outlier scores in the embeddings: each image's -ELBO drawn the same whatever batch it is in and equal
on average to training's -ELBO, null for an autoencoder, ranked by `outliers`; outputs written before the
scores (format 2) still read but are neither reused, merged nor ranked.

Real data: scikit-learn's digits, ingested and encoded by this folder's fixtures (conftest.py).
"""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.vae_core.data.conftest import MODEL, identity
from vae_core import load_config
from vae_core.data.embeddings import (EmbeddingFile, EmbeddingManifest, build_table, file_name, join_images,
                                      latents, outliers, read_embeddings, reusable_files, with_earlier_splits,
                                      write_file, write_manifest)
from vae_core.data.shards import read_split_u8
from vae_core.model.encode import encode_and_score, encode_images
from vae_core.model.vae import ConvVAE
from vae_core.storage import resolve
from vae_core.training.loop import evaluate


def test_an_images_score_is_the_same_whatever_batch_and_order_it_is_in(digits):
    info, encoded = digits
    torch.manual_seed(0)  # the fixture's model: it scored each shard in one batch
    model = ConvVAE(load_config("digits").model)
    images, _, ids = read_split_u8(info, "train")
    backwards = encode_and_score(model, images[::-1].copy(), batch_size=61)
    by_id = dict(zip(ids[::-1], backwards.neg_elbo))
    shards = [e for e in encoded if e.split == "train"]
    np.testing.assert_allclose([by_id[i] for e in shards for i in e.ids], np.concatenate([e.neg_elbo for e in shards]),
                               rtol=1e-5)
    np.testing.assert_array_equal(backwards.mean, encode_images(model, images[::-1].copy(), batch_size=61)[0])


def test_the_score_is_trainings_negative_elbo_per_image(digits):
    """The mean of the per-image scores is the -ELBO that training's `evaluate` reports (other noise, so up to
    sampling error), KL included: the posterior's means are pushed away from 0 to make the KL large."""
    info = digits[0]
    torch.manual_seed(0)
    model = ConvVAE(load_config("digits").model)
    with torch.no_grad():
        model.to_posterior.bias[: model.latent_dim] += 2.0  # KL about 0.5 * 2^2 * 8 = 16 nats per image
    images = read_split_u8(info, "train")[0]
    scores = encode_and_score(model, images)
    batches = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).split(256)
    reference = evaluate(model, batches, generator=torch.Generator().manual_seed(1))
    assert reference["kl"] > 10
    assert scores.neg_elbo.mean() == pytest.approx(reference["loss"], rel=0.01)
    assert scores.recon_error.mean() == pytest.approx(reference["recon"], rel=0.01)
    assert (scores.neg_elbo - scores.recon_error).mean() == pytest.approx(reference["kl"], rel=0.05)


def test_an_autoencoder_has_a_reconstruction_error_and_no_elbo(digits):
    info = digits[0]
    model = ConvVAE(load_config("digits", {}, "ae").model)
    images, labels, ids = read_split_u8(info, "test")
    out = encode_and_score(model, images)
    assert np.isnan(out.neg_elbo).all() and np.isfinite(out.recon_error).all()
    table = build_table(ids, "test", labels, out.mean, out.logvar, "vae-ae", 1, info.version, neg_elbo=out.neg_elbo,
                        recon_error=out.recon_error)
    assert table.column("neg_elbo").null_count == len(ids)
    with pytest.raises(ValueError, match="no row has a neg_elbo .*rank by recon_error"):
        outliers(table, info, n=3)
    top, scores, _ = outliers(table, info, n=3, by="recon_error")
    assert list(scores) == sorted(out.recon_error, reverse=True)[:3]


def test_outliers_are_the_highest_scores_first_ties_by_id_with_their_images(digits, published):
    info = digits[0]
    table = read_embeddings(published[0])
    ids, scores, images = outliers(table, info, n=5)
    all_scores = table.column("neg_elbo").to_numpy()
    np.testing.assert_array_equal(scores, np.sort(all_scores)[::-1][:5])
    assert ids == [table.column("id")[i].as_py() for i in np.argsort(-all_scores, kind="stable")[:5]]
    rows = table.take([table.column("id").to_pylist().index(i) for i in ids])
    np.testing.assert_array_equal(images, join_images(rows, info))
    tied = table.set_column(table.schema.get_field_index("neg_elbo"), "neg_elbo",
                            pa.array(np.ones(table.num_rows, np.float32)))
    assert outliers(tied, info, n=4)[0] == sorted(table.column("id").to_pylist())[:4]
    assert len(outliers(table.slice(0, 3), info, n=16)[0]) == 3
    for bad, message in ((dict(n=0), "n must be positive"), (dict(by="kl"), "by must be one of")):
        with pytest.raises(ValueError, match=message):
            outliers(table, info, **bad)


def test_a_format_2_output_reads_but_is_never_reused_merged_or_ranked(digits, published, tmp_path):
    info, encoded = digits
    fs, root = resolve(str(tmp_path))
    base = f"{root}/{MODEL}/1/digits"
    old = _publish_format_2(fs, f"{base}/old", encoded[:2], "old")
    table = read_embeddings(f"{base}/old")
    assert table.num_rows == sum(old.counts.values()) and "neg_elbo" not in table.column_names
    np.testing.assert_array_equal(latents(table)[1], np.concatenate([e.mean for e in encoded[:2]]))
    with pytest.raises(ValueError, match="no 'neg_elbo' column: they were written before format 3; encode them"):
        outliers(table, info)
    assert reusable_files(fs, f"{base}/new", identity(1)) == {}  # same model, files without scores
    current = read_embeddings(published[0])
    new = EmbeddingManifest(**{**dict(old), "format": 3, "splits": {}, "counts": {}})
    assert with_earlier_splits(new, f"{base}/old") == new  # its splits are not listed beside format 3 files
    assert current.num_rows  # a format 3 output beside it reads with its scores
    assert current.column("neg_elbo").null_count == 0


def _publish_format_2(fs, out: str, encoded: list, dataset_version: str) -> EmbeddingManifest:
    """Files and manifest as format 2 wrote them: no score columns, names without -f2."""
    model = identity(1)
    splits: dict[str, list[EmbeddingFile]] = {}
    for e in encoded:
        rel = posixpath.join(e.split, file_name(e.sha256, model, table_format=2))
        write_file(fs, posixpath.join(out, rel), e.table(dataset_version).drop_columns(["neg_elbo", "recon_error"]))
        splits.setdefault(e.split, []).append(EmbeddingFile(path=rel, rows=len(e.ids), source_sha256=e.sha256))
    manifest = EmbeddingManifest(
        format=2, model_name=MODEL, model_version=1, model_uri=f"models:/{MODEL}/1",
        weights_sha256=model.weights_sha256, dataset="digits", dataset_version=dataset_version,
        latent_dim=encoded[0].mean.shape[1], splits=splits,
        counts={s: sum(f.rows for f in files) for s, files in splits.items()})
    write_manifest(fs, out, manifest)
    return manifest
