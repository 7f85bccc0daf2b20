"""deploy/prefect.yaml and deploy/README.md agree with the flows: every deployment loads its flow, its default
request is valid, the nightly schedule is 02:00 UTC, and the README documents every field of every request."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "deploy" / "prefect.yaml"
EXPECTED = {"ingest-dataset/default", "train-vae/default", "evaluate-vae/default", "encode-dataset/default",
            "nightly-retrain/nightly"}


def _deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


def _flow(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)


def _annotation(flow) -> type:
    """The pydantic class of a flow's `request` parameter."""
    hints = inspect.get_annotations(flow.fn, eval_str=True)
    return hints["request"]


def test_every_deployment_loads_its_flow_and_its_default_request_is_valid():
    names = set()
    for d in _deployments():
        flow = _flow(d["entrypoint"])
        names.add(f"{flow.name}/{d['name']}")
        assert ".py:" not in d["entrypoint"], "module entrypoints: a worker runs the installed package"
        assert set(d["parameters"]) == {"request"}, d["parameters"]
        model = _annotation(flow)
        model.model_validate(d["parameters"]["request"])  # raises naming the field when the default is stale
        assert d["work_pool"]["name"] == "vae-local"
    assert names == EXPECTED


def test_nightly_runs_at_two_utc_and_one_at_a_time():
    (nightly,) = [d for d in _deployments() if d["name"] == "nightly"]
    (schedule,) = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"] == "UTC" and schedule["active"] is True
    assert nightly["concurrency_limit"] == 1
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # Prefect accepts it as written


def _documented_fields(readme: str) -> dict[str, list[str]]:
    """`### \\`deployment\\`: \\`Model\\`` sections of deploy/README.md -> the field column of their table."""
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"^### `([^`]+)`: `(\w+)`\n(.*?)(?=^#|\Z)", readme, re.M | re.S):
        out[m[2]] = re.findall(r"^\| `(\w+)` \|", m[3], re.M)
    return out


def test_deploy_readme_documents_every_field_of_every_request():
    documented = _documented_fields((ROOT / "deploy" / "README.md").read_text())
    models = {_annotation(_flow(d["entrypoint"])) for d in _deployments()}
    assert {m.__name__ for m in models} == set(documented)
    for model in models:
        assert documented[model.__name__] == list(model.model_fields), model.__name__


def test_a_stale_default_request_is_caught():
    """The check above is live: a misspelled field in a default request fails validation, naming it."""
    from vae_core.requests import TrainRequest

    with pytest.raises(Exception, match="epoch"):
        TrainRequest.model_validate({"dataset": "digits", "epoch": 3})
