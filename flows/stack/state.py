"""The local stack's state: `$VAE_HOME/stack/stack.json` (what `up` started), the lock that lets one `up` or
`down` run at a time, the Ray token, and the stack as `status` shows it (`Stack`, `Service`).

The state file is read strictly (`Record`): a file that `up` did not write is one error line, never a guess.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from vae_core.errors import VAEError
from vae_core.settings import vae_home


class StackError(VAEError, RuntimeError):
    """The stack cannot be started, inspected or stopped as asked; the message names the service and why."""


@dataclass
class Service:
    """One service of a stack as it is now."""

    name: str
    pid: int
    port: int | None  # None for the worker, which listens on nothing
    url: str
    log: str
    alive: bool = False
    healthy: bool = False
    detail: str = ""  # why it is not healthy; for Ray, the head's CPUs

    def to_json(self) -> dict:
        return {"pid": self.pid, "port": self.port, "url": self.url, "alive": self.alive, "healthy": self.healthy,
                "detail": self.detail, "log": self.log}


@dataclass
class Stack:
    """A stack under one VAE_HOME: its services, the environment that points programs at it, its state file."""

    home: str
    state: str
    services: dict[str, Service] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)  # what this `up` started; empty when it was already up
    notes: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return bool(self.services) and all(s.healthy for s in self.services.values())

    def exports(self) -> str:
        """`export KEY=value` lines for a POSIX shell (`eval "$(vae stack up)"`)."""
        return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in self.env.items())

    def to_json(self) -> dict:
        return {"services": {name: s.to_json() for name, s in self.services.items()}, "env": self.env,
                "state": self.state, "healthy": self.healthy, "started": self.started, "notes": self.notes}

    def describe(self) -> list[str]:
        """One line per service (name, pid, health, where), then the notes."""
        out = []
        for s in self.services.values():
            where = s.url + (f" ({s.detail})" if s.healthy and s.detail else "")
            state = "healthy" if s.healthy else f"UNHEALTHY: {s.detail}" if s.alive else "not running"
            out.append(f"{s.name:<8} pid {s.pid:<8} {state:<11} {where}")
        return out + [f"note: {note}" for note in self.notes]


def stack_home() -> Path:
    """$VAE_HOME as a local folder (the stack runs processes there); StackError for a remote URL."""
    home = vae_home()
    scheme, sep, path = home.partition("://")
    if sep and scheme != "file":
        raise StackError(f"VAE_HOME={home!r} is not a local folder; the stack keeps its state, logs and MLflow "
                         "store there")
    return Path(path if sep else home).expanduser().resolve()


def state_path(home: Path) -> Path:
    """Where `up` records what it started."""
    return home / "stack" / "stack.json"


class _Service(BaseModel):
    """A service in the state file: its root process (pid and start time: a reused pid is not it), port, URL,
    log, command line, and the descendants recorded once it was healthy ([pid, start time] each)."""

    model_config = ConfigDict(extra="forbid")
    pid: int
    create_time: float
    port: int | None
    url: str
    log: str
    cmd: list[str] = []
    descendants: list[tuple[int, float]] = []


class Record(BaseModel):
    """The state file, `stack.json`, as `up` writes it."""

    model_config = ConfigDict(extra="forbid")
    version: int = 1
    home: str = ""
    started_at: str = ""
    cwd: str = ""
    pool: str = ""
    worker_name: str = ""
    ray_temp_dir: str = ""
    env: dict[str, str] = {}
    notes: list[str] = []
    ports: dict[str, int] = {}  # every port in use, by service ("ray dashboard" too when it runs)
    settings: dict[str, int | str | None] = {}  # what `up` was given, DEFAULTS filled in
    services: dict[Literal["postgres", "prefect", "mlflow", "ray", "worker"], _Service]


def read(home: Path) -> dict | None:
    """The state file's record, checked against `Record`; None when there is none."""
    path = state_path(home)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StackError(f"cannot read {path} ({e}); remove it once the processes it names are stopped") from None
    try:
        return Record.model_validate_json(text).model_dump()
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"]))
        problem = f"{where}: {first['msg']}" if where else first["msg"]
        raise StackError(f"{path} is not a state file that `vae stack up` wrote ({problem}); stop the processes it "
                         "names if any still run, remove it, then `vae stack up`") from None


def write(home: Path, record: dict) -> None:
    """Write the state file atomically (a temporary name in the same folder, then a rename)."""
    path = state_path(home)
    fd, tmp = tempfile.mkstemp(prefix=".stack-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)


def forget(home: Path, record: dict) -> None:
    """Remove the state file, and Ray's session folder when it was outside VAE_HOME (a short temp path)."""
    state_path(home).unlink(missing_ok=True)
    ray_dir = Path(record.get("ray_temp_dir", ""))
    if ray_dir.name.startswith("vae-ray-") and ray_dir.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(ray_dir, ignore_errors=True)


def ray_token(home: Path) -> Path:
    """`<home>/stack/ray-token`, readable by this user only: the secret a driver or a Ray node needs to join the
    stack's head (exported as RAY_AUTH_TOKEN_PATH). Made once, kept across `down` and `up`."""
    path = home / "stack" / "ray-token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path


@contextlib.contextmanager
def locked(home: Path) -> Iterator[None]:
    """One `up` or `down` at a time per VAE_HOME."""
    (home / "stack").mkdir(parents=True, exist_ok=True)
    with open(home / "stack" / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(f"another `vae stack up` or `down` is running for VAE_HOME={home}") from None
        yield
