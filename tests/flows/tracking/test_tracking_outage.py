"""A tracking server that goes away: training goes on, the metrics of the outage arrive once it is back, each
once, and what never arrives is named.

The outage is real: a local `mlflow server` (SQLite store in a temp folder) killed with SIGKILL while the
train-vae flow (Prefect, a local Ray) runs against it, and started again on the same port and store 20 s later.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from flows.tracking import outbox, runs as tracking
from tests.flows.tracking.test_tracking import _stop_group, _wait_healthy
from tests.ports import free_port
from tests.processes import eventually

OUTAGE_S = 20.0
LOG_EVERY = 2
EPOCHS = 8  # training goes on for seconds after the first epoch: the outage must see steps
SMALL = ["model.hidden_channels=[16,32]", "model.hidden_dim=64", "model.latent_dim=8", "train.batch_size=64",
         "train.kl_warmup_steps=50", f"train.log_every={LOG_EVERY}", "train.image_every=100"]


class Server:
    """`mlflow server` on `port` with its SQLite store and artifacts in `root`; killed and started at will."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            env.pop(key, None)
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
                 "--artifacts-destination", str(self.root / "artifacts")],
                cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # uvicorn runs as a child: the whole group goes on a kill
            )
        _wait_healthy(self.url, self.proc, self.root / "server.log")

    def kill(self) -> None:
        """SIGKILL, as a crashed host: no shutdown, open connections dropped."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _stop_group(self.proc)


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path, free_port())
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _first_epoch_logged(client: MlflowClient) -> str | None:
    """The run id once a run of experiment train-vae has an `epoch/loss` point."""
    try:
        exp = client.get_experiment_by_name("train-vae")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return next((r.info.run_id for r in runs if _steps(client, r.info.run_id, "epoch/loss")), None)
    except Exception:  # the server is still coming up
        return None


def _outage(server: Server, client: MlflowClient, times: dict[str, float]) -> None:
    """Once the run has its first epoch: SIGKILL the server, keep it down OUTAGE_S, start it again."""
    if not eventually(lambda: _first_epoch_logged(client), 240, every=0.3):
        raise AssertionError("no epoch was logged")
    server.kill()
    times["down"] = time.time()
    time.sleep(OUTAGE_S)
    server.start()
    times["up"] = time.time()


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.usefixtures("prefect_server")
def test_training_goes_on_through_a_tracking_outage_and_every_point_arrives_once(server, tmp_path, mnist_home,
                                                                                   monkeypatch):
    from flows.train import train_vae
    from vae_core.requests import TrainRequest

    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    times: dict[str, float] = {}
    errors: list[BaseException] = []
    with mnist_home(tmp_path / "home", limit=1200) as home:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        outage = threading.Thread(target=lambda: _catch(errors, _outage, server, client, times), daemon=True)
        outage.start()
        try:  # progress=True: the driver polls the run through the outage too
            with open(tmp_path / "stderr", "w+") as f, contextlib.redirect_stderr(f):
                train_vae(TrainRequest(dataset="mnist", overrides=SMALL, epochs=EPOCHS, max_failures=0), progress=True)
        finally:
            outage.join()
            mlflow.set_tracking_uri(None)  # the flow pointed mlflow's globals at this server: later tests follow the env
            mlflow.set_registry_uri(None)
        assert not errors, errors
        train_rows = _train_rows(home)
    printed = (tmp_path / "stderr").read_text()
    assert re.findall(r"^epoch (\d+)/", printed, re.M) == [str(e) for e in range(1, EPOCHS + 1)], printed

    exp = client.get_experiment_by_name("train-vae")
    (run,) = client.search_runs([exp.experiment_id])  # one run, whatever the outage did
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and tracking.UNDELIVERED_TAG not in run.data.tags
    per_epoch = math.ceil(train_rows / 64)
    # every LOG_EVERY steps, and each epoch's last step
    every_step = sorted({*range(LOG_EVERY, EPOCHS * per_epoch + 1, LOG_EVERY),
                         *(e * per_epoch for e in range(1, EPOCHS + 1))})
    train_keys = [k for k in run.data.metrics if k.startswith("train/") and k != "train/images_per_s"]
    assert "train/loss" in train_keys
    for key in train_keys:  # every logged step, once: no gap from the outage, no point sent twice
        assert _steps(client, run_id, key) == every_step, key
    for key in (k for k in run.data.metrics if k.startswith("epoch/")):
        assert _steps(client, run_id, key) == list(range(1, EPOCHS + 1)), key
    # Training went on while the server was away: points stamped during the outage, delivered after it.
    down, up = times["down"], times["up"]
    during = {m.step for m in client.get_metric_history(run_id, "train/loss") if down + 1 < m.timestamp / 1000 < up - 1}
    assert len(during) >= 2, f"no training while the server was away ({down=}, {up=})"
    (version,) = client.search_model_versions("name='vae-mnist'")
    assert version.run_id == run_id


def _catch(errors: list[BaseException], fn, *args) -> None:
    """`fn(*args)` in a thread, its error kept for the test to raise."""
    try:
        fn(*args)
    except BaseException as e:
        errors.append(e)


def _train_rows(home: Path) -> int:
    from vae_core.data.shards import open_dataset

    return open_dataset(str(home / "datasets"), "mnist").counts["train"]


def test_what_never_reaches_the_server_is_named(caplog, monkeypatch):
    """Nothing listens: writes return at once, and the end names each metric step and tag not delivered."""
    for key, value in outbox.CLIENT_DEFAULTS.items():  # what the outbox sets in its process, undone after
        monkeypatch.setenv(key, value)
    logger = tracking.RunLogger("0" * 32, uri=f"http://127.0.0.1:{free_port()}", buffered=True)
    started = time.monotonic()
    for step in (5, 10):
        logger.log_metrics({"train/loss": 1.0, "train/kl": 0.5}, step=step)
    logger.set_tags({"ray.nodes": "1"})
    assert time.monotonic() - started < 1  # queued, not sent
    missing = logger.close(timeout_s=1.0)
    assert missing == "train/loss steps 5, 10; train/kl steps 5, 10; tags ray.nodes"
    assert missing in caplog.text
    assert eventually(lambda: not [t for t in threading.enumerate() if t.name.startswith("mlflow-outbox-")], 10)
