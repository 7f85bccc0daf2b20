"""Fixtures for the tests that run Prefect flows: one Prefect test server, started by the first test that
asks for it (`pytestmark = pytest.mark.usefixtures("prefect_server")`), not for every test."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Prefect's temporary server and its database live in a throwaway folder, not in ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# On a loaded two-core machine the temporary server can take longer than the default to come up.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# Prefect binds its console log handler to the sys.stderr of the moment it is first imported. Import it
# here, under pytest's session-wide capture, so that a flow first run inside a CliRunner (whose stream is
# closed afterwards) does not leave every later flow logging into a closed file.
import prefect  # noqa: E402,F401


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect test server for the session, stopped while pytest still owns the output streams."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield


MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


@contextlib.contextmanager
def _mnist_home(root: Path, limit: int, **ingest: object) -> Iterator[Path]:
    """VAE_HOME = `root` holding `limit` real MNIST images spread over train, val and test (dataset
    `mnist`, `ingest` options such as shard_mb passed on), with MLflow's store under it; the environment
    is restored after."""
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    old = {k: os.environ.get(k) for k in ("VAE_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["VAE_HOME"] = str(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        run_ingest(IngestRequest(source=str(MNIST_DIR), name="mnist", limit=limit, data_root=str(root / "datasets"),
                                 **ingest))
        yield root
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def mnist_home():
    """`with mnist_home(root, limit) as root:` a VAE_HOME holding `limit` real MNIST images (see `_mnist_home`)."""
    return _mnist_home


SMALL = {"model.hidden_channels": [16, 32], "model.hidden_dim": 64, "model.latent_dim": 8, "train.batch_size": 64,
         "train.kl_warmup_steps": 50, "train.lr": 3e-3}


def _register(epochs: int = 0, name: str = "vae-mnist", preset: str = "mnist", dataset: str = "mnist",
              objective: str | None = None) -> int:
    """Train a small model in process for `epochs` (0: untrained) on the train split of `dataset` under the
    current VAE_HOME and register it as the next version of `name` (@challenger); returns the version.
    The `mnist` preset is shrunk (SMALL) and fitted to the dataset's image shape; others are used as they are."""
    import torch

    from flows.tracking import registry, runs as tracking
    from vae_core import load_config
    from vae_core.data.shards import open_dataset, read_split_u8
    from vae_core.settings import data_root
    from vae_core.training.fit import Fit, steps_per_epoch
    from vae_core.training.loop import iterate_batches

    info = open_dataset(data_root(), dataset)
    cfg = load_config(preset, SMALL if preset == "mnist" else {}, objective)
    if preset == "mnist":
        cfg = cfg.with_image_shape(*info.shape)
    torch.manual_seed(epochs)
    images = torch.from_numpy(read_split_u8(info, "train")[0].copy()) if epochs else None
    fit = Fit.create(cfg, steps_per_epoch(len(images) if epochs else 1, cfg.train.batch_size))
    for epoch in range(1, epochs + 1):
        fit.train_epoch(iterate_batches(images, cfg.train.batch_size, generator=fit.order(epoch)))
    run_id = tracking.start_training_run("train-vae", f"e{epochs}", cfg, info.name, info.version, info.url)
    tracking.RunLogger(run_id).finish()
    return registry.log_and_register_model(run_id, fit.model, name, info.version)


@pytest.fixture(scope="session")
def register_model():
    """`register_model(epochs, name, preset, dataset, objective) -> version` (see `_register`)."""
    return _register
