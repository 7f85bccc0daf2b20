"""The production shape of infra/compose.yaml on two hosts, driven through the deployments as users drive it:
ingest, a two-worker train with one rank on each host and its checkpoints on S3, during which host B's cable
is pulled (the training resumes from its last checkpoint in the same run), evaluate, encode, the nightly on an
unchanged source with the Prefect worker killed while it runs and then run again, and the champion pulled
from the other host.

The tests share the session's cluster and run in the order written: each stage uses what the one before made.
One training carries the link fault and one nightly the worker's death, so the cluster trains once.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from tests.cluster.harness import (BASE, LOCAL_ADDITIONS, RAY_HEALTH, Compose, ComposeError, contract_names,
                                   python_in, substitute)
from tests.flows.conftest import MNIST_DIR, SMALL
from tests.processes import eventually

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

LIMIT = 1000
INGEST = {"source": str(MNIST_DIR), "name": "mnist", "limit": LIMIT}
# Two ranks of 2 CPUs: each Ray node (2 CPUs, RAY_HEAD_NUM_CPUS / RAY_WORKER_NUM_CPUS) fits exactly one.
TRAIN = {"dataset": "mnist", "overrides": SMALL, "epochs": 1, "workers": 2, "cpus_per_worker": 2}


def test_compose_variables_are_substituted_as_compose_does():
    env = {"SET": "v", "EMPTY": ""}
    assert substitute("${SET}/${EMPTY:-d}/${UNSET:-d}/$${SET}", env) == "v/d/d/${SET}"
    with pytest.raises(ComposeError, match="UNSET is unset: say why"):
        substitute("${UNSET:?say why}", env)
    with pytest.raises(ComposeError, match="AWS_ACCESS_KEY_ID"):
        Compose({}).shared()


def test_every_contract_name_is_in_compose():
    names = contract_names()
    assert {"VAE_HOME", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "AWS_SECRET_ACCESS_KEY"} <= set(names), names
    missing = set(names) - set(Compose({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}).shared())
    assert not missing, f"infra/compose.yaml's x-vae-env lacks {sorted(missing)}"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_processes_get_only_compose_environment_and_local_additions(cluster):
    compose = cluster.compose
    for name, service in cluster.services.items():
        given = compose.environment(name) if "environment" in compose.doc["services"][name] else {}
        extra = set(_environ(service.proc.pid)) - set(given) - set(BASE) - set(LOCAL_ADDITIONS) - set(RAY_HEALTH)
        assert extra <= {"PREFECT_HOME", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"}, (name, extra)
    worker = _environ(cluster.services["prefect-worker"].proc.pid)
    assert worker["VAE_HOME"] == "s3://vae" and worker["RAY_ADDRESS"] == "ray-head:6379", worker


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


def _registered_checkpoints(cluster, known: set[str], count: int, timeout: float) -> bool:
    """Whether Ray Train registered `count` checkpoints of a new run (one whose record is not in `known`) within
    `timeout` s (polled on host A).

    A checkpoint's files on the store are not enough: Ray Train's controller registers it, and a restarted group
    resumes from it, only once its poll has collected that report from every rank, which may come seconds
    (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) after the files and after a short epoch's next one. The controller writes
    what it registered to the run's `checkpoint_manager_snapshot.json` on the store: that is what is read."""
    code = ("import json, time\nfrom vae_core.settings import checkpoint_root\nfrom vae_core.storage import resolve\n"
            f"fs, root = resolve(checkpoint_root())\nend, n = time.monotonic() + {timeout}, 0\n"
            f"known = set({sorted(known)!r})\n"
            f"while n < {count} and time.monotonic() < end:\n"
            "    fs.invalidate_cache(); time.sleep(0.5)\n"
            "    for key in fs.find(root):\n"
            "        if key.endswith('/checkpoint_manager_snapshot.json') and key not in known:\n"
            "            n = max(n, len(json.loads(fs.cat(key))['checkpoint_results']))\n"
            f"print(json.dumps(n >= {count}))")
    return python_in(cluster.a, code, cluster.env(), timeout + 60)


