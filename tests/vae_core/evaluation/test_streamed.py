"""A streamed evaluation gives the numbers an in-memory one gives, on MNIST's real test split read from its
Parquet shards; the sampled numbers within their sampling error; its memory does not grow with the split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vae_core import load_config
from vae_core.data.shards import iter_split, open_dataset, read_split_u8, sample_split
from vae_core.evaluation.evaluate import EvalData, evaluate_model
from vae_core.evaluation.latent_metrics import active_units, latent_probes
from vae_core.evaluation.scores import score_split
from vae_core.evaluation.sharpness import SharpnessMeter
from vae_core.model.feature_net import FeatureNet, FrechetScorer
from vae_core.model.vae import ConvVAE
from vae_core.training.fit import Fit, steps_per_epoch
from vae_core.training.loop import iterate_batches

MNIST = Path(__file__).resolve().parents[4] / "shared" / "data" / "mnist"
SMALL = {"model.hidden_channels": [16, 32], "model.hidden_dim": 64, "model.latent_dim": 8}
K, SEED, BATCH = 2, 7, 500
REFERENCE_ROWS = 5_000  # the train rows the probes fit on, in every evaluation here


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    """All of MNIST ingested (test: its 10,000 t10k images), and a small model with a few steps of training
    so its latents carry the classes."""
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    root = tmp_path_factory.mktemp("data")
    run_ingest(IngestRequest(source=str(MNIST), name="mnist", data_root=str(root), shard_mb=2))
    info = open_dataset(str(root), "mnist")
    cfg = load_config("mnist", {**SMALL, "train.batch_size": 200})
    train = torch.from_numpy(read_split_u8(info, "train")[0][:6000].copy())
    torch.manual_seed(0)
    fit = Fit.create(cfg, steps_per_epoch(len(train), cfg.train.batch_size))
    fit.train_epoch(iterate_batches(train, cfg.train.batch_size, generator=fit.order(1)))
    model = fit.model
    return info, model.eval()


def in_memory(model: ConvVAE, info, scorer: FrechetScorer) -> dict[str, float]:
    """The numbers as an evaluation held them before it streamed: every image's scores in memory, the
    probes fitted on the reference rows' latents, the Fréchet and sharpness measures over arrays of all images."""
    from vae_core.model.encode import encode_images

    images, labels, _ = read_split_u8(info, "test")
    reference = sample_split(info, "train", REFERENCE_ROWS, SEED)
    train_images, train_labels = reference.images, reference.labels
    scores = score_split(model, images, k=K, seed=SEED, batch_size=BATCH)
    c, h, w = model.config.input_shape
    out = {"neg_elbo": float(-(scores.log_px - scores.kl).mean(dtype=np.float64)),
           f"nll_k{K}": float(-scores.iwae.mean(dtype=np.float64)),
           "mse": float(scores.mse.mean(dtype=np.float64)), "ssim": float(scores.ssim.mean(dtype=np.float64)),
           "active_units": float(active_units(scores.mean)[0])}
    out.update({f"variance_{i}": float(v) for i, v in enumerate(active_units(scores.mean)[1])})
    out.update(latent_probes(encode_images(model, train_images, batch_size=BATCH)[0], train_labels, scores.mean,
                             labels, seed=SEED)[0])
    recon = torch.from_numpy(scores.reconstructions)
    out["frechet_reconstructions"] = scorer.distance(recon.split(BATCH))
    meter = SharpnessMeter()
    meter.add_real(torch.from_numpy(images).permute(0, 3, 1, 2))
    out["sharpness_reconstructions"] = meter.relative(recon.split(BATCH))
    generator = torch.Generator().manual_seed(SEED)
    samples = [model.sample(min(BATCH, len(images) - i), generator=generator) for i in range(0, len(images), BATCH)]
    out["frechet_samples"] = scorer.distance(samples)
    out["sharpness_samples"] = meter.relative(samples)
    return out


def streamed(model: ConvVAE, info, scorer: FrechetScorer, sample_rows: int, batch_size: int = BATCH):
    reference = sample_split(info, "train", REFERENCE_ROWS, SEED)
    data = EvalData(lambda b: iter_split(info, "test", b), reference, info.counts["train"])
    return evaluate_model(model, data, k=K, seed=SEED, batch_size=batch_size, frechet=scorer,
                          sample_rows=sample_rows)


@pytest.fixture(scope="module")
def scorer(mnist):
    info, _ = mnist
    torch.manual_seed(0)
    s = FrechetScorer(FeatureNet((1, 28, 28), 10))
    for rows in iter_split(info, "test", 2000):
        s.add_real(torch.from_numpy(rows.images).permute(0, 3, 1, 2))
    return s


@pytest.fixture(scope="module")
def whole(mnist, scorer):
    info, model = mnist
    return streamed(model, info, scorer, sample_rows=100_000)  # the sample holds every row: nothing sampled


@pytest.mark.slow
def test_streamed_numbers_equal_the_in_memory_numbers_on_mnist_test(mnist, scorer, whole):
    info, model = mnist
    assert info.counts["test"] == 10_000
    expected = in_memory(model, info, scorer)
    assert whole.images == 10_000 and len(whole.sample) == 10_000
    got = {**whole.metrics, **{f"variance_{i}": float(v) for i, v in enumerate(whole.unit_variance)}}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_sampled_probes_are_within_their_sampling_error(mnist, scorer, whole):
    info, model = mnist
    # 2,000 of the 10,000 test rows, the probes fitted on the same train rows: only the test side is sampled.
    sampled = streamed(model, info, scorer, sample_rows=2_000)
    for key in ("knn_accuracy", "linear_probe_accuracy"):
        p = whole.metrics[key]
        # An accuracy over n sampled rows has a standard error of sqrt(p(1-p)/n): allow four of them.
        assert abs(sampled.metrics[key] - p) <= 4 * np.sqrt(p * (1 - p) / 2000), (key, p, sampled.metrics[key])
    assert any("seeded sample" in note and "2,000 of the 10,000" in note for note in sampled.notes)
    assert not any("seeded sample" in note for note in whole.notes)
    # Numbers over the whole split are not sampled: the same as without a sample.
    for key in ("neg_elbo", "mse", "frechet_reconstructions", "active_units"):
        assert sampled.metrics[key] == pytest.approx(whole.metrics[key], rel=1e-6), key


@pytest.mark.slow
def test_a_split_streams_in_the_batches_slicing_it_gives_and_samples_the_rows_an_evaluation_keeps(mnist):
    from vae_core.evaluation.sample import SeededSample

    info, _ = mnist
    images, labels, ids = read_split_u8(info, "test")
    assert len(info.manifest.splits["test"].shards) > 1  # batches cross shard boundaries
    batches = list(iter_split(info, "test", 333, limit=9_000))
    assert [len(b) for b in batches] == [333] * 27 + [9]
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), images[:9_000])
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), labels[:9_000])
    assert [i for b in batches for i in b.ids] == ids[:9_000]
    kept = SeededSample(500, SEED)
    for b in iter_split(info, "test", 1000):
        kept.add(b.ids, id=np.array(b.ids))
    chosen = sample_split(info, "test", 500, SEED)
    assert len(chosen) == 500 and set(kept["id"]) == set(chosen.ids)
    np.testing.assert_array_equal(chosen.images, images[np.isin(ids, chosen.ids)])  # in split order
