"""Ctrl-C or SIGTERM ends a `vae` command within seconds with exit code 130 and leaves nothing half-written.

A terminal's Ctrl-C signals the whole foreground process group: the command, its Ray workers and, in
Prefect mode, Prefect's temporary server. The tests do the same to a command started in its own session;
SIGTERM (`kill PID`, a service manager stopping the command) goes to the command's process alone.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.processes import eventually, survivors


@pytest.fixture(scope="module")
def slow_source(tmp_path_factory) -> Path:
    """1,000 large, smooth PNGs (16 MB in all): written in a second, decoded in well over 10 s by two workers."""
    root = tmp_path_factory.mktemp("slow-source")
    y, x = np.mgrid[0:1024, 0:1024]
    blobs = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(np.stack([(x * (i + 1)) % 256, (y * (i + 2)) % 256, (x + y) % 256], -1).astype(np.uint8)
                        ).save(buf, "PNG")
        blobs.append(buf.getvalue())
    for i in range(1000):
        (root / f"{i:04d}.png").write_bytes(blobs[i % 8])
    return root


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    """A data root holding the built-in digits (dataset `digits`), ingested here once for the training tests."""
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    root = tmp_path_factory.mktemp("digits-root")
    run_ingest(IngestRequest(source="builtin:digits", name="digits", data_root=str(root)))
    return root


@pytest.fixture
def scratch(request) -> Path:
    """A short temp folder for the command (TMPDIR), removed after the test: Ray puts its session's Unix
    sockets below it, and those paths are limited to 107 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="vae-i-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(folder, ignore_errors=True))
    return folder


