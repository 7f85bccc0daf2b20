"""`vae demo`: the whole chain on one machine, offline: ingest, train, evaluate and promote, encode.

It is the `nightly-retrain` flow with the embedded default (scikit-learn's digits, shipped with the
package) or an MNIST folder, a small training budget, and `retrain="always"`, so every demo trains a new
version and shows the champion gate at work. What it prints is where to look afterwards.
"""

from __future__ import annotations

from pathlib import Path

from vae_core.requests import IngestRequest, NightlyRequest
from vae_core.results import NightlyResult

# (preset, epochs, importance samples): a minute or so for digits, a few for MNIST on a 2-core CPU.
BUDGETS = {"digits": ("digits", 20, 100), "mnist": ("mnist", 2, 10)}


def demo_request(source: str | None = None, epochs: int | None = None) -> NightlyRequest:
    """The demo's nightly request: the built-in digits when `source` is None, else the MNIST folder `source`."""
    name = "digits" if source is None else "mnist"
    preset, default_epochs, k = BUDGETS[name]
    return NightlyRequest(
        ingest=IngestRequest(source=source or "builtin:digits", name=name),
        train={"preset": preset, "epochs": epochs or default_epochs},
        evaluate={"iw_samples": k},
        retrain="always",
    )


class DemoResult(NightlyResult):
    """The nightly flow's result, plus where to look (what `vae demo --json` prints)."""

    where: dict[str, str]  # the MLflow UI, the champion; the HTML report and the embeddings where made


def where_to_look(out: NightlyResult) -> dict[str, str]:
    """Commands and paths that show what the demo made: the MLflow UI, the HTML report, the embeddings and the
    registered champion."""
    from flows.tracking import runs as tracking
    from flows.tracking.registry import CHAMPION, model_uri

    uri = tracking.tracking_uri()
    ui = uri if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}"
    looks = {"mlflow": ui, "champion": model_uri(out.model_name, CHAMPION)}
    if out.report:
        looks["report"] = out.report
    if out.embeddings:
        looks["embeddings"] = out.embeddings
    return looks


def run_demo(source: Path | str | None = None, epochs: int | None = None, progress: bool = True) -> DemoResult:
    """Run the chain (see the module docstring); returns the nightly flow's result plus `where` (where_to_look).

    The stages join one Ray (`ray_session`: the local one started here, or $RAY_ADDRESS's cluster) instead of
    each starting and stopping a local Ray of its own, which costs seconds a stage."""
    from flows.distributed.cluster import ray_session
    from flows.nightly import nightly_retrain

    with ray_session():
        out = nightly_retrain(demo_request(None if source is None else str(source), epochs), progress=progress)
    return DemoResult(**dict(out), where=where_to_look(out))
