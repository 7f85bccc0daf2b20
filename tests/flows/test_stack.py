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

import psutil
import pytest
from typer.testing import CliRunner

from flows import stack
from flows.cli import app
from tests.ports import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
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
    drop = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE", "VAE_HOME")
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
                   "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "VAE_HOME": str(home)}
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
        from flows.ray_cluster import ray_session

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
    from flows import tracking

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
    result = runner.invoke(app, ["stack", "up", *port_flags(free_ports(4)), "--json"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)
    assert again["started"] == [] and "already up: nothing started" in again["notes"]
    assert {name: s["pid"] for name, s in again["services"].items()} == {n: s["pid"] for n, s in before.items()}
    assert again["env"] == started["env"]
    quiet = runner.invoke(app, ["stack", "up", "--env"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == started["stdout"]


def test_down_stops_every_process_it_started(started, home):
    state = home / "stack" / "stack.json"
    recorded = json.loads(state.read_text())["services"]
    processes = [(p.pid, p.create_time()) for s in recorded.values()
                 for p in stack.services.members(s["pid"], s["create_time"], s["descendants"])]
    assert len(processes) > len(recorded)  # Ray's GCS, raylet, agents, ... are there too
    t0 = time.monotonic()
    result = runner.invoke(app, ["stack", "down"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"stopped worker (pid {recorded['worker']['pid']}), prefect")
    print(f"up took {started['seconds']:.1f} s, down {time.monotonic() - t0:.1f} s")
    assert [pid for pid, created in processes if not gone(pid, created)] == []
    assert not state.exists()
    assert runner.invoke(app, ["stack", "status"]).exit_code == 1
    assert runner.invoke(app, ["stack", "down"]).stdout.strip() == "nothing was running"


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
