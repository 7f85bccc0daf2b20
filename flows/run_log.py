"""What a flow run's user reads in Prefect's log (the UI, `prefect flow-run logs`, a deployment's worker,
`vae train`): the driver's lines (`run_lines`), the run's logger (`run_logger`) and a slow step's start and
duration (`timed`). The MLflow side of progress is `flows.tracking.progress`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator

from flows.tracking.progress import duration


def run_lines(progress: bool) -> Callable[[str], None]:
    """Where the driver's lines go: the Prefect run's log, which its API keeps (the UI, `prefect flow-run logs`)
    and its console shows (a deployment's worker, `vae train`). With `progress` the terminal gets each line
    plain on stderr instead of the console's copy, so it shows once; outside a Prefect run, this module's
    logger takes the place of the run's."""
    logger = run_logger(api_only=progress)

    def say(line: str) -> None:
        if progress:
            print(line, file=sys.stderr, flush=True)
        logger.info(line)

    return say


def run_logger(api_only: bool = False) -> logging.Logger | logging.LoggerAdapter:
    """The current Prefect run's logger (its records carry the flow run's id, from any thread); `api_only`: one
    whose records go to Prefect's API but not to the console. This module's logger outside a Prefect run."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        logger = get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)
    if not api_only:
        return logger
    return logging.LoggerAdapter(_api_logger(), logger.extra)


def _api_logger() -> logging.Logger:
    """A logger with Prefect's API handler only: a run's loggers also propagate to the console handler on the root."""
    from prefect.logging.handlers import APILogHandler

    api = logging.getLogger(f"{__name__}.api")
    if not api.handlers:
        api.addHandler(APILogHandler())
        api.setLevel(logging.INFO)
        api.propagate = False
    return api


@contextlib.contextmanager
def timed(log: logging.Logger | logging.LoggerAdapter, what: str) -> Iterator[None]:
    """Log `what` as it starts, and how long it took when it ends (a failure is the caller's to report)."""
    log.info("%s ...", what)
    t0 = time.perf_counter()
    yield
    took = time.perf_counter() - t0
    log.info("%s: done in %s", what, f"{took:.1f} s" if took < 10 else duration(took))
