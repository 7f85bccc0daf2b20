"""The services of `vae stack` (see `flows.stack.control`): the command line and environment each one starts with,
the health check it answers, and the process handling that starts and stops them.

Every server listens on 127.0.0.1, except what Ray 2.60 decides for itself: `ray start` replaces a loopback
`--node-ip-address` by the machine's routable address, and so does every client that joins `127.0.0.1:PORT`,
so a head that listens on loopback only could not be joined by a driver that has nothing but RAY_ADDRESS
(docs/stack.md, "Ray and the network").
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil

from flows.stack import postgres

HOST = "127.0.0.1"
SERVERS = ("prefect", "mlflow", "ray")  # started together (after Postgres); the worker follows once Prefect answers
STOP_ORDER = ("worker", "prefect", "mlflow", "ray", "postgres")
# Inherited settings that would point a service elsewhere (another Prefect profile or database, another
# tracking server or Ray cluster): dropped, then set for the stack.
_DROPPED = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
            "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "VAE_HOME")
_SOCKET_ROOM = 38  # longest Ray temp folder whose session sockets stay under the 107-byte unix path limit
_DASHBOARD_DEPS = ("aiohttp", "aiohttp_cors", "grpc", "opencensus", "opentelemetry",
                   "opentelemetry.exporter.prometheus", "prometheus_client")


def mlflow_store(home: Path) -> str:
    """The SQLite store `flows.tracking.runs.tracking_uri()` uses when no tracking URI is set."""
    return f"sqlite:///{home / 'mlflow.db'}"  # four slashes: an absolute path


def mlflow_artifacts(home: Path) -> str:
    """`file://<home>/mlartifacts`: the root under which `flows.tracking.runs` keeps artifacts when no tracking URI is
    set. The stack's server records locations under it that clients write and read directly, so a model
    registered through the server loads from the same store once the server is gone."""
    return (home / "mlartifacts").as_uri()


def postgres_data(home: Path) -> Path:
    """The Postgres cluster of `--db postgres`, kept across `down` and `up`."""
    return home / "stack" / "postgres"


def client_prefect_home(home: Path) -> Path:
    """The PREFECT_HOME the stack exports for its clients (the worker, `prefect` commands); the server's own is
    `<home>/stack/prefect`."""
    return home / "stack" / "client-prefect"


def ray_temp_dir(home: Path) -> Path:
    """`<home>/stack/ray` when short enough for Ray's unix sockets, else a folder under the system temp
    folder named after `home`."""
    inside = home / "stack" / "ray"
    if len(str(inside)) <= _SOCKET_ROOM:
        return inside
    return Path(tempfile.gettempdir()) / f"vae-ray-{hashlib.sha1(str(home).encode()).hexdigest()[:10]}"


def dashboard_missing() -> str | None:
    """The first package Ray's dashboard needs that is not installed (`ray[default]`), or None."""
    for name in _DASHBOARD_DEPS:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ImportError:
            return name
    return None


