"""MLflow tracking for the platform: the store, experiments, runs, metrics, datasets, system metrics.

This is the tracking side; the registered model (logging, registering, naming it) is in
`flows.tracking.registry`. With those two and `flows.tracking.pyfunc`, the only modules that import mlflow.
Everything goes through an explicit `MlflowClient` and a run id, never mlflow's global "active
run", so the same calls work from the driver, a Ray worker (given MLFLOW_TRACKING_URI or VAE_HOME
in its environment) or a thread.

Where things live: `$MLFLOW_TRACKING_URI` when set (a server: http://host:5000), otherwise a SQLite
store at `<VAE_HOME>/mlflow.db` with artifacts under `<VAE_HOME>/mlartifacts/<experiment>`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Dataset as DatasetEntity, DatasetInput, InputTag, LoggedModelInput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from flows.tracking.outbox import Outbox, Write, describe, first_line, flush_timeout_s
from vae_core.settings import vae_home

if TYPE_CHECKING:
    from PIL import Image

    from vae_core.model.config import VAEConfig

log = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
UNDELIVERED_TAG = "tracking.undelivered"  # what a run's writers could not deliver to the server before its end


# --- where the store is -------------------------------------------------------------------------


def tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI` if set, else `sqlite:////<abs VAE_HOME>/mlflow.db` (folder created).

    Raises:
        ValueError: VAE_HOME is a remote URL (SQLite needs a local folder) and no tracking URI is set.
    """
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    home = _local_home()
    home.mkdir(parents=True, exist_ok=True)
    # Four slashes: "sqlite:///" + an absolute path; three plus a relative path would follow the cwd.
    return f"sqlite:///{home / 'mlflow.db'}"


