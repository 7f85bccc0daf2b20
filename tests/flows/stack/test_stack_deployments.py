"""The deployments as users run them on the local stack: `vae stack up` (real Prefect server and worker, MLflow
server, Ray head on 127.0.0.1), `prefect deploy` of deploy/prefect.yaml, `prefect deployment run ...` of ingest
and train on a small MNIST subset, their data and model landing under the stack's VAE_HOME and store, and
`vae stack down` leaving no process behind. Every stage through its deployment, the nightly on an unchanged
source and training over two hosts run in tests/cluster, on compose's shape.

The tests share one stack and one VAE_HOME and run in the order written: each stage uses what the previous
one made, as in production.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.flows.conftest import MNIST_DIR
from tests.ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
LIMIT = 1500
SMALL = {"model.hidden_channels": [16, 32], "model.hidden_dim": 64, "model.latent_dim": 8,
         "train.batch_size": 64, "train.kl_warmup_steps": 50, "train.lr": 3e-3}
INGEST = {"source": str(MNIST_DIR), "name": "mnist", "limit": LIMIT}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A stack under a fresh VAE_HOME, stopped (and checked stopped) at the end whatever happened."""
    from flows.stack import control as vae_stack

    home = tmp_path_factory.mktemp("vae-home")
    old = os.environ.get("VAE_HOME")
    os.environ["VAE_HOME"] = str(home)
    try:
        up = vae_stack.up(prefect_port=free_port(), mlflow_port=free_port(), ray_port=free_port(), ray_cpus=2,
                          ray_dashboard_port=free_port())
        try:
            yield up
        finally:
            vae_stack.down()
    finally:
        if old is None:
            os.environ.pop("VAE_HOME", None)
        else:
            os.environ["VAE_HOME"] = old


def _env(stack) -> dict[str, str]:
    """The environment a user gets from `eval "$(vae stack up)"`, with the CLI's own Prefect home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, **stack.env, "PREFECT_HOME": str(Path(stack.home) / "cli-prefect"),
            "MLFLOW_DISABLE_TELEMETRY": "true"}


def _cli(stack, *args: str, timeout: float = 420) -> str:
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], env=_env(stack), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _run(stack, deployment: str, request: dict) -> str:
    """`prefect deployment run DEPLOYMENT --param request=... --watch`: the worker runs it; fails unless it
    ends Completed."""
    return _cli(stack, "prefect", "deployment", "run", deployment, "--param", f"request={json.dumps(request)}",
                "--watch")


def _mlflow(stack):
    """A client of the stack's server for runs and the registry (both named: an earlier test may have set
    another registry URI for this process)."""
    import mlflow

    uri = stack.env["MLFLOW_TRACKING_URI"]
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _versions(stack, name: str) -> list[int]:
    return sorted(int(v.version) for v in _mlflow(stack).search_model_versions(f"name='{name}'"))


def test_deploy_creates_every_deployment(stack):
    assert stack.healthy, stack.describe()
    _cli(stack, "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
    listed = _cli(stack, "prefect", "deployment", "ls")
    for name in ("ingest-dataset/default", "train-vae/default", "evaluate-vae/default", "encode-dataset/default",
                 "nightly-retrain/nightly"):
        assert name.split("/")[1] in listed and name.split("/")[0] in listed, listed


def _nightly(stack) -> dict:
    return json.loads(_cli(stack, "prefect", "deployment", "inspect", "nightly-retrain/nightly", "-o", "json"))


def test_nightly_deployment_has_the_two_utc_cron(stack):
    (entry,) = _nightly(stack)["schedules"]
    assert entry["schedule"]["cron"] == "0 2 * * *" and entry["schedule"]["timezone"] == "UTC", entry
    assert entry["active"] and _nightly(stack)["work_pool_name"] == "vae-local"
    # Paused from here on (which also drops its scheduled runs): a test running across 02:00 UTC would otherwise
    # see the real schedule fire its default request in the middle of the checks below.
    _cli(stack, "prefect", "deployment", "schedule", "pause", "nightly-retrain/nightly", entry["id"])
    assert not _nightly(stack)["schedules"][0]["active"]


NIGHTLY_DEFAULT = """        ingest: {source: "builtin:digits", name: digits}
        train: {preset: digits}
"""


def _api(stack, method: str, path: str, body: dict | None = None):
    """One call to the stack's Prefect API (quicker than a `prefect` command where the output is not the point)."""
    import httpx

    reply = httpx.request(method, f"{stack.env['PREFECT_API_URL']}{path}", json=body, timeout=30)
    reply.raise_for_status()
    return reply.json() if reply.content else None


