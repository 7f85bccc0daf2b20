"""train-vae end to end: Prefect's engine, a local Ray with two CPU workers, a SQLite MLflow store."""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mlflow
import pytest

from vae_core.results import TrainResult

pytestmark = pytest.mark.usefixtures("prefect_server")

MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
SMALL = ["model.hidden_channels=[16,32]", "train.batch_size=64", "train.kl_warmup_steps=50", "train.log_every=5"]
TWO_WORKERS = {"dataset": "mnist", "overrides": SMALL, "epochs": 3, "workers": 2}  # run whole, and with a kill


@pytest.fixture(scope="module")
def home(tmp_path_factory, mnist_home, s3):
    """A VAE_HOME holding 2,400 real MNIST images (train + val carve, test), shared by this module, and one
    local Ray that every training joins instead of starting and stopping its own.

    Ray's processes keep the environment Ray started with, as a cluster node's do (infra/compose.yaml gives
    every node AWS_*): the S3 endpoint (moto's server) is set before Ray starts. Ray Train's controller polls
    its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and sees a report, a dead worker or
    the end of training only then: 0.2 s keeps it from idling between polls.
    """
    from flows.distributed.cluster import ray_session
    from flows.tracking import runs as tracking

    with mnist_home(tmp_path_factory.mktemp("train_home"), limit=2400) as root, pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", s3[1]["client_kwargs"]["endpoint_url"])
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        mp.delenv("RAY_ADDRESS", raising=False)
        tracking.configure()
        with ray_session():
            yield root


def _epoch_steps(run_id: str, key: str = "epoch/loss") -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def _runs() -> list:
    exp = mlflow.get_experiment_by_name("train-vae")
    return mlflow.search_runs([exp.experiment_id], output_format="list") if exp else []


def _train_with_progress(tmp: Path, **request) -> tuple[TrainResult, str]:
    """train_vae(progress=True); returns its output and what it printed to sys.stderr.

    A module-scoped fixture has no capsys, so sys.stderr goes to a file (a real one: Ray may want its fd).
    """
    from flows.train import train_vae
    from vae_core.requests import TrainRequest

    with open(tmp / "stderr", "w+") as f, contextlib.redirect_stderr(f):
        out = train_vae(TrainRequest(**request), progress=True)
    return out, (tmp / "stderr").read_text()


def _progress_epochs(printed: str) -> list[int]:
    return [int(m[1]) for m in re.finditer(r"^epoch (\d+)/3: loss [\d.]+, val loss [\d.]+, beta [\d.e-]+, "
                                           r"[\d,]+ images/s, (\d+ min )?\d+ s left$", printed, re.M)]


def _registered_file(out: dict) -> Path:
    folder = mlflow.artifacts.download_artifacts(f"models:/{out.model_name}/{out.model_version}")
    [weights] = Path(folder).rglob("*.safetensors")
    return weights


def _registered_weights(out: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(_registered_file(out))


@pytest.fixture(scope="module")
def uninterrupted(home, tmp_path_factory) -> tuple[dict, str, int]:
    """TWO_WORKERS trained without failure: (output, progress printed, runs before it). Run once: the
    killed-worker test compares its final weights with this run's."""
    before = len(_runs())
    return *_train_with_progress(tmp_path_factory.mktemp("whole"), **TWO_WORKERS, max_failures=0), before


def test_two_workers_train_track_register_and_pull(home, uninterrupted):
    out, printed, before = uninterrupted
    client = mlflow.MlflowClient()

    assert _progress_epochs(printed) == [1, 2, 3], printed  # one line per epoch, as it finished
    assert "worker failure" not in printed and "resumed" not in printed, printed
    assert len(_runs()) == before + 1  # exactly one run for the job
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden_channels"] == "[16, 32]" and run.data.params["train.epochs"] == "3"
    assert run.data.tags["dataset_version"] == out.dataset_version
    ranks = run.data.tags["ray.worker_nodes"].split(",")  # one local node holds both ranks
    assert len(ranks) == 2 and ranks[0] == ranks[1] and run.data.tags["ray.nodes"] == "1"
    # The ranks trained different halves of the data in step (DDP): after the last epoch each held bit-identical
    # weights, those registered. Without DDP each would have followed its own half and rank 0's would be kept.
    from vae_core.model.weights import load_model
    from vae_core.training.fit import weights_digest

    digests = run.data.tags["ray.rank_weights"].split(",")
    assert digests == [weights_digest(load_model(str(_registered_file(out))))[:16]] * 2, digests
    assert _epoch_steps(out.run_id) == [1, 2, 3]
    losses = [m.value for m in sorted(client.get_metric_history(out.run_id, "epoch/loss"), key=lambda m: m.step)]
    assert losses[-1] < losses[0], losses
    for key in ("epoch/val_loss", "epoch/images_per_s", "epoch/grad_norm", "train/loss", "train/beta", "train/lr",
                "train/images_per_s", "train/grad_norm", "train/kl", "train/recon"):
        assert client.get_metric_history(out.run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(out.run_id, "samples")}
    assert "samples/epoch_0003.png" in artifacts

    assert out.run_id in out.run_url
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect_client:
        arts = prefect_client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["train-vae-summary"])))
    assert any(out.run_id in a.data and f"version {out.model_version}" in a.data for a in arts)

    mv = client.get_model_version_by_alias("vae-mnist", "challenger")
    assert int(mv.version) == out.model_version and mv.run_id == out.run_id

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
    # The mnist preset's latent vector: latent_dim 32 and its 16-dim top layer, [z1 | z2].
    assert shapes == {"mean": [5, 32 + 16], "logvar": [5, 32 + 16], "sample": [2, 1, 28, 28]}


