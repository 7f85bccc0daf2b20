"""What each stage returns: one typed result per stage, beside its request (`vae_core.requests`).

A stage's flow returns its result; `vae <stage> --json` prints `result.model_dump(mode="json")`, the
command's summary lines and the flow's Prefect artifact read its fields, and `nightly-retrain` chains them
(`ingested.version`, `trained.model_version`). Field order is the JSON's key order.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vae_core.evaluation.gate import Decision
from vae_core.requests import Split


class Result(BaseModel):
    """Unknown fields are errors, as in the requests."""

    model_config = ConfigDict(extra="forbid")


class NodeRows(Result):
    """The items one Ray node (or this process, `local`) decoded in a run."""

    node_id: str
    address: str
    rows: int


class IngestResult(Result):
    """`ingest-dataset`: the dataset version made (or found), and what became of the source's items."""

    name: str
    version: str
    path: str  # the version folder's URL
    created: bool  # False when this version already existed and nothing was written
    counts: dict[Split, int]  # rows per split
    shape: tuple[int, int, int]  # (H, W, C) of every image
    seen: int  # items the source yielded: kept + duplicates + quarantined
    duplicates: int
    label_conflicts: int  # duplicates whose label disagrees with the kept copy's
    quarantined: int
    nodes: list[NodeRows] = Field(default_factory=list)  # decoded by this run (a re-run: only what it decoded)
    retries: int = 0  # storage reads retried (transient errors) by this run

    @property
    def ref(self) -> str:
        """NAME@VERSION, the dataset reference of exactly this version."""
        return f"{self.name}@{self.version}"


class TrainResult(Result):
    """`train-vae`: the MLflow run and the model version registered as `@challenger`."""

    run_id: str
    run_url: str
    model_name: str
    model_version: int
    model_uri: str  # models:/NAME@challenger
    dataset: str
    dataset_version: str
    metrics: dict[str, float]  # the final epoch's metrics and start-up timings (`startup/...`)
    warnings: list[str] = []  # what makes this model less than its config promises (the run's `warning/*` tags)


class FeatureClassifier(Result):
    """The dataset version's feature classifier (Fréchet distances, k-NN and probe features)."""

    test_accuracy: float
    accuracy_split: str
    num_classes: int
    train_rows: int
    cached: bool  # False: trained by this evaluation
    path: str


class NoFeatureClassifier(Result):
    """Why there is no feature classifier (no labelled reference split)."""

    skipped: str


class ChampionScores(Result):
    """The champion the challenger was compared with, scored on the same images."""

    version: int
    metrics: dict[str, float]  # `<split>/<name>`


class EvaluateResult(Result):
    """`evaluate-vae`: the pinned model's scores on a dataset split, the gate's decision and the report."""

    model_name: str
    model_version: int
    model_uri: str  # pinned: models:/NAME/VERSION
    asked: str  # the URI as given (an alias, perhaps)
    run_id: str  # the model's training run, where the evaluation is logged
    run_url: str
    dataset: str
    dataset_version: str
    split: Split
    images: int
    iw_samples: int
    seed: int
    metrics: dict[str, float]  # `<split>/<name>`
    notes: list[str]
    feature_classifier: FeatureClassifier | NoFeatureClassifier
    champion: ChampionScores | None  # None: no champion, or the model is the champion
    decision: Decision | None  # None: the gate did not run (promote=False)
    report: dict[str, str]  # picture or file name -> its URL; "report" is the HTML report

    @property
    def report_url(self) -> str:
        """The HTML report's URL ('' if none was written)."""
        return self.report.get("report", "")


class EncodeSeconds(Result):
    """Where an encode job's time went."""

    plan: float
    ray_start: float
    first_latents: float
    encode: float


class EncodeResult(Result):
    """`encode-dataset`: the embeddings folder and how its rows came to be there."""

    output: str
    rows: dict[Split, int]  # rows per split in the output
    rows_encoded: int  # by this job
    rows_reused: int  # copied from another dataset version's embeddings by the same weights
    rows_already_there: int
    images_per_s: float | None  # None: nothing was encoded
    model_uri: str  # pinned
    asked: str
    dataset: str
    dataset_version: str
    run_id: str
    seconds: EncodeSeconds
    steady_images_per_s: float | None


class NightlyDataset(Result):
    """The dataset version a nightly run ingested."""

    name: str
    version: str
    changed: bool  # a new version: ingest wrote it
    counts: dict[Split, int]


class ChampionChange(Result):
    """The champion's version before and after a nightly run (None: no champion)."""

    before: int | None = None
    after: int | None = None


class NightlyResult(Result):
    """`nightly-retrain`: what each stage did or why it did not run, and where its results are."""

    dataset: NightlyDataset
    model_name: str
    trained: int | None = None  # the model version trained by this run
    evaluated: int | None = None  # the model version evaluated by this run
    promoted: bool = False
    decision: Decision | None = None
    champion: ChampionChange = Field(default_factory=ChampionChange)
    encoded: int | None = None  # rows of the champion's embeddings of the dataset version, when encode ran
    embeddings: str | None = None  # their folder
    report: str | None = None  # the evaluation's HTML report, when evaluate ran
    # a new dataset version against the champion's training data (vae_core.evaluation.drift's summary), when measured
    drift: dict[str, float | bool] | None = None
    notes: dict[str, str] = Field(default_factory=dict)  # stage -> what it did, in one line
    skipped: dict[str, str] = Field(default_factory=dict)  # stage -> why it did not run
    failed: dict[str, str] = Field(default_factory=dict)  # stage -> its error (a returned result has none)
    # "nightly" -> this flow run (None outside a flow run), stage -> the stage's (its last try)
    flow_runs: dict[str, str | None] = Field(default_factory=dict)
    mlflow_runs: dict[str, str] = Field(default_factory=dict)  # stage -> its MLflow run
