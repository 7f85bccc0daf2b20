"""The seeded sample an evaluation keeps while a split streams past: its size, its rows whatever the
batches or their order, and the rows a dataset's `sample_split` reads."""

from __future__ import annotations

import numpy as np
import pytest

from vae_core.data.splits import sample_keys
from vae_core.evaluation.sample import SeededSample

IDS = [f"item-{i:05d}" for i in range(5_000)]


def _fed(ids: list[str], batch: int, size: int = 300, seed: int = 3) -> SeededSample:
    s = SeededSample(size, seed)
    for at in range(0, len(ids), batch):
        part = ids[at : at + batch]
        rows = np.array([int(i.split("-")[1]) for i in part])
        s.add(part, row=rows, label=rows % 10)
    return s


def test_the_sample_is_the_rows_with_the_smallest_keys_whatever_the_batches_and_order():
    expected = np.sort(np.argsort(sample_keys(IDS, 3))[:300])
    for batch, ids in ((7, IDS), (500, IDS), (5_000, IDS), (64, IDS[::-1])):
        s = _fed(ids, batch)
        assert len(s) == 300 and s.seen == 5_000
        np.testing.assert_array_equal(np.sort(s["row"]), expected)
        np.testing.assert_array_equal(s["label"], s["row"] % 10)  # each kept row keeps its own columns
        assert list(s["row"]) == sorted(s["row"], key=lambda r: sample_keys([IDS[r]], 3)[0])


def test_another_seed_another_sample_and_a_short_stream_is_kept_whole():
    assert set(_fed(IDS, 100)["row"]) != set(_fed(IDS, 100, seed=4)["row"])
    short = _fed(IDS[:120], 50)
    assert len(short) == 120 and short.describe("the split") == "all 120 rows of the split"
    assert "300 of the 5,000 rows" in _fed(IDS, 100).describe("the split")
    with pytest.raises(ValueError, match="at least 1 row"):
        SeededSample(0, 0)


def test_samples_of_parts_merge_into_the_sample_of_the_whole():
    whole = _fed(IDS, 100)
    merged = SeededSample(300, 3)
    for part in (IDS[:1234], IDS[1234:4000], IDS[4000:]):  # e.g. scored on three workers
        merged.merge(_fed(part, 77))
    assert merged.seen == 5_000
    np.testing.assert_array_equal(merged["row"], whole["row"])
    with pytest.raises(ValueError, match="seeds"):
        merged.merge(_fed(IDS[:10], 5, seed=4))
