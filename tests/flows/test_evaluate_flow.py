"""evaluate-vae end to end on real MNIST: Prefect's engine, a SQLite MLflow store, registered models.

Three versions of `vae-mnist` are registered in turn (a briefly trained model, an untrained one, a
longer trained one) and each goes through the champion gate: the first becomes champion, the worse
one does not, the better one does.
"""

from __future__ import annotations

import gzip
import html
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("prefect_server")

MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
K = 20


@pytest.fixture(scope="module")
def home(tmp_path_factory, mnist_home):
    """A VAE_HOME with 3,000 real MNIST images (train, val and test splits) and a SQLite MLflow store."""
    with mnist_home(tmp_path_factory.mktemp("eval_home"), limit=3000) as root:
        yield root


@pytest.fixture(scope="module")
def register(home, register_model):
    """register(epochs, name=..., preset=...) -> version: a small model trained in process for `epochs`
    (0: untrained) on the dataset's train split, registered as the next version of vae-mnist."""
    return register_model


def _evaluate(**request):
    from flows.evaluate import evaluate_vae
    from vae_core.requests import EvaluateRequest

    # The fewest points the latent maps take: t-SNE's cost grows with them, and no check here counts them.
    return evaluate_vae(EvaluateRequest(**{"iw_samples": K, "map_points": 10, **request}))


def _client() -> mlflow.MlflowClient:
    from flows.tracking import runs as tracking

    return tracking.client()


