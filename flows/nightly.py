"""The `nightly-retrain` flow: keep the champion model and its embeddings fresh as data arrives.

    ingest-dataset  ->  train-vae  ->  evaluate-vae (champion gate)  ->  encode-dataset (with the champion)

Each stage is the stage's own flow, called here as a sub-flow (a child run in Prefect's UI), with the
request `NightlyRequest` builds for it. A stage runs only when something calls for it:

- ingest always runs; the dataset version is a content hash, so an unchanged source gives the version
  already there and writes nothing.
- train runs when `retrain="always"`, or when no version of the model was trained on this dataset
  version yet (the champion's `dataset_version` tag is another one, or there is no champion). A version
  trained on it that the gate never saw (an earlier run stopped after training) is evaluated instead of
  training another; one the gate already kept out is not trained again.
- evaluate runs on the version just trained (or found unevaluated), pinned as `models:/NAME/VERSION`, on
  the ingested version, with the champion gate: `evaluate-vae` moves `@champion` when it wins.
- encode runs with the champion, pinned, when the champion changed, the dataset changed, or that
  champion's embeddings of this dataset version are missing or incomplete (its manifest against the
  dataset's row counts); encoding is incremental and exactly once per row anyway.

With nothing changed, nothing runs after ingest: no model version, no alias move, no MLflow run, no file.

A failed stage stops the run (the flow run fails with a `StageError` naming the stage and the cause) and
leaves the previous champion and its embeddings as they were:

- train registers its model only after training finished, as @challenger; it never touches @champion.
- evaluate's gate records its decision on the challenger and then moves @champion in one registry call,
  as its last step before the report: a failure before it leaves the alias where it was. (A failure
  after it, writing the report, leaves @champion on the challenger that was evaluated and won; the next
  run finds the new champion without its embeddings and encodes them.)
- encode never moves an alias, and never writes another model version's files: a file's name carries
  its input shard's checksum and the model version (`<sha256>-v<version>.parquet`), by default under
  that version's own folder, so even a shared `out` folder keeps the previous champion's files. Each file
  appears atomically, a published one is not written again (unless the encode options ask for
  `overwrite`), and the manifest is written last, only when every file it lists is there.

Retries: Prefect 3 flows take `retries` but no `retry_condition_fn` (tasks do), and a flow-level retry
would also re-run a training that failed on bad data. Each sub-flow call goes through
`flows.retries.call_with_retries` instead, which retries only errors a later try may not meet (`is_transient`:
connection errors, timeouts, I/O errors other than a missing file or a denied permission, 5xx answers
from MLflow or Prefect's API), after `retry_delay_s`, doubling. A `VAEError` (TrainError,
NonFiniteLossError, ConfigError, EvaluateError, EncodeError, ModelNotFoundError, ...) names a problem
in the data, the model or the request and is never retried. Every try is its own child flow run.

The run ends with the Markdown artifact `nightly-retrain-summary`: per stage, what ran or was skipped
and why, or where it failed.
"""

from __future__ import annotations

import math
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.tracking import registry
from flows.tracking import runs as tracking
from flows.retries import call_with_retries
from flows.encode import encode_dataset
from flows.evaluate import evaluate_vae
from flows.ingest import ingest_dataset
from flows.tracking.registry import PinnedModel
from flows.train import train_vae
from vae_core.data import embeddings
from vae_core.errors import ModelNotFoundError
from vae_core.requests import EncodeRequest, NightlyRequest
from vae_core.settings import data_root, embeddings_root
from vae_core.data.shards import resolve

T = TypeVar("T")
STAGES = ("ingest", "train", "evaluate", "encode")
ARTIFACT_KEY = "nightly-retrain-summary"
CHAMPION = "champion"

