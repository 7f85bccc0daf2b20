"""encode-dataset end to end on real MNIST: Prefect's engine, a local Ray with Ray Data, a SQLite MLflow store.

Every id once per split, the registered model's `predict` and the in-process scores reproduced, a driver
killed halfway and run again, a new dataset version that shares shards, S3 output through moto's server,
planted noise images found as the top outliers.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.usefixtures("prefect_server")

MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
SHARD_MB = 0.1  # ~130 MNIST images per shard: 17 shards of 2,000 images, so "halfway" exists


@pytest.fixture(scope="module")
def home(tmp_path_factory, mnist_home, register_model, s3):
    """2,000 real MNIST images in 17 shards, an untrained small model registered as vae-mnist v1, and one
    local Ray that the encodes run here join instead of each starting its own.

    The S3 server (`s3`, the session's) is up before Ray starts: `ray_session` puts the environment back as it
    found it when Ray stops, so AWS_* set by a fixture inside the session would be dropped for every later test.
    """
    from flows.distributed.cluster import ray_session

    with mnist_home(tmp_path_factory.mktemp("encode_home"), limit=2000, shard_mb=SHARD_MB) as root:
        register_model(epochs=0)
        with ray_session():
            yield root


def _encode(**request):
    from flows.encode import encode_dataset
    from vae_core.requests import EncodeRequest

    return encode_dataset(EncodeRequest(**{"model": "models:/vae-mnist@challenger", "dataset": "mnist", **request}))


def _dataset(name: str = "mnist"):
    from vae_core.data.shards import open_dataset
    from vae_core.settings import data_root

    return open_dataset(data_root(), name)


def _files(out: str) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in Path(out).rglob("*.parquet")}


def test_every_id_once_equal_to_predict_and_a_rerun_does_nothing(home):
    from vae_core.data.embeddings import latents, read_embeddings
    from vae_core.data.shards import read_split_u8
    from vae_core.model.encode import encode_and_score

    out = _encode()
    info = _dataset()
    assert out.rows == {s: n for s, n in info.counts.items()} and out.rows_encoded == sum(info.counts.values())
    assert out.output.endswith(f"embeddings/vae-mnist/1/mnist/{info.version}")
    loaded = mlflow.pyfunc.load_model(out.model_uri)
    for split in ("train", "val", "test"):
        table = read_embeddings(out.output, splits=[split])
        images, labels, ids = read_split_u8(info, split)
        assert table.column("id").to_pylist() == ids  # every id once, in the dataset's order
        assert set(table.column("split").to_pylist()) == {split}
        np.testing.assert_array_equal(table.column("label").fill_null(-1).to_numpy(), labels)
        _, mean, logvar = latents(table)
        expected = loaded.predict(images)
        np.testing.assert_allclose(mean, expected["mean"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(logvar, expected["logvar"], rtol=0, atol=1e-5)
        # An image's score does not depend on the batch or the worker it was scored in.
        scored = encode_and_score(loaded.unwrap_python_model().model, images, batch_size=100)
        np.testing.assert_allclose(table.column("neg_elbo").to_numpy(), scored.neg_elbo, rtol=1e-5)
        np.testing.assert_allclose(table.column("recon_error").to_numpy(), scored.recon_error, rtol=1e-5)
    # Plain pyarrow and pandas read the output as it is: one file per input shard.
    files = sorted(Path(out.output).rglob("*.parquet"))
    assert len(files) == sum(len(s.shards) for s in info.manifest.splits.values())
    frame = pd.read_parquet(files[0])
    assert list(frame.columns) == ["id", "split", "label", "mean", "logvar", "neg_elbo", "recon_error", "model_name",
                                   "model_version", "dataset_version"]
    # The mnist preset has a second stochastic layer: the embedding is [z1 | z2], 8 + 16 wide.
    assert expected["mean"].shape[1] == 8 + 16
    assert len(frame["mean"].iloc[0]) == 8 + 16 and frame["model_version"].iloc[0] == 1
    assert pq.read_table(files[0]).schema.field("mean").type.list_size == 8 + 16
    manifest = json.loads((Path(out.output) / "manifest.json").read_text())
    assert manifest["counts"] == out.rows and manifest["model_version"] == 1
    # Throughput in an MLflow run linked to the model version.
    run = mlflow.MlflowClient().get_run(out.run_id)
    assert run.data.metrics["images_per_s"] > 0 and run.data.tags["model_version"] == "1"
    assert [m.model_id for m in run.inputs.model_inputs] == [loaded.metadata.model_id]
    # 2,000 images come back in two batches at least (1,024 each at most): a steady rate after the first.
    assert out.steady_images_per_s > 0 and run.data.metrics["steady_images_per_s"] == out.steady_images_per_s

    before = _files(out.output)
    again = _encode()
    assert again.rows_encoded == 0 and again.rows_already_there == out.rows_encoded
    assert _files(out.output) == before  # nothing rewritten

    redo = _encode(splits=["test"], overwrite=True)
    assert redo.rows_encoded == info.counts["test"] and redo.rows == {"test": info.counts["test"]}
    # Where every row came in the first batch there is no steady rate at all, rather than one of 0.
    redo_rate = mlflow.MlflowClient().get_run(redo.run_id).data.metrics.get("steady_images_per_s")
    assert redo_rate == redo.steady_images_per_s != 0.0
    assert read_embeddings(out.output).num_rows == sum(info.counts.values())  # other splits stay listed

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect_client:
        arts = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["encode-dataset-summary"])))
    assert any(out.output in a.data and f"| train | {info.counts['train']:,} |" in a.data for a in arts)


def test_a_steady_rate_needs_rows_after_the_first_batch():
    from flows.encode import steady_rate

    assert steady_rate(0, 0.0) == steady_rate(0, 2.5) == {}  # all rows in the first batch
    assert steady_rate(300, 1.5) == {"steady_images_per_s": 200.0}


def test_killed_driver_then_rerun_encodes_only_what_is_missing(home, tmp_path):
    from prefect.settings import PREFECT_API_URL

    from vae_core.data.embeddings import read_embeddings
    from vae_core.data.shards import read_split_u8

    out_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "flows.cli.app", "encode", "--model", "models:/vae-mnist/1", "--dataset", "mnist",
           "--out", str(out_dir), "--batch-size", "8"]
    info = _dataset()
    total_files = sum(len(s.shards) for s in info.manifest.splits.values())
    log = tmp_path / "driver.log"
    # The session's Prefect server: the driver's own temporary one would only add its start-up to the wait.
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(out_dir.rglob("*.parquet")):
            assert proc.poll() is None, f"the job ended before it wrote anything:\n{log.read_text()[-3000:]}"
            time.sleep(0.02)
    finally:  # SIGKILL: the driver and the Ray it started, with no chance to clean up
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(list(out_dir.rglob("*.parquet")))
    assert 0 < done < total_files, f"{done} of {total_files} files written when killed"
    # The progress bar is drawn from the first latents on, after Ray's core worker printed its line per actor.
    printed = log.read_text()
    bar = printed.find(f"encode mnist@{info.version}")
    assert bar >= 0 and "core_worker.cc" not in printed[bar:], printed[-3000:]
    resumed = _encode(out=str(out_dir))
    assert resumed.rows_already_there > 0
    assert resumed.rows_encoded + resumed.rows_already_there == sum(info.counts.values())
    assert not [p for p in out_dir.rglob("*") if p.name.startswith(".")]  # no temporaries left
    table = read_embeddings(str(out_dir))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == sum(info.counts.values())
    assert set(ids) == {i for split in ("train", "val", "test") for i in read_split_u8(info, split)[2]}


def test_a_new_dataset_version_encodes_only_the_shards_it_does_not_share(home, tmp_path):
    """New images in the test folder change only the test split's shards (an item's split is its source's, its
    shard a function of its content): the train and val shards of the new version are byte-identical to the old
    one's, so their embeddings are reused, not computed again."""
    from PIL import Image

    from vae_core.data.embeddings import read_embeddings
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    with gzip.open(MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    for i in range(400):
        Image.fromarray(images[i]).save(_mkdir(tmp_path / "grow" / "train" / "digit") / f"{i:04d}.png")
    for tests in (100, 400):  # the second version adds 300 test images
        for i in range(1000, 1000 + tests):
            Image.fromarray(images[i]).save(_mkdir(tmp_path / "grow" / "test" / "digit") / f"{i:04d}.png")
        run_ingest(IngestRequest(source=str(tmp_path / "grow"), name="grow", shard_mb=SHARD_MB))
        out = _encode(dataset="grow")
        if tests == 100:
            first = out
    info = _dataset("grow")
    assert out.dataset_version == info.version != first.dataset_version
    assert out.rows_reused == info.counts["train"] + info.counts["val"] and out.rows_encoded == info.counts["test"]
    table = read_embeddings(out.output)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 800
    assert set(table.column("dataset_version").to_pylist()) == {info.version}  # reused rows restamped


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_shape_mismatch_fails_before_any_work(home, register_model):
    from vae_core.errors import EncodeError

    register_model(epochs=0, name="vae-digits", preset="digits")
    with pytest.raises(EncodeError, match=r"takes 8x8x1 images but dataset mnist@\w+ has 28x28x1"):
        _encode(model="models:/vae-digits@challenger")


def test_output_on_s3(home, s3, monkeypatch):
    from vae_core.data.embeddings import read_embeddings

    fs, options = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["client_kwargs"]["endpoint_url"])
    out = _encode(splits=["test"], out="s3://vae-bucket/embeddings/mnist-test")
    assert out.output == "s3://vae-bucket/embeddings/mnist-test"
    table = read_embeddings(out.output, storage_options=options)
    assert table.num_rows == out.rows["test"] == len(set(table.column("id").to_pylist()))
    assert fs.exists("vae-bucket/embeddings/mnist-test/manifest.json")


