"""Trying a call again after an error a later try may not meet, waiting longer each time (exponential backoff).

What counts as such an error is the caller's: the storage layer asks about connections to an object store,
the flows about tracking servers and HTTP APIs too (`flows.retries.is_transient`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def backoff(delay_s: float, max_delay_s: float = math.inf) -> Iterator[float]:
    """The waits between tries: `delay_s`, then twice the last, each at most `max_delay_s`; endless."""
    wait = delay_s
    while True:
        yield min(wait, max_delay_s)
        wait *= 2


def call_with_retries(fn: Callable[[], T], *, retries: int, delay_s: float, transient: Callable[[BaseException], bool],
                      what: str = "call", max_delay_s: float = math.inf, sleep: Callable[[float], None] = time.sleep,
                      log: logging.Logger | logging.LoggerAdapter | None = None) -> T:
    """`fn()`, tried again up to `retries` times when it raises an error `transient` accepts, after the waits of
    `backoff(delay_s, max_delay_s)`. Any other error, or the last try's, is raised as it is."""
    waits = backoff(delay_s, max_delay_s)
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == retries or not transient(e):
                raise
            wait = next(waits)
            if log is not None:
                log.warning("%s failed (%s: %s); try %d of %d in %.1f s", what, type(e).__name__, e, attempt + 2,
                            retries + 1, wait)
            sleep(wait)
    raise AssertionError("unreachable")  # the loop returns or raises
