"""The `nightly-retrain` flow: keep the champion model and its embeddings fresh as data arrives.

    ingest-dataset  ->  train-vae  ->  evaluate-vae (champion gate)  ->  encode-dataset (with the champion)  ->  drift

Each stage is the stage's own flow, called here as a sub-flow (a child run in Prefect's UI), with the
request `NightlyRequest` builds for it. A stage runs only when something calls for it (`flows.nightly_rules`):

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

- drift runs on a new dataset version: its outlier scores and latent means by the champion against those of
  the champion's training data (`flows.nightly_drift`), a table in the artifact and a picture beside the
  champion's report.

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.encode import encode_dataset
from flows.evaluate import evaluate_vae
from flows.ingest import ingest_dataset
from flows.nightly_drift import measure_drift, write_drift
from flows.nightly_rules import (champion_of, check_data_root, decision_note, embeddings_gap, encode_reasons,
                                 plan_training)
from flows.retries import call_with_retries
from flows.tracking import registry, runs as tracking
from flows.tracking.registry import PinnedModel
from flows.train import train_vae
from vae_core.requests import NightlyRequest
from vae_core.results import IngestResult, NightlyDataset, NightlyResult

T = TypeVar("T")
R = TypeVar("R")
STAGES = ("ingest", "train", "evaluate", "encode", "drift")
ARTIFACT_KEY = "nightly-retrain-summary"


class StageError(RuntimeError):
    """A stage of `nightly-retrain` failed (after its retries); `stage` names it, `__cause__` is the error."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        self.stage = stage
        super().__init__(f"nightly-retrain stopped at {stage}: {type(cause).__name__}: {cause}")


# --- the run's record ----------------------------------------------------------------------------


class Record(NightlyResult):
    """What this run did so far, stage by stage (the dataset and the model are None until known): the flow's
    result and the artifact are both made from it."""

    dataset_name: str
    dataset: NightlyDataset | None = None
    model_name: str | None = None
    drift_table: str | None = None  # the drift check's table, for the artifact

    def skip(self, stage: str, reason: str) -> None:
        self.skipped[stage] = reason
        self.notes[stage] = f"skipped: {reason}"

    def title(self) -> str:
        """NAME@VERSION of the dataset ('?' for the version before ingest finished)."""
        return f"{self.dataset_name}@{self.dataset.version if self.dataset else '?'}"

    def result(self) -> NightlyResult:
        """The flow's result (once every stage ran or was skipped: the dataset and the model are known)."""
        return NightlyResult.model_validate(self.model_dump(exclude={"dataset_name", "drift_table"}))

    def markdown(self) -> str:
        """The run's Prefect artifact: per stage, what ran or was skipped and why, or where it failed."""
        rows = []
        for stage in STAGES:
            note = self.notes.get(stage, "not reached")
            rows.append(f"| {stage} | {_cell(note)} | {self.flow_runs.get(stage, '')} |")
        champion = (f"v{self.champion.before}" if self.champion.before else "none") + " -> " + \
                   (f"v{self.champion.after}" if self.champion.after else "none")
        lines = [f"# nightly-retrain: {self.title() if self.dataset else self.dataset_name}", "",
                 "| stage | outcome | flow run |", "|---|---|---|", *rows, "",
                 f"- Champion of `{self.model_name}`: {champion}" if self.model_name else "- Model: not reached"]
        if self.report:
            lines.append(f"- Evaluation report: `{self.report}`")
        if self.embeddings:
            lines.append(f"- Embeddings: `{self.embeddings}`")
        lines += [f"- MLflow run ({stage}): `{run_id}`" for stage, run_id in self.mlflow_runs.items()]
        if self.flow_runs.get("nightly"):
            lines.append(f"- This run: `{self.flow_runs['nightly']}`")
        if self.drift_table:
            lines += ["", "## Drift against the champion's training data", "", self.drift_table]
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# --- the stages ----------------------------------------------------------------------------------


