"""The pictures' sample stratified by label: every class shown however the split is stored, the same rows
for the same seed whatever the batches, their order or the workers, and at most `size` classes."""

from __future__ import annotations

import numpy as np
import pytest

from vae_core.data.splits import sample_keys
from vae_core.evaluation.sample import SeededSample, stratified_rows

# A split stored one class folder after another: 10 classes of 200 rows, in class order.
IDS = [f"class{c}/img-{i:03d}.png" for c in range(10) for i in range(200)]
LABELS = np.repeat(np.arange(10), 200)


def _fed(order: np.ndarray, batch: int, size: int = 32, seed: int = 5) -> SeededSample:
    s = SeededSample(size, seed, stratify="label")
    for at in range(0, len(order), batch):
        rows = order[at : at + batch]
        s.add([IDS[r] for r in rows], row=rows, label=LABELS[rows])
    return s


def _expected(size: int, seed: int) -> list[int]:
    """Round robin over the classes: each class's rows by key, the classes of one round in key order."""
    keys = sample_keys(IDS, seed)
    ranked = [(rank, keys[r], r) for c in range(10)
              for rank, r in enumerate(sorted(np.flatnonzero(LABELS == c), key=lambda r: keys[r]))]
    return [r for _, _, r in sorted(ranked)[:size]]


def test_every_class_is_drawn_from_a_split_stored_class_by_class():
    s = _fed(np.arange(len(IDS)), batch=100)
    assert len(s) == 32 and s.seen == 2_000
    assert list(s["row"]) == _expected(32, 5)
    counts = np.bincount(s["label"], minlength=10)
    assert counts.min() == 3 and counts.max() == 4  # 32 places over 10 classes
    assert len(set(s["label"][:10])) == 10  # the first row of a grid already spans the classes
    np.testing.assert_array_equal(s["label"], LABELS[s["row"]])
    assert "stratified by label" in s.describe("the split")
    assert list(stratified_rows(IDS, LABELS, 32, 5)) == _expected(32, 5)  # a split held in memory: the same rows


def test_same_seed_same_rows_whatever_the_batches_order_and_workers():
    whole = _fed(np.arange(len(IDS)), batch=100)
    rng = np.random.default_rng(0)
    merged = SeededSample(32, 5, stratify="label")
    for part in np.array_split(rng.permutation(len(IDS)), 3):  # e.g. three workers, rows in any order
        merged.merge(_fed(part, batch=37))
    for other in (_fed(np.arange(len(IDS))[::-1], batch=7), merged):
        np.testing.assert_array_equal(other["row"], whole["row"])
    assert merged.seen == 2_000
    assert set(_fed(np.arange(len(IDS)), 100, seed=6)["row"]) != set(whole["row"])


def test_more_classes_than_places_shows_the_classes_with_the_smallest_keys():
    s = _fed(np.arange(len(IDS)), batch=250, size=4)
    assert len(set(s["label"])) == 4
    assert list(s["row"]) == _expected(4, 5)
    with pytest.raises(ValueError, match="stratified by 'label' needs that column"):
        SeededSample(4, 0, stratify="label").add(["a"], row=np.array([0]))
