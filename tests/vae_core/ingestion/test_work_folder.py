"""The work folder a run resumes from: parts committed under another bucket count are never mixed with this
run's (their rows would sit in buckets no reduce task reads), and the run that finds them says so and
leaves a clean start for the next."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import vae_core.ingestion.ingest
import vae_core.ingestion.work
from vae_core.errors import IngestError
from vae_core.ingestion.ingest import run_ingest
from vae_core.requests import IngestRequest


def _folder(root, classes: int = 3, per_class: int = 20):
    rng = np.random.default_rng(4)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (6, 6), np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_parts_committed_under_another_bucket_count_are_not_mixed_in(tmp_path, monkeypatch):
    req = IngestRequest(source=str(_folder(tmp_path / "src")), name="w", data_root=str(tmp_path / "ds"))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill between the map and reduce steps

    with monkeypatch.context() as m:
        m.setattr(vae_core.ingestion.work, "BUCKET_ROWS", 7)  # 60 rows: 9 buckets
        m.setattr(vae_core.ingestion.ingest, "write_shards", stopped)
        with pytest.raises(KeyboardInterrupt):
            run_ingest(req)
    assert list((tmp_path / "ds" / "w").glob(".ingest-*/run-*/parts/commit/*.json"))
    with pytest.raises(IngestError, match=r"was written for 9 buckets, this run has 1"):
        run_ingest(req)
    assert not list((tmp_path / "ds" / "w").glob(".ingest-*"))
    result = run_ingest(req)
    assert result.created and result.manifest.items.ok == 60
