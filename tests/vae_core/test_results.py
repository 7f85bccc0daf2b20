"""The stage results: what `--json` prints (keys in order, values as JSON), and what they accept back."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from vae_core.evaluation.gate import Decision
from vae_core.results import EvaluateResult, FeatureClassifier, IngestResult, NightlyResult, NoFeatureClassifier

EVALUATED = {
    "model_name": "vae-mnist", "model_version": 4, "model_uri": "models:/vae-mnist/4",
    "asked": "models:/vae-mnist@challenger", "run_id": "r4", "run_url": "sqlite:///x.db (run r4)",
    "dataset": "mnist", "dataset_version": "abc", "split": "test", "images": 100, "iw_samples": 5, "seed": 0,
    "metrics": {"test/nll_k5": 95.0, "test/frechet_samples": math.nan}, "notes": [],
    "feature_classifier": {"skipped": "no labelled reference split to train the feature classifier on"},
    "champion": {"version": 3, "metrics": {"test/nll_k5": 97.0}},
    "decision": {"promote": True, "reason": "better", "metric": "test/nll_k5", "challenger": 95.0,
                 "challenger_version": 4, "champion": 97.0, "champion_version": 3, "margin": 0.0},
    "report": {"report": "file:///r/report.html", "samples": "file:///r/samples.png"},
}


def test_ingest_result_prints_the_summary_keys_in_order(tmp_path):
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    published = run_ingest(IngestRequest(source="builtin:digits", name="digits", data_root=str(tmp_path), workers=1))
    out = json.loads(json.dumps(published.summary().model_dump(mode="json")))
    assert list(out) == ["name", "version", "path", "created", "counts", "shape", "seen", "duplicates",
                         "label_conflicts", "quarantined", "nodes", "retries"]
    assert out["shape"] == [8, 8, 1] and out["created"] and out["path"] == published.url
    assert IngestResult.model_validate(out) == published.summary() and published.summary().ref == \
        f"digits@{published.version}"


def test_evaluate_result_round_trips_through_json_with_its_nested_parts_typed():
    result = EvaluateResult.model_validate(EVALUATED)
    assert isinstance(result.feature_classifier, NoFeatureClassifier) and isinstance(result.decision, Decision)
    assert result.decision.tags()["gate.decision"] == "promoted" and result.report_url == "file:///r/report.html"
    text = json.dumps(result.model_dump(mode="json"))
    assert '"test/frechet_samples": NaN' in text  # as `json.dumps` of the metrics prints it
    again = EvaluateResult.model_validate(json.loads(text))
    assert again.decision == result.decision and list(json.loads(text)) == list(EVALUATED)

    measured = {"test_accuracy": 0.9, "accuracy_split": "test", "num_classes": 10, "train_rows": 1000,
                "cached": True, "path": "file:///f"}
    assert isinstance(EvaluateResult.model_validate({**EVALUATED, "feature_classifier": measured}).feature_classifier,
                      FeatureClassifier)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        EvaluateResult.model_validate({**EVALUATED, "feature_classifier": {**measured, "skipped": "both"}})


def test_a_nightly_result_names_its_dataset_and_model():
    dataset = {"name": "mnist", "version": "abc", "changed": False, "counts": {"train": 10}}
    out = NightlyResult(dataset=dataset, model_name="vae-mnist")
    assert out.champion.before is None and out.skipped == {} and out.decision is None
    with pytest.raises(ValidationError, match="model_name"):
        NightlyResult(dataset=dataset)
