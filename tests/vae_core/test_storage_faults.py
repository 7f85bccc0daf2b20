"""S3 that drops connections for a while (moto's server behind a proxy that resets every connection, open or
new): a short outage is retried through and the data is intact; a longer one than the retry budget ends
in one clear error naming the object, within a bounded time."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from vae_core.data.shards import open_dataset, read_split_u8
from vae_core.ingestion.ingest import run_ingest
from vae_core.requests import IngestRequest
from vae_core.storage import StorageUnavailableError

MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
LIMIT = 100


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 in front of `upstream` that, while failing, resets every connection: those
    open when the failure starts, and each new one as soon as it is accepted."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.failing_until: float | None = None
        self._pending: float | None = None  # an outage's length, until its first connection starts it
        self.resets = 0  # connections reset so far
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="dropping-proxy", daemon=True)
        self._thread.start()

    def fail_for(self, seconds: float) -> None:
        """Reset the open connections, and every new one for `seconds` from the first one (so that whatever the
        operation under test does first meets the outage)."""
        self.failing_until, self._pending = None, seconds
        with self._lock:
            for s in list(self._open):
                self._reset(s)

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(), which a close alone does not
        self.server.close()
        self._thread.join(timeout=5)
        with self._lock:
            for s in list(self._open):
                self._reset(s)

    def _reset(self, s: socket.socket) -> None:
        """Close with an RST (SO_LINGER 0): the peer sees 'connection reset', not an orderly end."""
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        s.close()
        self._open.discard(s)
        self.resets += 1

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            with self._lock:
                if self._pending is not None:
                    self.failing_until, self._pending = time.monotonic() + self._pending, None
                if self.failing_until is not None and time.monotonic() < self.failing_until:
                    self._reset(client)
                    continue
                upstream = socket.create_connection(self.upstream)
                self._open.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with self._lock:
            for s in (src, dst):
                if s in self._open:
                    self._open.discard(s)
                    s.close()


@pytest.fixture
def proxy(s3):
    """(proxy, storage options that reach moto through it)."""
    _, options = s3
    endpoint = options["client_kwargs"]["endpoint_url"]
    host, port = endpoint.removeprefix("http://").split(":")
    p = DroppingProxy((host, int(port)))
    try:
        yield p, {**options, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{p.port}"}}
    finally:
        p.close()


def _ingest(root: str, options: dict | None = None):
    return run_ingest(IngestRequest(name="mnist", source=str(MNIST_DIR), limit=LIMIT, data_root=root,
                                    data_root_options=options or {}))


def test_a_short_outage_is_retried_through_and_the_dataset_is_intact(proxy, tmp_path):
    p, options = proxy
    root = f"s3://vae-bucket/faults-{uuid.uuid4().hex[:8]}"
    p.fail_for(1.5)
    remote = _ingest(root, options)
    assert p.resets > 0  # the ingest met the outage
    local = _ingest(str(tmp_path / "datasets"))
    assert remote.created and remote.version == local.version  # the same content: nothing lost or doubled
    info = open_dataset(root, "mnist", remote.version, storage_options=options)
    for split in info.counts:  # read back whole, every shard's checksum verified
        x, y, ids = read_split_u8(info, split)
        lx, ly, lids = read_split_u8(open_dataset(str(tmp_path / "datasets"), "mnist", local.version), split)
        assert ids == lids and (x == lx).all() and (y == ly).all()


def test_an_outage_beyond_the_retry_budget_is_one_error_naming_the_object(proxy, monkeypatch):
    p, options = proxy
    monkeypatch.setenv("VAE_S3_MAX_ATTEMPTS", "2")
    root = f"s3://vae-bucket/faults-{uuid.uuid4().hex[:8]}"
    p.fail_for(600)
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError) as caught:
        _ingest(root, options)
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert f"{root.removeprefix('s3://').split('/')[0]}" in message and "s3://vae-bucket/" in message, message
    assert "VAE_S3_MAX_ATTEMPTS" in message and "\n" not in message, message


def test_the_command_reports_it_in_one_line(proxy, tmp_path):
    """`vae ingest` with the usual AWS variables: `error: <the object and what happened>`, nothing else."""
    p, options = proxy
    p.fail_for(600)
    env = {**os.environ, "AWS_ENDPOINT_URL": options["client_kwargs"]["endpoint_url"], "VAE_S3_MAX_ATTEMPTS": "2",
           "VAE_HOME": str(tmp_path / "home")}
    root = f"s3://vae-bucket/faults-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run([sys.executable, "-m", "flows.cli.app", "ingest", str(MNIST_DIR), "--name", "mnist",
                           "--limit", str(LIMIT), "--data-root", root, "--no-prefect", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: "), proc.stderr
    assert "s3://vae-bucket/" in proc.stderr and "did not answer" in proc.stderr, proc.stderr