@dataclass
class Run:
    """One nightly run as its stages share it: the request, the record, and the stage it is at."""

    request: NightlyRequest
    progress: bool
    log: Any
    rec: Record
    stage: str = "ingest"

    def retried(self, fn: Callable[[], T], what: str) -> T:
        """`fn()`, tried again on a transient error (`flows.retries`)."""
        return call_with_retries(fn, retries=self.request.retries, delay_s=self.request.retry_delay_s, what=what,
                                 log=self.log)

    def call(self, stage_flow: Callable[..., R], stage_request: Any) -> R:
        """The current stage's flow on `stage_request`, as a sub-flow (each try a child flow run); its result."""
        def attempt() -> R:
            state = stage_flow(stage_request, self.progress, return_state=True)
            self.rec.flow_runs[self.stage] = str(state.state_details.flow_run_id)
            return state.result()

        return self.retried(attempt, self.stage)

    def logged(self, stage: str, fn: Callable[..., T], *args: Any) -> T:
        """`fn(self, *args)`, the stage's start and outcome logged from this flow: a sub-flow's own log lines
        are not shown by `prefect deployment run --watch` (a failure is logged by `_stopped`)."""
        self.log.info("%s: started", stage)
        out = fn(self, *args)
        self.log.info("%s: %s", stage, self.rec.notes.get(stage, "done"))
        return out

    def champion(self, model_name: str) -> PinnedModel | None:
        """`champion_of(model_name)`, recorded as the champion after this run so far."""
        champion = self.retried(lambda: champion_of(model_name), "reading the champion")
        self.rec.champion.after = champion.version if champion else None
        return champion


@dataclass(frozen=True)
class Candidate:
    """What the train stage leaves to the next ones: the model, its champion before this run, and the version
    to evaluate (None: none)."""

    model_name: str
    champion: PinnedModel | None
    version: int | None


def ingest_stage(run: Run) -> IngestResult:
    """Ingest the source: a new dataset version, or the one already there."""
    run.stage = "ingest"
    ingested = run.call(ingest_dataset, run.request.ingest)
    run.rec.dataset = NightlyDataset(name=ingested.name, version=ingested.version, changed=ingested.created,
                                     counts=ingested.counts)
    total = sum(ingested.counts.values())
    run.rec.notes["ingest"] = (f"new dataset version {ingested.ref} ({total:,} images)" if ingested.created
                               else f"dataset unchanged: {ingested.ref} already ingested ({total:,} images)")
    return ingested


def train_stage(run: Run, ingested: IngestResult) -> Candidate:
    """Train a challenger on the dataset version when `plan_training` says so."""
    run.stage = "train"
    train_request = run.request.train_request(ingested.ref)
    model_name = run.rec.model_name = train_request.model_name or registry.default_model_name(ingested.name)
    champion = run.champion(model_name)
    run.rec.champion.before = run.rec.champion.after
    on_version = run.retried(lambda: registry.versions_trained_on(model_name, ingested.version),
                             "listing model versions")
    plan = plan_training(run.request, model_name, champion, ingested.name, ingested.version, on_version)
    if not plan.train:
        run.rec.skip("train", plan.reason)
        return Candidate(model_name, champion, plan.evaluate)
    trained = run.call(train_vae, train_request)
    run.rec.trained = trained.model_version
    run.rec.mlflow_runs["train"] = trained.run_id
    run.rec.notes["train"] = f"trained v{trained.model_version} on {ingested.ref} ({plan.reason})"
    return Candidate(model_name, champion, trained.model_version)


def evaluate_stage(run: Run, ingested: IngestResult, candidate: Candidate) -> PinnedModel | None:
    """Evaluate the candidate version through the champion gate; returns the champion after it."""
    run.stage = "evaluate"
    if candidate.version is None:
        run.rec.skip("evaluate", "no new model version to evaluate")
        return candidate.champion
    model = f"models:/{candidate.model_name}/{candidate.version}"
    evaluated = run.call(evaluate_vae, run.request.evaluate_request(model, ingested.ref))
    decision = run.rec.decision = evaluated.decision
    run.rec.evaluated = candidate.version
    run.rec.promoted = bool(decision and decision.promote)
    run.rec.mlflow_runs["evaluate"] = evaluated.run_id
    run.rec.report = evaluated.report.get("report")
    run.rec.notes["evaluate"] = decision_note(candidate.version, decision)
    return run.champion(candidate.model_name)


