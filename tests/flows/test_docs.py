"""The documentation's Python examples run as written, in the order a new user would follow them, and the
figures docs/ingest.md derives from ingestion's constants are those constants' figures.

Each page's ```python blocks run in one namespace, in a fresh working folder that has `../shared` beside
it (as a checkout does) and `VAE_HOME=./.vae`: ingest (docs/ingest.md), train (docs/train.md), evaluate
and promote (docs/evaluate.md), encode the dataset (docs/encode.md), pull the registered model
(docs/models.md), the library tour (README.md), then the nightly chain over what is there (docs/nightly.md)
and the objectives (docs/objectives.md).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = ["docs/ingest.md", "docs/train.md", "docs/evaluate.md", "docs/encode.md", "docs/models.md", "README.md",
         "docs/nightly.md", "docs/objectives.md"]


def python_blocks(page: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block of a page."""
    text = (REPO / page).read_text()
    return [(text[: m.start()].count("\n") + 2, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
@pytest.mark.timeout(900)
def test_every_python_example_in_the_docs_runs(tmp_path, monkeypatch):
    work = tmp_path / "checkout"
    work.mkdir()
    (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    monkeypatch.chdir(work)
    monkeypatch.setenv("VAE_HOME", str(work / ".vae"))
    for key in ("MLFLOW_TRACKING_URI", "VAE_DATA_ROOT", "VAE_CHECKPOINT_ROOT", "RAY_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    from flows.distributed.cluster import ray_session

    ran = 0
    # One local Ray that every example's flow joins (as flows join a cluster's RAY_ADDRESS), started once the
    # environment above is set, instead of one started and stopped per flow: seconds each.
    with ray_session():
        for page in PAGES:
            namespace: dict = {"__name__": f"docs_{Path(page).stem}"}
            for line, code in python_blocks(page):
                try:
                    exec(compile(code, f"{page}:{line}", "exec"), namespace)
                except Exception as e:  # name the block, not just the line inside it
                    raise AssertionError(f"the example at {page}:{line} failed: {type(e).__name__}: {e}") from e
                ran += 1
    assert ran >= 6
    # No example leaves state outside VAE_HOME (a stray ./mlflow.db or ./mlruns in the working folder).
    assert sorted(p.name for p in work.iterdir()) == [".vae"]


def test_the_ingest_page_states_the_constants_it_reasons_with():
    """The S3 and work-folder arithmetic of docs/ingest.md rests on the part, bucket, retry and list sizes: a
    change to one of them must change the page."""
    from vae_core.data.shards.manifest import LIST_BOUND
    from vae_core.data.sources.listing import PART_ROWS, RETRY_BASE_S, RETRY_TRIES
    from vae_core.ingestion.work import BUCKET_BYTES, BUCKET_ROWS, buckets_for

    text = (REPO / "docs/ingest.md").read_text()
    waits = [f"{RETRY_BASE_S * 2**k:g}" for k in range(RETRY_TRIES - 1)]
    for stated in (f"`PART_ROWS` = {PART_ROWS:,} files", f"`BUCKET_ROWS` = {BUCKET_ROWS:,} rows",
                   f"`BUCKET_BYTES` = {BUCKET_BYTES >> 20} MiB",
                   f"`RETRY_TRIES` = {RETRY_TRIES} attempts in all, waiting {', '.join(waits[:-1])} and {waits[-1]} s",
                   f"lists of more than {LIST_BOUND:,} entries"):
        assert stated in text, stated
    for power in (6, 7, 8):  # the table of work files: items, image, parts, buckets
        for h, w, c in ((28, 28, 1), (64, 64, 3)):
            items = 10**power
            row = f"| 10^{power} | {h}x{w}x{c} | {math.ceil(items / PART_ROWS):,} | {buckets_for(items, h * w * c):,} |"
            assert row in text, row
