"""Where an evaluation's results go: metrics to the model's training run, pictures and the HTML report to
`$VAE_HOME/reports/<model>/<version>/` and the run's `evaluation/<split>_k<K>/`, and the markdown summary
that becomes the Prefect artifact; and what the training run warns of (`warning/<name>` tags)."""

from __future__ import annotations

import io
import json
import posixpath
from typing import TYPE_CHECKING

from flows.tracking import runs as tracking
from flows.tracking.registry import PinnedModel
from vae_core.settings import reports_root
from vae_core.storage import atomic_write_bytes, resolve, to_url

if TYPE_CHECKING:
    from PIL import Image

    from vae_core.evaluation.evaluate import Evaluation
    from vae_core.requests import EvaluateRequest
    from vae_core.results import EvaluateResult

REPORT = "report.html"
WARNING_TAG = "warning/"  # a training run's tag `warning/<name>`: one sentence saying what went wrong


def training_warnings(run_id: str) -> dict[str, str]:
    """The training run's warnings, {name: sentence}, from its `warning/<name>` tags, by name."""
    tags = tracking.client().get_run(run_id).data.tags
    return {k[len(WARNING_TAG):]: v for k, v in sorted(tags.items()) if k.startswith(WARNING_TAG)}


def log_evaluation(model: PinnedModel, req: EvaluateRequest, evaluation: Evaluation, facts: dict[str, str]) -> None:
    """Metrics as `<split>/<name>` into the model's training run, and tags saying what they were measured on."""
    run = tracking.RunLogger(model.run_id)
    run.log_metrics(evaluation.keyed(req.split), step=0)
    run.set_tags({f"evaluation.{req.split}.{k}": v for k, v in
                  {"dataset": facts["dataset"], "images": facts["images"], "k": str(req.iw_samples),
                   "seed": str(req.seed)}.items()})


def write_report(model: PinnedModel, req: EvaluateRequest, facts: dict[str, str], evaluation: Evaluation,
                 pictures: dict[str, Image.Image]) -> dict[str, str]:
    """Write every picture (PNG), `metrics.json` and the self-contained `report.html` under
    `<reports_root>/<model>/<version>/`, and log them to the training run. Returns {name: URL}."""
    from vae_core.evaluation.report import render_html

    metrics = evaluation.keyed(req.split)
    html = render_html(f"{model.name} version {model.version}: {req.split} split", facts, metrics, pictures,
                       evaluation.notes)
    files: dict[str, bytes] = {f"{name}.png": png_bytes(image) for name, image in pictures.items()}
    files["metrics.json"] = json.dumps({"facts": facts, "metrics": metrics, "notes": evaluation.notes},
                                       indent=2).encode()
    files[REPORT] = html.encode()
    written = publish(model, "", f"evaluation/{req.split}_k{req.iw_samples}", files)
    return {name.rsplit(".", 1)[0]: url for name, url in written.items()}


def publish(model: PinnedModel, subfolder: str, artifact_path: str, files: dict[str, bytes]) -> dict[str, str]:
    """Write `files` ({name: bytes}) under `<reports_root>/<model>/<version>/<subfolder>` (atomically, each) and
    log them to the model's training run under `artifact_path`; returns {name: URL}."""
    fs, folder = resolve(posixpath.join(reports_root(), model.name, str(model.version), *filter(None, [subfolder])))
    fs.makedirs(folder, exist_ok=True)
    written = {}
    for name, data in files.items():
        atomic_write_bytes(fs, posixpath.join(folder, name), data)
        written[name] = to_url(fs, posixpath.join(folder, name))
    _log_artifacts(model.run_id, artifact_path, files)
    return written


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _log_artifacts(run_id: str, folder: str, files: dict[str, bytes]) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="vae-eval-") as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        tracking.client().log_artifacts(run_id, tmp, artifact_path=folder)


def summary_markdown(out: EvaluateResult) -> str:
    """The Prefect artifact: what was evaluated, the decision, the metric table and where to look."""
    decision = out.decision
    verdict = "gate not run (--no-promote)" if decision is None else (
        f"**{'promoted to champion' if decision.promote else 'not promoted'}**: {decision.reason}")
    champion = out.champion
    rows = []
    for key, value in sorted(out.metrics.items()):
        if "/kl_dim_" in key:
            continue
        theirs = champion.metrics.get(key) if champion else None
        rows.append(f"| {key} | {value:.4g} | {'' if theirs is None else f'{theirs:.4g}'} |")
    champion_head = f"champion v{champion.version}" if champion else "champion"
    head = f"| metric | v{out.model_version} | {champion_head} |"
    notes = "".join(f"- {n}\n" for n in out.notes)
    return (
        f"# evaluate-vae: {out.model_uri}\n\n"
        f"- Asked for: `{out.asked}`; dataset `{out.dataset}@{out.dataset_version}`, split "
        f"`{out.split}`, {out.images:,} images, K = {out.iw_samples}, seed {out.seed}\n"
        f"- Gate: {verdict}\n"
        f"- MLflow run: `{out.run_id}` ({out.run_url})\n"
        f"- Report: {out.report_url}\n\n{notes}\n{head}\n|---|---|---|\n" + "\n".join(rows) + "\n"
    )
