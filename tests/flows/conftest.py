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
def _mnist_home(root: Path, limit: int) -> Iterator[Path]:
    """VAE_HOME = `root` holding `limit` real MNIST images spread over train, val and test (dataset
    `mnist`), with MLflow's store under it; the environment is restored after."""
    from vae_core.ingest import run_ingest
    from vae_core.requests import IngestRequest

    old = {k: os.environ.get(k) for k in ("VAE_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["VAE_HOME"] = str(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        run_ingest(IngestRequest(source=str(MNIST_DIR), name="mnist", limit=limit, data_root=str(root / "datasets")))
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
