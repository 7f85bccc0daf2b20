"""Two hosts on one machine: Linux network namespaces joined by a veth pair, each process of infra/compose.yaml
started in one of them with the environment and command line compose gives it.

Host A runs what compose's single host runs (Postgres, S3, MLflow, the Prefect server and worker, the Ray
head); host B runs a Ray worker node. The compose service names resolve inside both namespaces to host A
(`/etc/netns/<ns>/hosts`, which `ip netns exec` mounts over /etc/hosts), so compose's URLs and ports are used
verbatim: every port is private to its namespace. The filesystem is shared; only the network is separate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMPOSE = ROOT / "infra" / "compose.yaml"
README = ROOT / "infra" / "README.md"
SUBNET = "10.77.0"  # private to the two namespaces: the same /24 in another pair of namespaces does not clash
SERVICES_ON_A = ("postgres", "minio", "mlflow", "prefect-server", "ray-head")

# What a process here gets besides its compose environment, and why (infra/README.md, "What runs in tests").
LOCAL_ADDITIONS = {
    "RAY_AUTH_MODE": "disabled",  # a private cluster: no token files to hand to every process
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PYTHONUNBUFFERED": "1",  # logs arrive as written
}
# The head declares a silent node dead after about 5 s, not Ray's default of about 30 s (a faster fault test).
RAY_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
              "RAY_health_check_failure_threshold": "3"}
# The one machine's basics (an image sets these), passed on from the test's own environment.
BASE = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV")


class ComposeError(ValueError):
    """A variable compose requires (`${VAR:?message}`) is unset, or compose lacks what the cluster reads."""


_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:-|:\?)([^}]*))?\}")


def substitute(text: str, env: Mapping[str, str]) -> str:
    """`text` with `${VAR}`, `${VAR:-default}`, `${VAR:?message}` and `$$` expanded as `docker compose` does."""
    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        value = env.get(name, "")
        if op == ":?" and not value:
            raise ComposeError(f"{name} is unset: {arg}")
        return arg if op == ":-" and not value else value
    return _VARIABLE.sub(one, text)


@dataclass(frozen=True)
class Compose:
    """infra/compose.yaml as the cluster reads it, variables taken from `env` (what infra/.env would give)."""

    env: Mapping[str, str]
    doc: dict = field(default_factory=lambda: yaml.safe_load(COMPOSE.read_text()))

    def shared(self) -> dict[str, str]:
        """The `x-vae-env` block: the environment every project process reads."""
        return {k: substitute(str(v), self.env) for k, v in self.doc["x-vae-env"].items()}

    def environment(self, service: str) -> dict[str, str]:
        return {k: substitute(str(v), self.env) for k, v in self.doc["services"][service]["environment"].items()}

    def command(self, service: str, drop: tuple[str, ...] = ()) -> list[str]:
        """The service's `command` without the arguments starting with one of `drop`, its executable taken
        from this Python environment."""
        args = [substitute(str(a), self.env) for a in self.doc["services"][service]["command"]]
        exe, *args = [a for a in args if not a.startswith(drop or ("\0",))]
        return [str(BIN / exe) if (BIN / exe).exists() else exe, *args]

    def buckets(self) -> list[str]:
        """The buckets `create-buckets` makes (`mc mb ... store/NAME ...`)."""
        return re.findall(r"store/(\w+)", " ".join(self.doc["services"]["create-buckets"]["command"]))

    def databases(self) -> list[str]:
        """Postgres's databases: POSTGRES_DB and those its init script creates (infra/postgres/)."""
        sql = (COMPOSE.parent / "postgres" / "init-databases.sql").read_text()
        return [self.environment("postgres")["POSTGRES_DB"], *re.findall(r"CREATE DATABASE (\w+)", sql)]