def configure() -> str:
    """Point this process's mlflow tracking and registry at `tracking_uri()` and return it.

    The URI environment variables are left as they were (mlflow's setters would export them), so a
    later change of VAE_HOME is still followed; give other processes MLFLOW_TRACKING_URI or
    VAE_HOME explicitly. Telemetry and artifact progress bars are off unless the environment says
    otherwise.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri()
    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return uri


def _local_home() -> Path:
    home = vae_home()
    parsed = urlparse(home)
    if parsed.scheme == "file":
        return Path(parsed.path).resolve()
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise ValueError(
            f"VAE_HOME={home!r} is not a local folder, so it cannot hold MLflow's SQLite store; "
            "set MLFLOW_TRACKING_URI to a tracking server (http://host:5000) or a database URL"
        )
    return Path(home).resolve()


def _is_server(uri: str) -> bool:
    """True for tracking servers, which choose (and may proxy) artifact locations themselves."""
    return urlparse(uri).scheme in {"http", "https", "databricks", "databricks-uc"}


def client() -> MlflowClient:
    """An MlflowClient for the store `configure()` points at (tracking and registry alike)."""
    uri = configure()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# --- experiments and runs -----------------------------------------------------------------------


def ensure_experiment(name: str) -> str:
    """Id of experiment `name`, created if missing; a local store keeps its artifacts under VAE_HOME."""
    mlflow_client = client()
    if (found := mlflow_client.get_experiment_by_name(name)) is not None:
        if found.lifecycle_stage == "deleted":
            # A deleted experiment still owns its name; bring it back rather than fail on create.
            mlflow_client.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = None if _is_server(mlflow_client.tracking_uri) else _artifact_location(name)
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except MlflowException as exc:
        # Another process created it between our lookup and create: use theirs.
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return mlflow_client.get_experiment_by_name(name).experiment_id


def _artifact_location(experiment: str) -> str:
    """`<VAE_HOME>/mlartifacts/<safe name>` as a URI (file:// for a local folder)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    try:
        path = _local_home() / "mlartifacts" / safe
    except ValueError:  # VAE_HOME is a remote URL: artifacts go there, beside the datasets
        return f"{vae_home().rstrip('/')}/mlartifacts/{safe}"
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def start_training_run(
    experiment: str,
    run_name: str,
    config: VAEConfig,
    dataset_name: str,
    dataset_version: str,
    dataset_path: str,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Create a RUNNING run with the config as params and `config.json`, and the dataset as its input.

    Tags: git_commit, dataset_name, dataset_version, config_hash (= config.digest()), plus
    `extra_tags`. The dataset input's name is `dataset_name` and its digest `dataset_version`.
    No global active run is left behind. Returns the run id.
    """
    mlflow_client = client()
    run_id = start_run(experiment, run_name, {
        "dataset_name": dataset_name,
        "dataset_version": dataset_version,
        "config_hash": config.digest(),
        **(extra_tags or {}),
    })
    params = [Param(k, _param_value(v)) for k, v in config.flat().items()]
    for start in range(0, len(params), 100):  # log_batch takes at most 100 params per call
        mlflow_client.log_batch(run_id, params=params[start : start + 100])
    mlflow_client.log_dict(run_id, config.model_dump(mode="json"), "config.json")
    mlflow_client.log_inputs(run_id, datasets=[_dataset_input(dataset_name, dataset_version, dataset_path)])
    return run_id


def start_run(experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """Create a RUNNING run in `experiment` (created if missing) with `tags` plus git_commit; no global
    active run is left behind. Returns the run id."""
    run = client().create_run(ensure_experiment(experiment), tags={"git_commit": git_commit(), **tags},
                              run_name=run_name)
    return run.info.run_id


def log_model_input(run_id: str, model_id: str) -> None:
    """Record the logged model `model_id` as an input of run `run_id` (a run that used the model)."""
    client().log_inputs(run_id, models=[LoggedModelInput(model_id)])


def _param_value(value: Any) -> str:
    # JSON for lists ("[32, 64]" either way) and booleans ("true"), so params read back as YAML overrides.
    return value if isinstance(value, str) else json.dumps(value)


def _dataset_input(name: str, version: str, path: str) -> DatasetInput:
    """A metadata-only dataset input: the shards stay where they are, the digest is the version."""
    try:
        with warnings.catch_warnings():
            # A plain path matches both the "" and "file" local sources, which are the same class.
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(path)
    except MlflowException:
        # No MLflow source type for this scheme (e.g. memory://): record the URL as given.
        source = HTTPDatasetSource(url=path)
    dataset = MetaDataset(source=source, name=name, digest=version)
    return DatasetInput(
        dataset=DatasetEntity(**dataset.to_dict()),
        tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value="train")],
    )


def git_commit() -> str:
    """HEAD of the repository this code runs from, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


# --- logging into a run from anywhere -----------------------------------------------------------


class RunLogger:
    """Logs into an existing run by id; safe to build in another process (e.g. a Ray worker).

    Only the run id, tracking URI and mode are kept; the client is made on first use, so the object
    pickles cleanly to another process. `buffered=True` queues the writes (metrics, tags, images) for a
    sender thread (`flows.tracking.outbox`): the caller never waits on the server, a tracking outage delays
    the writes instead of failing them, and `flush` waits for them at the end. It also turns MLflow's
    client retries down in this process (`outbox.fail_fast`): use it where the outbox does the retrying.
    """

    def __init__(self, run_id: str, uri: str | None = None, buffered: bool = False) -> None:
        self.run_id = run_id
        self.uri = uri or tracking_uri()
        self.buffered = buffered
        self._client_obj: MlflowClient | None = None
        self._outbox: Outbox | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "uri": self.uri, "buffered": self.buffered, "_client_obj": None,
                "_outbox": None}

    @property
    def client(self) -> MlflowClient:
        """The MlflowClient for this run's store, made on first use."""
        if self._client_obj is None:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            self._client_obj = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client_obj

    def _write(self, what: str, send: Callable[[], None], points: tuple[tuple[str, int], ...] = ()) -> None:
        """Make a write now, or queue it when buffered."""
        if not self.buffered:
            send()
            return
        if self._outbox is None:
            self._outbox = Outbox(f"mlflow-outbox-{self.run_id[:8]}")
        self._outbox.put(Write(what, send, points))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log all `metrics` at `step` in one request (same timestamp)."""
        if not metrics:
            return
        ts = int(time.time() * 1000)  # fixed now: a batch sent again is the same points, which MLflow keeps once
        batch = [Metric(key, float(value), ts, int(step)) for key, value in metrics.items()]

        def send() -> None:
            for start in range(0, len(batch), 1000):  # log_batch's per-call limit
                self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

        self._write(f"metrics at step {step}", send, tuple((m.key, m.step) for m in batch))

    def log_image(self, img: Image.Image, artifact_file: str) -> None:
        """Save a PIL image as an artifact at `artifact_file` (e.g. "samples/epoch_003.png")."""
        self._write(f"artifact {artifact_file}",
                    lambda: self.client.log_image(self.run_id, img, artifact_file=artifact_file))

    def last_step(self, key: str) -> int:
        """Largest step logged for metric `key`, -1 if none: resume logging after it, not over it."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=-1)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags in one request."""
        if tags:
            batch = [RunTag(k, str(v)) for k, v in tags.items()]
            self._write(f"tags {', '.join(tags)}", lambda: self.client.log_batch(self.run_id, tags=batch))

    def flush(self, timeout_s: float | None = None) -> str:
        """Wait for the queued writes, at most `timeout_s` (default `$VAE_TRACKING_FLUSH_S`, 300 s); returns
        what is still undelivered (`outbox.describe`, "" when nothing), after a warning naming it."""
        if self._outbox is None:
            return ""
        timeout_s = flush_timeout_s() if timeout_s is None else timeout_s
        missing = describe(self._outbox.flush(timeout_s))
        if missing:
            log.warning("run %s: not delivered to %s within %.0f s: %s", self.run_id, self.uri, timeout_s, missing)
        return missing

    def close(self, timeout_s: float | None = None) -> str:
        """`flush`, stop the sender, then name what is still undelivered in the run's tag `tracking.undelivered`,
        where the server takes that (it may still be away: the warning `flush` logged names it then); returns
        it. A later write starts a new sender."""
        missing = self.flush(timeout_s)
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None
        if missing:
            try:
                self.client.set_tag(self.run_id, UNDELIVERED_TAG, missing[:5000])
            except Exception as e:
                log.warning("run %s: could not record what is missing either: %s", self.run_id, first_line(e))
        return missing

    def finish(self, status: RunStatus = "FINISHED") -> None:
        """`close`, then mark the run terminated with `status` and stamp its end time (MLflow's client retries
        an unreachable server for about four minutes first: `MLFLOW_HTTP_REQUEST_MAX_RETRIES`)."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        self.close()
        self.client.set_terminated(self.run_id, status=status)


# --- system metrics (CPU, memory, disk, network, GPU when present) ------------------------------


def start_system_metrics(run_id: str, sampling_interval: float = 10.0, node_id: str | None = None) -> Any | None:
    """Start a background thread logging `system/...` metrics into the run; None if unavailable.

    Steps continue from the run's last system metric, so a restarted worker appends rather than
    overwrites. Stop it with `stop_system_metrics(handle)`.
    """
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=sampling_interval,
            resume_logging=True,
            node_id=node_id,
            tracking_uri=tracking_uri(),
        )
    except Exception as exc:  # psutil missing, or a monitor failing to initialise
        log.warning("system metrics disabled: %s", exc)
        return None
    monitor.start()
    return monitor


def stop_system_metrics(handle: Any | None) -> None:
    """Stop a monitor from `start_system_metrics` and flush its last samples; None is a no-op."""
    if handle is not None:
        handle.finish()


def run_url(run_id: str) -> str:
    """Where a person looks at a run: the MLflow UI page on a server, else the store and run id."""
    uri = tracking_uri()
    if urlparse(uri).scheme in {"http", "https"}:
        experiment_id = client().get_run(run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{uri} (run {run_id}; `mlflow ui --backend-store-uri {uri}` to browse)"
