"""`vae stack up --db postgres`: a real PostgreSQL under VAE_HOME holding MLflow's and Prefect's stores, started
first and stopped last; its data outlives `down`; missing server programs are one error line; and Postgres
restarting while `vae evaluate` runs leaves one gate decision and one alias move.

The slow tests share one stack and run in the order written. As root PostgreSQL runs as the `postgres` user,
so VAE_HOME is a folder under /tmp that every user can traverse (pytest's own folders are private to root).
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

import httpx
import psutil
import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from flows.stack import control, postgres, services, state
from flows.stack.state import StackError
from tests.flows.conftest import MNIST_DIR
from tests.ports import free_ports

BIN = Path(sys.executable).parent
MODEL = "vae-mnist"
KEY = "test/nll_k5"  # the gate's metric in the evaluation below (--iw-samples 5)
# A Prefect client that asks the API for flow runs once told to (a line on stdin).
ASK_PREFECT = """
import sys, anyio
from prefect.client.orchestration import get_client

async def ask():
    async with get_client() as client:
        return await client.read_flow_runs(limit=1)

print("ready", flush=True)
sys.stdin.readline()
anyio.run(ask)
print("answered")
"""
WAITING = ("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
           "AND query ILIKE '%model_version_tags%'")  # a write to the tags of a model version, waiting on a lock
runner = CliRunner()


@pytest.fixture(scope="module")
def home():
    """VAE_HOME in a folder the `postgres` user can reach, set in os.environ and restored after."""
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="vae-pg-"))
    root.chmod(0o755)
    before = {k: os.environ.pop(k, None) for k in ("VAE_HOME", "MLFLOW_TRACKING_URI")}
    os.environ["VAE_HOME"] = str(root / ".vae")
    try:
        yield root / ".vae"
    finally:
        os.environ.pop("VAE_HOME")
        os.environ.update({key: value for key, value in before.items() if value is not None})
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(home):
    """A `--db postgres` stack on free ports; whatever happens, stopped at the end (a second `up` too)."""
    prefect, mlflow_port, ray, dashboard, pg = free_ports(5)
    try:
        yield control.up(prefect, mlflow_port, ray, ray_dashboard_port=dashboard, ray_cpus=1, db="postgres",
                         postgres_port=pg)
    finally:
        control.down()


def _client(stack):
    import mlflow

    uri = stack.env["MLFLOW_TRACKING_URI"]
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _env(stack) -> dict[str, str]:
    """What `eval "$(vae stack up)"` gives a shell, with the command's own Prefect home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, **stack.env, "PREFECT_HOME": str(Path(stack.home) / "cli-prefect"),
            "MLFLOW_DISABLE_TELEMETRY": "true"}


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_up_starts_postgres_first_and_both_servers_use_it(stack, home):
    assert stack.started == list(stack.services) == ["postgres", "prefect", "mlflow", "ray", "worker"]
    assert stack.healthy, stack.describe()
    shown = runner.invoke(app, ["stack", "status", "--json"])
    assert shown.exit_code == 0, shown.output
    pg = json.loads(shown.output)["services"]["postgres"]
    assert pg["healthy"] and pg["detail"].startswith("PostgreSQL "), pg
    assert (home / "stack" / "postgres" / "PG_VERSION").exists()
    assert not (home / "mlflow.db").exists()  # MLflow's store is the `mlflow` database
    assert "postgresql+asyncpg://" in " ".join(psutil.Process(stack.services["prefect"].pid).environ().values())

    other = runner.invoke(app, ["stack", "up", "--db", "sqlite"])
    assert other.exit_code == 1 and "db postgres (asked sqlite)" in other.output, other.output


def _train(stack, home, register_model) -> str:
    """A tiny MNIST subset ingested, a model trained for one epoch and registered through the stack's MLflow
    server (version 1, @challenger); returns its run id."""
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    run_ingest(IngestRequest(source=str(MNIST_DIR), name="mnist", limit=400, data_root=str(home / "datasets")))
    os.environ["MLFLOW_TRACKING_URI"] = stack.env["MLFLOW_TRACKING_URI"]
    try:
        assert register_model(epochs=1, name=MODEL) == 1
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    return _client(stack).get_model_version(MODEL, "1").run_id


def _restart_postgres(home: Path, while_down) -> None:
    """Stop the stack's Postgres as `down` does (fast shutdown: open transactions are rolled back), call
    `while_down()`, then start it again from its recorded command line and record the new process, so that
    `status` and `down` follow it."""
    with state.locked(home):
        record = state.read(home)
        svc = record["services"]["postgres"]
        proc = services.ours(svc["pid"], svc["create_time"])
        assert services.stop([("postgres", svc["pid"], [proc])], timeout=30) == []
        while_down()
        child = services.spawn(svc["cmd"], dict(os.environ), Path(svc["log"]), record["cwd"])
        svc.update(pid=child.pid, create_time=services.create_time(child.pid), descendants=[])
        state.write(home, record)


def _mlflow_db(stack, autocommit: bool):
    import psycopg2

    conn = psycopg2.connect(host=services.HOST, port=stack.services["postgres"].port, user=postgres.USER,
                            dbname="mlflow")
    conn.autocommit = autocommit
    return conn


