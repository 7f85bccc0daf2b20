"""Shared fixtures. Every test runs with MLflow telemetry off; nothing here needs Prefect, Ray or MLflow,
so the library's tests run on a machine that has only torch (tests/vae_core/training/test_devices.py on a GPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def vae_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "vae_home"
    monkeypatch.setenv("VAE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def digits_u8():
    """Real handwritten digits (scikit-learn's, shipped offline): uint8 (1797, 1, 8, 8)."""
    import torch

    from vae_core.data.sources.digits import load_digits_u8

    images, _ = load_digits_u8()
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on 127.0.0.1 (random port) and storage options that reach it.

    One per session: moto keeps its buckets in process memory, shared by every server it starts.
    """
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}, "skip_instance_cache": True}
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("vae-bucket")
    yield fs, options
    server.stop()
    mp.undo()
