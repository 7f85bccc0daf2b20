"""SIGTERM (`kill PID`, a service manager stopping the command) ends `vae train` as Ctrl-C does: exit 130
within seconds, after cleanup, with the line `interrupted` and no stack dump, Ray's processes gone with it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.processes import eventually, survivors


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_stops_training_with_exit_130_after_cleanup(tmp_path):
    """SIGTERM to the command's process alone (as `kill PID` sends it), while Ray Train runs: the command
    unwinds as on Ctrl-C, and nothing of its process group is left."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME", "RAY_ADDRESS")}
    # A short temp folder of its own: Ray's session sockets live below it (107-byte limit on their paths).
    scratch = Path(tempfile.mkdtemp(prefix="vae-s-", dir="/tmp"))
    env.update(VAE_HOME=str(tmp_path / "vae"), MLFLOW_DISABLE_TELEMETRY="true", TMPDIR=str(scratch))
    subprocess.run([sys.executable, "-m", "flows.cli.app", "ingest", "builtin:digits", "--name", "digits", "--no-prefect"],
                   env=env, check=True, capture_output=True)
    checkpoints = tmp_path / "vae" / "checkpoints"
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli.app", "train", "--dataset", "digits", "--preset",
                                 "digits", "--epochs", "200"], env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        assert eventually(lambda: proc.poll() is not None or any(checkpoints.glob("*/checkpoint_*")), 400)
        time.sleep(1)
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - start
        stderr = (tmp_path / "stderr").read_text()
        assert code == 130 and took < 15, (code, took, stderr[-3000:])
        assert "interrupted" in stderr.splitlines(), stderr[-3000:]
        assert "Traceback" not in stderr and "SIGABRT" not in stderr and "Stack trace" not in stderr, stderr[-3000:]
        assert eventually(lambda: not survivors(proc.pid), 15), survivors(proc.pid)
        print(f"SIGTERM to exit: {took:.1f} s")
    finally:
        if survivors(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)