def encode_stage(run: Run, ingested: IngestResult, model_name: str, champion: PinnedModel | None) -> None:
    """Encode the dataset version with the champion, pinned, when `_encode_reasons` finds a reason."""
    run.stage = "encode"
    if champion is None:
        run.rec.skip("encode", f"no champion of {model_name}: nothing to encode with")
        return
    request = run.request.encode_request(champion.uri, ingested.ref)  # pinned: an alias move changes nothing
    out, gap = run.retried(lambda: embeddings_gap(champion, ingested.name, ingested.version, ingested.counts,
                                                  request), "reading the champion's embeddings manifest")
    run.rec.embeddings = out
    if not (reasons := encode_reasons(run.rec.champion.before, champion.version, ingested.created, gap)):
        rows = sum(ingested.counts.get(s, 0) for s in request.splits)
        run.rec.skip("encode", f"champion v{champion.version} unchanged, dataset unchanged, and its embeddings of "
                               f"{ingested.ref} are complete ({rows:,} rows)")
        return
    encoded = run.call(encode_dataset, request)
    run.rec.encoded = sum(encoded.rows.values())
    run.rec.embeddings = encoded.output
    run.rec.mlflow_runs["encode"] = encoded.run_id
    run.rec.notes["encode"] = (f"encoded {run.rec.encoded:,} rows with v{champion.version} "
                               f"({encoded.rows_encoded:,} new, {encoded.rows_reused:,} reused, "
                               f"{encoded.rows_already_there:,} already there) because " + "; ".join(reasons))


def drift_stage(run: Run, ingested: IngestResult, champion: PinnedModel | None) -> None:
    """A new dataset version against the champion's training data, in the champion's terms (`flows.nightly_drift`).
    Only for a new version: with nothing changed, the nightly writes nothing."""
    run.stage = "drift"
    if not ingested.created or champion is None or run.rec.embeddings is None:
        run.rec.skip("drift", "the dataset is unchanged" if not ingested.created else "no champion's embeddings")
        return
    drift, note = run.retried(lambda: measure_drift(champion, ingested.name, ingested.version, run.rec.embeddings),
                              "reading the embeddings to compare")
    if drift is None:
        run.rec.skip("drift", note.removeprefix("no drift measured: "))
        return
    files = run.retried(lambda: write_drift(champion, ingested.version, drift), "writing the drift report")
    run.rec.drift = drift.summary()
    run.rec.drift_table = drift.markdown() + f"\n![drift]({files['png']})\n"
    run.rec.notes["drift"] = f"{note} (picture: {files['png']})"
    if drift.flagged:
        run.log.warning("drift: %s", "; ".join(drift.reasons))


# --- the flow ------------------------------------------------------------------------------------


@flow(name="nightly-retrain")
def nightly_retrain(request: NightlyRequest, progress: bool = False) -> NightlyResult:
    """Ingest `request.ingest`; train, evaluate (with the champion gate) and encode only where the data or the
    request call for it (see the module's docstring for the rules, the failure guarantees and the retries).

    Returns what each stage did or why it did not run (`NightlyResult`): the dataset version, the model
    versions trained and evaluated, the gate's decision, the champion before and after, the embeddings,
    the child flow runs and MLflow runs.
    """
    run = Run(request, progress, get_run_logger(),
              Record(dataset_name=request.ingest.name, flow_runs={"nightly": str(flow_run.id) if flow_run.id else None}))
    try:
        check_data_root(request)
        tracking.configure()
        ingested = run.logged("ingest", ingest_stage)
        candidate = run.logged("train", train_stage, ingested)
        champion = run.logged("evaluate", evaluate_stage, ingested, candidate)
        run.logged("encode", encode_stage, ingested, candidate.model_name, champion)
        run.logged("drift", drift_stage, ingested, champion)
    except Exception as e:
        _stopped(run, e)
        raise StageError(run.stage, e) from e
    _publish(run.rec)
    return run.rec.result()


def _stopped(run: Run, e: Exception) -> None:
    """Record and publish where the run stopped, and what `@champion` names now."""
    rec = run.rec
    rec.failed[run.stage] = f"{type(e).__name__}: {e}"
    rec.notes[run.stage] = f"**failed**: {type(e).__name__}: {e}"
    if rec.model_name:  # what @champion names now, for the record; a registry still away is no news
        try:
            now = champion_of(rec.model_name)
            rec.champion.after = now.version if now else None
        except Exception:
            pass
    run.log.error("nightly-retrain stopped at %s: %s: %s", run.stage, type(e).__name__, e)
    _publish(rec)


def _publish(rec: Record) -> None:
    create_markdown_artifact(markdown=rec.markdown(), key=ARTIFACT_KEY,
                             description=f"nightly-retrain of {rec.title()}")