def test_first_becomes_champion_worse_does_not_better_does(home, register):
    v1 = register(epochs=1)
    first = _evaluate(model="models:/vae-mnist@challenger")
    assert first.model_version == v1 and first.model_uri == f"models:/vae-mnist/{v1}"
    assert first.decision.promote and first.decision.reason == "there is no champion yet"
    client = _client()
    assert int(client.get_registered_model("vae-mnist").aliases["champion"]) == v1

    # Every metric the issue names, keyed by split (and K where K matters), logged to the training run.
    m = first.metrics
    for key in ("neg_elbo", "recon_nll", "kl", f"nll_k{K}", f"bits_per_dim_k{K}", "mse", "psnr", "ssim",
                "active_units", "kl_dim_00", "knn_accuracy", "linear_probe_accuracy", "frechet_samples",
                "frechet_reconstructions", "sharpness_reconstructions", "sharpness_samples"):
        assert f"test/{key}" in m, key
    assert m[f"test/nll_k{K}"] <= m["test/neg_elbo"] + 1.0  # the IWAE bound is at least as tight, up to noise
    assert 0 < m["test/ssim"] <= 1 and m["test/psnr"] > 0
    assert 0 <= m["test/active_units"] <= 8 + 16  # the mnist preset has a 16-dim top layer above the 8
    assert m["test/knn_accuracy"] > 0.3  # ten classes: chance is 0.1
    assert first.feature_classifier.test_accuracy > 0.55 and not first.feature_classifier.cached
    # Its accuracy beside chance, logged; high enough that no note doubts the Fréchet distances.
    assert m["features/classifier_accuracy"] == first.feature_classifier.test_accuracy
    assert m["features/chance_accuracy"] == pytest.approx(0.1)
    assert not [n for n in first.notes if "Fréchet" in n]
    run = client.get_run(first.run_id)
    assert run.data.metrics[f"test/nll_k{K}"] == pytest.approx(m[f"test/nll_k{K}"])
    assert run.data.metrics["features/classifier_accuracy"] == pytest.approx(first.feature_classifier.test_accuracy)
    assert run.data.tags["evaluation.test.k"] == str(K)

    # Pictures: PNGs of the expected sizes under $VAE_HOME/reports/<model>/<version>/, and logged.
    folder = home / "reports" / "vae-mnist" / str(v1)
    sizes = {name: Image.open(folder / f"{name}.png").size for name in
             ("reconstructions", "samples", "interpolations", "traversals", "latent_pca", "latent_tsne")}
    assert sizes["samples"] == (484, 484)  # 64 images of 28 px, padding 2 (242 px), scaled x2 to be >= 256 wide
    assert sizes["interpolations"] == (10 * 30 + 2, 8 * 30 + 2)  # 8 pairs, 10 steps
    assert sizes["traversals"] == (9 * 30 + 2, 8 * 30 + 2)  # 8 dimensions, 9 steps
    assert sizes["latent_pca"] == sizes["latent_tsne"] == (600, 600)
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and f"test/nll_k{K}" in html
    assert "promoted: there is no champion yet" in html
    logged = {Path(a.path).name for a in client.list_artifacts(first.run_id, f"evaluation/test_k{K}")}
    assert {"report.html", "metrics.json", "samples.png", "latent_tsne.png"} <= logged
    assert json.loads((folder / "metrics.json").read_text())["metrics"] == m

    # An untrained model is worse: evaluated against the champion on the same split, K and seed, kept out.
    # Its training run's warning reaches the notes, the report and the gate's reason.
    v2 = register(epochs=0)
    warning = "training ended with the KL weight at 0.02, below its target 1.0"
    client.set_tag(client.get_model_version("vae-mnist", str(v2)).run_id, "warning/kl_warmup", warning)
    worse = _evaluate(model="models:/vae-mnist@challenger")
    assert f"training warning (kl_warmup): {warning}" in worse.notes
    assert f"training warning (kl_warmup): {warning}" in (home / "reports" / "vae-mnist" / str(v2) /
                                                          "report.html").read_text()
    assert worse.decision.reason.endswith(f"; warning: {warning}")
    assert not worse.decision.promote and worse.champion.version == v1
    assert worse.champion.metrics[f"test/nll_k{K}"] == pytest.approx(m[f"test/nll_k{K}"], rel=1e-6)
    assert int(client.get_registered_model("vae-mnist").aliases["champion"]) == v1
    tags = client.get_model_version("vae-mnist", str(v2)).tags
    assert tags["gate.decision"] == "kept" and tags["gate.champion_version"] == str(v1)
    assert tags["gate.reason"] == worse.decision.reason
    assert client.get_model_version("vae-mnist", str(v2)).description.endswith(f"gate: kept: {worse.decision.reason}.")
    assert float(tags["gate.challenger"]) == pytest.approx(worse.metrics[f"test/nll_k{K}"])
    assert float(tags["gate.champion"]) == pytest.approx(m[f"test/nll_k{K}"])

    # Longer training is better: it takes the champion alias, and the reason names both numbers.
    v3 = register(epochs=4)
    better = _evaluate(model=f"models:/vae-mnist/{v3}")
    assert better.decision.promote, better.decision
    assert better.metrics[f"test/nll_k{K}"] < better.champion.metrics[f"test/nll_k{K}"]
    assert int(client.get_registered_model("vae-mnist").aliases["champion"]) == v3
    assert client.get_model_version("vae-mnist", str(v3)).tags["gate.decision"] == "promoted"
    assert better.feature_classifier.cached  # trained once per dataset version

    # Evaluating without the gate moves nothing.
    again = _evaluate(model=f"models:/vae-mnist/{v1}", promote=False)
    assert again.decision is None and again.champion is None
    assert int(client.get_registered_model("vae-mnist").aliases["champion"]) == v3

    # The Prefect artifact: the metric table beside the champion's, the decision, the report.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect_client:
        arts = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["evaluate-vae-summary"])))
    assert any(f"models:/vae-mnist/{v3}" in a.data and "promoted to champion" in a.data
               and f"| test/nll_k{K} |" in a.data and better.report["report"] in a.data for a in arts)

    # A champion that moved after this evaluation pinned it is not overwritten: the gate re-reads it.
    from flows.evaluate import Target, gate_task
    from flows.tracking import registry
    from vae_core.requests import EvaluateRequest

    stale = Target(model=registry.pin_model(f"models:/vae-mnist/{v2}"),
                   champion=registry.pin_model(f"models:/vae-mnist/{v1}"), dataset=None)
    req = EvaluateRequest(model=f"models:/vae-mnist/{v2}", iw_samples=K)
    moved = gate_task.fn(req, stale, {f"nll_k{K}": 1.0}, {f"nll_k{K}": 500.0})
    assert not moved.promote and moved.reason.startswith(f"champion moved to version {v3}")
    assert int(client.get_registered_model("vae-mnist").aliases["champion"]) == v3
    assert client.get_model_version("vae-mnist", str(v2)).tags["gate.reason"] == moved.reason


