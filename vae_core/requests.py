"""What a user asks of each stage: one typed request per stage, declared once.

The `vae` command line builds its options from these models (the field name is the option, the
description its help, the default its default) and validates the request before Prefect or Ray start;
the flow takes the same object as its `request` parameter (in a deployment:
`--param request='{"dataset": "mnist"}'`); the library and the Ray workers receive it typed. A new
stage adds its request here, and its command and flow follow from it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, create_model, field_validator, model_validator

from vae_core import settings
from vae_core.data.sources.formats import SourceFormat
from vae_core.data.sources.limits import (DEFAULT_MAX_ARCHIVE_MB, DEFAULT_MAX_FILE_MB, DEFAULT_MAX_IMAGE_PIXELS,
                                          SourceLimits)
from vae_core.data.sources.remote import check_url
from vae_core.evaluation.gate import GateMetric
from vae_core.model.config import Strict as Request, list_objectives, parse_overrides
from vae_core.names import NAME_HELP, DatasetName, DatasetRef, ModelName, ModelURI, parse_dataset_ref

Split = Literal["train", "val", "test"]
R = TypeVar("R", bound=Request)


def _split_list(v: Any) -> Any:
    """'test,val' or ['test', 'val,train'] -> each split once, in the order given."""
    items = v.split(",") if isinstance(v, str) else v
    if isinstance(items, (list, tuple)):
        items = [s.strip() for item in items for s in str(item).split(",") if s.strip()]
        if not items:
            raise ValueError("splits must name at least one of train, val, test")
        return list(dict.fromkeys(items))
    return items


def _reachable(url: str) -> str:
    """`url` if it follows the source rule (`sources.remote`): allowed protocols, no metadata host."""
    check_url(url)
    return url


# Field types that carry their parsing and checks, so the nightly's stage options derived from a request's
# fields keep them.
Splits = Annotated[list[Split], BeforeValidator(_split_list)]
Overrides = Annotated[dict[str, Any], BeforeValidator(lambda v: parse_overrides(v) if isinstance(v, (list, tuple))
                                                      else v)]  # key=value items from the command line
ReachableURL = Annotated[str, AfterValidator(_reachable)]


def parse_image_size(text: str) -> tuple[int, int]:
    """'28,28' / '28x28' / '28' -> (H, W)."""
    parts = [p for p in re.split(r"[,x\s]+", text.strip().lower()) if p]
    if len(parts) in (1, 2) and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[-1])
    raise ValueError(f"image size {text!r} is not H,W (e.g. 28,28)")


class IngestRequest(Request):
    """`ingest-dataset`: any image source in, one versioned dataset of Parquet shards out."""

    source: str = Field(description="image folder (any fsspec URL), MNIST IDX folder, .npz, .parquet file or "
                        "folder, or builtin:digits", json_schema_extra={"cli": "argument"})
    name: DatasetName = Field(description=f"dataset name: {NAME_HELP}")
    data_root: str | None = Field(None, description="datasets root URL (default $VAE_DATA_ROOT or $VAE_HOME/datasets)")
    format: SourceFormat = Field("auto", description="source format")
    image_size: tuple[int, int] | None = Field(None, description="H,W to resize to (default: keep the source's)")
    channels: Literal[1, 3] | None = Field(None, description="1 or 3 (default: keep the source's)")
    fit: Literal["crop", "pad"] = Field("crop", description="aspect ratio with image_size: crop (centre) or "
                                        "pad (black)")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of train carved out as val, by id hash")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="test share for sources without splits, by id hash")
    shard_mb: float = Field(64, gt=0, description="max uncompressed pixel MiB per shard")
    max_quarantine_fraction: float = Field(0.05, ge=0, le=1, description="fail above this share of bad items")
    workers: int = Field(0, ge=0, description="Ray tasks decoding at once (0: as many as the cluster's CPUs allow)")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs Ray reserves per decoding task (default: "
                                          "the cluster's CPUs shared among the workers)")
    limit: int | None = Field(None, ge=1, description="N items spread evenly over the source (quick runs)")
    image_column: str | None = Field(None, description="Parquet: column of image bytes")
    label_column: str | None = Field(None, description="Parquet: column of labels")
    source_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the source",
                                           json_schema_extra={"cli": None})
    data_root_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for data_root",
                                              json_schema_extra={"cli": None})
    max_file_mb: float = Field(DEFAULT_MAX_FILE_MB, gt=0, description="quarantine image files (or Parquet image "
                               "cells) larger than this many MiB, unread")
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, gt=0, description="quarantine images whose header "
                                  "declares more pixels (width x height) than this, undecoded")
    max_archive_mb: float = Field(DEFAULT_MAX_ARCHIVE_MB, gt=0, description="fail on an .npz array, IDX file or "
                                  "Parquet row group that inflates to more MiB than this, before inflating it")

    @field_validator("image_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        size = parse_image_size(v) if isinstance(v, str) else v
        if size is not None and (size[0] < 1 or size[1] < 1):
            raise ValueError(f"image_size must be positive, got {size[0]}x{size[1]}")
        return size

    @model_validator(mode="after")
    def _reachable(self) -> IngestRequest:
        """The source and data root may only use allowed protocols and hosts (`sources.remote`): a request is
        refused before any work, whoever sent it."""
        if not self.source.startswith("builtin:"):
            check_url(self.source, self.source_options)
        if self.data_root is not None:
            check_url(self.data_root, self.data_root_options)
        return self

    @model_validator(mode="after")
    def _fractions(self) -> IngestRequest:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction {self.val_fraction} + test_fraction {self.test_fraction} "
                             "leaves no train split")
        return self

    def root(self) -> str:
        """The datasets root this request writes under."""
        return self.data_root or settings.data_root()

    def source_limits(self) -> SourceLimits:
        """The caps on what the source may make ingestion read or allocate."""
        return SourceLimits.from_options(self.max_file_mb, self.max_image_pixels, self.max_archive_mb)


class TrainRequest(Request):
    """`train-vae`: a dataset version in, one MLflow run and one registered model version out."""

    dataset: DatasetRef = Field(description="NAME or NAME@VERSION of an ingested dataset (latest version by default)")
    preset: str = Field("mnist", description="model and training preset shipped with vae_core, or a YAML path",
                        json_schema_extra={"cli": ["--preset", "--config"]})
    objective: str | None = Field(None, description="objective preset laid over the preset: "
                                  f"{', '.join(list_objectives())} (default: the preset's own, the ELBO)")
    overrides: Overrides = Field(default_factory=dict, description="config overrides key=value, e.g. "
                                      "train.lr=3e-4 (repeatable)", json_schema_extra={"cli": ["--set"]})
    epochs: int | None = Field(None, ge=1, description="epochs (overrides the preset)")
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs reserved per worker, fractional allowed "
                                          "(default: 90% of the cluster's CPUs, shared)")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker; above 0 trains on GPUs with NCCL")
    model_name: ModelName | None = Field(None, description="registered model name (default vae-<dataset name>)")
    experiment: str = Field("train-vae", description="MLflow experiment of the run")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint")
    memory_budget_mb: float = Field(4096, gt=0, description="MiB of pixels a worker holds per split; "
                                    "a larger split streams through Ray Data")

    def dataset_ref(self) -> tuple[str, str | None]:
        """(name, version or None) of the dataset."""
        return parse_dataset_ref(self.dataset)



class EvaluateRequest(Request):
    """`evaluate-vae`: a registered model version in, its metrics, pictures, report and the champion gate's
    decision out."""

    model: ModelURI = Field(description="registered model: models:/NAME@ALIAS or models:/NAME/VERSION")
    dataset: DatasetRef | None = Field(None, description="NAME or NAME@VERSION to evaluate on (default: the dataset "
                                "version the model was trained on)")
    split: Split = Field("test", description="split to score")
    iw_samples: int = Field(100, ge=1, description="K, importance samples per image for the IWAE NLL (cost grows "
                            "linearly with K)")
    promote: bool = Field(True, description="run the champion gate: move @champion here when this model beats it")
    metric: GateMetric = Field("nll", description="what the gate compares (nll: the IWAE NLL at K)")
    margin: float = Field(0.0, ge=0, description="how much better than the champion, in the metric's units, a "
                          "model must be to take its place")
    gpus: int = Field(0, ge=0, description="GPUs to score on (0: the CPU)")
    seed: int = Field(0, description="seed of every random draw (binarisation, posterior and prior samples)")
    batch_size: int = Field(500, ge=1, description="images per forward pass")
    limit: int | None = Field(None, ge=2, description="score only the split's first N images (quick runs)")
    map_points: int = Field(2000, ge=10, description="points in the PCA and t-SNE maps of the latent space")
    sample_rows: int = Field(20_000, ge=10, description="rows of the split, and of the train split, in the seeded "
                             "sample the k-NN and linear probes and the latent maps use (the whole split when "
                             "smaller); every other number is over the whole split")
    workers: int = Field(1, ge=1, description="scoring actors (a Ray Data actor pool over the split's shards); 1 "
                         "scores in this process")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs reserved per scoring actor (default: the "
                                          "cluster's CPUs but one, shared)")

    @property
    def gpus_per_worker(self) -> float:
        return 0.0  # scoring actors run on CPUs; --gpus scores on GPUs in this process

    @model_validator(mode="after")
    def _one_place_to_score(self) -> EvaluateRequest:
        if self.workers > 1 and self.gpus:
            raise ValueError(f"--workers {self.workers} scores on CPU actors and --gpus {self.gpus} on GPUs in this "
                             "process: choose one")
        return self



class EncodeRequest(Request):
    """`encode-dataset`: a registered model version and a dataset version in; one Parquet file of latents per
    input shard, plus a manifest, out."""

    model: ModelURI = Field(description="registered model: models:/NAME@ALIAS or models:/NAME/VERSION")
    dataset: DatasetRef = Field(description="NAME or NAME@VERSION of an ingested dataset (latest version by default)")
    splits: Splits = Field(default_factory=lambda: ["train", "val", "test"],
                                description="splits to encode (repeatable, or comma-separated)")
    out: ReachableURL | None = Field(None, description="output folder URL (default $VAE_HOME/embeddings/<model>/<version>/"
                            "<dataset>/<dataset version>)")
    batch_size: int = Field(1024, ge=1, description="images per encoder call")
    workers: int = Field(1, ge=1, description="encoder actors (Ray Data actor pool)")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs reserved per actor (default: the cluster's "
                                          "CPUs less one for reading, shared)")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per actor; above 0 encodes on GPUs in bf16")
    overwrite: bool = Field(False, description="encode every shard again, even those already written")
    experiment: str = Field("encode-dataset", description="MLflow experiment of the run that records throughput")

    def dataset_ref(self) -> tuple[str, str | None]:
        return parse_dataset_ref(self.dataset)


class StageOptions(Request):
    """A stage's options in the nightly request: the fields of the stage's request less `fixed`, the ones the
    nightly flow fills in for each run (types, defaults and checks come with the fields; the stage's own
    request, built for each run, checks what spans several fields)."""

    fixed: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _not_fixed(cls, data: Any) -> Any:
        if isinstance(data, dict) and (taken := sorted(set(data) & set(cls.fixed))):
            raise ValueError(f"{', '.join(taken)} cannot be set here: the nightly flow sets "
                             f"{'them' if len(taken) > 1 else 'it'} for each run")
        return data

    def request(self, stage: type[R], **fixed: Any) -> R:
        """The stage's request: these options (those set only: the request's defaults apply) plus `fixed`."""
        return stage(**self.model_dump(exclude_unset=True), **fixed)


def stage_options(stage: type[Request], fixed: tuple[str, ...]) -> type[StageOptions]:
    """The options model of `stage` (e.g. TrainRequest -> TrainOptions): a new field of the request is an option
    with no second declaration."""
    fields = {name: (f.annotation, f) for name, f in stage.model_fields.items() if name not in fixed}
    options = create_model(stage.__name__.removesuffix("Request") + "Options", __base__=StageOptions,
                           __doc__=f"{stage.__name__} less {', '.join(fixed)}.", **fields)
    options.fixed = fixed
    return options


TrainOptions = stage_options(TrainRequest, ("dataset",))
EvaluateOptions = stage_options(EvaluateRequest, ("model", "dataset", "promote"))
EncodeOptions = stage_options(EncodeRequest, ("model", "dataset"))


class NightlyRequest(Request):
    """`nightly-retrain`: ingest a source; when the data or the request call for it, train a challenger on the
    new dataset version, evaluate it through the champion gate, and encode the dataset with the champion.

    The train, evaluate and encode options are the fields of those stages' requests less the ones the flow
    fills in (the dataset version it ingested, the model version it trained, the champion it pinned):
    `TrainOptions`, `EvaluateOptions`, `EncodeOptions`.
    """

    ingest: IngestRequest = Field(description="the ingest-dataset request: the source, the dataset name, ...")
    train: TrainOptions = Field(default_factory=TrainOptions, description="train-vae options: TrainRequest fields "
                                "except dataset (e.g. preset, overrides, epochs, workers, model_name)")
    evaluate: EvaluateOptions = Field(default_factory=EvaluateOptions, description="evaluate-vae options: "
                                      "EvaluateRequest fields except model, dataset and promote (e.g. split, "
                                      "iw_samples, metric, margin)")
    encode: EncodeOptions = Field(default_factory=EncodeOptions, description="encode-dataset options: EncodeRequest "
                                  "fields except model and dataset (e.g. splits, out, batch_size, workers)")
    retrain: Literal["on-change", "always"] = Field("on-change", description="on-change: train only when no model "
                                                    "was trained on the dataset version yet; always: every run")
    retries: int = Field(2, ge=0, description="retries of a stage that failed on a transient error (connection, "
                         "I/O, a 5xx from MLflow); errors in the data, the model or the request are never retried")
    retry_delay_s: float = Field(30.0, ge=0, description="seconds before the first retry, doubling after each")

    def train_request(self, dataset: str) -> TrainRequest:
        """The train-vae request for `dataset` (NAME@VERSION)."""
        return self.train.request(TrainRequest, dataset=dataset)

    def evaluate_request(self, model: str, dataset: str) -> EvaluateRequest:
        """The evaluate-vae request for `model` (models:/NAME/VERSION) on `dataset`, with the champion gate."""
        return self.evaluate.request(EvaluateRequest, model=model, dataset=dataset, promote=True)

    def encode_request(self, model: str, dataset: str) -> EncodeRequest:
        """The encode-dataset request for `dataset` with `model` (the champion, pinned: models:/NAME/VERSION)."""
        return self.encode.request(EncodeRequest, model=model, dataset=dataset)
