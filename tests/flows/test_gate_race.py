"""Champion gates that decide at the same moment (the nightly and a manual evaluation, or several at once on a
stack) are serialised by the registry lock: one promotion, one record, one alias move, and the lock gone after."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

GATES = 6


@pytest.fixture
def two_versions(tmp_path, monkeypatch, register_model):
    """vae-digits version 1 (champion, by its gate) and version 2 (not yet evaluated), in a fresh local store."""
    from flows.evaluate import Target, gate_task
    from flows.tracking import registry
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import EvaluateRequest, IngestRequest

    monkeypatch.setenv("VAE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_ingest(IngestRequest(source="builtin:digits", name="digits"))
    first, second = (registry.pin_model(f"models:/vae-digits/{register_model(name='vae-digits', preset='digits', dataset='digits')}")
                     for _ in range(2))
    request = EvaluateRequest(model=second.uri, iw_samples=5)
    gate_task.fn(request, Target(first, None, None), {"nll_k5": 100.0}, None)
    return request, first, second


def test_concurrent_gates_promote_once_and_keep_the_record(two_versions):
    from flows.evaluate import Target, gate_task
    from flows.tracking import registry

    request, first, second = two_versions
    start = threading.Barrier(GATES)

    def gate(_: int):
        start.wait()  # every gate read the champion (version 1) at its start, and decides now
        return gate_task.fn(request, Target(second, first, None), {"nll_k5": 90.0}, {"nll_k5": 100.0})

    with ThreadPoolExecutor(GATES) as pool:
        decisions = list(pool.map(gate, range(GATES)))

    assert sum(d.promote for d in decisions) == 1, [d.reason for d in decisions]
    assert all("champion moved to version 2" in d.reason for d in decisions if not d.promote)
    tags = registry.client().get_model_version("vae-digits", str(second.version)).tags
    assert tags["gate.decision"] == "promoted", tags  # not overwritten by the gates that came second
    assert registry.alias_version("vae-digits", "champion") == second.version
    names = [m.name for m in registry.client().search_registered_models()]
    assert names == ["vae-digits"], names  # the lock is released


def test_a_stale_lock_is_taken_over_and_a_held_one_waited_for(two_versions, monkeypatch):
    from flows.tracking import registry, registry_lock
    from vae_core.errors import EvaluateError

    registry.client().create_registered_model("vae-digits.gate-lock", tags={"holder": "gone", "since": "0"})
    with registry_lock.gate_lock("vae-digits", wait_s=5):  # older than STALE_S: taken over
        with pytest.raises(EvaluateError, match="another champion gate of 'vae-digits' has held"):
            with registry_lock.gate_lock("vae-digits", wait_s=0.5):
                pass
    assert [m.name for m in registry.client().search_registered_models()] == ["vae-digits"]
