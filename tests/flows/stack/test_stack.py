"""`vae stack`: real Prefect, MLflow and Ray servers and a Prefect worker under a throwaway VAE_HOME, on free ports.

One stack serves the module (starting it takes most of the time); the tests run in file order and the last one
stops it. Whatever happens, the fixture stops it too.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from typer.testing import CliRunner

from flows.cli.app import app
from flows.stack import control as stack
from tests.ports import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[3]
VAE = str(Path(sys.executable).parent / "vae")
RAY_CPUS = 1
runner = CliRunner()


def port_flags(ports: list[int]) -> list[str]:
    return ["--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1]), "--ray-port", str(ports[2]),
            "--ray-dashboard-port", str(ports[3])]


def gone(pid: int, created: float) -> bool:
    """The recorded process has ended (a zombie, or a new process under the same pid, counts as ended)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() == psutil.STATUS_ZOMBIE or abs(proc.create_time() - created) > 0.05
    except psutil.NoSuchProcess:
        return True


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without settings that point at other servers, plus `extra`."""
    drop = ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE", "VAE_HOME")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A VAE_HOME for the module, set in os.environ (for the Python API and CliRunner) and restored after."""
    root = tmp_path_factory.mktemp("stack") / ".vae"
    before = os.environ.get("VAE_HOME")
    os.environ["VAE_HOME"] = str(root)
    yield root
    if before is None:
        os.environ.pop("VAE_HOME", None)
    else:
        os.environ["VAE_HOME"] = before


@pytest.fixture(scope="module")
def started(home):
    """`vae stack up` run as a user runs it, over a stale state file; the stack is stopped at the end regardless."""
    stale = subprocess.Popen(["true"])
    stale.wait()
    (home / "stack").mkdir(parents=True)
    (home / "stack" / "stack.json").write_text(json.dumps({"services": {"prefect": {
        "pid": stale.pid, "create_time": 1.0, "port": 1, "url": "http://127.0.0.1:1", "log": "x"}}}))
    ports = free_ports(4)
    try:
        t0 = time.monotonic()
        out = subprocess.run([VAE, "stack", "up", *port_flags(ports), "--ray-cpus", str(RAY_CPUS), "--timeout", "150"],
                             capture_output=True, text=True, env=clean_env(VAE_HOME=str(home)), timeout=200)
        seconds = time.monotonic() - t0
        assert out.returncode == 0, out.stderr
        exports = dict(shlex.split(line)[1].split("=", 1) for line in out.stdout.splitlines())
        yield {"ports": ports, "stdout": out.stdout, "stderr": out.stderr, "env": exports, "seconds": seconds}
    finally:
        stack.down()


