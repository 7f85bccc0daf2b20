"""MLflow layer against real stores: a SQLite file per module and a local `mlflow server`.

Registry pulls are checked from fresh interpreters that get only the tracking URI, as a job that
consumes `models:/vae-<dataset>@challenger` would.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flows.tracking import registry, runs as tracking
from flows.tracking.pyfunc import VAEPyfunc, as_images
from tests.ports import free_port
from vae_core.model.config import load_config
from vae_core.model.vae import ConvVAE

CONFIG = load_config("digits")  # 8x8x1 images, latent_dim 8: small enough for quick registry tests


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite MLflow store under a temporary VAE_HOME, shared by this module's tests."""
    home = tmp_path_factory.mktemp("vae_home")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAE_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield home


@pytest.fixture(scope="module")
def model() -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(CONFIG.model).eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(7, 8, 8, 1), dtype=np.uint8)


def _client():
    import mlflow

    return mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())


def _start(experiment: str, version: str = "v123") -> str:
    return tracking.start_training_run(
        experiment, "run-1", CONFIG, "digits", version, "/data/digits/v123", extra_tags={"trigger": "test"}
    )


@torch.no_grad()
def _encode_reference(model: ConvVAE, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return model.encode(model.likelihood.to_input(x)).mean.numpy()


# --- runs ---------------------------------------------------------------------------------------


def test_start_training_run_records_config_tags_and_dataset(store):
    import mlflow

    run_id = _start("exp-start")
    client = _client()
    exp_id = tracking.ensure_experiment("exp-start")
    assert tracking.ensure_experiment("exp-start") == exp_id  # idempotent
    runs = client.search_runs([exp_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "RUNNING" and run.info.run_name == "run-1"
    assert mlflow.active_run() is None

    assert run.data.params["train.lr"] == "0.002"
    assert run.data.params["model.hidden_channels"] == "[32, 64]"
    assert set(run.data.params) == set(CONFIG.flat())
    tags = run.data.tags
    assert tags["dataset_version"] == "v123" and tags["dataset_name"] == "digits"
    assert tags["config_hash"] == CONFIG.digest() and tags["trigger"] == "test"
    assert len(tags["git_commit"]) == 40 or tags["git_commit"] == "unknown"

    (ds_input,) = run.inputs.dataset_inputs
    assert ds_input.dataset.digest == "v123" and ds_input.dataset.name == "digits"
    assert "/data/digits/v123" in ds_input.dataset.source

    config_json = client.download_artifacts(run_id, "config.json", str(store / "dl"))
    assert json.loads(Path(config_json).read_text()) == CONFIG.model_dump(mode="json")
    # Artifacts of a local store live under VAE_HOME, not ./mlruns in the working directory.
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())


def test_run_logger_metrics_images_tags_and_status(store):
    run_id = _start("exp-logger")
    # A fresh, unpickled logger stands in for one built in a Ray worker.
    logger = pickle.loads(pickle.dumps(tracking.RunLogger(run_id)))
    assert logger.last_step("train/loss") == -1
    logger.log_metrics({"train/loss": 3.0, "train/kl": 1.5}, step=0)
    logger.log_metrics({"train/loss": 2.0, "train/kl": 1.0}, step=10)
    assert logger.last_step("train/loss") == 10
    logger.log_image(Image.new("L", (16, 16), color=128), "samples/epoch_001.png")
    logger.set_tags({"epochs_done": "2"})
    with pytest.raises(ValueError, match="status"):
        logger.finish("DONE")  # type: ignore[arg-type]
    logger.finish("FAILED")

    client = _client()
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/kl")] == [(0, 1.5), (10, 1.0)]
    assert run.data.tags["epochs_done"] == "2"
    assert [f.path for f in client.list_artifacts(run_id, "samples")] == ["samples/epoch_001.png"]


def test_system_metrics_are_logged_and_stop_cleanly(store):
    run_id = _start("exp-system")
    handle = tracking.start_system_metrics(run_id, sampling_interval=0.2)
    assert handle is not None
    time.sleep(0.7)
    tracking.stop_system_metrics(handle)
    tracking.stop_system_metrics(None)
    keys = set(_client().get_run(run_id).data.metrics)
    assert any(k.startswith("system/cpu") for k in keys), keys


def test_system_metrics_unavailable_is_a_warning_not_an_error(monkeypatch, caplog):
    # A None entry in sys.modules makes the import fail, as it does where psutil is missing.
    monkeypatch.setitem(sys.modules, "mlflow.system_metrics.system_metrics_monitor", None)
    assert tracking.start_system_metrics("no-such-run") is None
    assert "system metrics disabled" in caplog.text


# --- registered model ---------------------------------------------------------------------------


def test_register_creates_versions_and_moves_challenger(store, model):
    from vae_core.evaluation.gate import decide

    run_id = _start("exp-register")
    name = "vae-register-test"
    path_before = list(sys.path)
    assert registry.log_and_register_model(run_id, model, name, "v123") == 1
    assert sys.path == path_before  # the input example is not checked by loading the model in this process
    client = _client()
    described = client.get_registered_model(name).description
    assert "trained on the `digits` dataset" in described and f"models:/{name}@champion" in described
    client.update_registered_model(name, description="ours")  # a description someone wrote is kept
    assert registry.log_and_register_model(run_id, model, name, "v123") == 2
    assert client.get_registered_model(name).description == "ours"
    newest = client.get_model_version_by_alias(name, "challenger")
    assert int(newest.version) == 2  # an int from SQLite, a str over REST
    assert newest.tags["dataset_version"] == "v123" and newest.tags["run_id"] == run_id
    assert newest.run_id == run_id
    # Registering must not end the run: training may still be going on.
    assert client.get_run(run_id).info.status == "RUNNING"
    _check_listed_once(client, name, newest)
    assert registry.pin_model(f"models:/{name}@challenger").model_id == newest.source.removeprefix("models:/")

    about = newest.description
    assert f"`digits@v123` with the `{CONFIG.name}` config in MLflow run `{run_id}`" in about
    assert "uint8 images (N, 8, 8, 1) to latents of 8 dimensions" in about and about.endswith("not evaluated yet.")
    # Each gate decision replaces the one before; what registration wrote stays.
    registry.describe_gate(name, 2, decide("test/nll_k100", 90.0, 2, 80.0, 1))
    registry.describe_gate(name, 2, decide("test/nll_k100", 70.0, 2, 80.0, 1))
    gated = client.get_model_version(name, "2").description
    assert gated.startswith(about.split("Champion gate:")[0]) and gated.count("Champion gate:") == 1
    assert gated.endswith("Champion gate: promoted: test/nll_k100 70.0000 is 10.0000 lower (better) than the "
                          "champion's 80.0000 (version 1); margin 0.")


def _check_listed_once(client, name: str, version) -> None:
    """The version's logged model lists it once in its `mlflow.modelVersions` tag."""
    logged = client.get_logged_model(version.source.removeprefix("models:/"))  # a local store leaves model_id None
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": name, "version": int(version.version)}]


def test_a_version_beyond_what_a_registry_holds_is_one_clear_error(store, model):
    """The registry's store answers such a version with an internal error (SQLite: "Python int too large"),
    and a server with a 500 that reads as "try again": it is refused before the registry is asked."""
    from pydantic import ValidationError

    from vae_core.requests import EncodeRequest

    registry.log_and_register_model(_start("exp-huge"), model, "vae-huge", "v123")
    for version in ("99999999999999999999", str(2**63), str(2**31)):
        uri = f"models:/vae-huge/{version}"
        with pytest.raises(ValueError, match=f"model version {version} in '{uri}' is beyond any registry's "
                           r"versions \(at most 2147483647\)"):
            registry.pin_model(uri)
        with pytest.raises(ValidationError, match=f"model version {version} in"):
            EncodeRequest(model=uri, dataset="digits")
    assert registry.pin_model(f"models:/vae-huge/{1}").version == 1


def test_pyfunc_predict_accepts_dataset_shapes_and_rejects_others(model, images):
    wrapped = VAEPyfunc()
    wrapped.model = model
    expected = _encode_reference(model, images)
    out = wrapped.predict(None, images, params={"batch_size": 3})
    assert set(out) == {"mean", "logvar"}
    assert out["mean"].dtype == np.float32 and out["mean"].shape == (7, 8)
    np.testing.assert_allclose(out["mean"], expected, rtol=1e-5, atol=1e-6)
    # (N, H, W) for one channel, flattened rows, and a DataFrame of per-image lists give the same.
    import pandas as pd

    for alt in (images[..., 0], images.reshape(7, -1), pd.DataFrame({"x": list(images.reshape(7, -1))})):
        np.testing.assert_allclose(wrapped.predict(None, alt)["mean"], out["mean"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected uint8 images of shape \(N, 8, 8, 1\).*got \(2, 7, 8, 1\)"):
        wrapped.predict(None, np.zeros((2, 7, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        wrapped.predict(None, np.zeros((2, 8, 8, 1), np.float32))
    assert as_images(np.zeros((0, 8, 8, 1), np.uint8), (8, 8, 1)).shape == (0, 8, 8, 1)


_PULL = textwrap.dedent(
    """
    import json, sys
    import mlflow, numpy as np, pandas as pd, torch

    loaded = mlflow.pyfunc.load_model(sys.argv[1])
    images = np.array(json.loads(sys.argv[2]), dtype=np.uint8)
    out = loaded.predict(images)
    # A one-column DataFrame of flattened pixel lists is reshaped by MLflow's schema enforcement.
    from_frame = loaded.predict(pd.DataFrame({"pixels": [im.ravel().tolist() for im in images]}))
    assert np.allclose(from_frame["mean"], out["mean"], atol=1e-6)
    example = loaded.input_example  # logged with the model, with its serving form beside it
    serving = loaded.metadata.saved_input_example_info["serving_input_path"]
    vae = loaded.unwrap_python_model().model
    decoded = vae.decode(torch.from_numpy(out["mean"]))
    samples = vae.sample(3)
    try:
        loaded.predict(images[:, :7])
        error = ""
    except Exception as exc:
        error = str(exc)
    print(json.dumps({
        "mean": out["mean"].tolist(), "logvar_shape": list(out["logvar"].shape),
        "types": [type(out).__name__, str(out["mean"].dtype)],
        "decoded": list(decoded.shape), "samples": list(samples.shape), "error": error[-200:],
        "flows_imported": "flows" in sys.modules,
        "example": [list(example.shape), str(example.dtype), list(loaded.predict(example)["mean"].shape), serving],
    }))
    """
)


def _pull_in_fresh_process(uri: str, model_uri: str, images: np.ndarray, cwd: Path) -> dict:
    """Load and use a registered model in a new interpreter whose only MLflow setting is the URI."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(cwd)),
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _PULL, model_uri, json.dumps(images.tolist())],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_pulled(result: dict, model: ConvVAE, images: np.ndarray) -> None:
    np.testing.assert_allclose(np.array(result["mean"]), _encode_reference(model, images), rtol=1e-5, atol=1e-6)
    assert result["types"] == ["dict", "float32"] and result["logvar_shape"] == [len(images), 8]
    assert result["decoded"] == [len(images), 1, 8, 8] and result["samples"] == [3, 1, 8, 8]
    assert "does not match expected shape (-1, 8, 8, 1)" in result["error"]
    assert not result["flows_imported"]  # the model needs vae_core and mlflow, not the flows package
    assert result["example"] == [[1, 8, 8, 1], "uint8", [1, 8], "serving_input_example.json"]


def test_registered_model_loads_in_a_fresh_process(store, model, images, tmp_path):
    run_id = _start("exp-pull")
    name = "vae-pull-test"
    registry.log_and_register_model(run_id, model, name, "v123")
    result = _pull_in_fresh_process(tracking.tracking_uri(), registry.model_uri(name, "challenger"), images, tmp_path)
    _check_pulled(result, model, images)


# --- against a real tracking server -------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free local port with SQLite and proxied artifacts in a temp folder."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # the server runs uvicorn as a child: stop the whole group
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, root / "server.log")
        yield url
    finally:
        _stop_group(proc)
        log.close()


def _wait_healthy(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.slow
def test_tracking_server_end_to_end(mlflow_server, model, images, tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
    assert tracking.configure() == mlflow_server

    run_id = _start("exp-server", version="srv1")
    logger = tracking.RunLogger(run_id)
    logger.log_metrics({"val/loss": 1.25}, step=4)
    assert logger.last_step("val/loss") == 4
    name = registry.default_model_name("digits-server")
    assert registry.log_and_register_model(run_id, model, name, "srv1") == 1
    assert registry.log_and_register_model(run_id, model, name, "srv1") == 2
    logger.finish("FINISHED")

    client = _client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.inputs.dataset_inputs[0].dataset.digest == "srv1"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    assert int(client.get_model_version_by_alias(name, "challenger").version) == 2
    _check_listed_once(client, name, client.get_model_version(name, "2"))  # the server lists it too
    assert not (tmp_path / "home" / "mlflow.db").exists()  # nothing written to the local default

    result = _pull_in_fresh_process(mlflow_server, registry.model_uri(name, "challenger"), images, tmp_path)
    _check_pulled(result, model, images)
