"""Real MNIST (../shared/data/mnist) through ingestion: counts, labels, exact pixels, splits, re-runs."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import vae_core.ingestion.progress
from vae_core.data.shards import open_dataset, read_split_u8, shard_paths
from vae_core.data.splits import id_hash_unit
from vae_core.ingestion.ingest import run_ingest
from vae_core.requests import IngestRequest

MNIST = Path(__file__).resolve().parents[4] / "shared" / "data" / "mnist"

pytestmark = pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists(), reason="MNIST files not present")


def _idx(name: str) -> np.ndarray:
    """Independent IDX reader for the checks: gzip + fixed MNIST header sizes."""
    data = gzip.decompress((MNIST / name).read_bytes())
    header = 16 if "images" in name else 8
    return np.frombuffer(data, np.uint8, offset=header)


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist-ds")
    cfg = IngestRequest(name="mnist", source=str(MNIST), data_root=str(root))
    result = run_ingest(cfg)
    info = open_dataset(str(root), "mnist")
    splits = {s: read_split_u8(info, s) for s in ("train", "val", "test")}
    return cfg, result, info, splits


def test_counts_shape_and_labels(mnist):
    _, result, info, splits = mnist
    m = info.manifest
    assert result.created and info.version == result.version
    assert (m.height, m.width, m.channels) == (28, 28, 1)
    assert m.counts["train"] + m.counts["val"] == 60_000 and m.counts["test"] == 10_000
    assert m.items.seen == 70_000 and m.items.ok == 70_000 and m.items.quarantined == 0
    assert m.label_names == [str(i) for i in range(10)]
    assert m.source.kind == "idx"
    for s, (x, y, ids) in splits.items():
        assert x.shape == (m.counts[s], 28, 28, 1) and len(ids) == len(y) == m.counts[s]
        assert y.min() >= 0 and y.max() == 9  # every row labelled
    # Normalisation stats of the train split are the familiar MNIST ones.
    assert m.channel_mean[0] == pytest.approx(0.1307, abs=5e-4)
    assert m.channel_std[0] == pytest.approx(0.3081, abs=5e-4)


def test_pixels_and_labels_are_byte_identical_to_the_idx_files(mnist):
    _, _, _, splits = mnist
    for prefix in ("train", "t10k"):
        images = _idx(f"{prefix}-images-idx3-ubyte.gz").reshape(-1, 28, 28, 1)
        labels = _idx(f"{prefix}-labels-idx1-ubyte.gz")
        seen = 0
        for x, y, ids in splits.values():
            rows = [(k, int(i.split("/")[1])) for k, i in enumerate(ids) if i.startswith(prefix + "/")]
            if not rows:
                continue
            k, idx = map(np.array, zip(*rows))
            np.testing.assert_array_equal(x[k], images[idx])
            np.testing.assert_array_equal(y[k], labels[idx])
            seen += len(rows)
        assert seen == len(images)  # every IDX image is in exactly one split


def test_train_val_carve_is_deterministic_by_id(mnist):
    cfg, _, _, splits = mnist
    val_ids = splits["val"][2]
    train_ids = splits["train"][2]
    assert all(i.startswith("train/") for i in val_ids) and all(i.startswith("t10k/") for i in splits["test"][2])
    # val is exactly the train items whose id hashes below val_fraction, nothing random.
    assert (id_hash_unit(val_ids) < cfg.val_fraction).all()
    assert (id_hash_unit(train_ids) >= cfg.val_fraction).all()
    assert 0.09 < len(val_ids) / 60_000 < 0.11
    # Rows keep source order within a split.
    assert train_ids[:3] == sorted(train_ids[:3], key=lambda i: int(i.split("/")[1]))


def test_rerun_is_a_no_op_with_the_same_version(mnist):
    cfg, first, info, _ = mnist
    root = Path(cfg.data_root)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = run_ingest(cfg)
    assert not again.created and again.version == first.version
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert after == before  # nothing written, not even a temporary file


def test_shards_read_back_with_plain_pyarrow_and_pandas(mnist):
    _, _, info, splits = mnist
    files = shard_paths(info, "test", urls=True)
    table = pq.read_table(files[0]) if len(files) == 1 else pq.ParquetDataset(files).read()
    assert table.schema.field("image").type.byte_width == 784
    assert table.num_rows == 10_000
    df = pd.read_parquet(os.path.dirname(files[0]))
    assert list(df.columns) == ["id", "image", "label", "source"]
    assert len(df) == 10_000 and df["label"].between(0, 9).all()
    first = np.frombuffer(df["image"].iloc[0], np.uint8).reshape(28, 28, 1)
    np.testing.assert_array_equal(first, splits["test"][0][0])
    assert df["source"].iloc[0].endswith("t10k-images-idx3-ubyte.gz#0")
    for shard in info.manifest.splits["train"].shards:
        meta = pq.ParquetFile(f"{info.url}/{shard.path}").metadata
        assert meta.num_rows == shard.rows
        assert meta.row_group(0).column(1).compression == "ZSTD"


def test_small_shards_split_rows_without_losing_any(tmp_path):
    cfg = IngestRequest(name="mnist-small", source=str(MNIST), data_root=str(tmp_path), limit=5000, shard_mb=0.5)
    info = open_dataset(str(tmp_path), run_ingest(cfg).name)
    shards = info.manifest.splits["train"].shards
    rows_per_shard = (512 * 1024) // 784
    # One content bucket here (5,000 rows): its split's rows fill every shard but one.
    assert len(shards) > 1 and sorted(s.rows for s in shards)[1:] == [rows_per_shard] * (len(shards) - 1)
    x, _, ids = read_split_u8(info, "train")
    assert len(ids) == info.counts["train"] == sum(s.rows for s in shards)
    expected = _idx("train-images-idx3-ubyte.gz").reshape(-1, 28, 28, 1)
    np.testing.assert_array_equal(x, expected[[int(i.split("/")[1]) for i in ids]])


def test_limit_is_a_sample_spread_over_the_whole_source(tmp_path, monkeypatch):
    totals: list[int | None] = []
    real = vae_core.ingestion.progress.tqdm

    def bar(*args, **kw):
        totals.append(kw.get("total"))
        return real(*args, **kw)

    monkeypatch.setattr(vae_core.ingestion.progress, "tqdm", bar)
    cfg = IngestRequest(name="mnist-2k", source=str(MNIST), data_root=str(tmp_path / "a"), limit=2000)
    r = run_ingest(cfg)
    c = r.manifest.counts
    assert sum(c.values()) == r.manifest.items.seen == 2000 and totals == [2000]
    assert c["test"] == 2000 - 60_000 * 2000 // 70_000  # 286: 60,000 train items come first, then t10k
    assert 0.07 < c["val"] / (c["train"] + c["val"]) < 0.13  # val carved from train as usual
    again = run_ingest(cfg.model_copy(update={"data_root": str(tmp_path / "b")}))
    assert again.created and again.version == r.version  # the same rows (the version hashes them)
