"""The `ingest-dataset` flow: any image source in, one versioned dataset of Parquet shards out.

    open-source (validate, fail fast) -> list-source -> decode-parts -> write-shards -> publish-version

Each task is a call into `vae_core.ingestion.ingest`. A source of many files (a folder, a prefix, a file
list) runs its listing, decoding and shard writing as Ray Data tasks (`flows.distributed.ingest_tasks`)
on $RAY_ADDRESS's cluster or a local Ray; an in-process source (IDX, npz, one Parquet file) runs here.
The flow adds logging (progress lines in the flow run's log) and a Markdown artifact with counts per
split, shape, channel stats, the quarantine, the rows each node decoded and the reads retried. A re-run
on the same input finds the existing version and writes nothing; a re-run after a kill keeps every part
and shard finished before it.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from vae_core.data.sources.base import Source
from vae_core.ingestion.ingest import (Decoded, Listed, Published, Runner, decode_parts, find_unchanged, finish,
                                       input_fingerprint,
                                       list_source, open_source_for, remove_work, serial, work_base, write_shards)
from vae_core.ingestion.work import locked
from vae_core.ingestion.progress import Progress
from vae_core.ingestion.report import summary_markdown
from vae_core.requests import IngestRequest
from vae_core.results import IngestResult


# Tasks pass in-memory objects (an open source, its parts) to the next one: caching them by their inputs
# would be wrong, and hashing them would be slow.
@task(name="open-source", cache_policy=NO_CACHE)
def open_source_task(req: IngestRequest) -> Source:
    source = open_source_for(req)
    size = f"{source.size:,} items" if source.size is not None else "files to list" if source.lister else "size unknown"
    get_run_logger().info("source %s (%s): %s", source.url, source.kind, size)
    return source


@task(name="list-source", cache_policy=NO_CACHE)
def list_task(source: Source, req: IngestRequest, runner: Runner, bar: Progress) -> Listed:
    listed = list_source(source, req, runner, bar)
    get_run_logger().info("%s items to ingest", f"{listed.total:,}" if listed.total is not None else "unknown")
    return listed


@task(name="decode-parts", cache_policy=NO_CACHE)
def decode_task(listed: Listed, req: IngestRequest, runner: Runner, bar: Progress) -> Decoded:
    bar.start_decoding(listed.total)
    return decode_parts(listed, req, runner, bar)


@task(name="write-shards", cache_policy=NO_CACHE)
def shards_task(decoded: Decoded, runner: Runner, bar: Progress) -> list[dict]:
    return write_shards(decoded, runner, bar)


@task(name="publish-version", cache_policy=NO_CACHE)
def publish_task(listed: Listed, decoded: Decoded, buckets: list[dict]) -> Published:
    return finish(listed, decoded, buckets)


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "ingest-" + (re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "dataset")


@contextlib.contextmanager
def runner_for(source: Source, req: IngestRequest) -> Iterator[Runner]:
    """Ray Data tasks for a source of many files (in a Ray session for the block), else this process."""
    if source.lister is None and source.parts is None:
        yield serial
        return
    from flows.distributed.cluster import ray_session
    from flows.distributed.ingest_tasks import ray_runner, scaling

    with ray_session() as resources:
        cpus, workers = scaling(req, resources)
        get_run_logger().info("Ray: %g CPUs, tasks of %g CPUs, %s at once", resources.get("CPU", 0), cpus,
                              workers or "as many as fit")
        yield ray_runner(cpus, workers)


def _ingest(src: Source, request: IngestRequest, runner: Runner, bar: Progress) -> Published:
    """List, then find an unchanged version or decode, write shards and publish."""
    listed = list_task(src, request, runner, bar)
    if (found := find_unchanged(request, listed.fingerprint)) is not None:
        remove_work(request, listed.base)
        return found
    decoded = decode_task(listed, request, runner, bar)
    buckets = shards_task(decoded, runner, bar)
    return publish_task(listed, decoded, buckets)


@flow(name="ingest-dataset")
def ingest_dataset(request: IngestRequest, progress: bool = False) -> IngestResult:
    """Ingest `request.source` as dataset `request.name` under its data root (default
    $VAE_HOME/datasets); returns what `vae ingest --json` prints (name, version, path, counts per split,
    quarantined, nodes, retries, ...)."""
    logger = get_run_logger()
    started = time.monotonic()
    bar = Progress(request.name, enabled=progress, log=logger)
    src = open_source_task(request)
    # The same input as an existing version (by its fingerprint): nothing to decode or write. A source read
    # in process has its fingerprint now; one of many files once it is listed.
    result = find_unchanged(request, input_fingerprint(request, src)) if src.lister is None else None
    if result is None:
        with locked(work_base(request, src), request.data_root_options), runner_for(src, request) as runner:
            result = _ingest(src, request, runner, bar)
    bar.close(time.monotonic() - started)
    logger.info("%s %s@%s at %s: %s", "created" if result.created else "found existing", result.name,
                result.version, result.url, result.manifest.counts)
    if conflicts := result.manifest.label_conflicts:
        logger.warning("%d duplicate images disagree with the copy kept on their label (label noise): see the "
                       "duplicates in %s", conflicts, result.url)
    create_markdown_artifact(markdown=summary_markdown(result), key=artifact_key(result.name),
                             description=f"dataset {result.name} version {result.version}")
    return result.summary()