def _train_worker_pids(home: Path) -> list[int]:
    """This test's Ray Train workers: Ray names its actor processes after their class
    (`ray::RayTrainWorker...`), and ours have this module's VAE_HOME (other jobs may train beside it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f, open(f"/proc/{entry}/environ", "rb") as e:
                    if f.read().startswith(b"ray::RayTrainWorker") and f"VAE_HOME={home}".encode() in \
                            e.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                continue
    return sorted(pids)


def _kill_a_worker_after_a_checkpoint(home: Path, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL one of this test's Ray Train workers once Ray's controller has registered a checkpoint.

    Registered means named in the controller's snapshot in the run's checkpoint folder (Ray 2.60's
    checkpoint_manager_snapshot.json: if that changes, nothing is killed and the test says so). A report
    is only collected at the controller's next poll (see `home`): a worker killed before that, even after
    its epoch reached MLflow, takes the checkpoint with it, and the new group starts from scratch.
    """
    import json
    import signal

    while not stop.is_set():
        runs = [r for r in _runs() if r.info.status == "RUNNING"]
        snapshot = home / "checkpoints" / runs[0].info.run_id / "checkpoint_manager_snapshot.json" if runs else None
        try:
            registered = snapshot and json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):  # not written yet, or being written
            registered = None
        if registered and (pids := _train_worker_pids(home)):
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])
            return
        time.sleep(0.2)


def test_killed_worker_is_replaced_and_every_epoch_logged_once(home, uninterrupted, tmp_path):
    import torch

    before = len(_runs())
    killed: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_kill_a_worker_after_a_checkpoint, args=(home, killed, stop), daemon=True)
    watcher.start()
    try:
        out, printed = _train_with_progress(tmp_path, **TWO_WORKERS, max_failures=2)
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert killed, "no worker was killed: the test did not exercise recovery"
    client = mlflow.MlflowClient()
    assert len(_runs()) == before + 1
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["failure/1"].startswith("rank "), run.data.tags  # recorded by Ray's controller
    assert _epoch_steps(out.run_id) == [1, 2, 3]
    steps = _epoch_steps(out.run_id, "train/loss")
    assert len(steps) == len(set(steps)), "a step was logged twice"
    # The new workers went on from a checkpoint rather than from scratch (which, training being
    # deterministic, would end with the same weights too)...
    resumed = [m.value for m in client.get_metric_history(out.run_id, "resumed_from_epoch")]
    assert resumed and all(1 <= e < 3 for e in resumed), resumed
    assert _progress_epochs(printed) == [1, 2, 3], printed
    assert "worker failure: rank " in printed and f"resumed from the checkpoint of epoch {resumed[0]:.0f}" in printed
    # ...and ended with the weights of the uninterrupted run, bit for bit: weights, optimizer, schedule and
    # counters came back intact, the re-run epoch drew the same noise (seeded by seed, epoch and rank) and
    # order (seed + epoch), and gloo sums two ranks' gradients in an order-free way (a + b == b + a).
    whole, resumed_weights = _registered_weights(uninterrupted[0]), _registered_weights(out)
    assert whole.keys() == resumed_weights.keys()
    differ = {k: (whole[k] - resumed_weights[k]).abs().max().item() for k in whole
              if not torch.equal(whole[k], resumed_weights[k])}
    assert not differ, differ


