"""Ingestion of a folder on Ray: decoded on both nodes of a two-node cluster, the same shards whatever the
number of workers, and a run killed mid-way (SIGKILL of its process group) finished by the next run without
decoding again the parts it had committed.

The cluster (`ray_cluster`) is this module's own: two `ray start --block` nodes of 1 CPU each on 127.0.0.1,
each in a process group of its own that the fixture kills at the end (`ray stop` would stop every Ray on the
machine, other test runs' included). Every port is a free one and the temp folder a short one of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.ports import free_ports

REPO = Path(__file__).resolve().parents[3]
RAY = Path(sys.executable).with_name("ray")

# A run of `run_ingest` on the cluster at $RAY_ADDRESS, as `vae ingest` would make it: argv[1] is the request
# as JSON, argv[2] the rows per content bucket (the test's runs in process use the same, so every run cuts
# the items into the same buckets; the request gives the image size, so only the driver reads it).
DRIVER = """
import sys
import vae_core.ingestion.work
from flows.distributed.cluster import ray_session
from flows.distributed.ingest_tasks import ray_runner, scaling
from vae_core.ingestion.ingest import run_ingest
from vae_core.requests import IngestRequest

vae_core.ingestion.work.BUCKET_ROWS = int(sys.argv[2])
req = IngestRequest.model_validate_json(sys.argv[1])
with ray_session() as resources:
    print(run_ingest(req, runner=ray_runner(*scaling(req, resources))).version, flush=True)
"""


def _pngs(root: Path, classes: int, per_class: int, side: int = 24, seed: int = 0) -> Path:
    """`classes` class folders of `per_class` distinct noise PNGs (side x side RGB) each: one listing unit,
    so one part, per class folder."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8)).save(buf, "PNG")
            (folder / f"{i:04d}.png").write_bytes(buf.getvalue())
    return root