def tool(name: str) -> str:
    """The `name` command of the Python environment running this code, else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    if found := shutil.which(name):
        return found
    raise FileNotFoundError(f"the `{name}` command is not installed in {Path(sys.executable).parent} nor on PATH")


def commands(home: Path, ports: dict[str, int], pool: str, worker_name: str, ray_cpus: int | None,
             dashboard_port: int | None, env: dict[str, str]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """(command line, environment) of each service; `env` is what the stack exports (PREFECT_API_URL, ...).
    With a "postgres" port, Postgres is a service too and holds MLflow's and the Prefect server's stores."""
    prefect_home = str(home / "stack" / "prefect")
    quiet = {"PREFECT_HOME": prefect_home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}
    store, prefect_db, specs = mlflow_store(home), {}, {}
    if (pg_port := ports.get("postgres")) is not None:
        store = postgres.url(HOST, pg_port, "mlflow", "psycopg2")
        prefect_db = {"PREFECT_API_DATABASE_CONNECTION_URL": postgres.url(HOST, pg_port, "prefect", "asyncpg")}
        specs["postgres"] = (postgres.server_command(postgres_data(home), HOST, pg_port), _environ({}))
    ray = [tool("ray"), "start", "--head", "--port", str(ports["ray"]), "--node-ip-address", HOST,
           "--temp-dir", str(ray_temp_dir(home)), "--disable-usage-stats",
           # Workers take ports from the OS, not from 10002-19999, where a chosen head port would clash.
           "--min-worker-port", "0", "--max-worker-port", "0"]
    if dashboard_port is None:
        ray += ["--include-dashboard", "false"]
    else:
        ray += ["--include-dashboard", "true", "--dashboard-host", HOST, "--dashboard-port", str(dashboard_port)]
    if ray_cpus is not None:
        ray += ["--num-cpus", str(ray_cpus)]
    ray.append("--block")  # stays in the foreground: a child that `down` stops with one signal
    return {
        **specs,
        "prefect": ([tool("prefect"), "server", "start", "--host", HOST, "--port", str(ports["prefect"])],
                    _environ({**quiet, **prefect_db})),
        "mlflow": ([tool("mlflow"), "server", "--host", HOST, "--port", str(ports["mlflow"]),
                    "--backend-store-uri", store, "--default-artifact-root", mlflow_artifacts(home),
                    # Served artifacts get `mlflow-artifacts:` URIs that only this server resolves.
                    "--no-serve-artifacts", "--workers", "1"],
                   # Its job runner (GenAI scorers: eight more processes) is not needed for training runs.
                   _environ({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                             "PYTHONUNBUFFERED": "1"})),
        "ray": (ray, _environ({"RAY_AUTH_MODE": env["RAY_AUTH_MODE"], "RAY_AUTH_TOKEN_PATH": env["RAY_AUTH_TOKEN_PATH"],
                               "PYTHONUNBUFFERED": "1"})),
        "worker": ([tool("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", worker_name],
                   _environ({**quiet, **env, "PREFECT_WORKER_QUERY_SECONDS": "2"})),
    }


def _environ(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without another Prefect profile, server or cluster, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k not in _DROPPED}
    return {**env, **extra}


# --- ports and health checks ---------------------------------------------------------------------


def port_taken(port: int) -> bool:
    """True when something listens on `port` (any address), or holds it bound without SO_REUSEADDR."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT does not count
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def _tcp_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((HOST, port)) == 0


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # http_proxy must not see loopback


def _http(url: str, body: dict | None = None) -> tuple[bool, str]:
    """(answered 2xx, the body or what went wrong) for a GET, or a POST of `body` as JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _NO_PROXY.open(request, timeout=3) as response:
            return True, response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code} from {url}"
    except (OSError, ValueError) as e:
        return False, f"no answer from {url} ({getattr(e, 'reason', e)})"


def health(name: str, port: int | None, pool: str, worker_name: str, env: dict[str, str]) -> tuple[bool, str]:
    """(healthy, detail) of one service; `port` is Prefect's for the worker, `env` the stack's exports. The
    detail says what failed, or for Ray how many CPUs the head offers."""
    if name == "ray":
        return _ray_head(port, env)
    if name == "postgres":
        return postgres.health(HOST, port)
    if name in ("prefect", "mlflow"):
        ok, text = _http(f"http://{HOST}:{port}/{'api/health' if name == 'prefect' else 'health'}")
        return ok, "" if ok else text
    ok, text = _http(f"http://{HOST}:{port}/api/work_pools/{urllib.parse.quote(pool, safe='')}/workers/filter", {})
    if not ok:
        return False, text
    status = next((w.get("status") for w in json.loads(text) if w.get("name") == worker_name), None)
    if status == "ONLINE":
        return True, f"{worker_name} polls {pool}"
    return False, f"worker {worker_name!r} of pool {pool!r}: {status or 'not registered yet'}"


# Asks the GCS for the head's CPUs. In a process of its own: Ray reads its authentication settings once per
# process, so the caller (which may have joined another cluster) could not present this stack's token.
_ASK_GCS = """
import json, sys
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
nodes = GcsClient(address=sys.argv[1]).get_all_node_info(timeout=2).values()
print(json.dumps(next((n.resources_total.get("CPU", 0.0) for n in nodes
                       if n.state == GcsNodeInfo.ALIVE and "node:__internal_head__" in n.resources_total), None)))
