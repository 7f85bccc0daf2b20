"""Faults on the session's two-host cluster, each with its outcome asserted: host B's cable pulled in the middle
of a two-host training, and the Prefect worker killed while a flow run runs.
"""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from tests.cluster.harness import python_in
from tests.cluster.test_cluster import INGEST, TRAIN
from tests.processes import eventually

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

LINK_DOWN_S = 20  # longer than the head takes to declare a silent node dead (RAY_HEALTH in the harness)


def _submit(cluster, deployment: str, request: dict) -> str:
    """Start a run of `deployment` without waiting for it; its flow run id."""
    out = cluster.cli("prefect", "deployment", "run", deployment, "--param", f"request={json.dumps(request)}")
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def _state(cluster, flow_run: str, until: tuple[str, ...], timeout: float) -> tuple[str, str]:
    """The flow run's state type and message, polled on host A until the type is one of `until` or `timeout` s
    passed."""
    code = ("import json, time\nfrom prefect.client.orchestration import get_client\n"
            f"end = time.monotonic() + {timeout}\n"
            "with get_client(sync_client=True) as c:\n"
            f"    while (s := c.read_flow_run({flow_run!r}).state).type.value not in {until!r} "
            "and time.monotonic() < end:\n"
            "        time.sleep(1)\n"
            "print(json.dumps([s.type.value, s.message or '']))")
    kind, message = python_in(cluster.a, code, cluster.env(), timeout + 60)
    return kind, message


def _new_checkpoints(cluster, known: set[str], count: int, timeout: float) -> bool:
    """Whether `count` checkpoints not in `known` reached the store within `timeout` s (polled on host A)."""
    code = ("import json, time\nfrom vae_core.settings import checkpoint_root\nfrom vae_core.storage import resolve\n"
            f"fs, root = resolve(checkpoint_root())\nknown, end = set({sorted(known)!r}), time.monotonic() + {timeout}\n"
            "while len(new := [k for k in fs.find(root) if k.endswith('.safetensors') and k not in known]) < "
            f"{count} and time.monotonic() < end:\n"
            "    fs.invalidate_cache(); time.sleep(0.5)\n"
            f"print(json.dumps(len(new) >= {count}))")
    return python_in(cluster.a, code, cluster.env(), timeout + 60)


def test_host_b_unplugged_mid_training_resumes_from_its_checkpoint_in_the_same_run(cluster):
    if not cluster.stored()["datasets"]:  # this module run on its own
        cluster.deployment("ingest-dataset/default", INGEST)
    before = cluster.stored()
    run = _submit(cluster, "train-vae/default", {**TRAIN, "epochs": 6, "max_failures": 2, "model_name": "vae-link"})
    # A second checkpoint on the store: the first is then registered with Ray Train, and the cable goes
    # in the middle of a later epoch.
    assert _new_checkpoints(cluster, set(before["checkpoints"]), 2, 240), "training wrote no two checkpoints"
    cluster.b.link(False)
    time.sleep(LINK_DOWN_S)
    cluster.b.link(True)
    # Compose restarts a Ray node that exits (`restart: unless-stopped`); a node the head declared dead exits
    # once it hears so, and is started again here as compose would.
    node = cluster.services["ray-worker"]
    if eventually(lambda: not node.alive(), timeout=60, every=1):
        node.start()
    final, _ = _state(cluster, run, ("COMPLETED", "FAILED", "CRASHED"), 300)

    after = cluster.stored()
    new = {k: r for k, r in after["runs"].items() if k not in before["runs"] and r["nodes"] is not None}
    assert len(new) == 1, f"training made {len(new)} MLflow runs: {new}"
    ((_, training),) = new.items()
    assert final == "COMPLETED" and training["status"] == "FINISHED", (final, training, cluster.services["ray-worker"].tail())
    assert training["resumed"] is not None and training["failures"], training
    assert after["models"]["vae-link"] == [1]


def test_worker_killed_mid_run_leaves_a_crashed_run_and_a_rerun_duplicates_nothing(cluster):
    request = {**TRAIN, "max_failures": 0, "model_name": "vae-crash"}
    before = cluster.stored()
    run = _submit(cluster, "train-vae/default", request)
    assert _state(cluster, run, ("RUNNING",), 180)[0] == "RUNNING"
    worker = cluster.services["prefect-worker"]
    worker.kill(signal.SIGKILL)  # the worker's process group
    worker.proc.wait(10)
    state, message = _state(cluster, run, ("CRASHED", "FAILED", "COMPLETED"), 60)
    print(f"\nflow run after the worker's SIGKILL: {state}: {message}")
    worker.start()
    assert state == "CRASHED", (state, message)

    cluster.deployment("train-vae/default", request)
    after = cluster.stored()
    assert after["models"]["vae-crash"] == [1], after["models"]
    assert after["datasets"] == before["datasets"] and after["embeddings"] == before["embeddings"]
