"""The champion gate's decisions, and the tags that record them."""

from __future__ import annotations

import math

import pytest

from vae_core.evaluation.gate import decide, metric_key


def test_first_model_becomes_champion():
    d = decide("test/nll_k100", 90.0, 1, None, None)
    assert d.promote and d.reason == "there is no champion yet"
    assert d.tags()["gate.champion"] == "none" and d.tags()["gate.decision"] == "promoted"


def test_better_by_the_margin_promotes_and_worse_or_tied_does_not():
    better = decide("test/nll_k100", 88.0, 3, 90.0, 2, margin=1.0)
    assert better.promote and "2.0000 lower (better)" in better.reason
    assert better.tags() == {"gate.decision": "promoted", "gate.reason": better.reason,
                             "gate.metric": "test/nll_k100", "gate.margin": "1.0", "gate.challenger": "88.0",
                             "gate.champion": "90.0", "gate.champion_version": "2"}
    assert not decide("test/nll_k100", 89.5, 3, 90.0, 2, margin=1.0).promote  # better, not by enough
    assert not decide("test/nll_k100", 90.0, 3, 90.0, 2).promote  # a tie keeps the champion
    worse = decide("test/nll_k100", 95.0, 3, 90.0, 2)
    assert not worse.promote and worse.tags()["gate.decision"] == "kept"


def test_higher_is_better_metrics_and_non_numbers():
    assert decide("test/knn_accuracy", 0.9, 3, 0.8, 2, higher_is_better=True).promote
    assert not decide("test/knn_accuracy", 0.7, 3, 0.8, 2, higher_is_better=True).promote
    assert not decide("test/nll_k100", math.nan, 3, 90.0, 2).promote
    assert decide("test/nll_k100", 90.0, 3, math.inf, 2).promote
    same = decide("test/nll_k100", 80.0, 2, None, 2)
    assert not same.promote and "already the champion" in same.reason
    with pytest.raises(ValueError, match="margin"):
        decide("test/nll_k100", 1.0, 1, None, None, margin=-1)


def test_metric_keys_carry_k_only_where_k_matters():
    assert metric_key("nll", 1000) == "nll_k1000" and metric_key("bits_per_dim", 5) == "bits_per_dim_k5"
    assert metric_key("frechet_samples", 1000) == "frechet_samples"
