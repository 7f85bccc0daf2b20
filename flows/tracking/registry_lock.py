"""One champion gate at a time per registered model, across processes and machines, through the registry itself.

Two evaluations that finish together (the nightly and a manual one, or eight at once on a stack) each read
`@champion`, decide, record and move it. Unserialised, both may read the same champion and both promote: two
"promoted" records over one champion, and the last alias write wins whatever it was compared with. MLflow has no
compare-and-set on an alias, but creating a registered model is atomic in every store (a unique name, in SQLite
as in Postgres, behind a server or not), so the lock is a registered model `<name>.gate-lock` that exists while
a gate holds it. A holder that died leaves it behind: one older than `STALE_S` is taken over.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from flows.tracking.registry import GATE_LOCK_SUFFIX
from flows.tracking.runs import client
from vae_core.errors import EvaluateError

STALE_S = 600.0  # a gate holds the lock for a few registry calls: ten minutes means its holder is gone
WAIT_S = 300.0


def lock_name(model_name: str) -> str:
    return f"{model_name}{GATE_LOCK_SUFFIX}"


@contextmanager
def gate_lock(model_name: str, wait_s: float = WAIT_S) -> Iterator[None]:
    """Hold `<model_name>.gate-lock` for the block: wait (polling with jitter) while another gate holds it, up
    to `wait_s` seconds, then raise EvaluateError naming the holder and how to free a stale lock."""
    name, token = lock_name(model_name), secrets.token_hex(8)
    deadline = time.monotonic() + wait_s
    while not _try_take(name, token):
        if time.monotonic() > deadline:
            raise EvaluateError(f"another champion gate of {model_name!r} has held {name!r} for over {wait_s:g} s; "
                                f"if no evaluation is running, delete that registered model and run again")
        time.sleep(0.2 + random.random() * 0.3)
    try:
        yield
    finally:
        _release(name, token)


def _try_take(name: str, token: str) -> bool:
    """Create the lock (True), or find it held (False); a lock older than STALE_S is deleted first."""
    mlflow_client = client()
    try:
        mlflow_client.create_registered_model(name, tags={"holder": token, "since": f"{time.time():.3f}"},
                                              description="Held while a champion gate decides; deleted after.")
        return True
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    try:
        held = mlflow_client.get_registered_model(name).tags
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return False  # released in between: try again
        raise
    if time.time() - float(held.get("since", "0")) > STALE_S:
        _release(name, held.get("holder", ""))
    return False


def _release(name: str, token: str) -> None:
    """Delete the lock if `token` still holds it (a stale holder's late release must not free a new one)."""
    mlflow_client = client()
    try:
        if mlflow_client.get_registered_model(name).tags.get("holder") == token:
            mlflow_client.delete_registered_model(name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
