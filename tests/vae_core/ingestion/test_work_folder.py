"""The work folder a run resumes from, and what the reduce step sums.

Parts committed under another bucket count are never mixed with this run's (their rows would sit in buckets
no reduce task reads): the run that finds them says so and leaves a clean start for the next. The channel
statistics are the train rows', channel by channel."""

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


def test_channel_statistics_are_those_of_the_train_rows_channel_by_channel(tmp_path):
    from vae_core.data.shards import open_dataset, read_split_u8

    rng = np.random.default_rng(8)
    for i in range(40):  # each channel its own range, so a channel mix-up shows
        pixels = np.stack([rng.integers(0, 60, (5, 5)), rng.integers(100, 160, (5, 5)), rng.integers(200, 256, (5, 5))],
                          axis=-1).astype(np.uint8)
        (tmp_path / "rgb" / "k").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(tmp_path / "rgb" / "k" / f"{i}.png")
    r = run_ingest(IngestRequest(source=str(tmp_path / "rgb"), name="rgb", data_root=str(tmp_path / "ds")))
    train = read_split_u8(open_dataset(str(tmp_path / "ds"), "rgb"), "train")[0].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(r.manifest.channel_mean, train.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(r.manifest.channel_std, train.std(axis=0), atol=1e-6)