"""


def _ray_head(port: int, env: dict[str, str], wait: float = 30.0) -> tuple[bool, str]:
    """Whether the GCS at `port` knows an alive head node, asked with the stack's token (`env`)."""
    if not _tcp_open(port):
        return False, f"nothing listens on {HOST}:{port}"
    try:
        out = subprocess.run([sys.executable, "-c", _ASK_GCS, f"{HOST}:{port}"], capture_output=True, text=True,
                             timeout=wait, env=_environ({k: v for k, v in env.items() if k.startswith("RAY_AUTH")}))
    except subprocess.TimeoutExpired:
        return False, f"the GCS at {HOST}:{port} did not answer within {wait:g} s"
    if out.returncode != 0:
        return False, (out.stderr.strip().splitlines() or ["the GCS query failed"])[-1][:300]
    cpus = json.loads(out.stdout.strip().splitlines()[-1])
    if cpus is None:
        return False, "the head node has not registered yet"
    return True, f"{cpus:g} CPU{'' if cpus == 1 else 's'}"


# --- processes -----------------------------------------------------------------------------------

_CHILDREN: dict[int, subprocess.Popen] = {}  # kept so they are reaped, not warned about, when they end


def spawn(cmd: list[str], env: dict[str, str], log: Path, cwd: str) -> subprocess.Popen:
    """Start `cmd` in its own session (a terminal's Ctrl-C does not reach it), output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 cwd=cwd, start_new_session=True)
    _CHILDREN[child.pid] = child
    return child


def exit_code(pid: int) -> int | None:
    """The exit code of a service this process started and that has ended, else None."""
    child = _CHILDREN.get(pid)
    return None if child is None else child.poll()


def create_time(pid: int) -> float:
    return psutil.Process(pid).create_time()


def ours(pid: int | None, created: float | None) -> psutil.Process | None:
    """The live process `pid` if it is the one recorded (same start time: not a reused PID), else None."""
    if not pid or created is None:
        return None
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - created) > 0.05 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def members(pid: int, created: float, recorded: list[list[float]]) -> list[psutil.Process]:
    """Every live process of a service: its root, the root's descendants and process group (while the root is
    still the recorded process), and the descendants recorded at start-up that are still the same processes."""
    found: dict[int, psutil.Process] = {}
    if root := ours(pid, created):
        found[pid] = root
        for proc in _safe(lambda: root.children(recursive=True), []):
            found[proc.pid] = proc
        for proc in psutil.process_iter():
            if proc.pid not in found and proc.pid != os.getpid() and _safe(lambda: os.getpgid(proc.pid), -1) == pid:
                found[proc.pid] = proc
    for child_pid, child_created in recorded:
        if (proc := ours(int(child_pid), child_created)) is not None:
            found.setdefault(proc.pid, proc)
    return list(found.values())


def descendants(pid: int, created: float) -> list[list[float]]:
    """[pid, start time] of the live descendants of a service's root, recorded for `stop`."""
    root = ours(pid, created)
    return [[p.pid, p.create_time()] for p in _safe(lambda: root.children(recursive=True), [])] if root else []


def stop(groups: list[tuple[str, int, list[psutil.Process]]], timeout: float) -> list[psutil.Process]:
    """SIGTERM every process of each (name, root pid, processes) group, root first, wait up to `timeout` s for
    them to end, SIGKILL what is left. Returns the processes still alive after all that. Every process, as
    `ray stop` does for Ray: signalled alone, `ray start --block` waits for a drain that may never come. Postgres
    alone is different: SIGINT to its server process only."""
    everyone = [proc for _, _, procs in groups for proc in procs]
    for name, root, procs in groups:
        sig = signal.SIGTERM
        if name == "postgres":  # it stops its own processes; SIGINT is its fast shutdown (SIGTERM waits for clients)
            sig, procs = signal.SIGINT, [p for p in procs if p.pid == root]
        for proc in sorted(procs, key=lambda p: p.pid != root):
            _signal(proc, sig)
    left = _wait(everyone, timeout)
    for proc in left:
        _signal(proc, signal.SIGKILL)
    return _wait(left, 5.0)


def _wait(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if _alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def _alive(proc: psutil.Process) -> bool:
    """False once `proc` has ended; a zombie child of this process is reaped."""
    if child := _CHILDREN.get(proc.pid):
        if child.poll() is not None:
            del _CHILDREN[proc.pid]
            return False
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def _safe(call, default):
    try:
        return call()
    except (psutil.Error, OSError):
        return default


def log_tail(log: Path, lines: int = 6) -> str:
    """The last non-empty lines of a log, joined into one line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    kept = [ln.strip()[:240] for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(kept) or "(empty log)"
