"""`ray_session` starts a new local Ray when RAY_ADDRESS is unset, whatever an earlier `ray start` left behind,
and fails within seconds, naming the address, when RAY_ADDRESS names one where nothing answers.

Each case runs in a process of its own (Ray's settings are per process) with its own Ray temp folder
(RAY_TMPDIR), so the address file it plants is seen by that process only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.ports import free_port

REPO = Path(__file__).resolve().parents[3]

# Prints how long `ray_session` took to yield (or to fail). With ray_session's Ray up, it sends itself SIGTERM
# while `ray.get` waits on a minute-long task: the exception its own handler raises (not a KeyboardInterrupt, as
# Prefect's flow engine raises none) must reach it within seconds, and its handler be in force after the session.
DRIVER = """
import json, os, signal, sys, threading, time
import ray
from flows.distributed.cluster import ray_session

class Stop(BaseException):
    pass

def mine(signum, frame):
    raise Stop

@ray.remote(num_cpus=0)
def slow():
    time.sleep(60)

signal.signal(signal.SIGTERM, mine)
before = dict(os.environ)
t0 = time.monotonic()
try:
    with ray_session() as resources:
        print(json.dumps({"seconds": time.monotonic() - t0, "cpus": resources.get("CPU")}), flush=True)
        os.environ["SET_DURING"] = "kept"  # the block's own setting outlives the session
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t1 = time.monotonic()
        ray.get(slow.remote())
except Stop:
    print(json.dumps({"stopped_after": time.monotonic() - t1, "mine_after": signal.getsignal(signal.SIGTERM) is mine,
                      "env_after": {k: v for k, v in os.environ.items() if before.get(k) != v},
                      "env_gone": sorted(set(before) - set(os.environ))}))
except Exception as e:
    print(json.dumps({"seconds": time.monotonic() - t0, "error": f"{type(e).__name__}: {e}"}))
    sys.exit(1)
"""


@pytest.fixture
def ray_tmp():
    """A short Ray temp folder of the test's own (unix socket paths stay under 107 bytes), removed after."""
    folder = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _drive(ray_tmp: Path, timeout: float, **env: str) -> tuple[subprocess.CompletedProcess, list[dict], float]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    t0 = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, cwd=REPO,
                             env={**base, "RAY_TMPDIR": str(ray_tmp), **env}, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"ray_session did not return within {timeout:g} s: {(e.stderr or b'')[-2000:]!r}")
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return out, lines, time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stale_address_file_does_not_stop_a_local_ray_from_starting(ray_tmp):
    """What a `ray start --head` that was killed leaves: an address file naming a GCS that is gone."""
    (ray_tmp / "ray").mkdir()
    stale = ray_tmp / "ray" / "ray_current_cluster"
    stale.write_text(f"127.0.0.1:{free_port()}")
    out, lines, _ = _drive(ray_tmp, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert lines[0]["cpus"] and lines[0]["seconds"] < 120, lines  # minutes of GCS retries before
    assert stale.exists()  # not ours to remove
    # A local Ray turns token authentication on; its notice, amid every command's progress, is not printed.
    assert "Token authentication" not in out.stderr, out.stderr[-3000:]
    # Ray's driver installs a SIGTERM handler that kills its processes mid-job (exit 134), and Ray's blocking
    # calls drop what a handler raises unless it is a KeyboardInterrupt: the caller's own handler is obeyed.
    assert lines[1]["stopped_after"] < 15 and lines[1]["mine_after"], lines
    # What ray.init wrote to the environment (RAY_AUTH_MODE, ...) is gone after the session; what the block set
    # is not.
    assert lines[1]["env_after"] == {"SET_DURING": "kept"} and lines[1]["env_gone"] == [], lines


@pytest.mark.timeout(120)
def test_an_address_where_nothing_answers_fails_within_seconds_naming_it(ray_tmp):
    address = f"127.0.0.1:{free_port()}"
    out, lines, _ = _drive(ray_tmp, timeout=90, RAY_ADDRESS=address)
    assert out.returncode == 1, out.stderr[-3000:]
    assert lines[0]["seconds"] < 10, lines
    error = lines[0]["error"]
    assert error.startswith("RayUnreachableError: ") and f"RAY_ADDRESS={address}" in error, error
    assert "unset RAY_ADDRESS" in error and "\n" not in error, error
