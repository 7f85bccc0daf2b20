"""The local stack for deployments on one machine: a Prefect server, a Prefect worker for a process work
pool, an MLflow tracking server over the project's own SQLite store, and a Ray head (`vae stack up`). With
`db="postgres"`, a private PostgreSQL cluster (`flows.stack.postgres`, data in `stack/postgres/`) holds
MLflow's and Prefect's stores instead: it starts first and stops last.

Everything is under `$VAE_HOME/stack/`: `stack.json` (what `up` started: PIDs, ports, command lines),
`logs/<service>.log`, `prefect/` (the server's PREFECT_HOME). `up` starts nothing while the recorded stack
answers its health checks; `down` stops exactly what `up` recorded. The services and their processes are
`flows.stack.services`, the state file and the stack as `status` shows it `flows.stack.state`; the guide is
docs/stack.md.

    stack = up(prefect_port=4200, mlflow_port=5000, ray_port=6379)
    os.environ.update(stack.env)     # PREFECT_API_URL, MLFLOW_TRACKING_URI, RAY_ADDRESS, VAE_HOME, ...
    down()
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from flows.stack import postgres, services, state
from flows.stack.services import HOST
from flows.stack.state import Service, Stack, StackError

ORDER = ("postgres", "prefect", "mlflow", "ray", "worker")
DATABASES = ("sqlite", "postgres")
EXITED = "had already exited"  # how `down` names a service whose process had ended before it ran
RAY_GRACE_S = 3.0  # seconds Ray's processes get between SIGTERM and SIGKILL
# What `up` takes; an option left out is the running stack's, else this default.
DEFAULTS: dict[str, int | str | None] = {"prefect_port": 4200, "mlflow_port": 5000, "ray_port": 6379,
                                         "ray_dashboard_port": 8265, "pool": "vae-local", "ray_cpus": None,
                                         "db": "sqlite", "postgres_port": 5432}
_LABELS = {"prefect_port": "prefect port", "mlflow_port": "mlflow port", "ray_port": "ray port",
           "ray_dashboard_port": "ray dashboard port", "pool": "pool", "ray_cpus": "ray CPUs", "db": "db",
           "postgres_port": "postgres port"}
_POOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def up(prefect_port: int | None = None, mlflow_port: int | None = None, ray_port: int | None = None,
       pool: str | None = None, ray_cpus: int | None = None, ray_dashboard_port: int | None = None,
       db: str | None = None, postgres_port: int | None = None, timeout: float = 180.0,
       say: Callable[[str], None] | None = None) -> Stack:
    """Start the stack under the current $VAE_HOME and wait until every service answers its health check.
    An option left None is the running stack's, else its value in `DEFAULTS`.

    When the recorded stack is running and healthy, nothing starts and it is returned (`started` empty); a
    state file whose processes have all ended is replaced. Every port is checked before anything starts. If a
    service fails or `timeout` s pass, what this call started is stopped. `say` gets progress lines.

    Raises:
        StackError: a port is taken, the recorded stack is running but unhealthy or with other ports, pool,
            CPUs or db than asked, Postgres's programs are missing (db "postgres"), a service did not come up.
    """
    say = say or (lambda _line: None)
    home = state.stack_home()
    asked = {key: value for key, value in {"prefect_port": prefect_port, "mlflow_port": mlflow_port,
             "ray_port": ray_port, "ray_dashboard_port": ray_dashboard_port, "pool": pool,
             "ray_cpus": ray_cpus, "db": db, "postgres_port": postgres_port}.items() if value is not None}
    settings = {**DEFAULTS, **asked}
    if not _POOL.fullmatch(settings["pool"]):
        raise StackError(f"work pool name {settings['pool']!r} must use only letters, digits, '.', '_', '-'")
    if ray_cpus is not None and ray_cpus < 1:
        raise StackError(f"ray_cpus must be at least 1, got {ray_cpus}")
    if settings["db"] not in DATABASES:
        raise StackError(f"db must be one of {', '.join(DATABASES)}, got {settings['db']!r}")
    with state.locked(home):
        if (record := state.read(home)) is not None:
            current = _inspect(home, record)
            if current.healthy:
                _check_same(home, record, asked)
                current.notes.append("already up: nothing started")
                return current
            if running := [s.name for s in current.services.values() if s.alive]:
                unwell = "; ".join(f"{s.name}: {s.detail}" for s in current.services.values() if not s.healthy)
                raise StackError(f"the stack in {state.state_path(home)} is running ({', '.join(running)}) but not "
                                 f"healthy ({unwell}); `vae stack down` stops it, then `vae stack up`")
            state.forget(home, record)
            say(f"replaced a stale {state.state_path(home)} (its processes had ended)")
        record, plan = _plan(home, settings)
        deadline = time.monotonic() + timeout
        try:
            if "postgres" in plan:
                _start_postgres(home, record, plan["postgres"], deadline, timeout, say)
            for name in services.SERVERS:
                _start(home, record, name, plan[name], say)
            _wait(record, ["prefect"], deadline, timeout, say)
            _start(home, record, "worker", plan["worker"], say)
            _wait(record, ["mlflow", "ray", "worker"], deadline, timeout, say)
            for svc in record["services"].values():
                svc["descendants"] = services.descendants(svc["pid"], svc["create_time"])
            state.write(home, record)
        except BaseException:  # a failed service, a timeout, Ctrl-C: stop what this call started
            _stop(record, timeout=2.5)  # within the 5 s an interrupted command has (flows.cli.outcome)
            state.forget(home, record)
            raise
    stack = _inspect(home, record)
    stack.started = [name for name in ORDER if name in record["services"]]
    return stack


def down(timeout: float = 20.0) -> list[str]:
    """Stop the stack recorded under the current $VAE_HOME: the worker first, then Prefect, MLflow and Ray,
    each with SIGTERM, then SIGKILL for what is left after `timeout` s (Ray: `RAY_GRACE_S` at most), their
    children and process groups included, and Postgres last (its data stays). Removes the state file. Returns
    one entry per recorded service ("worker (pid 123)", or "mlflow (pid 124): had already exited"); [] when
    no stack is recorded.

    Raises:
        StackError: a process survived SIGKILL (the state file is kept, so `down` can be run again).
    """
    home = state.stack_home()
    with state.locked(home):
        if (record := state.read(home)) is None:
            return []
        stopped, left = _stop(record, timeout)
        if left:
            pids = ", ".join(str(p.pid) for p in left)
            raise StackError(f"could not stop pids {pids}; {state.state_path(home)} is kept")
        state.forget(home, record)
    return stopped


def status() -> Stack:
    """The stack recorded under the current $VAE_HOME, each service checked now (no services: none recorded)."""
    home = state.stack_home()
    record = state.read(home)
    return _inspect(home, record) if record is not None else Stack(str(home), str(state.state_path(home)))


# --- starting, checking, stopping ----------------------------------------------------------------


def _plan(home: Path, settings: dict) -> tuple[dict, dict[str, dict]]:
    """The state record (nothing started yet) and each service's plan (command, environment, port, URL), once
    every port is known free. `settings` holds every key of `DEFAULTS`."""
    prefect_port, mlflow_port, ray_port = settings["prefect_port"], settings["mlflow_port"], settings["ray_port"]
    pool, ray_cpus, ray_dashboard_port = settings["pool"], settings["ray_cpus"], settings["ray_dashboard_port"]
    missing = services.dashboard_missing()
    ports = {"prefect": prefect_port, "mlflow": mlflow_port, "ray": ray_port}
    if missing is None:
        ports["ray dashboard"] = ray_dashboard_port
    if settings["db"] == "postgres":  # missing server programs: `services.commands` says so, before any start
        ports["postgres"] = settings["postgres_port"]
    flags = {"prefect": "--prefect-port", "mlflow": "--mlflow-port", "ray": "--ray-port",
             "ray dashboard": "--ray-dashboard-port", "postgres": "--postgres-port"}
    for name, port in ports.items():
        if list(ports.values()).count(port) > 1:
            raise StackError(f"port {port} is given to more than one service ({name}); pick another with {flags[name]}")
        if services.port_taken(port):
            raise StackError(f"{name} port {port} is already in use on this machine; pick another with "
                             f"{flags[name]} (nothing was started)")
    env = {"PREFECT_API_URL": f"http://{HOST}:{prefect_port}/api",
           "MLFLOW_TRACKING_URI": f"http://{HOST}:{mlflow_port}",
           "RAY_ADDRESS": f"{HOST}:{ray_port}",
           # Ray listens on every interface whatever it is told (docs/stack.md): joining takes this stack's token.
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state.ray_token(home)),
           "VAE_HOME": str(home),
           # For the `prefect` commands of a shell that evals the exports (and the worker's flow runs): a home
           # of their own under the stack, not ~/.prefect nor the server's PREFECT_HOME.
           "PREFECT_HOME": str(services.client_prefect_home(home))}
    if settings["db"] == "postgres":
        # Prefect's server answers 500, not 503, while its database refuses connections (asyncpg's connect
        # errors reach it unwrapped): its clients retry those too, with backoff, through a database restart.
        env["PREFECT_CLIENT_RETRY_EXTRA_CODES"] = "500"
    worker_name = f"{pool}-{secrets.token_hex(3)}"
    specs = services.commands(home, ports, pool, worker_name, ray_cpus, None if missing else ray_dashboard_port, env)
    ray_url = f"http://{HOST}:{ray_dashboard_port}" if missing is None else env["RAY_ADDRESS"]
    urls = {"prefect": f"http://{HOST}:{prefect_port}", "mlflow": env["MLFLOW_TRACKING_URI"], "ray": ray_url,
            "worker": f"http://{HOST}:{prefect_port}/work-pools/work-pool/{pool}",
            "postgres": f"postgresql://{postgres.USER}@{HOST}:{settings['postgres_port']}"}
    plan = {name: {"cmd": cmd, "env": cmd_env, "port": ports.get(name),
                   "url": urls[name]} for name, (cmd, cmd_env) in specs.items()}
    record = {"version": 1, "home": str(home), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cwd": os.getcwd(),
              "pool": pool, "worker_name": worker_name, "ray_temp_dir": str(services.ray_temp_dir(home)), "env": env,
              "ports": ports, "settings": settings,
              "notes": [] if missing is None else [f"Ray dashboard off: it needs ray[default] ({missing} is missing)"],
              "services": {}}
    return record, plan


def _check_same(home: Path, record: dict, asked: dict) -> None:
    """Raise StackError when `asked` names ports, a pool or CPUs other than the running stack's: `up` would
    otherwise print exports for ports nobody asked for."""
    running = {"db": "sqlite", **{f"{name}_port": s["port"] for name, s in record["services"].items() if s["port"]},
               "pool": record["pool"], **record["settings"]}  # state files without settings name fewer
    differ = {key: value for key, value in asked.items() if key in running and running[key] != value}
    if not differ:
        return
    what = ", ".join(f"{_LABELS[key]} {'all' if running[key] is None else running[key]} (asked {value})"
                     for key, value in differ.items())
    ports = record["ports"] or {name: s["port"] for name, s in record["services"].items() if s["port"]}
    flags = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in asked.items())
    raise StackError(f"a stack is already up under VAE_HOME={home} with {what}; in use: "
                     f"{', '.join(f'{name} {port}' for name, port in ports.items())}. Use it as it is (`vae stack "
                     f"up` without those options), or restart it on others: `vae stack down`, then `vae stack up "
                     f"{flags}`")


def _start(home: Path, record: dict, name: str, plan: dict, say: Callable) -> None:
    """Start one service and record it at once, so that `down` finds it even if this `up` goes no further."""
    log = home / "stack" / "logs" / f"{name}.log"
    child = services.spawn(plan["cmd"], plan["env"], log, record["cwd"])
    record["services"][name] = {"pid": child.pid, "create_time": services.create_time(child.pid),
                                "port": plan["port"], "url": plan["url"], "log": str(log), "cmd": plan["cmd"],
                                "descendants": []}
    state.write(home, record)
    say(f"{name}: started (pid {child.pid}), log {log}")


def _start_postgres(home: Path, record: dict, plan: dict, deadline: float, timeout: float, say: Callable) -> None:
    """Make the cluster (once), start it, wait for it, then create the databases the servers use."""
    data = services.postgres_data(home)
    if not (data / "PG_VERSION").exists():
        say(f"postgres: creating a cluster in {data}")
    postgres.initdb(data)
    _start(home, record, "postgres", plan, say)
    _wait(record, ["postgres"], deadline, timeout, say)
    postgres.create_databases(HOST, plan["port"])


def _check(record: dict, name: str) -> tuple[bool, str]:
    svc = record["services"][name]
    port = record["services"]["prefect"]["port"] if name == "worker" else svc["port"]
    return services.health(name, port, record["pool"], record["worker_name"], record["env"])


def _wait(record: dict, names: list[str], deadline: float, timeout: float, say: Callable) -> None:
    """Poll until every service in `names` is healthy; fail at once if one exits, or at `deadline`."""
    pending, detail = list(names), {}
    while pending:
        for name in list(pending):
            svc = record["services"][name]
            if services.ours(svc["pid"], svc["create_time"]) is None:
                code = "" if (rc := services.exit_code(svc["pid"])) is None else f" with code {rc}"
                raise StackError(f"{name} exited{code} while starting; last lines of {svc['log']}: "
                                 f"{services.log_tail(Path(svc['log']))}")
            ok, detail[name] = _check(record, name)
            if ok:
                pending.remove(name)
                say(f"{name}: healthy at {svc['url']}")
        if pending and time.monotonic() > deadline:
            name = pending[0]
            log = Path(record["services"][name]["log"])
            raise StackError(f"{name} did not answer its health check within {timeout:g} s ({detail[name]}); "
                             f"last lines of {log}: {services.log_tail(log)}")
        if pending:
            time.sleep(0.5)


def _inspect(home: Path, record: dict) -> Stack:
    stack = Stack(str(home), str(state.state_path(home)), env=dict(record.get("env", {})),
                  notes=list(record.get("notes", [])))
    for name in ORDER:
        if (svc := record["services"].get(name)) is None:
            continue
        s = Service(name, svc["pid"], svc["port"], svc["url"], svc["log"])
        s.alive = services.ours(svc["pid"], svc["create_time"]) is not None
        if not s.alive:
            s.detail = "not running"
        elif name == "worker" and not stack.services.get("prefect", s).healthy:
            s.detail = "the Prefect server does not answer"
        else:
            s.healthy, s.detail = _check(record, name)
        stack.services[name] = s
    return stack


def _stop(record: dict, timeout: float) -> tuple[list[str], list]:
    """Stop the recorded services, the worker before the rest, Postgres after. Returns (one entry per recorded
    service: "name (pid N)", or "name (pid N): had already exited" when its root process had ended, survivors)."""
    groups, said = [], []
    for name in services.STOP_ORDER:
        if (svc := record["services"].get(name)) is None:
            continue
        procs = services.members(svc["pid"], svc["create_time"], svc.get("descendants", []))
        if procs:
            groups.append((name, svc["pid"], procs))
        if any(proc.pid == svc["pid"] for proc in procs):  # `members` holds the root while it is the recorded one
            said.append(f"{name} (pid {svc['pid']})")
        else:  # its recorded descendants, if any are left, are stopped all the same
            left_over = f" ({len(procs)} of its processes stopped)" if procs else ""
            said.append(f"{name} (pid {svc['pid']}): {EXITED}{left_over}")
    left = services.stop([g for g in groups if g[0] == "worker"], timeout)
    left += services.stop([g for g in groups if g[0] in ("prefect", "mlflow")], timeout)
    # Ray's GCS and raylet outlive SIGTERM for good after a Ray Train or Ray Data job (their detached actors),
    # and `ray stop` kills them after a grace period too; a head node's state is not kept, so the grace is short.
    left += services.stop([g for g in groups if g[0] == "ray"], min(timeout, RAY_GRACE_S))
    left += services.stop([g for g in groups if g[0] == "postgres"], timeout)  # last: the servers used it
    return said, left