def contract_names() -> list[str]:
    """The variable names of infra/README.md's environment-contract table."""
    section = README.read_text().split("## The environment contract", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return [name for cell in rows for name in re.findall(r"`(\w+)`", cell)]


def process_env(compose_env: Mapping[str, str], **local: str) -> dict[str, str]:
    """A process's whole environment: the machine's basics, compose's block, the local additions, `local`."""
    base = {k: os.environ[k] for k in BASE if k in os.environ}
    return {**base, **compose_env, **LOCAL_ADDITIONS, **local}


# --- hosts ---------------------------------------------------------------------------------------------


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode:
        raise OSError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass(frozen=True)
class Host:
    """A network namespace `ns` with one end `dev` of the veth pair at `ip`."""

    ns: str
    dev: str
    ip: str

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def link(self, up: bool) -> None:
        """Plug or unplug this host's cable."""
        _ip("-n", self.ns, "link", "set", self.dev, "up" if up else "down")

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


def make_hosts(tag: str) -> tuple[Host, Host]:
    """Namespaces `vae<tag>a`/`vae<tag>b` joined by a veth pair, compose's server names resolving to host A.

    Whatever is made before a failure is removed again (`remove_hosts`)."""
    a, b = Host(f"vae{tag}a", f"va{tag}", f"{SUBNET}.1"), Host(f"vae{tag}b", f"vb{tag}", f"{SUBNET}.2")
    try:
        for h in (a, b):
            _ip("netns", "add", h.ns)
        _ip("link", "add", a.dev, "type", "veth", "peer", "name", b.dev)
        for h in (a, b):
            _ip("link", "set", h.dev, "netns", h.ns)
            _ip("-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", h.dev)
            _ip("-n", h.ns, "link", "set", h.dev, "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
            hosts = Path("/etc/netns") / h.ns / "hosts"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            # Each host resolves the machine's name to its own address, as separate machines would: Gloo
            # (torch.distributed on CPUs) gives its peers the address the host name resolves to.
            hosts.write_text(f"127.0.0.1 localhost\n{h.ip} {socket.gethostname()}\n{a.ip} {' '.join(SERVICES_ON_A)}\n")
    except BaseException:
        remove_hosts(a, b)
        raise
    return a, b


def remove_hosts(*hosts: Host) -> None:
    """Kill every process left in the namespaces (all started here), then delete them and their files."""
    for h in hosts:
        for pid in h.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", h.ns], capture_output=True)
        shutil.rmtree(Path("/etc/netns") / h.ns, ignore_errors=True)


def netns_works() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`), or None."""
    if os.geteuid() != 0:
        return "the cluster tests make network namespaces: run them as root"
    if shutil.which("ip") is None:
        return "the cluster tests need `ip` (Debian package iproute2)"
    probe = f"vaeprobe{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if proc.returncode == 0 else f"`ip netns add` fails here: {proc.stderr.strip()}"


# --- processes -----------------------------------------------------------------------------------------


@dataclass
class Service:
    """A long-running process on a host, in a process group of its own, logging to `log`."""

    name: str
    host: Host
    cmd: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> Service:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.host.prefix() + self.cmd, env=self.env, cwd=ROOT, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (the process and every child it did not move elsewhere)."""
        if self.alive():
            os.killpg(self.proc.pid, sig)

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


def run_in(host: Host, cmd: list[str], env: dict[str, str], timeout: float) -> str:
    """Run `cmd` on `host` to the end; its stdout, or AssertionError with its output's tail."""
    try:
        proc = subprocess.run(host.prefix() + cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join(cmd)[:300]} on {host.ns}: no end after {timeout} s\n"
                             f"{(e.stdout or b'')[-3000:].decode(errors='replace')}") from None
    assert proc.returncode == 0, f"{' '.join(cmd)[:300]} on {host.ns}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def python_in(host: Host, code: str, env: dict[str, str], timeout: float = 120) -> Any:
    """Run Python `code` on `host`; the JSON it prints last."""
    return json.loads(run_in(host, [sys.executable, "-c", code], env, timeout).strip().splitlines()[-1])


def wait_ports(host: Host, ports: dict[str, int], env: dict[str, str], timeout: float) -> None:
    """Until something listens on each of `ports` (name -> port) on `host`, or AssertionError naming the missing."""
    code = ("import socket, time, json\n"
            f"ports, end = {ports!r}, time.monotonic() + {timeout}\n"
            "def up(p):\n"
            f"    try: socket.create_connection(({host.ip!r}, p), 1).close(); return True\n"
            "    except OSError: return False\n"
            "while (missing := [n for n, p in ports.items() if not up(p)]) and time.monotonic() < end:\n"
            "    time.sleep(0.3)\n"
            "print(json.dumps(missing))\n")
    missing = python_in(host, code, env, timeout + 30)
    assert not missing, f"nothing listens for {missing} on {host.ns} after {timeout} s"



def stored_state() -> dict:
    """(Run on host A.) What the cluster holds: dataset versions of `mnist`, the objects under the embeddings
    and checkpoint roots (key -> last modified), registered model versions, champions, and every MLflow run
    with its status, resumptions and recorded failures."""
    import mlflow

    from vae_core.settings import checkpoint_root, data_root, embeddings_root
    from vae_core.storage import resolve

    fs, datasets = resolve(data_root())
    objects = {name: {k: str(v.get("LastModified")) for k, v in fs.find(resolve(url)[1], detail=True).items()}
               for name, url in (("embeddings", embeddings_root()), ("checkpoints", checkpoint_root()))}
    client = mlflow.MlflowClient()
    models = {m.name: sorted(int(v.version) for v in client.search_model_versions(f"name='{m.name}'"))
              for m in client.search_registered_models()}
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    return {
        "datasets": sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{datasets}/mnist", detail=False))
        if fs.exists(f"{datasets}/mnist") else [],
        **objects,
        "models": models,
        "champions": {m: v.version for m in models for a, v in [("champion", _alias(client, m))] if v},
        "runs": {r.info.run_id: {"status": r.info.status, "resumed": r.data.metrics.get("resumed_from_epoch"),
                                 "failures": {k: v[:300] for k, v in sorted(r.data.tags.items())
                                              if k.startswith("failure/")},
                                 "nodes": r.data.tags.get("ray.worker_nodes"),
                                 # when a run failed: the epochs it logged, and when, to read the story from
                                 "epochs": [(m.step, m.timestamp) for m in client.get_metric_history(
                                     r.info.run_id, "epoch/loss")] if any(k.startswith("failure/") for k in r.data.tags)
                                 else None} for r in runs},
    }


def _alias(client, model: str):
    """Model version `model`@champion, or None."""
    try:
        return client.get_model_version_by_alias(model, "champion")
    except Exception:  # MLflow raises its RestException for a missing alias
        return None


def champion_encodes(model: str, rows: int) -> float:
    """(Run on any host.) Pull `models:/MODEL@champion` fresh, encode the first `rows` images of the test split
    of the dataset it was trained on, and return the largest difference between those means and the ones
    encode-dataset stored for the same ids."""
    import mlflow
    import numpy as np

    from vae_core.data.embeddings import read_embeddings
    from vae_core.data.shards import open_dataset, read_split_u8
    from vae_core.settings import data_root, embeddings_root

    version = mlflow.MlflowClient().get_model_version_by_alias(model, "champion")
    dataset = mlflow.get_run(version.run_id).data.tags["dataset_version"]
    info = open_dataset(data_root(), "mnist", dataset)
    images, _, ids = read_split_u8(info, "test")
    got = mlflow.pyfunc.load_model(f"models:/{model}@champion").predict(images[:rows])["mean"]
    table = read_embeddings(f"{embeddings_root()}/{model}/{version.version}/mnist/{dataset}")
    stored = dict(zip(table.column("id").to_pylist(), table.column("mean").to_pylist()))
    return float(np.abs(got - np.array([stored[i] for i in ids[:rows]])).max())