def test_up_starts_every_service_healthy_and_prints_the_exports(started, home):
    ports, env = started["ports"], started["env"]
    assert all(line.startswith("export ") for line in started["stdout"].splitlines())  # eval-able: nothing else
    token = home / "stack" / "ray-token"
    assert env == {"PREFECT_API_URL": f"http://127.0.0.1:{ports[0]}/api",
                   "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports[1]}", "RAY_ADDRESS": f"127.0.0.1:{ports[2]}",
                   "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "VAE_HOME": str(home),
                   "PREFECT_HOME": str(home / "stack" / "client-prefect")}
    assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_text()) == 64
    assert "replaced a stale" in started["stderr"]
    assert f"http://127.0.0.1:{ports[0]}" in started["stderr"] and f"http://127.0.0.1:{ports[1]}" in started["stderr"]

    result = runner.invoke(app, ["stack", "status", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["state"] == str(home / "stack" / "stack.json") and report["env"] == env
    assert {name: (s["healthy"], s["port"]) for name, s in report["services"].items()} == {
        "prefect": (True, ports[0]), "mlflow": (True, ports[1]), "ray": (True, ports[2]), "worker": (True, None)}
    assert report["services"]["ray"]["detail"] == f"{RAY_CPUS} CPU"
    for name in ("prefect", "mlflow", "ray", "worker"):
        assert (home / "stack" / "logs" / f"{name}.log").stat().st_size > 0
    # Prefect and MLflow listen on loopback only.
    recorded = json.loads((home / "stack" / "stack.json").read_text())["services"]
    pids = {p.pid for name in ("prefect", "mlflow") for p in stack.services.members(
        recorded[name]["pid"], recorded[name]["create_time"], [])}
    listening = {c.laddr.ip for c in psutil.net_connections("inet") if c.pid in pids and c.status == "LISTEN"}
    assert listening == {"127.0.0.1"}


def test_a_prefect_command_with_the_exports_keeps_its_state_under_the_stack(started, home, tmp_path):
    """The exports' PREFECT_HOME: a plain `prefect` command in a shell that evals them writes its profile under
    the stack, not ~/.prefect."""
    user = tmp_path / "user"
    user.mkdir()
    out = subprocess.run([str(Path(sys.executable).parent / "prefect"), "profile", "create", "stack-check"],
                         capture_output=True, text=True, env=clean_env(**started["env"], HOME=str(user)), timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stack-check" in (home / "stack" / "client-prefect" / "profiles.toml").read_text()
    assert list(user.iterdir()) == []


def test_a_driver_and_a_second_node_join_the_ray_head_with_its_token(started):
    """A driver whose environment holds only the Ray exports (address and token) joins through `ray_session`,
    while a second node joins with `ray start --address` and the exported environment; a driver without the
    token is refused."""
    address = started["env"]["RAY_ADDRESS"]
    node = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--address", address,
                             "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--block"],
                            env=clean_env(**started["env"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    driver = textwrap.dedent("""
        import json, time
        import ray
        from flows.distributed.cluster import ray_session

        @ray.remote(num_cpus=1)
        def square(x):
            return x * x

        with ray_session():
            deadline = time.time() + 60
            while sum(n["Alive"] for n in ray.nodes()) < 2 and time.time() < deadline:
                time.sleep(0.5)
            alive = [n for n in ray.nodes() if n["Alive"]]
            head = next(n for n in alive if "node:__internal_head__" in n["Resources"])
            print(json.dumps({"head_cpus": head["Resources"]["CPU"], "nodes": len(alive),
                              "squares": ray.get([square.remote(i) for i in range(3)])}))
    """)
    try:
        only = {k: v for k, v in started["env"].items() if k.startswith("RAY_")}
        base = {"PATH": os.environ["PATH"], "HOME": os.environ["HOME"]}
        out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env={**base, **only},
                             cwd=REPO, timeout=150)
        assert out.returncode == 0, out.stderr[-3000:]
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen == {"head_cpus": RAY_CPUS, "nodes": 2, "squares": [0, 1, 4]}

        stranger = {**base, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
        refused = subprocess.run([sys.executable, "-c", "import ray; ray.init(); print(ray.nodes())"],
                                 capture_output=True, text=True, env=stranger, cwd=REPO, timeout=150)
        assert refused.returncode != 0 and "nodes" not in refused.stdout, refused.stdout
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)


def test_a_run_logged_through_the_server_lands_in_the_vae_home_store(started, home, monkeypatch):
    from flows.tracking import runs as tracking

    uri = started["env"]["MLFLOW_TRACKING_URI"]
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"{uri}/health", timeout=10) as r:
        assert r.read() == b"OK"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    run_id = tracking.start_run("stack-check", "through-the-server", {"purpose": "test"})
    logger = tracking.RunLogger(run_id)
    logger.log_metrics({"loss": 1.25}, step=0)
    logger.finish()
    with sqlite3.connect(home / "mlflow.db") as db:
        assert db.execute("select status from runs where run_uuid = ?", (run_id,)).fetchall() == [("FINISHED",)]
        assert db.execute("select value from metrics where run_uuid = ?", (run_id,)).fetchall() == [(1.25,)]


def test_up_again_starts_nothing(started, home):
    before = json.loads((home / "stack" / "stack.json").read_text())["services"]
    result = runner.invoke(app, ["stack", "up", *port_flags(started["ports"]), "--json"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)
    assert again["started"] == [] and "already up: nothing started" in again["notes"]
    assert {name: s["pid"] for name, s in again["services"].items()} == {n: s["pid"] for n, s in before.items()}
    assert again["env"] == started["env"]
    quiet = runner.invoke(app, ["stack", "up", "--env"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == started["stdout"]


def test_up_with_other_ports_while_up_names_the_ports_in_use(started, home):
    ports, other = started["ports"], free_ports(6)[-1]
    state = (home / "stack" / "stack.json").read_text()
    result = runner.invoke(app, ["stack", "up", "--mlflow-port", str(other), "--ray-port", str(ports[2])])
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert line.startswith(f"error: a stack is already up under VAE_HOME={home} with mlflow port {ports[1]} "
                           f"(asked {other}); in use: prefect {ports[0]}, mlflow {ports[1]}, ray {ports[2]}"), line
    assert line.endswith("or restart it on others: `vae stack down`, then `vae stack up "
                         f"--mlflow-port {other} --ray-port {ports[2]}`"), line
    assert "\n" not in line and (home / "stack" / "stack.json").read_text() == state


@pytest.fixture(scope="module")
def registered(started, home, register_model):
    """A digits model trained for one epoch and registered through the stack's MLflow server as
    `vae-digits@champion`; the dataset is under the module's VAE_HOME."""
    from flows.tracking import registry, runs as tracking
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    run_ingest(IngestRequest(source="builtin:digits", name="digits", data_root=str(home / "datasets")))
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = started["env"]["MLFLOW_TRACKING_URI"]
    try:
        version = register_model(epochs=1, name="vae-digits", preset="digits", dataset="digits")
        registry.set_alias("vae-digits", "champion", version)
        client = tracking.client()
        mv = client.get_model_version("vae-digits", str(version))
        found = {"version": version, "run_artifacts": client.get_run(mv.run_id).info.artifact_uri,
                 "model_artifacts": client.get_model_version_download_uri("vae-digits", str(version))}
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
    return found


def test_a_model_registered_through_the_server_is_stored_by_path(registered, home):
    """The server records artifact locations that the commands open themselves (under $VAE_HOME/mlartifacts),
    not `mlflow-artifacts:` URIs that only the server resolves."""
    root = (home.resolve() / "mlartifacts").as_uri() + "/"
    assert registered["run_artifacts"].startswith(root) and registered["model_artifacts"].startswith(root), registered


def test_down_stops_every_process_it_started(started, home):
    state = home / "stack" / "stack.json"
    recorded = json.loads(state.read_text())["services"]
    processes = [(p.pid, p.create_time()) for s in recorded.values()
                 for p in stack.services.members(s["pid"], s["create_time"], s["descendants"])]
    assert len(processes) > len(recorded)  # Ray's GCS, raylet, agents, ... are there too
    mlflow = recorded["mlflow"]
    os.kill(mlflow["pid"], signal.SIGKILL)  # a service that died before `down`: its workers are left behind
    while not gone(mlflow["pid"], mlflow["create_time"]):
        time.sleep(0.05)
    t0 = time.monotonic()
    result = runner.invoke(app, ["stack", "down"])
    assert result.exit_code == 0, result.output
    pids = {name: s["pid"] for name, s in recorded.items()}
    lines = result.stdout.splitlines()
    assert lines[0] == f"stopped worker (pid {pids['worker']}), prefect (pid {pids['prefect']}), ray (pid {pids['ray']})"
    # "(N of its processes stopped)" follows when its workers had not noticed yet
    assert len(lines) == 2 and lines[1].startswith(f"mlflow (pid {pids['mlflow']}): had already exited"), lines
    print(f"up took {started['seconds']:.1f} s, down {time.monotonic() - t0:.1f} s")
    assert [pid for pid, created in processes if not gone(pid, created)] == []
    assert not state.exists()
    assert runner.invoke(app, ["stack", "status"]).exit_code == 1
    assert runner.invoke(app, ["stack", "down"]).stdout.strip() == "nothing was running"


def test_a_model_registered_through_the_stack_is_used_after_down(registered, home, prefect_server):
    """Once `down` ran: `mlflow.pyfunc.load_model` on VAE_HOME's store, then `vae evaluate` and `vae encode` as a
    user runs them, with no MLFLOW_TRACKING_URI. Their flows report to the session's Prefect server: a temporary
    one of their own would add its start-up (about 20 s each) and nothing this test looks at."""
    import mlflow
    from prefect.settings import PREFECT_API_URL

    from flows.tracking import runs as tracking
    from vae_core.data.embeddings import read_embeddings
    from vae_core.data.shards import open_dataset, read_split_u8

    assert not (home / "stack" / "stack.json").exists()  # the stack is down (the test before stopped it)
    test_images = read_split_u8(open_dataset(str(home / "datasets"), "digits"), "test")[0]
    tracking.configure()  # the store under VAE_HOME, as the commands use it without a server
    try:
        latents = mlflow.pyfunc.load_model("models:/vae-digits@champion").predict(test_images[:16])
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert latents["mean"].shape[0] == 16 and np.isfinite(latents["mean"]).all()

    env = clean_env(VAE_HOME=str(home), PREFECT_API_URL=PREFECT_API_URL.value())
    for args in (["evaluate", "--iw-samples", "5", "--limit", "50", "--map-points", "10", "--no-promote"],
                 ["encode", "--splits", "test"]):
        out = subprocess.run([VAE, *args, "--model", "models:/vae-digits@champion", "--dataset", "digits", "--json"],
                             capture_output=True, text=True, env=env, cwd=home.parent, timeout=280)
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["model_uri"] == f"models:/vae-digits/{registered['version']}", result
    assert result["rows"] == {"test": len(test_images)}
    assert read_embeddings(result["output"]).num_rows == len(test_images)


def test_a_malformed_state_file_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_HOME", str(tmp_path / ".vae"))
    state = tmp_path / ".vae" / "stack" / "stack.json"
    state.parent.mkdir(parents=True)
    for record, problem in (({"services": {"prefect": {"port": 1}}}, "services.prefect.pid: Field required"),
                            ({"services": []}, "services: Input should be an object"),
                            ([], "Input should be an object"),
                            ({"services": {"ray": {"pid": "x", "create_time": 1.0, "port": 1, "url": "u", "log": "l"}}},
                             "services.ray.pid: Input should be a valid integer")):
        state.write_text(json.dumps(record))
        for command in (["stack", "status"], ["stack", "down"], ["stack", "up"]):
            result = runner.invoke(app, command)
            assert result.exit_code == 1, (command, result.output)
            line = result.stderr.strip()
            assert line.startswith(f"error: {state} is not a state file that `vae stack up` wrote ({problem}"), line
            assert line.endswith("stop the processes it names if any still run, remove it, then `vae stack up`"), line
            assert "\n" not in line and state.exists()


def test_down_spares_a_live_process_that_reused_a_recorded_pid(tmp_path, monkeypatch):
    """PIDs wrap: by the time `down` runs, a pid recorded for a service (a root, or a descendant recorded at
    start-up) may be another program's. It is not signalled, nor is its process group swept."""
    monkeypatch.setenv("VAE_HOME", str(tmp_path / ".vae"))
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)  # its own process group
    try:
        created = psutil.Process(bystander.pid).create_time()
        service = {"pid": bystander.pid, "create_time": created - 60, "port": 1, "url": "http://127.0.0.1:1",
                   "log": "x", "cmd": ["prefect", "server", "start"], "descendants": []}
        ray = {**service, "pid": 999_999_999, "descendants": [[bystander.pid, created - 30]]}
        state = tmp_path / ".vae" / "stack" / "stack.json"
        state.parent.mkdir(parents=True)
        state.write_text(json.dumps({"services": {"prefect": service, "ray": ray}}))
        result = runner.invoke(app, ["stack", "down", "--timeout", "1"])
        assert result.exit_code == 0, result.output
        time.sleep(0.5)
        assert bystander.poll() is None and not state.exists()
        assert result.stdout.splitlines() == [f"prefect (pid {bystander.pid}): had already exited",
                                              "ray (pid 999999999): had already exited"]
    finally:
        bystander.kill()
        bystander.wait()


def test_a_taken_port_is_one_error_line_and_nothing_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_HOME", str(tmp_path / ".vae"))
    ports = free_ports(4)
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[1]))
        result = runner.invoke(app, ["stack", "up", *port_flags(ports)])
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"error: mlflow port {ports[1]} is already in use on this machine; pick another "
                                     "with --mlflow-port (nothing was started)")
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children
    assert not (tmp_path / ".vae" / "stack" / "stack.json").exists()
    assert not (tmp_path / ".vae" / "stack" / "logs").exists()