def test_nan_loss_fails_the_run_with_a_clear_error(home):
    from flows.train import train_vae
    from vae_core.errors import NonFiniteLossError, TrainError
    from vae_core.requests import TrainRequest

    before = {r.info.run_id for r in _runs()}
    with pytest.raises(TrainError, match="non-finite loss") as raised:
        train_vae(TrainRequest(dataset="mnist", overrides=SMALL + ["train.lr=1e4"], epochs=2, workers=1,
                               max_failures=0))
    # The worker's own exception crossed Ray's boundary typed, naming the step where the loss went bad.
    assert type(raised.value) is NonFiniteLossError and "at step" in str(raised.value)
    new = [r for r in _runs() if r.info.run_id not in before]
    assert len(new) == 1 and new[0].info.status == "FAILED"


def test_a_perceptual_vae_gan_logs_every_term_and_a_time_budget_ends_both_ranks_at_one_epoch(home):
    """One two-rank run on Ray Train checks two things.

    Both extra terms at once: the perceptual loss's classifier is resolved (trained and cached) before the
    run and named in its parameters; the discriminator's terms are logged from its start.

    train.time_budget_minutes: after the first epoch the budget is spent, so the run ends there with a
    final picture and a registered model, epochs being only an upper bound. Both ranks plan the end from
    the same all-reduced time, checked with ranks whose clocks differ in
    tests/vae_core/training/test_ddp.py::test_ranks_with_different_clocks_plan_the_same_last_epoch (here every rank
    would stop after one epoch whatever it planned from)."""
    from flows.train import train_vae
    from vae_core.model.feature_net import feature_net_url
    from vae_core.requests import TrainRequest

    gan = ["objective.adversarial.weight=0.5", "objective.adversarial.feature_weight=1",
           "objective.adversarial.start_step=6", "objective.adversarial.channels=[8,16]"]
    out = train_vae(TrainRequest(dataset="mnist", objective="perceptual", workers=2, max_failures=0, epochs=5,
                                 overrides=SMALL + gan + ["train.time_budget_minutes=0.001"]))
    client = mlflow.MlflowClient()
    run = client.get_run(out.run_id)
    assert run.data.params["train.time_budget_minutes"] == "0.001"
    assert _epoch_steps(out.run_id) == [1]
    assert [m.value for m in client.get_metric_history(out.run_id, "epoch/planned_epochs")] == [1]
    [elapsed] = client.get_metric_history(out.run_id, "epoch/elapsed_s")
    assert elapsed.value > 0.06  # the budget, in seconds, was spent
    assert "samples/epoch_0001.png" in {a.path for a in client.list_artifacts(out.run_id, "samples")}
    assert client.get_model_version_by_alias("vae-mnist", "challenger").run_id == out.run_id
    classifier = run.data.params["objective.perceptual.weights"]
    assert classifier == feature_net_url("mnist", out.dataset_version) and run.data.params["name"] == "mnist+perceptual"
    for term in ("recon", "kl", "perceptual", "feature", "adversarial", "adaptive_weight", "disc_loss"):
        assert math.isfinite(run.data.metrics[f"epoch/{term}"]), term
    steps = sorted(m.step for m in client.get_metric_history(out.run_id, "train/disc_loss"))
    assert steps and steps[0] >= 6  # the discriminator starts at its start step
    assert len(client.get_metric_history(out.run_id, "train/perceptual")) > len(steps)