def _interrupt(args: list[str], env: dict[str, str], stderr: Path, working, wait_s: float = 300,
               settle_s: float = 1.0, sig: signal.Signals = signal.SIGINT, group: bool = True,
               gone_s: float = 30) -> tuple[int, float]:
    """Start `vae ARGS` in its own session, wait until `working()` (then `settle_s` more), send `sig` to its
    whole process group as a terminal's Ctrl-C does (or, `group=False`, to the command alone, as `kill PID`
    does); returns (exit code, seconds it took to exit). Every process of the group must be gone within
    `gone_s` seconds after (Prefect's server, Ray's, decode workers)."""
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli.app", *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    try:
        eventually(lambda: proc.poll() is not None or working(), wait_s)
        # The pause lets the work get going (Ray's tasks start, in Prefect mode) before the signal.
        time.sleep(settle_s)
        assert proc.poll() is None, stderr.read_text()[-3000:]
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        start = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - start
        # Ray's per-node agents wind down on their own clock once the raylet is gone (over 10 s once, on a
        # loaded 2-core machine): what must not happen is that any process stays.
        assert eventually(lambda: not survivors(proc.pid), gone_s), survivors(proc.pid)
    finally:
        if survivors(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return code, took


def _env(tmp_path: Path, scratch: Path) -> dict[str, str]:
    """No PREFECT_API_URL, so Prefect mode starts its temporary server, and no RAY_ADDRESS, so Ray is the
    command's own, as on a user's machine; TMPDIR is `scratch`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME", "RAY_ADDRESS")}
    return {**env, "VAE_HOME": str(tmp_path / "vae"), "MLFLOW_DISABLE_TELEMETRY": "true", "TMPDIR": str(scratch)}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["--prefect", "--no-prefect"])
def test_ctrl_c_stops_ingest_within_seconds_leaving_nothing_behind(tmp_path, scratch, slow_source, mode):
    data = tmp_path / "data"
    args = ["ingest", str(slow_source), "--name", "x", "--data-root", str(data), "--workers", "2", "--image-size",
            "16,16", mode]
    # Its work folder (in the data root) gets a listing as the run starts (after Prefect's server is up, in
    # Prefect mode); decoding follows.
    code, took = _interrupt(args, _env(tmp_path, scratch), tmp_path / "stderr",
                            lambda: any(data.glob("x/.ingest-*/listing/*.parquet")))
    stderr = (tmp_path / "stderr").read_text()
    assert code == 130 and took < 15, (code, took, stderr[-3000:])
    assert "interrupted" in stderr.splitlines() and "Traceback" not in stderr, stderr[-3000:]
    # No version and no lock: what stays is the work folder, whose committed parts the next run resumes from.
    assert not list(data.rglob("manifest.json")) and not list(data.glob("x/[!.]*")), list(data.rglob("*"))
    assert not list(data.rglob(".lock.tmp-*")), list(data.rglob("*"))
    assert not [p for p in scratch.iterdir() if p.name != "ray"]  # Ray's own session folder aside


def _train_worker_pids(home: Path) -> list[int]:
    """The Ray Train workers of a command whose VAE_HOME is `home`: Ray names its actor processes after their
    class (`ray::RayTrainWorker...`)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker") and \
                    f"VAE_HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                pids.append(int(proc.name))
        except OSError:  # it ended while we looked
            continue
    return pids


def _kill_workers_while_staging(home: Path, scratch: Path) -> bool:
    """SIGKILL the command's Ray Train workers at a moment a checkpoint is staged in `scratch`; True once done.

    Ray's shutdown ends a worker that is writing or uploading when the interrupt comes without unwinding it
    (the training function runs in one of its threads): this does the same at a known moment, so whatever
    the worker staged can only be removed by the command itself. The workers are frozen (SIGSTOP) first, so
    that the check and the kill see the same moment."""
    if not any(scratch.glob("vae-ckpt-*")) or not (pids := _train_worker_pids(home)):
        return False
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    staged = any(scratch.glob("vae-ckpt-*"))
    for pid in pids:  # or, when the upload finished in between, let them go on to the next checkpoint
        os.kill(pid, signal.SIGKILL if staged else signal.SIGCONT)
    return staged


def _train(*options: str) -> list[str]:
    """`vae train` on the digits for far more epochs than a test waits for (stopped at its first checkpoints)."""
    return ["train", "--dataset", "digits", "--preset", "digits", "--epochs", "200", *options]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_stops_training_within_seconds_leaving_no_checkpoint_temporaries(tmp_path, scratch, digits_root,
                                                                                prefect_server):
    """Ray Train replaces the SIGINT handler with its own (which aborts the run, then exits 0): the command
    still ends with 130 in seconds, and Ray's processes with it. The workers stage each checkpoint in a
    `vae-ckpt-*` folder of the temp dir: the signal comes while one is there, its worker killed
    mid-checkpoint, and the folder must be gone once the command has ended. The flow reports to the session's
    Prefect server: the ingest test above stops a temporary one with Ctrl-C, the SIGTERM test below with
    `kill PID`, and a third would add only its start-up (about 20 s)."""
    from prefect.settings import PREFECT_API_URL

    checkpoints = tmp_path / "vae" / "checkpoints"
    env = {**_env(tmp_path, scratch), "VAE_DATA_ROOT": str(digits_root), "PREFECT_API_URL": PREFECT_API_URL.value()}
    # No restarts: a new worker group would stage checkpoints of its own while the command winds down.
    code, took = _interrupt(_train("--max-failures", "0"), env, tmp_path / "stderr",
                            lambda: any(checkpoints.glob("*/checkpoint_*"))
                            and _kill_workers_while_staging(tmp_path / "vae", scratch), settle_s=0)
    stderr = (tmp_path / "stderr").read_text()
    assert code == 130 and took < 15, (code, took, stderr[-3000:])
    assert "interrupted" in stderr.splitlines() and "Traceback" not in stderr, stderr[-3000:]
    assert not list(scratch.glob("vae-ckpt-*")), list(scratch.glob("vae-ckpt-*/*"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_stops_training_with_exit_130_after_cleanup(tmp_path, scratch, digits_root):
    """SIGTERM to the command's process alone (as `kill PID` sends it), once Ray Train has written a
    checkpoint: the command unwinds as on Ctrl-C, with no stack dump, and nothing of its process group is left."""
    checkpoints = tmp_path / "vae" / "checkpoints"
    code, took = _interrupt(_train(), {**_env(tmp_path, scratch), "VAE_DATA_ROOT": str(digits_root)},
                            tmp_path / "stderr", lambda: any(checkpoints.glob("*/checkpoint_*")), settle_s=0,
                            sig=signal.SIGTERM, group=False, gone_s=15)
    stderr = (tmp_path / "stderr").read_text()
    assert code == 130 and took < 15, (code, took, stderr[-3000:])
    assert "interrupted" in stderr.splitlines(), stderr[-3000:]
    assert "Traceback" not in stderr and "SIGABRT" not in stderr and "Stack trace" not in stderr, stderr[-3000:]
