"""Drift in the model's own terms: outlier scores and latent means of a new dataset version against the
training data's, as one model encoded both."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vae_core.data.embeddings.format import vectors
from vae_core.evaluation.drift import SHARE_LIMIT, compare


def _table(rng: np.random.Generator, rows: int, score_shift: float = 0.0, outliers: float = 0.0,
           latent_shift: dict[int, float] | None = None) -> pa.Table:
    """`rows` embeddings: neg_elbo ~ N(100 + score_shift, 5) with a share `outliers` at +60 nats, and 4-dim
    latent means ~ N(0, 2), dimension d moved by latent_shift[d] (raw units: 2 is one standard deviation)."""
    scores = rng.normal(100 + score_shift, 5, rows)
    scores[: int(rows * outliers)] += 60
    mean = rng.normal(0, 2, (rows, 4))
    for d, s in (latent_shift or {}).items():
        mean[:, d] += s
    return pa.table({"mean": vectors(mean), "neg_elbo": pa.array(scores, pa.float32())})


def test_data_like_the_training_data_is_not_flagged():
    rng = np.random.default_rng(0)
    drift = compare(_table(rng, 4000), _table(rng, 4000))
    assert not drift.flagged and drift.reasons == []
    assert 0.003 < drift.share_above_p99 < 0.02  # 1% expected
    assert max(map(abs, drift.shift)) < 0.1
    assert drift.quantiles["q50"][0] == pytest.approx(100, abs=0.5) and set(drift.quantiles) == {
        "q05", "q25", "q50", "q75", "q95", "q99"}
    assert "no drift" in drift.markdown()


def test_planted_outliers_and_a_moved_latent_dimension_are_flagged_naming_each():
    rng = np.random.default_rng(1)
    reference = _table(rng, 4000)
    outliers = compare(reference, _table(rng, 2000, outliers=0.08))  # 8% unlike anything trained on
    assert outliers.share_above_p99 > SHARE_LIMIT and len(outliers.reasons) == 1
    assert "of the images score above the training data's 99th percentile" in outliers.reasons[0]
    moved = compare(reference, _table(rng, 2000, latent_shift={2: 2.0}))  # one reference std
    assert len(moved.reasons) == 1 and "1 latent dimension(s) moved by more than 0.5 std: 2 (+" in moved.reasons[0]
    assert moved.shift[2] == pytest.approx(1.0, abs=0.1)
    assert "**drift**" in moved.markdown() and "(dim 2)" in moved.markdown()
    summary = moved.summary()
    assert summary["flagged"] is True and summary["max_abs_shift"] == pytest.approx(moved.shift[2])
    picture = moved.picture()
    assert picture.size == (1000, 360) and picture.mode == "RGB"


def test_rows_without_a_score_are_left_out_and_a_table_without_scores_is_refused():
    rng = np.random.default_rng(2)
    with_nulls = _table(rng, 100)
    scores = with_nulls.column("neg_elbo").to_pylist()
    with_nulls = with_nulls.set_column(1, "neg_elbo", pa.array([None] * 10 + scores[10:], pa.float32()))
    assert compare(_table(rng, 100), with_nulls).current_rows == 90
    with pytest.raises(ValueError, match="the reference embeddings have no neg_elbo column"):
        compare(with_nulls.drop(["neg_elbo"]), with_nulls)
    unscored = with_nulls.set_column(1, "neg_elbo", pa.nulls(100, pa.float32()))
    with pytest.raises(ValueError, match="the current embeddings have no outlier scores"):
        compare(with_nulls, unscored)