def test_ingest_then_a_two_host_training_outlives_a_pulled_cable_in_one_run(cluster):
    """Fault 3: host B's link goes down for LINK_DOWN_S in the middle of an epoch; Ray Train restarts the group
    on both hosts from the last checkpoint on S3 once the node is back, and MLflow keeps one run."""
    cluster.deployment("ingest-dataset/default", INGEST)
    before = cluster.stored()
    run = _submit(cluster, "train-vae/default", {**TRAIN, "epochs": 5, "max_failures": 2})
    # A checkpoint registered with Ray Train: the cable goes in the middle of a later epoch, and the group
    # resumes from it.
    assert _registered_checkpoints(cluster, set(before["checkpoints"]), 1, 240), "Ray Train registered no checkpoint"
    cluster.b.link(False)
    print(f"\nhost B's link down at {time.time() * 1000:.0f} ms")
    time.sleep(LINK_DOWN_S)
    cluster.b.link(True)
    # Compose restarts a Ray node that exits (`restart: unless-stopped`); a node the head declared dead exits
    # once it hears so, and is started again here as compose would.
    node = cluster.services["ray-worker"]
    if eventually(lambda: not node.alive(), timeout=60, every=1):
        node.start()
    final, _ = _state(cluster, run, ("COMPLETED", "FAILED", "CRASHED"), 300)

    after = cluster.stored()
    assert len(after["datasets"]) == 1 and after["models"] == {"vae-mnist": [1]}, after
    new = {k: r for k, r in after["runs"].items() if k not in before["runs"] and r["nodes"] is not None}
    assert len(new) == 1, f"training made {len(new)} MLflow runs: {new}"
    ((run_id, training),) = new.items()
    print(f"training run: {training}")
    assert final == "COMPLETED" and training["status"] == "FINISHED", (final, training, node.tail())
    assert training["resumed"] is not None and training["resumed"] >= 1 and training["failures"], training
    nodes = training["nodes"].split(",")
    assert len(nodes) == 2 and nodes[0] != nodes[1], f"both ranks ran on one host: {nodes}"
    weights = [key for key in after["checkpoints"] if run_id in key and key.endswith(".safetensors")]
    assert weights, f"no checkpoint of run {run_id} on S3: {list(after['checkpoints'])[:10]}"


def test_evaluate_sets_the_champion_and_encode_writes_embeddings_to_s3(cluster):
    cluster.deployment("evaluate-vae/default", {"model": "models:/vae-mnist@challenger", "iw_samples": 5,
                                                "limit": 200, "map_points": 50})
    # The default reservation, the cluster's CPUs less one (3), is cut to what one node holds (2).
    cluster.deployment("encode-dataset/default", {"model": "models:/vae-mnist@champion", "dataset": "mnist"})
    state = cluster.stored()
    assert state["champions"] == {"vae-mnist": "1"}, state["champions"]
    parquet = [key for key in state["embeddings"] if key.endswith(".parquet")]
    assert parquet and all("/vae-mnist/1/mnist/" in key for key in parquet), state["embeddings"]


def test_worker_killed_mid_nightly_leaves_a_crashed_run_and_a_rerun_changes_nothing(cluster):
    """Fault 4, on the nightly over an unchanged source: the Prefect worker is killed while the run runs, the
    run ends CRASHED, and a re-run of the deployment completes adding no dataset version, model version,
    champion, embeddings file or MLflow run (so neither did the killed run)."""
    nightly = {"ingest": INGEST, "train": {k: v for k, v in TRAIN.items() if k != "dataset"}}
    before = cluster.stored()
    run = _submit(cluster, "nightly-retrain/nightly", nightly)
    assert _state(cluster, run, ("RUNNING",), 180)[0] == "RUNNING"
    worker = cluster.services["prefect-worker"]
    worker.kill(signal.SIGKILL)  # the worker's process group
    worker.proc.wait(10)
    state, message = _state(cluster, run, ("CRASHED", "FAILED", "COMPLETED"), 60)
    print(f"\nflow run after the worker's SIGKILL: {state}: {message}")
    worker.start()
    assert state == "CRASHED", (state, message)

    cluster.deployment("nightly-retrain/nightly", nightly)
    after = cluster.stored()
    for what in ("datasets", "models", "champions", "embeddings", "runs"):
        assert after[what] == before[what], what


def test_champion_pulled_on_host_b_encodes_as_encode_dataset_did(cluster):
    code = "import json\nfrom tests.cluster.harness import champion_encodes\n" \
           "print(json.dumps(champion_encodes('vae-mnist', 8)))"
    assert python_in(cluster.b, code, cluster.env()) < 1e-4
