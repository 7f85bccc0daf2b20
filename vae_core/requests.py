"""What a user asks of each stage: one typed request per stage, declared once.

The `vae` command line builds its options from these models (the field name is the option, the
description its help, the default its default) and validates the request before Prefect or Ray start;
the flow takes the same object as its `request` parameter (in a deployment:
`--param request='{"dataset": "mnist"}'`); the library and the Ray workers receive it typed. A new
stage adds its request here, and its command and flow follow from it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from vae_core import settings
from vae_core.model.config import Strict as Request, parse_overrides
from vae_core.evaluation.gate import GateMetric
from vae_core.data.sources.limits import (DEFAULT_MAX_ARCHIVE_MB, DEFAULT_MAX_FILE_MB, DEFAULT_MAX_IMAGE_PIXELS,
                                     SourceLimits)
from vae_core.data.sources.remote import check_url

# \Z, not $: `$` also matches before a final newline ("dig\n"). Use with fullmatch.
NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")
NAME_HELP = "letters, digits, '.', '_', '-', starting with a letter or digit"
SourceFormat = Literal["auto", "folder", "idx", "npz", "parquet", "builtin"]
Split = Literal["train", "val", "test"]
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[^/@]+))\Z")
MAX_MODEL_VERSION = 2**31 - 1  # MLflow's SQL stores keep versions in an INTEGER column (32-bit in PostgreSQL)


def check_name(value: str, what: str) -> str:
    """`value` if it follows the naming rule of datasets, versions and models, else ValueError."""
    if not NAME_RULE.fullmatch(value):
        raise ValueError(f"{what} {value!r} must use only {NAME_HELP}")
    return value


def parse_dataset_ref(ref: str) -> tuple[str, str | None]:
    """'mnist' -> ('mnist', None); 'mnist@3f2a' -> ('mnist', '3f2a'); a name or version that could
    leave the data root ('../x', 'a/b') is a ValueError."""
    name, at, version = ref.partition("@")
    check_name(name, "dataset name")
    if at:
        check_name(version, "dataset version")
    return name, version or None


def parse_model_uri(uri: str) -> tuple[str, str | None, int | None]:
    """'models:/vae-mnist@champion' -> ('vae-mnist', 'champion', None); 'models:/vae-mnist/3' ->
    ('vae-mnist', None, 3). Anything else is a ValueError showing both forms."""
    m = MODEL_URI.fullmatch(uri)
    if not m:
        raise ValueError(f"model {uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION "
                         "(e.g. models:/vae-mnist@challenger, models:/vae-mnist/3)")
    check_name(m["name"], "model name")
    if m["alias"]:
        return m["name"], check_name(m["alias"], "alias"), None
    if not m["version"].isdigit() or int(m["version"]) < 1:
        raise ValueError(f"model version {m['version']!r} in {uri!r} is not a positive whole number")
    if int(m["version"]) > MAX_MODEL_VERSION:  # the store would fail on it with an internal error, not "not found"
        raise ValueError(f"model version {m['version']} in {uri!r} is beyond any registry's versions (at most "
                         f"{MAX_MODEL_VERSION}): name one the model has, or an alias (models:/{m['name']}@champion)")
    return m["name"], None, int(m["version"])



def _checked(parse):
    """A pydantic AfterValidator that runs `parse` (which raises ValueError naming the problem) and keeps
    the text as given: surrounding whitespace is an error like any other character outside the rule."""
    def check(value: str) -> str:
        parse(value)
        return value

    return AfterValidator(check)


DatasetRef = Annotated[str, _checked(parse_dataset_ref)]  # NAME or NAME@VERSION
ModelURI = Annotated[str, _checked(parse_model_uri)]  # models:/NAME@ALIAS or models:/NAME/VERSION

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
    name: str = Field(description=f"dataset name: {NAME_HELP}")
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
    workers: int = Field(0, ge=0, description="decode processes (0: one per CPU)")
    limit: int | None = Field(None, ge=1, description="N items spread evenly over the source (quick runs)")
    image_column: str | None = Field(None, description="Parquet: column of image bytes")
    label_column: str | None = Field(None, description="Parquet: column of labels")
    source_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the source",
                                           json_schema_extra={"cli": None})
    data_root_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for data_root",
                                              json_schema_extra={"cli": None})
    staging_dir: str | None = Field(None, description="local scratch folder (default: .staging in a local data root, "
                                    "else staging in a local VAE_HOME, else the system temp folder)",
                                    json_schema_extra={"cli": None})
    max_file_mb: float = Field(DEFAULT_MAX_FILE_MB, gt=0, description="quarantine image files (or Parquet image "
                               "cells) larger than this many MiB, unread")
    max_image_pixels: int = Field(DEFAULT_MAX_IMAGE_PIXELS, gt=0, description="quarantine images whose header "
                                  "declares more pixels (width x height) than this, undecoded")
    max_archive_mb: float = Field(DEFAULT_MAX_ARCHIVE_MB, gt=0, description="fail on an .npz array, IDX file or "
                                  "Parquet row group that inflates to more MiB than this, before inflating it")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        return check_name(v, "dataset name")

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
    objective: str | None = Field(None, description="objective preset laid over the preset: ae, recon-only, "
                                  "kl-only, elbo, vae-gan, perceptual (default: the preset's own, the ELBO)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="config overrides key=value, e.g. "
                                      "train.lr=3e-4 (repeatable)", json_schema_extra={"cli": ["--set"]})
    epochs: int | None = Field(None, ge=1, description="epochs (overrides the preset)")
    workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks)")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs reserved per worker, fractional allowed "
                                          "(default: 90% of the cluster's CPUs, shared)")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker; above 0 trains on GPUs with NCCL")
    model_name: str | None = Field(None, description="registered model name (default vae-<dataset name>)")
    experiment: str = Field("train-vae", description="MLflow experiment of the run")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint")
    memory_budget_mb: float = Field(4096, gt=0, description="MiB of pixels a worker holds per split; "
                                    "a larger split streams through Ray Data")

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        return v if v is None else check_name(v, "model name")

    @field_validator("overrides", mode="before")
    @classmethod
    def _overrides(cls, v: Any) -> Any:
        return parse_overrides(v) if isinstance(v, (list, tuple)) else v

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



class EncodeRequest(Request):
    """`encode-dataset`: a registered model version and a dataset version in; one Parquet file of latents per
    input shard, plus a manifest, out."""

    model: ModelURI = Field(description="registered model: models:/NAME@ALIAS or models:/NAME/VERSION")
    dataset: DatasetRef = Field(description="NAME or NAME@VERSION of an ingested dataset (latest version by default)")
    splits: list[Split] = Field(default_factory=lambda: ["train", "val", "test"],
                                description="splits to encode (repeatable, or comma-separated)")
    out: str | None = Field(None, description="output folder URL (default $VAE_HOME/embeddings/<model>/<version>/"
                            "<dataset>/<dataset version>)")
    batch_size: int = Field(1024, ge=1, description="images per encoder call")
    workers: int = Field(1, ge=1, description="encoder actors (Ray Data actor pool)")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs reserved per actor (default: the cluster's "
                                          "CPUs less one for reading, shared)")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per actor; above 0 encodes on GPUs in bf16")
    overwrite: bool = Field(False, description="encode every shard again, even those already written")
    experiment: str = Field("encode-dataset", description="MLflow experiment of the run that records throughput")

    @field_validator("out")
    @classmethod
    def _reachable_out(cls, v: str | None) -> str | None:
        """The output folder follows the source rule (`sources.remote`): allowed protocols, no metadata host."""
        if v is not None:
            check_url(v)
        return v

    @field_validator("splits", mode="before")
    @classmethod
    def _splits(cls, v: Any) -> Any:
        items = v.split(",") if isinstance(v, str) else v
        if isinstance(items, (list, tuple)):
            items = [s.strip() for item in items for s in str(item).split(",") if s.strip()]
            if not items:
                raise ValueError("splits must name at least one of train, val, test")
            return list(dict.fromkeys(items))  # each once, in the order given
        return items

    def dataset_ref(self) -> tuple[str, str | None]:
        return parse_dataset_ref(self.dataset)


def _stage_options(stage: type[Request], options: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Any]:
    """`options` for `stage` checked by building the stage's request with `fixed` (the fields the nightly
    flow fills in, which `options` may not set); returns them as JSON values, e.g. overrides given as a
    list of key=value come back as a dict. A bad option is a ValueError naming it."""
    if taken := sorted(set(options) & set(fixed)):
        raise ValueError(f"{', '.join(taken)} cannot be set here: the nightly flow sets "
                         f"{'them' if len(taken) > 1 else 'it'} for each run")
    try:
        built = stage(**options, **fixed)
    except ValueError as e:  # pydantic's ValidationError is one: name the option, not the placeholders
        errors = getattr(e, "errors", lambda: [])()
        raise ValueError("; ".join(f"{'.'.join(map(str, err['loc'])) or stage.__name__}: {err['msg']}"
                                   for err in errors) or str(e)) from None
    return built.model_dump(mode="json", exclude_unset=True, exclude=set(fixed))


class NightlyRequest(Request):
    """`nightly-retrain`: ingest a source; when the data or the request call for it, train a challenger on the
    new dataset version, evaluate it through the champion gate, and encode the dataset with the champion.

    The train, evaluate and encode options are the fields of those stages' requests less the ones the flow
    fills in (the dataset version it ingested, the model version it trained, the champion it pinned);
    each is checked when this request is built, by building the stage's request.
    """

    ingest: IngestRequest = Field(description="the ingest-dataset request: the source, the dataset name, ...")
    train: dict[str, Any] = Field(default_factory=dict, description="train-vae options: TrainRequest fields "
                                  "except dataset (e.g. preset, overrides, epochs, workers, model_name)")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="evaluate-vae options: EvaluateRequest "
                                     "fields except model, dataset and promote (e.g. split, iw_samples, metric, "
                                     "margin)")
    encode: dict[str, Any] = Field(default_factory=dict, description="encode-dataset options: EncodeRequest "
                                   "fields except model and dataset (e.g. splits, out, batch_size, workers)")
    retrain: Literal["on-change", "always"] = Field("on-change", description="on-change: train only when no model "
                                                    "was trained on the dataset version yet; always: every run")
    retries: int = Field(2, ge=0, description="retries of a stage that failed on a transient error (connection, "
                         "I/O, a 5xx from MLflow); errors in the data, the model or the request are never retried")
    retry_delay_s: float = Field(30.0, ge=0, description="seconds before the first retry, doubling after each")

    @field_validator("train")
    @classmethod
    def _train(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _stage_options(TrainRequest, v, {"dataset": "dataset"})

    @field_validator("evaluate")
    @classmethod
    def _evaluate(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _stage_options(EvaluateRequest, v, {"model": "models:/model/1", "dataset": "dataset",
                                                   "promote": True})

    @field_validator("encode")
    @classmethod
    def _encode(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _stage_options(EncodeRequest, v, {"model": "models:/model/1", "dataset": "dataset"})

    def train_request(self, dataset: str) -> TrainRequest:
        """The train-vae request for `dataset` (NAME@VERSION)."""
        return TrainRequest(**self.train, dataset=dataset)

    def evaluate_request(self, model: str, dataset: str) -> EvaluateRequest:
        """The evaluate-vae request for `model` (models:/NAME/VERSION) on `dataset`, with the champion gate."""
        return EvaluateRequest(**self.evaluate, model=model, dataset=dataset, promote=True)

    def encode_request(self, model: str, dataset: str) -> EncodeRequest:
        """The encode-dataset request for `dataset` with `model` (the champion, pinned: models:/NAME/VERSION)."""
        return EncodeRequest(**self.encode, model=model, dataset=dataset)
