"""A private PostgreSQL cluster for the stack (`vae stack up --db postgres`) and for anything else that needs
one: the server programs, a data folder made once, the server's foreground command, the databases MLflow and
Prefect use, their connection URLs and a health check.

PostgreSQL refuses to run as root, so as root every program runs as the `postgres` OS user and the data
folder belongs to that user; every folder above it must then be traversable by others. The server listens
on TCP only (`-k ''`: no unix socket, whose path would be limited to 107 bytes) and trusts every local
connection as `vae`, the only role.

    initdb(data)
    cmd = server_command(data, "127.0.0.1", 5432)   # services.spawn(cmd, ...) or `ip netns exec NS *cmd`
    create_databases("127.0.0.1", 5432)
    url("127.0.0.1", 5432, "mlflow", "psycopg2")   # postgresql://vae@127.0.0.1:5432/mlflow
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path
from typing import Literal

from flows.stack.state import StackError

USER = "vae"  # the database role every client connects as
DATABASES = ("mlflow", "prefect")
OS_USER = "postgres"  # who runs the server when this process is root
_PROGRAMS = ("initdb", "pg_ctl", "postgres")
_MISSING = ("PostgreSQL's server programs (initdb, pg_ctl, postgres) are not installed{where}; `vae stack up "
            "--db postgres` needs them: apt-get install postgresql")


def bin_dir() -> Path:
    """The folder holding initdb, pg_ctl and postgres: `$VAE_POSTGRES_BIN` when set, else the newest
    /usr/lib/postgresql/<version>/bin, else `pg_config --bindir`, else the folder of `initdb` on PATH.

    Raises:
        StackError: none of them has all three programs; the message names the package to install.
    """
    if chosen := os.environ.get("VAE_POSTGRES_BIN"):
        if _complete(Path(chosen)):
            return Path(chosen)
        raise StackError(_MISSING.format(where=f" in VAE_POSTGRES_BIN={chosen}"))
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: _number(p.parent.name), reverse=True)
    for folder in [*versions, _pg_config_bindir(), Path(shutil.which("initdb") or "/nonexistent").parent]:
        if folder is not None and _complete(folder):
            return folder
    raise StackError(_MISSING.format(where=""))


def _complete(folder: Path) -> bool:
    return all(os.access(folder / name, os.X_OK) for name in _PROGRAMS)


def _number(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)) or (0,)


def _pg_config_bindir() -> Path | None:
    if (pg_config := shutil.which("pg_config")) is None:
        return None
    out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
    return Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None


def _as_owner(cmd: list[str]) -> list[str]:
    """`cmd` run as the `postgres` user when this process is root (`runuser`, which waits for it)."""
    return ["runuser", "-u", OS_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def initdb(data_dir: Path) -> None:
    """Make a cluster in `data_dir` (role `vae`, trust authentication) unless one is there (`PG_VERSION`).

    Raises:
        StackError: the programs are missing, the `postgres` user cannot reach `data_dir`, or initdb failed.
    """
    if (data_dir / "PG_VERSION").exists():
        return
    programs = bin_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        _hand_over(data_dir)
    out = subprocess.run(_as_owner([str(programs / "initdb"), "-D", str(data_dir), "-U", USER, "--auth=trust",
                                    "--encoding=UTF8", "--no-locale", "--no-instructions"]),
                         capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise StackError(f"initdb failed for {data_dir}: {last}")


def _hand_over(data_dir: Path) -> None:
    """Give `data_dir` to the `postgres` user (mode 0700, as the server demands) and check it can reach it."""
    user = pwd.getpwnam(OS_USER)
    os.chown(data_dir, user.pw_uid, user.pw_gid)
    data_dir.chmod(0o700)
    if subprocess.run(["runuser", "-u", OS_USER, "--", "test", "-x", str(data_dir)]).returncode == 0:
        return
    closed = next((p for p in reversed(data_dir.parents) if not p.stat().st_mode & 0o001), data_dir.parent)
    raise StackError(f"the {OS_USER!r} user, which runs PostgreSQL for root, cannot reach {data_dir}: {closed} is "
                     f"not traversable by others; use a VAE_HOME whose parent folders are (`chmod o+x {closed}`, or "
                     "a VAE_HOME outside it)")


def server_command(data_dir: Path, host: str, port: int) -> list[str]:
    """The server in the foreground, listening on `host`:`port` only, no unix socket. As root it runs as the
    `postgres` user through `setpriv`, which execs: the process started is the server itself, so a signal to
    it, or to its process group, reaches PostgreSQL (runuser would stay in between and kill it after 2 s)."""
    cmd = [str(bin_dir() / "postgres"), "-D", str(data_dir), "-h", host, "-p", str(port), "-k", ""]
    if os.geteuid() != 0:
        return cmd
    return ["setpriv", f"--reuid={OS_USER}", f"--regid={OS_USER}", "--init-groups", *cmd]


def _connect(host: str, port: int, timeout: float, database: str = "postgres"):
    import psycopg2  # imported here: the SQLite stack never needs it

    return psycopg2.connect(host=host, port=port, user=USER, dbname=database, connect_timeout=max(1, round(timeout)),
                            options=f"-c statement_timeout={int(timeout * 1000)}")


def create_databases(host: str, port: int, names: tuple[str, ...] = DATABASES) -> None:
    """Create each database in `names` that does not exist yet."""
    from psycopg2 import errors, sql

    conn = _connect(host, port, timeout=30.0)
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        with conn.cursor() as cur:
            for name in names:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    try:
                        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    except errors.DuplicateDatabase:  # made by another caller meanwhile
                        pass
    finally:
        conn.close()


def url(host: str, port: int, database: str, driver: Literal["psycopg2", "asyncpg"]) -> str:
    """The SQLAlchemy URL of `database`: psycopg2's for MLflow's `--backend-store-uri`, asyncpg's for Prefect's
    PREFECT_API_DATABASE_CONNECTION_URL."""
    scheme = "postgresql" if driver == "psycopg2" else "postgresql+asyncpg"
    return f"{scheme}://{USER}@{host}:{port}/{database}"


def health(host: str, port: int) -> tuple[bool, str]:
    """(answers `SELECT 1` within 2 s, detail): the server's version, or why it did not answer."""
    import psycopg2

    try:
        conn = _connect(host, port, timeout=2.0)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            return True, f"PostgreSQL {conn.server_version // 10000}.{conn.server_version % 10000}"
        finally:
            conn.close()
    except psycopg2.Error as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return False, f"no answer from {host}:{port} ({first})"
