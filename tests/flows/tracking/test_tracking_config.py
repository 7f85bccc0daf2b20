"""Where the MLflow layer points: the tracking URI under VAE_HOME or from the environment, and model names."""

from __future__ import annotations

import os

import pytest

from flows.tracking import registry, runs as tracking


def test_tracking_uri_is_absolute_sqlite_under_vae_home(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VAE_HOME", "rel/home")
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:////{(tmp_path / 'rel' / 'home' / 'mlflow.db').as_posix().lstrip('/')}"
    assert (tmp_path / "rel" / "home").is_dir()
    # configure() must not pin the URI into the environment: a new VAE_HOME is followed.
    assert tracking.configure() == uri and "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("VAE_HOME", str(tmp_path / "other"))
    assert tracking.configure().endswith("/other/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri() == "http://127.0.0.1:1"


def test_remote_vae_home_without_tracking_uri_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("VAE_HOME", "s3://bucket/vae")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        tracking.tracking_uri()


def test_names_and_uris():
    assert registry.default_model_name("mnist") == "vae-mnist"
    assert registry.model_uri("vae-mnist", "champion") == "models:/vae-mnist@champion"
