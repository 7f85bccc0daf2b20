"""Whether an MLflow error means the tracking server is away for now (a later try may succeed): what
`flows.retries` asks of MLflow's errors. A module of its own, importing nothing of the project, so that
the retry rules and the run writers that use them (`flows.tracking.outbox`) import no circle."""

from __future__ import annotations

from mlflow.exceptions import MlflowException


def server_unavailable(exc: BaseException) -> bool:
    """True for an MLflow error that a later try may not meet: the tracking server answered 5xx, or was not
    reached at all (mlflow reports that as a 500 once its own HTTP retries are spent)."""
    return isinstance(exc, MlflowException) and exc.get_http_status_code() >= 500
