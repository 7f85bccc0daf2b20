"""What every MLflow-layer test here shares."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _forget_mlflow_uris():
    """configure() leaves the URI in mlflow's globals; clear them so later tests follow the env."""
    yield
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    os.environ.update({k: v for k, v in saved.items() if v is not None})
