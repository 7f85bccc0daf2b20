"""train-vae end to end: Prefect's engine, a local Ray with two CPU workers, a SQLite MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.usefixtures("prefect_server")

MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
SMALL = ["model.hidden_channels=[16,32]", "train.batch_size=64", "train.kl_warmup_steps=50", "train.log_every=5"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A VAE_HOME holding 2,400 real MNIST training images (train + val carve), shared by this module."""
    from vae_core.ingest import run_ingest
    from vae_core.requests import IngestRequest

    root = tmp_path_factory.mktemp("train_home")
    old = {k: os.environ.get(k) for k in ("VAE_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["VAE_HOME"] = str(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    run_ingest(IngestRequest(source=str(MNIST_DIR), name="mnist", limit=2400, data_root=str(root / "datasets")))
    from flows import tracking

    tracking.configure()
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _epoch_steps(run_id: str, key: str = "epoch/loss") -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def _runs() -> list:
    exp = mlflow.get_experiment_by_name("train-vae")
    return mlflow.search_runs([exp.experiment_id], output_format="list") if exp else []


def test_two_workers_train_track_register_and_pull(home):
    from flows.train import train_vae
    from vae_core.requests import TrainRequest

    before = len(_runs())
    out = train_vae(TrainRequest(dataset="mnist", overrides=SMALL, epochs=3, workers=2, max_failures=0))
    client = mlflow.MlflowClient()

    assert len(_runs()) == before + 1  # exactly one run for the job
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden_channels"] == "[16, 32]" and run.data.params["train.epochs"] == "3"
    assert run.data.tags["dataset_version"] == out["dataset_version"]
    assert _epoch_steps(out["run_id"]) == [1, 2, 3]
    losses = [m.value for m in sorted(client.get_metric_history(out["run_id"], "epoch/loss"), key=lambda m: m.step)]
    assert losses[-1] < losses[0], losses
    for key in ("epoch/val_loss", "epoch/images_per_s", "epoch/grad_norm", "train/loss", "train/beta", "train/lr",
                "train/images_per_s", "train/grad_norm", "train/kl", "train/recon"):
        assert client.get_metric_history(out["run_id"], key), key
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "samples")}
    assert "samples/epoch_0003.png" in artifacts

    assert out["run_id"] in out["run_url"]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect_client:
        arts = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-vae-summary"])))
    assert any(out["run_id"] in a.data and f"version {out['model_version']}" in a.data for a in arts)

    mv = client.get_model_version_by_alias("vae-mnist", "challenger")
    assert int(mv.version) == out["model_version"] and mv.run_id == out["run_id"]

    # A fresh process with only the tracking URI pulls the model by alias and encodes real images.
    code = textwrap.dedent(f"""
        import json, gzip, numpy as np, mlflow.pyfunc
        raw = gzip.open({str(MNIST_DIR / 't10k-images-idx3-ubyte.gz')!r}).read()
        x = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28, 1)[:5]
        m = mlflow.pyfunc.load_model("models:/vae-mnist@challenger")
        out = m.predict(x)
        vae = m.unwrap_python_model().model
        print(json.dumps({{"mean": np.asarray(out["mean"]).shape, "logvar": np.asarray(out["logvar"]).shape,
                          "sample": list(vae.sample(2).shape)}}))
    """)
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
           "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shapes = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert shapes == {"mean": [5, 32], "logvar": [5, 32], "sample": [2, 1, 28, 28]}


