"""The `ingest-dataset` flow: any image source in, one versioned dataset of Parquet shards out.

    open-source (validate, fail fast)  ->  build-shards (decode, dedup, split, stage)  ->  publish-version

Each task is a thin call into `vae_core.ingestion.ingest`; the flow adds orchestration (retries belong to the
deployment), logging and a Markdown artifact with counts per split, shape, channel stats and the
quarantine. A re-run on the same input finds the existing version and writes nothing.
"""

from __future__ import annotations

import re

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from vae_core.data.sources.base import Source
from vae_core.ingestion.ingest import (Published, StagedDataset, build, find_unchanged, open_source_for, publish,
                                       summary_markdown)
from vae_core.requests import IngestRequest
from vae_core.results import IngestResult


# Tasks pass in-memory objects (an open source, a staging folder) to the next one: caching them by
# their inputs would be wrong, and hashing them would be slow.
@task(name="open-source", cache_policy=NO_CACHE)
def open_source_task(req: IngestRequest) -> Source:
    source = open_source_for(req)
    get_run_logger().info("source %s (%s): %s items", source.url, source.kind,
                          source.size if source.size is not None else "unknown")
    return source


@task(name="build-shards", cache_policy=NO_CACHE)
def build_task(source: Source, req: IngestRequest, progress: bool) -> StagedDataset:
    return build(source, req, progress=progress)


@task(name="publish-version", cache_policy=NO_CACHE)
def publish_task(staged: StagedDataset, req: IngestRequest) -> Published:
    return publish(staged, req)


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "ingest-" + (re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "dataset")


@flow(name="ingest-dataset")
def ingest_dataset(request: IngestRequest, progress: bool = False) -> IngestResult:
    """Ingest `request.source` as dataset `request.name` under its data root (default
    $VAE_HOME/datasets); returns what `vae ingest --json` prints (name, version, path, counts per split,
    quarantined, ...)."""
    src = open_source_task(request)
    # The same input as an existing version (by its fingerprint): nothing to decode or write.
    if (result := find_unchanged(request, src)) is None:
        staged = build_task(src, request, progress)
        try:  # here, not in the task: a Ctrl-C or an API error between the two tasks must not leave it behind
            result = publish_task(staged, request)
        finally:
            staged.cleanup()
    logger = get_run_logger()
    logger.info("%s %s@%s at %s: %s", "created" if result.created else "found existing", result.name,
                result.version, result.url, result.manifest.counts)
    if conflicts := result.manifest.label_conflicts:
        logger.warning("%d duplicate images disagree with the copy kept on their label (label noise): see the "
                       "duplicates in %s/manifest.json", conflicts, result.url)
    create_markdown_artifact(markdown=summary_markdown(result), key=artifact_key(result.name),
                             description=f"dataset {result.name} version {result.version}")
    return result.summary()