def _wait_for(what, timeout: float, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"gave up after {timeout} s"
        time.sleep(every)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_postgres_restart_during_evaluate_leaves_one_decision_and_one_alias_move(stack, home, tmp_path,
                                                                                   register_model):
    asker = subprocess.Popen([sys.executable, "-c", ASK_PREFECT], env=_env(stack), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    run_id = _train(stack, home, register_model)
    # The hook: a transaction of this test holds the table of model-version tags against writes (reads go on),
    # so the evaluation runs up to the gate's first write, which then waits in Postgres until the restart.
    holder, watcher = _mlflow_db(stack, autocommit=False), _mlflow_db(stack, autocommit=True)
    holder.cursor().execute("LOCK TABLE model_version_tags IN EXCLUSIVE MODE")
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        evaluate = subprocess.Popen(
            [str(BIN / "vae"), "evaluate", "--model", f"models:/{MODEL}@challenger", "--iw-samples", "5", "--limit",
             "100", "--map-points", "20", "--sample-rows", "100", "--json"], env=_env(stack), stdout=stdout,
            stderr=stderr)
    try:
        _wait_for(lambda: evaluate.poll() is not None or _count(watcher, WAITING) > 0, 300)
        assert evaluate.poll() is None, err.read_text()[-3000:]
        assert asker.stdout.readline() == "ready\n"

        def outage() -> None:
            asker.stdin.write("now\n")  # Prefect's API, while its database is down
            asker.stdin.flush()
            time.sleep(2)

        _restart_postgres(home, outage)
        code = evaluate.wait(timeout=300)
        asked = asker.communicate(timeout=120)[0]
    finally:
        evaluate.kill()
        asker.kill()
        for conn in (holder, watcher):
            conn.close()
    assert code == 0, err.read_text()[-3000:]
    assert asker.returncode == 0 and asked.endswith("answered\n"), asked
    result = json.loads(out.read_text().strip().splitlines()[-1])
    assert result["decision"]["promote"] is True, result["decision"]

    failed = [line for line in (home / "stack" / "logs" / "mlflow.log").read_text().splitlines()
              if line.endswith("503 Service Unavailable") or "Error in _" in line]
    assert any("Error in _set_model_version_tag" in line for line in failed), failed  # the gate met the restart
    assert control.status().services["postgres"].healthy
    client = _client(stack)
    tags = client.get_model_version(MODEL, "1").tags
    assert tags["gate.decision"] == "promoted" and tags["gate.champion"] == "none", tags
    assert float(tags["gate.challenger"]) == result["metrics"][KEY]
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"
    assert len(client.get_metric_history(run_id, KEY)) == 1
    gates = httpx.post(f"{stack.env['PREFECT_API_URL']}/task_runs/filter",
                       json={"task_runs": {"name": {"like_": "champion-gate"}}}).json()
    assert [g["state_type"] for g in gates] == ["COMPLETED"], gates  # the gate ran once


def _count(conn, query: str) -> int:
    with conn.cursor() as cur:
        cur.execute(query)
        return cur.fetchone()[0]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_down_stops_postgres_last_keeping_its_data_and_up_finds_the_runs(stack, home):
    record = state.read(home)
    pids = [(s["pid"], s["create_time"]) for s in record["services"].values()] + \
        [tuple(d) for s in record["services"].values() for d in s["descendants"]]
    stopped = control.down()
    assert stopped[-1].startswith("postgres (pid "), stopped
    # Stopped after its clients: its fast shutdown cut no server's connection.
    last_start = (home / "stack" / "logs" / "postgres.log").read_text().rsplit("ready to accept connections", 1)[1]
    assert "received fast shutdown request" in last_start and "terminating connection" not in last_start
    assert all(services.ours(int(pid), created) is None for pid, created in pids)
    data = home / "stack" / "postgres"
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(data) in " ".join(p.info["cmdline"] or [])]
    assert (data / "PG_VERSION").exists()

    again = control.up(**record["settings"])
    assert again.healthy, again.describe()
    found = _client(again).get_model_version_by_alias(MODEL, "champion")
    assert found.version == "1" and found.tags["gate.decision"] == "promoted"


def test_missing_server_programs_are_one_line_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_HOME", str(tmp_path / ".vae"))
    monkeypatch.setenv("VAE_POSTGRES_BIN", str(tmp_path))  # an empty folder
    result = runner.invoke(app, ["stack", "up", "--db", "postgres"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "apt-get install postgresql" in result.output, result.output
    assert "--db postgres" in result.output
    assert not (tmp_path / ".vae" / "stack" / "stack.json").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the data folder to the postgres user")
def test_a_data_folder_the_postgres_user_cannot_reach_is_one_clear_error(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(StackError, match="cannot reach .* is not traversable by others.*chmod o\\+x"):
        postgres.initdb(private / "pg")


@pytest.mark.slow
def test_a_gate_run_again_on_the_champion_keeps_the_decision_that_promoted_it(tmp_path, monkeypatch,
                                                                           register_model):
    """An evaluation tried again once its alias moved (the nightly retries a stage that failed late, after a
    database restart say) finds the version already champion: the recorded decision stays the one that
    promoted it."""
    from flows.evaluate import Target, gate_task
    from flows.tracking import registry
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import EvaluateRequest, IngestRequest

    monkeypatch.setenv("VAE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_ingest(IngestRequest(source="builtin:digits", name="digits"))
    version = register_model(epochs=0, name="vae-digits", preset="digits", dataset="digits")
    pinned = registry.pin_model(f"models:/vae-digits/{version}")
    request = EvaluateRequest(model=pinned.uri, iw_samples=5)
    for champion in (None, pinned):  # the first try, then the try again
        gate_task.fn(request, Target(pinned, champion, None), {"nll_k5": 90.0}, None)
    tags = registry.client().get_model_version("vae-digits", str(version)).tags
    assert (tags["gate.decision"], tags["gate.reason"]) == ("promoted", "there is no champion yet"), tags
    assert registry.alias_version("vae-digits", "champion") == version
