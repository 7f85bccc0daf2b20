"""ingest-dataset's tasks on Ray Data: listing, decoding and shard writing for sources of many files.

`ray_runner` is a `vae_core.ingestion.ingest.Runner`: it maps one of ingestion's step functions over its
items (units to list, parts to decode, buckets to reduce) as a Ray Data job, one block per item, so the
tasks spread over every node of the cluster ($RAY_ADDRESS) or over a local Ray. Each result comes back
with the node that made it (its id and address: `nodes` in the stage's summary). What a task returns is
small (counts, checksums); the rows themselves go straight from the tasks to the data root.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flows.distributed.cluster import data_context, quiet
from vae_core.errors import IngestError
from vae_core.requests import IngestRequest


def scaling(req: IngestRequest, resources: dict[str, float]) -> tuple[float, int | None]:
    """(CPUs per task, tasks at once; None: as many as the CPUs allow) for `req` on a cluster with `resources`.

    By default the workers share the cluster's CPUs (fractions of one where there are more workers than
    CPUs); decoding is one thread per task, so a task never needs more than one."""
    total = resources.get("CPU", 1)
    if req.workers == 0:
        return req.cpus_per_worker or 1.0, None
    cpus = req.cpus_per_worker or min(1.0, math.floor(100 * total / req.workers) / 100)
    if cpus * req.workers > total + 1e-9:
        raise IngestError(f"{req.workers} workers x {cpus:g} CPUs exceed the cluster's {total:g} CPUs")
    return cpus, req.workers


def ray_runner(cpus: float, workers: int | None) -> Callable[[Callable[[Any], dict], Iterable[Any]], Iterator[dict]]:
    """A runner that maps a step over its items as Ray Data tasks of `cpus` CPUs, `workers` at once."""

    def run(fn: Callable[[Any], dict], items: Iterable[Any]) -> Iterator[dict]:
        import ray
        import ray.data

        todo = list(items)  # units, parts or buckets: one per task, never one per image
        if not todo:
            return

        def task(row: dict[str, Any]) -> dict[str, Any]:
            out = fn(todo[row["item"]])
            node = ray.get_runtime_context().get_node_id()
            return {"out": pickle.dumps({**out, "node_id": node, "address": ray.util.get_node_ip_address()})}

        with data_context(enable_progress_bars=False), _quiet():
            ds = ray.data.from_items([{"item": i} for i in range(len(todo))], override_num_blocks=len(todo))
            ds = ds.map(task, num_cpus=cpus, compute=ray.data.TaskPoolStrategy(size=workers))
            for row in ds.iter_rows():
                yield pickle.loads(row["out"])

    return run


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Ray Data's INFO lines and its warning about fewer blocks than tasks would cut through the progress
    bar and fill the flow's log: errors only while the job runs."""
    with quiet("ray.data"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")
        yield
