"""Prefect as the `vae` command uses it: its state under $VAE_HOME, its temporary server started early,
and its console lines without tracebacks unless --debug.

Nothing here imports Prefect at module level: `prefect_defaults` must run before Prefect is first imported.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from vae_core import settings

T = TypeVar("T")


def prefect_defaults() -> None:
    """Defaults for Prefect, set before it is first imported (it reads them then): its state under
    $VAE_HOME/prefect unless PREFECT_HOME says otherwise, and no telemetry from its temporary server (whose
    heartbeat also races the server's own start-up writes to SQLite: `database is locked` tracebacks)."""
    if "PREFECT_HOME" not in os.environ and (home := settings.prefect_home()):
        Path(home).mkdir(mode=0o700, parents=True, exist_ok=True)  # Prefect creates the last level only
        os.environ["PREFECT_HOME"] = home
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def start_prefect_server() -> threading.Thread | None:
    """Start Prefect's temporary server in the background, unless PREFECT_API_URL names a server to use, so
    that its start-up (~4 s) overlaps the imports that follow; the flow's client finds it running (Prefect
    keeps one per process). Returns the thread to join before the flow runs."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    def start() -> None:
        with contextlib.suppress(Exception):  # a server that fails to start fails again, reported, in the flow
            SubprocessASGIServer().start()

    starting = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    starting.start()
    return starting


class _NoTracebacks(logging.Filter):
    """Prefect's console lines without the tracebacks it attaches (the `vae` command prints the error in
    one line) and without its temporary server's start/stop notices (which would follow that line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return not (record.name == "prefect" and record.module == "server")


_NO_TRACEBACKS = _NoTracebacks()


def quiet_prefect_logs(debug: bool) -> None:
    """Put `_NoTracebacks` on the console handlers Prefect set up (or, with --debug, take it off). Only the
    console's: records reach the API log handler first, so the flow run's logs keep their tracebacks."""
    for name in ("", "prefect._internal"):
        for handler in logging.getLogger(name).handlers:
            handler.removeFilter(_NO_TRACEBACKS)
            if not debug and type(handler).__module__.startswith("prefect."):
                handler.addFilter(_NO_TRACEBACKS)


def load_flow(load: Callable[[], T], debug: bool) -> T:
    """A stage's flow, ready to run: Prefect's defaults set, its temporary server started while `load` does
    the heavy imports (torch, Ray, MLflow: seconds) and returns the flow, its console logs quieted."""
    prefect_defaults()
    starting = start_prefect_server()
    flow = load()
    quiet_prefect_logs(debug)
    if starting:
        starting.join()
    return flow


def run_flow(flow: str, debug: bool, *args: Any, **kwargs: Any) -> Any:
    """Run the flow `module:name` with these arguments and return its result; the flow's module (Ray, MLflow,
    torch: seconds) is imported while Prefect's server starts (`load_flow`)."""
    module, _, name = flow.partition(":")
    return load_flow(lambda: getattr(importlib.import_module(module), name), debug)(*args, **kwargs)