class StageError(RuntimeError):
    """A stage of `nightly-retrain` failed (after its retries); `stage` names it, `__cause__` is the error."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        self.stage = stage
        super().__init__(f"nightly-retrain stopped at {stage}: {type(cause).__name__}: {cause}")


# --- the run's record ----------------------------------------------------------------------------


@dataclass
class Record:
    """What this run did, stage by stage: the flow's result and the artifact are both made from it."""

    model_name: str | None = None
    dataset: dict[str, Any] = field(default_factory=dict)
    trained: int | None = None
    evaluated: int | None = None
    promoted: bool = False
    decision: dict[str, Any] | None = None
    champion_before: int | None = None
    champion_after: int | None = None
    encoded: int | None = None
    embeddings: str | None = None
    report: str | None = None  # the evaluation's HTML report
    notes: dict[str, str] = field(default_factory=dict)  # stage -> what it did, in one line
    skipped: dict[str, str] = field(default_factory=dict)  # stage -> why it did not run
    failed: dict[str, str] = field(default_factory=dict)
    flow_runs: dict[str, str] = field(default_factory=dict)  # stage -> the child flow run (the last try)
    mlflow_runs: dict[str, str] = field(default_factory=dict)
    nightly_run: str | None = None  # this flow run

    def skip(self, stage: str, reason: str) -> None:
        self.skipped[stage] = reason
        self.notes[stage] = f"skipped: {reason}"

    def result(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "model_name": self.model_name,
            "trained": self.trained,
            "evaluated": self.evaluated,
            "promoted": self.promoted,
            "decision": self.decision,
            "champion": {"before": self.champion_before, "after": self.champion_after},
            "encoded": self.encoded,
            "embeddings": self.embeddings,
            "report": self.report,
            "notes": self.notes,
            "skipped": self.skipped,
            "failed": self.failed,
            "flow_runs": {"nightly": self.nightly_run, **self.flow_runs},
            "mlflow_runs": self.mlflow_runs,
        }

    def markdown(self) -> str:
        ds = self.dataset
        title = f"{ds['name']}@{ds['version']}" if ds.get("version") else ds.get("name", "")
        rows = []
        for stage in STAGES:
            note = self.notes.get(stage, "not reached")
            rows.append(f"| {stage} | {_cell(note)} | {self.flow_runs.get(stage, '')} |")
        champion = (f"v{self.champion_before}" if self.champion_before else "none") + " -> " + \
                   (f"v{self.champion_after}" if self.champion_after else "none")
        lines = [f"# nightly-retrain: {title}", "",
                 "| stage | outcome | flow run |", "|---|---|---|", *rows, "",
                 f"- Champion of `{self.model_name}`: {champion}" if self.model_name else "- Model: not reached"]
        if self.report:
            lines.append(f"- Evaluation report: `{self.report}`")
        if self.embeddings:
            lines.append(f"- Embeddings: `{self.embeddings}`")
        lines += [f"- MLflow run ({stage}): `{run_id}`" for stage, run_id in self.mlflow_runs.items()]
        if self.nightly_run:
            lines.append(f"- This run: `{self.nightly_run}`")
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --- decisions -----------------------------------------------------------------------------------


def champion_of(model_name: str) -> PinnedModel | None:
    """The version `@champion` names now, pinned; None when the model or the alias does not exist."""
    try:
        return registry.pin_model(registry.model_uri(model_name, CHAMPION))
    except ModelNotFoundError:
        return None


@dataclass(frozen=True)
class TrainPlan:
    """What to do about a model for the dataset version: train one, evaluate one already trained, or
    nothing; and why."""

    train: bool
    evaluate: int | None  # an already registered version the gate has not seen
    reason: str


def plan_training(request: NightlyRequest, model_name: str, champion: PinnedModel | None, dataset: str,
                  version: str, on_version: list[tuple[int, dict[str, str]]]) -> TrainPlan:
    """The train rule (see the module's docstring). `on_version`: (version, tags) of the model versions
    trained on this dataset version, newest first."""
    ref = f"{dataset}@{version}"
    if request.retrain == "always":
        return TrainPlan(True, None, "retrain='always'")
    if champion is not None and champion.dataset_version == version:
        return TrainPlan(False, None, f"champion v{champion.version} trained on this version ({ref}): no retraining")
    if on_version:
        newest, tags = on_version[0]
        if "gate.decision" not in tags:
            return TrainPlan(False, newest, f"v{newest} was trained on {ref} but not evaluated yet (an earlier run "
                                            "stopped): evaluating it instead of training another")
        verdict = "promoted it" if tags["gate.decision"] == "promoted" else "kept it out"
        return TrainPlan(False, None, f"v{newest} was already trained on {ref} and the gate {verdict} "
                                      f"({tags.get('gate.reason', 'no reason recorded')}): no retraining "
                                      "(retrain='always' trains another)")
    if champion is None:
        return TrainPlan(True, None, f"no champion of {model_name} yet")
    was = champion.dataset_version or "an unrecorded version"
    return TrainPlan(True, None, f"champion v{champion.version} was trained on {dataset}@{was}, not {ref}")


