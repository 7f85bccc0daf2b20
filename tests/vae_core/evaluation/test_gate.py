"""The champion gate's decisions, and the tags that record them."""

from __future__ import annotations

import math

import pytest

from vae_core.evaluation.gate import decide, metric_key, refusal


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


def test_the_gate_refuses_frechet_distances_of_a_classifier_that_learned_too_little():
    from vae_core.model.feature_net import min_accuracy, unreliable_features

    assert min_accuracy(10) == pytest.approx(0.55) and min_accuracy(2) == pytest.approx(0.75)
    assert unreliable_features(0.55, 10) is None and unreliable_features(0.98, 10) is None
    weak = unreliable_features(0.098, 10)
    assert weak.startswith("the feature classifier's held-out accuracy is 0.098, below 0.550 (chance is 0.100")
    assert unreliable_features(0.7, 2).startswith("the feature classifier's held-out accuracy is 0.700, below 0.750")
    for metric in ("frechet_samples", "frechet_reconstructions"):
        assert refusal(metric, weak) == (f"the champion gate refuses --metric {metric}: {weak}; choose another "
                                         "--metric (nll, ssim, knn_accuracy, ...) or --no-promote")
        assert refusal(metric, None) is None
    assert refusal("nll", weak) is None  # other metrics do not depend on the classifier


def test_training_warnings_follow_the_reason():
    d = decide("test/nll_k100", 88.0, 3, 90.0, 2).with_warnings(["β ended at 0.1, below its target 1.0",
                                                                  "one worker restarted"])
    assert d.promote and d.reason.endswith("; warning: β ended at 0.1, below its target 1.0; warning: one worker "
                                           "restarted")
    assert d.tags()["gate.reason"] == d.reason
    assert decide("test/nll_k100", 1.0, 1, None, None).with_warnings([]).reason == "there is no champion yet"
