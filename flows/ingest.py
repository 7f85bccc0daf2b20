"""The `ingest-dataset` flow: any image source in, one versioned dataset of Parquet shards out.

    open-source (validate, fail fast)  ->  build-shards (decode, dedup, split, stage)  ->  publish-version

Each task is a thin call into `vae_core.ingest`; the flow adds orchestration (retries belong to the
deployment), logging and a Markdown artifact with counts per split, shape, channel stats and the
quarantine. A re-run on the same input finds the existing version and writes nothing.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.settings import data_root as default_data_root
from vae_core.ingest import IngestConfig, IngestResult, StagedDataset, build, open_source_for, publish, summary_markdown
from vae_core.sources.base import Source


# Tasks pass in-memory objects (an open source, a staging folder) to the next one: caching them by
# their inputs would be wrong, and hashing them would be slow.
@task(name="open-source", cache_policy=NO_CACHE)
def open_source_task(cfg: IngestConfig) -> Source:
    source = open_source_for(cfg)
    get_run_logger().info("source %s (%s): %s items", source.url, source.kind,
                          source.size if source.size is not None else "unknown")
    return source


@task(name="build-shards", cache_policy=NO_CACHE)
def build_task(source: Source, cfg: IngestConfig, progress: bool) -> StagedDataset:
    return build(source, cfg, progress=progress)


@task(name="publish-version", cache_policy=NO_CACHE)
def publish_task(staged: StagedDataset, cfg: IngestConfig) -> IngestResult:
    try:
        return publish(staged, cfg)
    finally:
        staged.cleanup()


def artifact_key(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "ingest-" + (re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "dataset")


@flow(name="ingest-dataset")
def ingest_dataset(
    source: str,
    name: str,
    data_root: str | None = None,
    format: Literal["auto", "folder", "idx", "npz", "parquet", "builtin"] = "auto",
    image_size: tuple[int, int] | None = None,
    channels: Literal[1, 3] | None = None,
    fit: Literal["crop", "pad"] = "crop",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    shard_mb: float = 64,
    max_quarantine_fraction: float = 0.05,
    workers: int = 0,
    image_column: str | None = None,
    label_column: str | None = None,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Ingest SOURCE as dataset NAME under DATA_ROOT (default $VAE_HOME/datasets); returns the summary
    `vae ingest --json` prints (name, version, path, counts per split, quarantined, ...)."""
    cfg = IngestConfig(
        source=source, name=name, data_root=data_root or default_data_root(), format=format,
        image_size=image_size, channels=channels, fit=fit, val_fraction=val_fraction,
        test_fraction=test_fraction, shard_mb=shard_mb, max_quarantine_fraction=max_quarantine_fraction,
        workers=workers, image_column=image_column, label_column=label_column, limit=limit,
    )
    src = open_source_task(cfg)
    staged = build_task(src, cfg, progress)
    result = publish_task(staged, cfg)
    logger = get_run_logger()
    logger.info("%s %s@%s at %s: %s", "created" if result.created else "found existing", result.name,
                result.version, result.url, result.manifest.counts)
    create_markdown_artifact(markdown=summary_markdown(result), key=artifact_key(result.name),
                             description=f"dataset {result.name} version {result.version}")
    return result.summary()