def _scheduled_requests(stack, deployment_id: str) -> list[dict]:
    """The `request` of every Scheduled run of the deployment, as the server holds them for the worker."""
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}, "state": {"type": {"any_": ["SCHEDULED"]}}}}
    return [run["parameters"].get("request") for run in _api(stack, "POST", "/flow_runs/filter", body)]


def _deploy_nightly(stack, prefect_file: Path) -> dict:
    """`prefect deploy --name nightly` of `prefect_file`; the deployment as the server then holds it."""
    _cli(stack, "prefect", "--no-prompt", "deploy", "--name", "nightly", "--prefect-file", str(prefect_file))
    return _api(stack, "GET", "/deployments/name/nightly-retrain/nightly")


def _wait_scheduled(stack, deployment_id: str, until, timeout: float = 60) -> list[dict]:
    """The scheduled runs' requests once `until(requests)` holds, or as they are after `timeout` s (Prefect's
    scheduler fills a recently deployed schedule within seconds)."""
    import time

    end = time.monotonic() + timeout
    while not until(requests := _scheduled_requests(stack, deployment_id)) and time.monotonic() < end:
        time.sleep(1)
    return requests


def test_the_documented_way_to_change_the_nightly_changes_what_scheduled_runs_receive(stack, tmp_path):
    """deploy/README.md: edit the nightly's `parameters` in deploy/prefect.yaml and deploy it again. The runs
    Prefect's scheduler had made with the old request are replaced by runs that carry the new one."""
    text = (ROOT / "deploy" / "prefect.yaml").read_text()
    assert NIGHTLY_DEFAULT in text, "the nightly's default request in deploy/prefect.yaml changed: update this test"
    default = _deploy_nightly(stack, ROOT / "deploy" / "prefect.yaml")  # its schedule active again
    mine = {"ingest": {"source": str(MNIST_DIR), "name": "mnist", "limit": 500}, "train": {"epochs": 3}}
    edited = tmp_path / "prefect.yaml"
    edited.write_text(text.replace(NIGHTLY_DEFAULT, f"        ingest: {json.dumps(mine['ingest'])}\n"
                                                   f"        train: {json.dumps(mine['train'])}\n"))
    try:
        old = _wait_scheduled(stack, default["id"], bool)
        assert old and all(r == default["parameters"]["request"] for r in old), old
        nightly = _deploy_nightly(stack, edited)
        assert nightly["parameters"] == {"request": mine} and nightly["schedules"][0]["active"]
        new = _wait_scheduled(stack, nightly["id"], lambda rs: rs and all(r == mine for r in rs))
        assert new and all(r == mine for r in new), new
    finally:  # paused again: no run at 02:00 UTC in the middle of the tests below
        nightly = _api(stack, "GET", "/deployments/name/nightly-retrain/nightly")
        _api(stack, "PATCH", f"/deployments/{nightly['id']}/schedules/{nightly['schedules'][0]['id']}",
             {"active": False})


def test_ingest_and_train_run_through_the_worker_with_the_stacks_environment(stack):
    _run(stack, "ingest-dataset/default", INGEST)
    _run(stack, "train-vae/default", {"dataset": "mnist", "overrides": SMALL, "epochs": 1, "max_failures": 0})
    assert sorted(p.name for p in (Path(stack.home) / "datasets").iterdir()) == ["mnist"]
    assert _versions(stack, "vae-mnist") == [1]
    run = _mlflow(stack).get_run(_mlflow(stack).get_model_version("vae-mnist", "1").run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ray.nodes"] == "1"


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def test_stack_down_leaves_no_process(stack):
    from flows.stack import control as vae_stack

    state = json.loads(Path(stack.state).read_text())
    pids = [svc["pid"] for svc in state["services"].values()]
    tree = [p.pid for pid in pids if (proc := _process(pid)) for p in [proc, *proc.children(recursive=True)]]
    assert len(tree) > len(pids)  # servers with children: the check below has something to find

    stopped = vae_stack.down()

    assert len(stopped) == len(pids), stopped
    alive = [p for p in map(_process, tree) if p and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    from flows.stack.services import ray_temp_dir

    marks = (str(stack.home), str(ray_temp_dir(Path(stack.home))))
    strays = [p.info for p in psutil.process_iter(["pid", "cmdline"])
              if any(m in " ".join(p.info["cmdline"] or []) for m in marks)]
    assert not strays, strays
    assert not Path(stack.state).exists()