def _train_worker_pids() -> list[int]:
    """Ray names its actor processes after their class: `ray::RayTrainWorker...`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().startswith(b"ray::RayTrainWorker"):
                        pids.append(int(entry))
            except OSError:
                continue
    return sorted(pids)


def _kill_one_worker_after_first_epoch(killed: list[int], stop: threading.Event) -> None:
    """Watch MLflow for the first logged epoch, then SIGKILL one Ray Train worker process."""
    import signal

    client = mlflow.MlflowClient()
    while not stop.is_set():
        runs = [r for r in _runs() if r.info.status == "RUNNING"]
        if runs and client.get_metric_history(runs[0].info.run_id, "epoch/loss"):
            pids = _train_worker_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
        time.sleep(0.2)


def test_killed_worker_is_replaced_and_every_epoch_logged_once(home):
    from flows.train import train_vae
    from vae_core.requests import TrainRequest

    before = len(_runs())
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_one_worker_after_first_epoch, args=(killed, stop), daemon=True)
    watcher.start()
    try:
        out = train_vae(TrainRequest(dataset="mnist", overrides=SMALL + ["train.epochs=4"], workers=2, max_failures=2))
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert killed, "no worker was killed: the test did not exercise recovery"
    assert len(_runs()) == before + 1
    assert mlflow.MlflowClient().get_run(out["run_id"]).info.status == "FINISHED"
    assert _epoch_steps(out["run_id"]) == [1, 2, 3, 4]
    steps = _epoch_steps(out["run_id"], "train/loss")
    assert len(steps) == len(set(steps)), "a step was logged twice"
    assert out["model_version"] >= 1


def test_nan_loss_fails_the_run_with_a_clear_error(home):
    from flows.train import train_vae
    from vae_core.errors import NonFiniteLossError, TrainError
    from vae_core.requests import TrainRequest

    before = {r.info.run_id for r in _runs()}
    with pytest.raises(TrainError, match="non-finite loss") as raised:
        train_vae(TrainRequest(dataset="mnist", overrides=SMALL + ["train.lr=1e4"], epochs=2, workers=1, max_failures=0))
    # The worker's own exception crossed Ray's boundary typed, naming the step where the loss went bad.
    assert type(raised.value) is NonFiniteLossError and "at step" in str(raised.value)
    new = [r for r in _runs() if r.info.run_id not in before]
    assert len(new) == 1 and new[0].info.status == "FAILED"


def test_shape_mismatch_fails_before_ray_starts(home):
    import ray

    from flows.train import train_vae
    from vae_core.errors import TrainError
    from vae_core.requests import TrainRequest

    with pytest.raises(TrainError, match=r"28x28x1 images, which preset 'rgb64' cannot take"):
        train_vae(TrainRequest(dataset="mnist", preset="rgb64", epochs=1))
    # As a deployment passes it: the request as JSON, validated into a TrainRequest by Prefect.
    with pytest.raises(TrainError, match=r"28x28x1 images, which preset 'rgb64' cannot take"):
        train_vae(request={"dataset": "mnist", "preset": "rgb64", "epochs": 1, "overrides": {"train.lr": 0.01}})
    assert not ray.is_initialized()
    with pytest.raises(FileNotFoundError):
        train_vae(TrainRequest(dataset="no-such-dataset", epochs=1))



@pytest.fixture
def ray_cluster():
    """A real Ray head started with `ray start` on 127.0.0.1, stopped afterwards."""
    import socket
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_bin = str(Path(sys.executable).parent / "ray")
    # A loopback-only test head without token auth: the driver side then needs no token file either
    # (joining a token-protected cluster takes RAY_AUTH_MODE=token and its token, as Ray documents).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, capture_output=True,
                   timeout=120, env=env)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120, env=env)


@pytest.mark.timeout(400)
def test_vae_train_joins_an_existing_cluster_through_ray_address(home, ray_cluster):
    """`vae train` in its own process, as a user or a Prefect worker runs it, against a running cluster."""
    import json

    import ray
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    args = [sys.executable, "-m", "flows.cli", "train", "--dataset", "mnist", "--epochs", "1", "--max-failures", "0",
            "--json"] + [a for o in SMALL for a in ("--set", o)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=360)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert _epoch_steps(out["run_id"]) == [1] and out["model_name"] == "vae-mnist"
    ray.init(address=ray_cluster, log_to_driver=False)
    try:
        assert ray.cluster_resources().get("CPU") == 2.0  # the flow left the cluster running
    finally:
        ray.shutdown()


def test_splits_over_the_memory_budget_stream_through_ray_data(home):
    from flows.train import train_vae
    from vae_core.requests import TrainRequest

    # 2,160 training and 240 validation images of 784 bytes: 1.6 and 0.18 MiB, both over 0.1 MiB.
    out = train_vae(TrainRequest(dataset="mnist", overrides=SMALL + ["train.image_every=2"], epochs=2, workers=2,
                                 max_failures=0, memory_budget_mb=0.1))
    client = mlflow.MlflowClient()
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["data.train"] == "stream" and run.data.tags["data.val"] == "stream"
    assert _epoch_steps(out["run_id"]) == [1, 2]
    # Each of the two workers streamed an equal part of 1,080 rows: 16 full batches of 64 each, every epoch.
    images = [m.value for m in client.get_metric_history(out["run_id"], "epoch/images")]
    assert images == [2 * 16 * 64] * 2
    losses = [m.value for m in sorted(client.get_metric_history(out["run_id"], "epoch/loss"), key=lambda m: m.step)]
    assert losses[-1] < losses[0], losses
    assert client.get_metric_history(out["run_id"], "epoch/val_loss")
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "reconstructions")}
    assert "reconstructions/epoch_0002.png" in artifacts  # the preview came from the validation stream
    assert client.get_model_version_by_alias("vae-mnist", "challenger").run_id == out["run_id"]


def test_dataset_streamed_from_s3_and_checkpoints_written_to_s3(home, s3, monkeypatch):
    """moto's S3 server on 127.0.0.1 stands in for S3; the endpoint reaches every process via AWS_*."""
    import s3fs

    from flows.train import train_vae
    from vae_core.requests import TrainRequest
    from vae_core.ingest import run_ingest
    from vae_core.requests import IngestRequest

    fs, options = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["client_kwargs"]["endpoint_url"])
    monkeypatch.setenv("VAE_DATA_ROOT", "s3://vae-bucket/train-ds")
    monkeypatch.setenv("VAE_CHECKPOINT_ROOT", "s3://vae-bucket/ckpt")
    s3fs.S3FileSystem.clear_instance_cache()
    run_ingest(IngestRequest(source=str(MNIST_DIR), name="mnist-s3", limit=600, data_root="s3://vae-bucket/train-ds"))

    out = train_vae(TrainRequest(dataset="mnist-s3", overrides=SMALL, epochs=2, max_failures=0, memory_budget_mb=0.1))
    run = mlflow.MlflowClient().get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["data.train"] == "stream"
    assert _epoch_steps(out["run_id"]) == [1, 2]
    keys = fs.find(f"vae-bucket/ckpt/{out['run_id']}", refresh=True)
    assert sum(k.endswith("/model.safetensors") for k in keys) == 2, keys  # one per epoch, both kept
    # Registration read the final weights back from S3.
    mv = mlflow.MlflowClient().get_model_version_by_alias("vae-mnist-s3", "challenger")
    assert mv.run_id == out["run_id"]


def test_data_plan_and_cpu_reservation_leave_ray_data_a_whole_cpu(home):
    from flows.train import _scaling, plan_data
    from vae_core.errors import TrainError
    from vae_core.requests import TrainRequest
    from vae_core.shards import open_dataset

    info = open_dataset(str(home / "datasets"), "mnist")
    assert plan_data(info, 4096) == {"train": "memory", "val": "memory"}
    assert plan_data(info, 1) == {"train": "stream", "val": "memory"}
    two = {"CPU": 2.0}
    assert _scaling(TrainRequest(dataset="mnist", workers=2), two, streaming=False) == (0.9, 1)
    assert _scaling(TrainRequest(dataset="mnist", workers=2), two, streaming=True) == (0.5, 1)
    assert _scaling(TrainRequest(dataset="mnist", workers=1), two, streaming=True) == (1.0, 2)
    with pytest.raises(TrainError, match="less than one CPU .* for Ray Data"):
        _scaling(TrainRequest(dataset="mnist", workers=2, cpus_per_worker=0.9), two, streaming=True)