def _shards(data_root: Path, name: str, version: str) -> dict[str, str]:
    """SHA-256 of every shard file of a version, by its path in the version folder."""
    vdir = data_root / name / version
    return {str(p.relative_to(vdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(vdir.rglob("*.parquet"))}


def _start_node(tmp: Path, gcs_port: int, head: bool) -> subprocess.Popen:
    """A `ray start --block` node of 1 CPU on 127.0.0.1, every port a free one, in a process group of its own."""
    agent, agent_grpc, metrics, runtime_env, dashboard = free_ports(5)
    args = [str(RAY), "start", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}",
            "--object-store-memory=150000000", "--min-worker-port=0", "--max-worker-port=0",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}", "--disable-usage-stats"]
    args += ([f"--port={gcs_port}", "--head", "--include-dashboard=false", f"--dashboard-port={dashboard}"] if head
             else [f"--address=127.0.0.1:{gcs_port}"])
    with open(tmp / f"node-{'head' if head else 'worker'}.log", "wb") as log:
        return subprocess.Popen(args, cwd=REPO, env=_node_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _node_env() -> dict[str, str]:
    """The nodes' environment: none of this process's RAY_ settings, this checkout importable by the workers,
    and token authentication off (a token in ~/.ray would turn it on for the head only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _wait_until(ready: Callable[[], bool], nodes: list[subprocess.Popen], tmp: Path, what: str) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        if time.monotonic() > deadline or any(n.poll() is not None for n in nodes):
            logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in tmp.glob("node-*.log"))
            pytest.fail(f"the Ray cluster did not come up ({what}):\n{logs}")
        time.sleep(0.5)


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _alive_nodes(address: str) -> int:
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        return sum(n["Alive"] for n in ray.nodes())
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """Two Ray nodes of 1 CPU each on this machine; RAY_ADDRESS names the head's for the module. -> the address."""
    tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    [port] = free_ports(1)
    address, nodes = f"127.0.0.1:{port}", []
    with pytest.MonkeyPatch.context() as mp:
        try:
            nodes.append(_start_node(tmp, port, head=True))
            _wait_until(lambda: _answers(port), nodes, tmp, "head")
            nodes.append(_start_node(tmp, port, head=False))
            mp.setenv("RAY_AUTH_MODE", "disabled")
            mp.setenv("RAY_ADDRESS", address)
            _wait_until(lambda: _alive_nodes(address) == 2, nodes, tmp, "second node")
            yield address
        finally:
            for node in nodes:  # each group holds its node's daemons; their workers exit with the raylet
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGKILL)
                node.wait()
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("prefect_server")
def test_a_folder_is_decoded_on_both_nodes_of_a_cluster(ray_cluster, tmp_path):
    """The flow joins $RAY_ADDRESS; one CPU per node and one CPU per task, so both nodes decode parts."""
    from flows.ingest import ingest_dataset
    from vae_core.requests import IngestRequest

    src = _pngs(tmp_path / "src", classes=8, per_class=50, side=48)
    out = ingest_dataset(IngestRequest(source=str(src), name="pngs", data_root=str(tmp_path / "ds")))
    assert out.created and out.seen == 400 and out.quarantined == 0
    assert len({n.node_id for n in out.nodes}) == 2, out.nodes
    assert all(n.rows > 0 and n.address for n in out.nodes), out.nodes
    assert sum(n.rows for n in out.nodes) == out.seen


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_or_three_workers_and_the_serial_runner_make_the_same_shards(ray_cluster, tmp_path, monkeypatch):
    """Several content buckets and several shards per split, duplicates across class folders (one under
    another label) and a corrupt file: the same version and byte-identical shards however the work is run."""
    import vae_core.ingestion.work
    from flows.distributed.cluster import ray_session
    from flows.distributed.ingest_tasks import ray_runner, scaling
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    # Read on the driver only: the request gives the image size, so the bucket count is known before any task.
    monkeypatch.setattr(vae_core.ingestion.work, "BUCKET_ROWS", 40)
    src = _pngs(tmp_path / "src", classes=6, per_class=30, side=16)
    shutil.copy(src / "class00" / "0000.png", src / "class03" / "copy.png")  # a duplicate under another label
    shutil.copy(src / "class01" / "0001.png", src / "class01" / "copy.png")
    (src / "class02" / "broken.png").write_bytes(b"\x89PNG not really")

    def request(data_root: str, workers: int) -> IngestRequest:
        return IngestRequest(source=str(src), name="pngs", data_root=str(tmp_path / data_root), workers=workers,
                             image_size=(16, 16), channels=3, shard_mb=0.02, max_quarantine_fraction=0.1)

    serial = run_ingest(request("serial", 0))
    assert (serial.manifest.items.duplicates, serial.manifest.label_conflicts) == (2, 1)
    assert serial.manifest.items.quarantined == 1 and len(serial.manifest.splits["train"].shards) > 2
    runs = {}
    with ray_session() as resources:  # one session, a data root per worker count
        for workers in (1, 3):
            req = request(f"w{workers}", workers)
            runs[workers] = run_ingest(req, runner=ray_runner(*scaling(req, resources)))
    expected = _shards(tmp_path / "serial", "pngs", serial.version)
    for workers, run in runs.items():
        assert run.version == serial.version, workers
        assert "local" not in {n.node_id for n in run.nodes}  # decoded by Ray tasks
        assert sum(n.rows for n in run.nodes) == run.manifest.items.seen
        assert _shards(tmp_path / f"w{workers}", "pngs", run.version) == expected, workers


def _committed(data_root: Path, name: str) -> list[Path]:
    return sorted(data_root.glob(f"{name}/.ingest-*/run-*/parts/commit/*.json"))


def _bucket_files(data_root: Path, name: str, parts: list[Path]) -> dict[Path, tuple[int, int]]:
    """(inode, mtime in ns) of the bucket files of the parts whose commit records are `parts`."""
    keys = {p.stem for p in parts}
    files = [f for f in data_root.glob(f"{name}/.ingest-*/run-*/parts/b-*/*.parquet") if f.stem in keys]
    return {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}


def _kill_mid_decoding(req_json: str, bucket_rows: int, data_root: Path, name: str) -> list[Path]:
    """Run DRIVER in a process group of its own and SIGKILL the group once it has committed some parts;
    -> the commit records there at the kill."""
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, req_json, str(bucket_rows)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while len(_committed(data_root, name)) < 3:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no parts committed before the run ended: {proc.communicate()[1][-3000:].decode()}")
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    return _committed(data_root, name)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_run_killed_mid_decoding_is_finished_by_the_next_keeping_its_parts(ray_cluster, tmp_path, monkeypatch):
    """SIGKILL of the whole process group while parts are being decoded; the next run reads none of the parts
    committed before the kill again (their bucket files are the very same files), decodes only the others,
    and publishes what an uninterrupted run publishes."""
    import vae_core.ingestion.work
    from flows.distributed.cluster import ray_session
    from flows.distributed.ingest_tasks import ray_runner, scaling
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    classes, per_class, bucket_rows = 40, 50, 500
    monkeypatch.setattr(vae_core.ingestion.work, "BUCKET_ROWS", bucket_rows)
    src = _pngs(tmp_path / "src", classes=classes, per_class=per_class, side=64)
    req = IngestRequest(source=str(src), name="big", data_root=str(tmp_path / "ds"), workers=1, image_size=(64, 64),
                        channels=3, shard_mb=0.5)
    committed = _kill_mid_decoding(req.model_dump_json(), bucket_rows, tmp_path / "ds", "big")
    assert len(committed) < classes, "the run had decoded every part before it was killed"
    kept = _bucket_files(tmp_path / "ds", "big", committed)
    assert kept
    done_rows = sum(json.loads(p.read_text())["seen"] for p in committed)

    def checked(runner: Callable) -> Callable:
        """The runner, checking the kept bucket files as the reduce step starts (the work folder goes with
        publishing)."""
        def run(fn: Callable, items: Any) -> Iterator[dict]:
            if isinstance(items, range):  # buckets to reduce: every part is decoded by now
                assert _bucket_files(tmp_path / "ds", "big", committed) == kept
            return runner(fn, items)
        return run

    with ray_session() as resources:
        again = run_ingest(req, runner=checked(ray_runner(*scaling(req, resources))))
    whole = run_ingest(req.model_copy(update={"data_root": str(tmp_path / "whole")}))
    assert again.created and again.version == whole.version
    assert _shards(tmp_path / "ds", "big", again.version) == _shards(tmp_path / "whole", "big", whole.version)
    decoded = sum(n.rows for n in again.nodes)
    assert 0 < decoded <= classes * per_class - done_rows, (decoded, done_rows)
    assert again.manifest.items.seen == classes * per_class