def embeddings_gap(champion: PinnedModel, dataset: str, version: str, counts: dict[str, int],
                   req: EncodeRequest) -> tuple[str, str | None]:
    """(output folder URL, what is missing there or None when the champion's embeddings of the dataset
    version are complete: a manifest of this model and dataset version, every requested split's rows, and
    every file it lists)."""
    out = req.out or embeddings.default_dir(embeddings_root(), champion.name, champion.version, dataset, version)
    what = f"embeddings of {dataset}@{version} by v{champion.version}"
    try:
        manifest = embeddings.read_manifest(out)
    except ValueError:
        return out, f"no {what} yet"
    if (manifest.model_name, manifest.model_version, manifest.dataset_version) != (champion.name, champion.version,
                                                                                   version):
        return out, f"{out} holds embeddings of {manifest.model_name} v{manifest.model_version} on " \
                    f"{manifest.dataset}@{manifest.dataset_version}, not the {what}"
    # Name and version alone can alias two models (a re-created registry numbers from 1 again): the
    # embeddings count only when they were written by these very weights.
    if manifest.identity != (identity := _identity(champion)):
        return out, f"{out} holds embeddings of {manifest.identity or 'a model whose weights were not recorded'}, " \
                    f"not of {identity}"
    short = [f"{s} {manifest.counts.get(s, 0):,} of {counts.get(s, 0):,} rows" for s in req.splits
             if manifest.counts.get(s, 0) != counts.get(s, 0)]
    if short:
        return out, f"{what} incomplete: {', '.join(short)}"
    fs, base = resolve(out)
    missing = [f.path for s in req.splits for f in manifest.splits.get(s, [])
               if not fs.exists(posixpath.join(base, f.path))]
    if missing:
        return out, f"{what} incomplete: {len(missing)} file(s) listed in the manifest are missing, first {missing[0]}"
    return out, None


def _identity(champion: PinnedModel) -> embeddings.ModelIdentity:
    """The champion exactly (name, version, weights digest), as encode-dataset keys its files."""
    from vae_core.model.weights import model_to_bytes

    return embeddings.ModelIdentity.of(champion.name, champion.version, model_to_bytes(registry.load_pinned(champion)))


def _decision_note(version: int, decision: dict[str, Any] | None) -> str:
    """'challenger v4 promoted: test/nll_k100 95.1 < 97.3 of champion v3', or the gate's reason where there is
    no pair of numbers to show (no champion yet, a non-finite score)."""
    if decision is None:
        return f"evaluated v{version}: no gate decision"
    verdict = "promoted" if decision["promote"] else "kept out"
    a, b = decision["challenger"], decision.get("champion")
    if b is None or decision.get("champion_version") is None or not math.isfinite(a) or not math.isfinite(b):
        return f"challenger v{version} {verdict}: {decision['reason']}"
    sign = "<" if a < b else ">" if a > b else "="
    margin = f" (margin {decision['margin']:g})" if decision.get("margin") else ""
    return f"challenger v{version} {verdict}: {decision['metric']} {a:.4g} {sign} {b:.4g} of champion " \
           f"v{decision['champion_version']}{margin}"


def _encode_reasons(before: int | None, now: int, data_changed: bool, gap: str | None) -> list[str]:
    """Why the champion's embeddings of the dataset version need an encode job; empty: they do not."""
    reasons = []
    if before != now:
        reasons.append(f"champion changed ({f'v{before}' if before else 'none'} -> v{now})")
    if data_changed:
        reasons.append("dataset changed")
    if gap:
        reasons.append(gap)
    return reasons


def _check_data_root(request: NightlyRequest) -> None:
    """Ingest writes where the other stages read (they read `data_root()`), or the run fails here."""
    given, used = request.ingest.root().rstrip("/"), data_root().rstrip("/")
    if "://" not in given + used:
        given, used = os.path.abspath(given), os.path.abspath(used)
    if given != used:
        raise ValueError(f"ingest.data_root {request.ingest.data_root!r} is not the data root the train, evaluate "
                         f"and encode stages read ({data_root()!r}, from VAE_DATA_ROOT or VAE_HOME): leave it unset "
                         "or set VAE_DATA_ROOT to it")


# --- the flow ------------------------------------------------------------------------------------


