"""Retrying a call on the errors a later try may not meet, and only those: what `nightly-retrain` wraps each
stage in (Prefect 3 flows take `retries` but no condition, so a flow-level retry would also re-run a
training that failed on bad data)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import httpx

from flows.tracking.availability import server_unavailable

from vae_core import retry
from vae_core.errors import VAEError

T = TypeVar("T")

# Errors of the file system that no retry cures: the path is wrong, not the storage briefly away.
_PERMANENT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exc: BaseException) -> bool:
    """True for an error a later try may not meet: a connection refused or reset, a timeout, an I/O error
    other than a missing file or a denied permission, a 5xx from MLflow or an HTTP API. A `VAEError` (bad
    data, model or request) and anything else (a bug) are not."""
    if isinstance(exc, VAEError):
        return False
    if server_unavailable(exc):
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):  # an HTTP error with an answer (requests, httpx, Prefect's client)
        return status >= 500
    if isinstance(exc, (ConnectionError, TimeoutError, httpx.TransportError)):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, _PERMANENT_OS_ERRORS)


def call_with_retries(fn: Callable[[], T], *, retries: int, delay_s: float, what: str = "call",
                      sleep: Callable[[float], None] = time.sleep,
                      log: logging.Logger | logging.LoggerAdapter | None = None) -> T:
    """`fn()`, tried again up to `retries` times when it raises a transient error (`is_transient`), after
    `delay_s` seconds, doubling each time (`vae_core.retry`). Any other error, or the last try's, is raised as
    it is."""
    return retry.call_with_retries(fn, retries=retries, delay_s=delay_s, transient=is_transient, what=what,
                                   sleep=sleep, log=log)