def test_errors_name_what_exists(home, register):
    from vae_core.errors import EvaluateError, ModelNotFoundError

    register(epochs=0, name="vae-other")
    with pytest.raises(ModelNotFoundError, match=r"no alias 'best'; its aliases: @challenger -> version 1"):
        _evaluate(model="models:/vae-other@best")
    with pytest.raises(ModelNotFoundError, match=r"no version 9; its versions: 1"):
        _evaluate(model="models:/vae-other/9")
    with pytest.raises(ModelNotFoundError, match=r"no registered model 'vae-nope'.*vae-other"):
        _evaluate(model="models:/vae-nope@champion")
    register(epochs=0, name="vae-digits", preset="digits")
    with pytest.raises(EvaluateError, match=r"takes 8x8x1 images but dataset mnist@\w+ has 28x28x1"):
        _evaluate(model="models:/vae-digits@challenger", dataset="mnist")
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    run_ingest(IngestRequest(source="builtin:digits", name="digits", val_fraction=0))
    with pytest.raises(EvaluateError, match=r"split 'val' of dataset digits@\w+ is empty \(train [\d,]+, val 0, test"):
        _evaluate(model="models:/vae-digits@challenger", dataset="digits", split="val")
    if not torch.cuda.is_available():  # more GPUs than the machine has: named before anything loads
        with pytest.raises(ValueError, match="asks for 1 CUDA devices, but this machine has 0"):
            _evaluate(model="models:/vae-other@challenger", gpus=1)


def test_no_labels_skip_label_metrics_and_random_labels_flag_the_frechet_distances(home, register, tmp_path):
    from vae_core.errors import EvaluateError
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    with gzip.open(MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:400]
    np.savez(tmp_path / "plain.npz", images=images)  # no labels
    run_ingest(IngestRequest(source=str(tmp_path / "plain.npz"), name="plain", test_fraction=0.5))
    version = register(epochs=0, name="vae-plain")
    out = _evaluate(model=f"models:/vae-plain/{version}", dataset="plain", promote=False)
    assert "test/knn_accuracy" not in out.metrics and "test/frechet_samples" not in out.metrics
    assert f"test/nll_k{K}" in out.metrics and "features/classifier_accuracy" not in out.metrics
    assert any("k-NN and linear probe skipped" in n for n in out.notes)
    assert out.feature_classifier.skipped.startswith("no labelled")

    # Labels drawn at random: no classifier can learn them, so it stays near chance (0.1) on held-out rows.
    np.savez(tmp_path / "random.npz", images=images, labels=np.random.default_rng(0).integers(0, 10, len(images)))
    run_ingest(IngestRequest(source=str(tmp_path / "random.npz"), name="random-labels", test_fraction=0.5))
    model = f"models:/vae-plain/{version}"
    with pytest.raises(EvaluateError, match=r"^the champion gate refuses --metric frechet_samples: the feature "
                                            r"classifier's held-out accuracy is 0\.\d+, below 0\.550 \(chance"):
        _evaluate(model=model, dataset="random-labels", metric="frechet_samples")
    assert "champion" not in _client().get_registered_model("vae-plain").aliases
    flagged = _evaluate(model=model, dataset="random-labels", promote=False, limit=50)
    accuracy = flagged.metrics["features/classifier_accuracy"]
    assert accuracy < 0.3 and flagged.metrics["features/chance_accuracy"] == pytest.approx(0.1)
    assert "test/frechet_samples" in flagged.metrics  # shown, with the note beside it
    note = next(n for n in flagged.notes if n.startswith("Fréchet distances unreliable: "))
    assert f"held-out accuracy is {accuracy:.3f}, below 0.550" in note
    report = (home / "reports" / "vae-plain" / str(version) / "report.html").read_text()
    assert html.escape(note, quote=True) in report