@flow(name="nightly-retrain")
def nightly_retrain(request: NightlyRequest, progress: bool = False) -> dict[str, Any]:
    """Ingest `request.ingest`; train, evaluate (with the champion gate) and encode only where the data or the
    request call for it (see the module's docstring for the rules, the failure guarantees and the retries).

    Returns: dataset (name, version, changed, counts), model_name, trained (the new model version or None),
    evaluated, promoted, decision (the gate's), champion (before, after), encoded (rows of the champion's
    embeddings of the dataset version, when encode ran, else None), embeddings (their folder), report (the
    evaluation's HTML report, when evaluate ran), notes and
    skipped (per stage, what it did / why it did not run), failed, flow_runs (child flow run per stage)
    and mlflow_runs (per stage).
    """
    log = get_run_logger()
    rec = Record(dataset={"name": request.ingest.name}, nightly_run=str(flow_run.id) if flow_run.id else None)
    stage = "ingest"

    def run(stage_flow: Any, stage_request: Any) -> dict[str, Any]:
        def attempt() -> dict[str, Any]:
            state = stage_flow(stage_request, progress, return_state=True)
            rec.flow_runs[stage] = str(state.state_details.flow_run_id)
            return state.result()

        return retried(attempt, stage)

    def retried(fn: Callable[[], T], what: str) -> T:
        return call_with_retries(fn, retries=request.retries, delay_s=request.retry_delay_s, what=what, log=log)

    try:
        _check_data_root(request)
        tracking.configure()

        ingested = run(ingest_dataset, request.ingest)
        name, version, changed = ingested["name"], ingested["version"], bool(ingested["created"])
        ref = f"{name}@{version}"
        rec.dataset = {"name": name, "version": version, "changed": changed, "counts": ingested["counts"]}
        total = sum(ingested["counts"].values())
        rec.notes["ingest"] = (f"new dataset version {ref} ({total:,} images)" if changed
                               else f"dataset unchanged: {ref} already ingested ({total:,} images)")

        stage = "train"
        train_request = request.train_request(ref)
        model_name = rec.model_name = train_request.model_name or registry.default_model_name(name)
        champion = retried(lambda: champion_of(model_name), "reading the champion")
        rec.champion_before = rec.champion_after = champion.version if champion else None
        on_version = retried(lambda: registry.versions_trained_on(model_name, version), "listing model versions")
        plan = plan_training(request, model_name, champion, name, version, on_version)
        candidate = plan.evaluate
        if plan.train:
            trained = run(train_vae, train_request)
            candidate = rec.trained = int(trained["model_version"])
            rec.mlflow_runs["train"] = trained["run_id"]
            rec.notes["train"] = f"trained v{candidate} on {ref} ({plan.reason})"
        else:
            rec.skip("train", plan.reason)

        stage = "evaluate"
        if candidate is not None:
            evaluated = run(evaluate_vae, request.evaluate_request(f"models:/{model_name}/{candidate}", ref))
            rec.evaluated = candidate
            rec.decision = evaluated["decision"]
            rec.promoted = bool(rec.decision and rec.decision["promote"])
            rec.mlflow_runs["evaluate"] = evaluated["run_id"]
            rec.report = evaluated["report"].get("report")
            rec.notes["evaluate"] = _decision_note(candidate, rec.decision)
            champion = retried(lambda: champion_of(model_name), "reading the champion")
            rec.champion_after = champion.version if champion else None
        else:
            rec.skip("evaluate", "no new model version to evaluate")

        stage = "encode"
        if champion is None:
            rec.skip("encode", f"no champion of {model_name}: nothing to encode with")
        else:
            encode_request = request.encode_request(champion.uri, ref)  # pinned: an alias move changes nothing
            out, gap = retried(lambda: embeddings_gap(champion, name, version, ingested["counts"], encode_request),
                               "reading the champion's embeddings manifest")
            rec.embeddings = out
            if reasons := _encode_reasons(rec.champion_before, champion.version, changed, gap):
                encoded = run(encode_dataset, encode_request)
                rec.encoded = sum(encoded["rows"].values())
                rec.embeddings = encoded["output"]
                rec.mlflow_runs["encode"] = encoded["run_id"]
                rec.notes["encode"] = (f"encoded {rec.encoded:,} rows with v{champion.version} "
                                       f"({encoded['rows_encoded']:,} new, {encoded['rows_reused']:,} reused, "
                                       f"{encoded['rows_already_there']:,} already there) because "
                                       + "; ".join(reasons))
            else:
                rows = sum(ingested["counts"].get(s, 0) for s in encode_request.splits)
                rec.skip("encode", f"champion v{champion.version} unchanged, dataset unchanged, and its embeddings "
                                   f"of {ref} are complete ({rows:,} rows)")
    except Exception as e:
        rec.failed[stage] = f"{type(e).__name__}: {e}"
        rec.notes[stage] = f"**failed**: {type(e).__name__}: {e}"
        if rec.model_name:  # what @champion names now, for the record; a registry still away is no news
            try:
                now = champion_of(rec.model_name)
                rec.champion_after = now.version if now else None
            except Exception:
                pass
        log.error("nightly-retrain stopped at %s: %s: %s", stage, type(e).__name__, e)
        _publish(rec)
        raise StageError(stage, e) from e
    _publish(rec)
    for s in STAGES:
        log.info("%s: %s", s, rec.notes.get(s, ""))
    return rec.result()


def _publish(rec: Record) -> None:
    ds = rec.dataset
    create_markdown_artifact(markdown=rec.markdown(), key=ARTIFACT_KEY,
                             description=f"nightly-retrain of {ds.get('name')}@{ds.get('version', '?')}")