def test_shape_mismatch_fails_before_ray_starts(home, monkeypatch):
    from flows.train import train_vae
    from vae_core.errors import TrainError
    from vae_core.requests import TrainRequest

    started: list[bool] = []

    def no_ray():  # stands in for the flow's one way into Ray
        started.append(True)
        raise RuntimeError("Ray was started")

    monkeypatch.setattr("flows.train.ray_session", no_ray)
    with pytest.raises(TrainError, match=r"28x28x1 images, which preset 'rgb64' cannot take"):
        train_vae(TrainRequest(dataset="mnist", preset="rgb64", epochs=1))
    # As a deployment passes it: the request as JSON, validated into a TrainRequest by Prefect.
    with pytest.raises(TrainError, match=r"28x28x1 images, which preset 'rgb64' cannot take"):
        train_vae(request={"dataset": "mnist", "preset": "rgb64", "epochs": 1, "overrides": {"train.lr": 0.01}})
    assert not started
    with pytest.raises(FileNotFoundError):
        train_vae(TrainRequest(dataset="no-such-dataset", epochs=1))


def test_splits_over_the_memory_budget_stream_from_s3_and_checkpoints_go_to_s3(home, s3, monkeypatch):
    """One streamed two-rank run checks two things: splits over the memory budget stream through Ray Data, an
    equal half to each rank; the dataset is read from S3 and the checkpoints are written there. moto's S3
    server on 127.0.0.1 stands in for S3; the endpoint reaches every process via AWS_* (`home`)."""
    import s3fs

    from flows.train import train_vae
    from vae_core.data.shards import open_dataset
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest, TrainRequest

    fs, _ = s3
    monkeypatch.setenv("VAE_DATA_ROOT", "s3://vae-bucket/train-ds")
    monkeypatch.setenv("VAE_CHECKPOINT_ROOT", "s3://vae-bucket/ckpt")
    s3fs.S3FileSystem.clear_instance_cache()
    run_ingest(IngestRequest(source=str(MNIST_DIR), name="mnist-s3", limit=2400, data_root="s3://vae-bucket/train-ds"))

    # ~1,900 training and ~190 validation images of 784 bytes: ~1.4 and ~0.14 MiB, both over 0.1 MiB.
    out = train_vae(TrainRequest(dataset="mnist-s3", overrides=SMALL + ["train.image_every=2"], epochs=2, workers=2,
                                 max_failures=0, memory_budget_mb=0.1))
    client = mlflow.MlflowClient()
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["data.train"] == "stream" and run.data.tags["data.val"] == "stream"
    assert _epoch_steps(out.run_id) == [1, 2]
    # Each of the two workers streamed an equal half of the rows, in full batches of 64, every epoch.
    rows = open_dataset("s3://vae-bucket/train-ds", "mnist-s3").counts["train"]
    images = [m.value for m in client.get_metric_history(out.run_id, "epoch/images")]
    assert images == [2 * (rows // 2 // 64) * 64] * 2
    losses = [m.value for m in sorted(client.get_metric_history(out.run_id, "epoch/loss"), key=lambda m: m.step)]
    assert losses[-1] < losses[0], losses
    assert client.get_metric_history(out.run_id, "epoch/val_loss")
    artifacts = {a.path for a in client.list_artifacts(out.run_id, "reconstructions")}
    assert "reconstructions/epoch_0002.png" in artifacts  # the preview came from the validation stream
    keys = fs.find(f"vae-bucket/ckpt/{out.run_id}", refresh=True)
    assert sum(k.endswith("/model.safetensors") for k in keys) == 2, keys  # one per epoch, both kept
    # Registration read the final weights back from S3.
    assert client.get_model_version_by_alias("vae-mnist-s3", "challenger").run_id == out.run_id


def test_data_plan_and_cpu_reservation_leave_ray_data_a_whole_cpu(home):
    from flows.train import _scaling, plan_data
    from vae_core.data.shards import open_dataset
    from vae_core.errors import TrainError
    from vae_core.requests import TrainRequest

    info = open_dataset(str(home / "datasets"), "mnist")
    assert plan_data(info, 4096) == {"train": "memory", "val": "memory"}
    assert plan_data(info, 1) == {"train": "stream", "val": "memory"}
    two = {"CPU": 2.0}
    assert _scaling(TrainRequest(dataset="mnist", workers=2), two, streaming=False) == (0.9, 1)
    assert _scaling(TrainRequest(dataset="mnist", workers=2), two, streaming=True) == (0.5, 1)
    assert _scaling(TrainRequest(dataset="mnist", workers=1), two, streaming=True) == (1.0, 2)
    with pytest.raises(TrainError, match="less than one CPU .* for Ray Data"):
        _scaling(TrainRequest(dataset="mnist", workers=2, cpus_per_worker=0.9), two, streaming=True)