def test_planted_noise_images_are_the_top_outliers(home, register_model, tmp_path):
    """300 MNIST test images and 3 of uniform noise, ingested from an .npz and encoded by a model trained for
    one epoch on MNIST: `outliers` ranks the 3 noise images first, with their pixels."""
    from vae_core.data.embeddings import outliers, read_embeddings
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    with gzip.open(MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        digits = np.frombuffer(f.read(), np.uint8, offset=16, count=300 * 28 * 28).reshape(300, 28, 28)
    noise = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    ids = [f"digit-{i:03d}" for i in range(300)] + [f"noise-{i}" for i in range(3)]
    np.savez(tmp_path / "planted.npz", images=np.concatenate([digits, noise]), ids=np.array(ids))
    run_ingest(IngestRequest(source=str(tmp_path / "planted.npz"), name="planted"))
    version = register_model(epochs=1, name="vae-mnist-e1")
    out = _encode(model=f"models:/vae-mnist-e1/{version}", dataset="planted")
    top, scores, images = outliers(read_embeddings(out.output), _dataset("planted"), n=4)
    assert sorted(top[:3]) == ["noise-0", "noise-1", "noise-2"] and top[3].startswith("digit-"), (top, scores)
    np.testing.assert_array_equal(images[:3, ..., 0], noise[[int(i[-1]) for i in top[:3]]])
