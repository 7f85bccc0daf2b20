"""One cluster per module, down before the rest of the suite runs: infra/compose.yaml's services on two hosts
(network namespaces), with the deployments of deploy/prefect.yaml applied; taken down, namespaces and
/etc/netns files included, whatever happens.

Images are replaced by what runs on this machine: moto's S3 server for MinIO, PostgreSQL's packaged server
(flows/stack/postgres.py) for the postgres image, this checkout's .venv for the project image.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.harness import (BIN, RAY_HEALTH, Compose, Host, Service, contract_names, make_hosts, netns_works,
                                   process_env, python_in, remove_hosts, run_in, wait_ports)
from tests.processes import eventually

# What infra/.env would hold; the CPU counts make each Ray node fit exactly one 2-CPU training rank.
TEST_ENV = {"POSTGRES_USER": "vae", "POSTGRES_PASSWORD": "cluster-test", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "RAY_HEAD_NUM_CPUS": "2", "RAY_WORKER_NUM_CPUS": "2"}
SETUP_S: dict[str, float] = {}  # seconds the session's cluster took to come up, for the report


class Cluster:
    """The services of compose on hosts `a` (servers, Prefect worker, Ray head) and `b` (a Ray worker)."""

    def __init__(self, a: Host, b: Host, tmp: Path) -> None:
        self.a, self.b, self.tmp = a, b, tmp
        self.compose = Compose(TEST_ENV)
        self.services: dict[str, Service] = {}
        self.t0 = time.monotonic()

    def env(self, **local: str) -> dict[str, str]:
        """A project process's environment: compose's `x-vae-env` and the local additions."""
        return process_env(self.compose.shared(), PREFECT_HOME=str(self.tmp / "cli-prefect"), **local)

    def start(self, name: str, host: Host, cmd: list[str], env: dict[str, str]) -> Service:
        self.services[name] = Service(name, host, cmd, env, self.tmp / f"{name}.log").start()
        return self.services[name]

    def up(self) -> None:
        """Every service, each started as soon as what it needs answers, then the deployments applied."""
        missing = set(contract_names()) - set(self.compose.shared())
        assert not missing, f"infra/compose.yaml's x-vae-env lacks the contract's {sorted(missing)}"
        c, quiet = self.compose, process_env({})
        # Ray Client's server needs `ray[client]`, which this environment lacks (the image has ray[default]).
        self.start("ray-head", self.a, c.command("ray-head", drop=("--ray-client-server-port",)) + self._ray_node(self.a),
                   process_env(c.environment("ray-head"), **RAY_HEALTH))
        self._storage()
        # MLflow's job runner (GenAI scorers: more processes) is not needed by training runs.
        self.start("mlflow", self.a, c.command("mlflow"),
                   process_env(c.environment("mlflow"), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        self.start("prefect-server", self.a, c.command("prefect-server"),
                   process_env(c.environment("prefect-server"), PREFECT_HOME=str(self.tmp / "prefect-server")))
        self._lap("storage")
        wait_ports(self.a, {"ray-head": 6379}, quiet, 120)
        self.start("ray-worker", self.b, c.command("ray-worker") + self._ray_node(self.b),
                   process_env(c.environment("ray-worker")))
        wait_ports(self.a, {"prefect-server": 4200}, quiet, 120)
        # Compose starts the worker through `with-ray-node`, which joins the cluster as a node with no CPUs
        # so that a flow run (a Ray driver) has a raylet beside it; host A's head already is that node.
        self.start("prefect-worker", self.a, c.command("prefect-worker", drop=("with-ray-node",)),
                   process_env(c.environment("prefect-worker"), PREFECT_HOME=str(self.tmp / "worker-prefect")))
        wait_ports(self.a, {"mlflow": 5000, "prefect-worker (--with-healthcheck)": 8080}, quiet, 120)
        assert self.ray_nodes() == 2, "host B's Ray node did not join the head"
        self._lap("servers")
        self.cli("prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
        self._lap("deploy")

    def _lap(self, what: str) -> None:
        """Record the seconds since the last lap as `what`'s set-up time."""
        now = time.monotonic()
        SETUP_S[what] = now - getattr(self, "_t", self.t0)
        self._t = now

    def _storage(self) -> None:
        """Postgres with compose's databases, and the S3 store with compose's buckets, on host A."""
        from flows.stack import postgres

        assert TEST_ENV["POSTGRES_USER"] == postgres.USER, "the test's role must be the one initdb makes"
        data = self.tmp / "postgres"
        postgres.initdb(data)
        # initdb trusts loopback only; the image lets every host in with a password, this trusts the hosts'
        # private /24 (clients reach `postgres` at host A's address, even on host A).
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write(f"host all {postgres.USER} {self.a.ip.rsplit('.', 1)[0]}.0/24 trust\n")
        self.start("postgres", self.a, postgres.server_command(data, "0.0.0.0", 5432), process_env({}))
        self.start("minio", self.a, [str(BIN / "moto_server"), "-H", "0.0.0.0", "-p", "9000"], process_env({}))
        wait_ports(self.a, {"postgres": 5432, "minio": 9000}, process_env({}), 60)
        buckets = json.dumps(self.compose.buckets())
        python_in(self.a, f"from flows.stack.postgres import create_databases\n"
                          f"create_databases('postgres', 5432, {tuple(self.compose.databases())!r})\n"
                          f"import boto3\ns3 = boto3.client('s3')\n"
                          f"for b in {buckets}: s3.create_bucket(Bucket=b)\nprint('[]')", self.env())

    def _ray_node(self, host: Host) -> list[str]:
        """What a Ray node here needs beyond compose's command: its own temp folder (the filesystem is shared,
        and a short path keeps Ray's unix sockets under their length limit) and its host's address."""
        temp = Path(tempfile.gettempdir()) / f"r{os.getpid()}{host.ns[-1]}"
        return ["--temp-dir", str(temp), "--node-ip-address", host.ip]

    def ray_nodes(self, timeout: float = 60) -> int:
        """Alive Ray nodes, asked from host A as a driver would; waits up to `timeout` s for a second one."""
        code = ("import json, time, ray\nray.init(log_to_driver=False)\n"
                f"end = time.monotonic() + {timeout}\n"
                "while (n := sum(x['Alive'] for x in ray.nodes())) < 2 and time.monotonic() < end: time.sleep(1)\n"
                "print(json.dumps(n))")
        return python_in(self.a, code, self.env(), timeout + 60)

    def cli(self, *args: str, host: Host | None = None, timeout: float = 300) -> str:
        """A command of this Python environment run on `host` (default A) with the project's environment."""
        return run_in(host or self.a, [str(BIN / args[0]), *args[1:]], self.env(), timeout)

    def deployment(self, name: str, request: dict, timeout: float = 300) -> str:
        """`prefect deployment run NAME --param request=... --watch`: fails unless the run ends Completed."""
        try:
            return self.cli("prefect", "deployment", "run", name, "--param", f"request={json.dumps(request)}",
                            "--watch", timeout=timeout)
        except AssertionError as e:  # the flow run's own output is in the worker's log
            raise AssertionError(f"{e}\n--- prefect-worker ---\n{self.services['prefect-worker'].tail(40)}") from None

    def stored(self) -> dict:
        """What the cluster holds (tests.cluster.harness.stored_state), read from host A."""
        return python_in(self.a, "import json\nfrom tests.cluster.harness import stored_state\n"
                                 "print(json.dumps(stored_state()))", self.env())

    def down(self) -> None:
        # SIGTERM to every group at once, a bounded wait, then whatever is left in the namespaces is killed.
        for service in self.services.values():
            service.kill(signal.SIGTERM)
        eventually(lambda: not any(s.alive() for s in self.services.values()), timeout=10, every=0.2)
        remove_hosts(self.a, self.b)
        for host in (self.a, self.b):
            shutil.rmtree(self._ray_node(host)[1], ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """The cluster, up and deployed; skipped with the reason when namespaces cannot be made here."""
    if (why := netns_works()) is not None:
        pytest.skip(why)
    # Not pytest's tmp_path: its folders are private to root, and PostgreSQL runs as the `postgres` user.
    tmp = Path(tempfile.mkdtemp(prefix="vae-cluster-"))
    tmp.chmod(0o755)
    a, b = make_hosts(str(os.getpid()))
    made = Cluster(a, b, tmp)
    try:
        made.up()
        SETUP_S["total"] = time.monotonic() - made.t0
        print(f"\ncluster set-up: {json.dumps({k: round(v, 1) for k, v in SETUP_S.items()})}")
        yield made
    except BaseException:
        for name, service in made.services.items():
            print(f"--- {name} (alive: {service.alive()}) ---\n{service.tail()}")
        raise
    finally:
        made.down()
        shutil.rmtree(tmp, ignore_errors=True)
