"""The production shape of infra/compose.yaml on two hosts, driven through the deployments as users drive it:
ingest, a two-worker train with one rank on each host and its checkpoints on S3, evaluate, encode, the
nightly on an unchanged source, then the champion pulled from the other host.

The tests share the session's cluster and run in the order written: each stage uses what the one before made.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster.harness import (BASE, LOCAL_ADDITIONS, RAY_HEALTH, Compose, ComposeError, contract_names,
                                   python_in, substitute)
from tests.flows.conftest import MNIST_DIR, SMALL

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


def test_ingest_and_two_host_training_with_checkpoints_on_s3(cluster):
    cluster.deployment("ingest-dataset/default", INGEST)
    cluster.deployment("train-vae/default", {**TRAIN, "max_failures": 0})
    state = cluster.stored()
    assert len(state["datasets"]) == 1 and state["models"] == {"vae-mnist": [1]}, state
    ((run_id, run),) = [(i, r) for i, r in state["runs"].items() if r["nodes"]]
    assert run["status"] == "FINISHED", run
    nodes = run["nodes"].split(",")
    assert len(nodes) == 2 and nodes[0] != nodes[1], f"both ranks ran on one host: {nodes}"
    weights = [key for key in state["checkpoints"] if run_id in key and key.endswith(".safetensors")]
    assert weights, f"no checkpoint of run {run_id} on S3: {list(state['checkpoints'])[:10]}"


def test_evaluate_sets_the_champion_and_encode_writes_embeddings_to_s3(cluster):
    cluster.deployment("evaluate-vae/default", {"model": "models:/vae-mnist@challenger", "iw_samples": 5,
                                                "limit": 200, "map_points": 50})
    # One actor of 1 CPU: the default reservation (the cluster's CPUs less one, 3) fits no single 2-CPU node,
    # so Ray never places the actor and the run hangs.
    cluster.deployment("encode-dataset/default", {"model": "models:/vae-mnist@champion", "dataset": "mnist",
                                                  "cpus_per_worker": 1})
    state = cluster.stored()
    assert state["champions"] == {"vae-mnist": "1"}, state["champions"]
    parquet = [key for key in state["embeddings"] if key.endswith(".parquet")]
    assert parquet and all("/vae-mnist/1/mnist/" in key for key in parquet), state["embeddings"]


def test_nightly_with_an_unchanged_source_changes_nothing(cluster):
    before = cluster.stored()
    cluster.deployment("nightly-retrain/nightly", {"ingest": INGEST, "train": {k: v for k, v in TRAIN.items()
                                                                                 if k != "dataset"}})
    after = cluster.stored()
    for what in ("datasets", "models", "champions", "embeddings", "runs"):
        assert after[what] == before[what], what


def test_champion_pulled_on_host_b_encodes_as_encode_dataset_did(cluster):
    code = "import json\nfrom tests.cluster.harness import champion_encodes\n" \
           "print(json.dumps(champion_encodes('vae-mnist', 8)))"
    assert python_in(cluster.b, code, cluster.env()) < 1e-4