def test_an_autoencoder_is_evaluated_like_any_model_without_likelihood_numbers(home, register):
    from vae_core.errors import EvaluateError

    version = register(epochs=0, name="vae-mnist-ae", objective="ae")
    with pytest.raises(EvaluateError, match=r"compares nll, which an autoencoder \(model.kind=ae\) does not have"):
        _evaluate(model=f"models:/vae-mnist-ae/{version}")  # the gate's default metric: stops before scoring
    out = _evaluate(model=f"models:/vae-mnist-ae/{version}", metric="frechet_samples", limit=300)
    m = out.metrics
    assert not [k for k in m if k.startswith(("test/nll", "test/bits_per_dim", "test/neg_elbo", "test/kl"))]
    assert m["test/recon_nll"] > 0 and m["test/frechet_samples"] > 0 and 0 <= m["test/knn_accuracy"] <= 1
    assert out.decision.promote  # the first version of its name: gated on what it has


def test_cli_prints_metrics_and_decision_as_json(home, register):
    from flows.cli.app import app

    result = CliRunner().invoke(app, ["evaluate", "--model", "models:/vae-mnist@champion", "--iw-samples", "5",
                                      "--limit", "100", "--map-points", "50", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["images"] == 100 and "test/nll_k5" in out["metrics"]
    assert out["decision"]["reason"].endswith("is already the champion") and not out["decision"]["promote"]

    bad = CliRunner().invoke(app, ["evaluate", "--model", "vae-mnist"])
    assert bad.exit_code == 1 and "models:/NAME@ALIAS or models:/NAME/VERSION" in bad.output


def test_a_shard_deleted_from_the_dataset_is_named_with_what_to_do(home, register):
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    dataset = run_ingest(IngestRequest(source="builtin:digits", name="digits-damaged"))
    version = register(epochs=0, name="vae-digits-damaged", preset="digits", dataset="digits-damaged")
    shard = dataset.manifest.splits["test"].shards[0].path
    (Path(dataset.url) / shard).unlink()
    with pytest.raises(FileNotFoundError, match=rf"^dataset digits-damaged@{dataset.version}: shard {shard}"
                                                r" is missing \(.*\); the dataset version is damaged; remove "):
        _evaluate(model=f"models:/vae-digits-damaged/{version}", promote=False)


@pytest.mark.slow
def test_actors_score_the_split_as_this_process_does(home, register):
    from flows.distributed.cluster import ray_session

    v = register(epochs=1, name="vae-actors")
    # One batch size: the prior samples are drawn batch by batch from one generator.
    one = _evaluate(model=f"models:/vae-actors/{v}", promote=False, batch_size=64)
    with ray_session():  # one local Ray that both scorings on actors join
        two = _evaluate(model=f"models:/vae-actors/{v}", promote=False, workers=2, batch_size=64)
        again = _evaluate(model=f"models:/vae-actors/{v}", promote=False, limit=100, workers=2, batch_size=32)
    assert two.images == one.images > 300
    # Numbers that draw no noise are the same whoever scores which batch; the seeded per-batch noise of the
    # likelihood bounds differs with the batches, so those agree within sampling noise.
    for key in ("mse", "psnr", "ssim", "active_units", "sharpness_reconstructions", "frechet_reconstructions",
                "frechet_samples", "sharpness_samples", "knn_accuracy", "linear_probe_accuracy"):
        assert two.metrics[f"test/{key}"] == pytest.approx(one.metrics[f"test/{key}"], rel=1e-4), key
    for key in (f"nll_k{K}", "neg_elbo"):
        assert two.metrics[f"test/{key}"] == pytest.approx(one.metrics[f"test/{key}"], rel=0.02), key
    first = _evaluate(model=f"models:/vae-actors/{v}", promote=False, limit=100, batch_size=32)
    assert again.images == first.images == 100
    assert again.metrics["test/mse"] == pytest.approx(first.metrics["test/mse"], rel=1e-5)  # the same 100 rows
