"""The registered model: logging a trained ConvVAE as an MLflow pyfunc, registering it, naming it.

The store itself (where it is, experiments, runs) is `flows.tracking.runs`'s; the pyfunc class that
loads the registered model is in `flows.tracking.pyfunc`.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

from flows.tracking.runs import client
from vae_core.errors import ModelNotFoundError

if TYPE_CHECKING:
    from vae_core.model.vae import ConvVAE

MODEL_ARTIFACT_NAME = "model"
# Third-party packages the registered model needs at load time (vae_core itself travels with it).
_MODEL_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "safetensors", "pydantic", "PyYAML", "fsspec")
_PYFUNC_FILE = Path(__file__).resolve().parent / "pyfunc.py"
WEIGHTS_ARTIFACT = "weights"  # the artifact key flows.tracking.pyfunc reads (not imported: it pulls in torch)
CHAMPION, CHALLENGER = "champion", "challenger"  # the aliases: the version served, the one trained last
GATE_LOCK_SUFFIX = ".gate-lock"  # `<name>.gate-lock`: a registered model only while a champion gate holds it


def default_model_name(dataset_name: str) -> str:
    """Registered model name for a dataset: `vae-<dataset_name>`."""
    return f"vae-{dataset_name}"


def model_uri(model_name: str, alias: str) -> str:
    """`models:/<name>@<alias>`, what `mlflow.pyfunc.load_model` takes."""
    return f"models:/{model_name}@{alias}"


def model_signature(model: ConvVAE) -> ModelSignature:
    """uint8 (-1, H, W, C) images in; float32 (-1, L) "mean" and "logvar" out; optional batch_size."""
    c, h, w = model.config.input_shape
    latent = model.latent_dim
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, c))]),
        outputs=Schema([
            TensorSpec(np.dtype(np.float32), (-1, latent), "mean"),
            TensorSpec(np.dtype(np.float32), (-1, latent), "logvar"),
        ]),
        params=ParamSchema([ParamSpec("batch_size", "long", 256)]),
    )


def log_and_register_model(
    run_id: str,
    model: ConvVAE,
    model_name: str,
    dataset_version: str,
    alias: str = CHALLENGER,
) -> int:
    """Log `model` as a pyfunc into the run, register it as a new version of `model_name`, set `alias`.

    The version carries tags dataset_version and run_id. Returns the new version number.
    """
    import vae_core  # torch-heavy; only this function needs it
    from vae_core.model.weights import save_model

    mlflow_client = client()
    tags = {"dataset_version": dataset_version, "run_id": run_id}
    run = mlflow_client.get_run(run_id)
    # The LoggedModel is created here, in the run's experiment: mlflow's log_model would otherwise
    # file it under the process's active experiment (the Default one when no run is active).
    logged = mlflow_client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=MODEL_ARTIFACT_NAME,
        source_run_id=run_id,
        tags=tags,
        params={k: v[:6000] for k, v in run.data.params.items()},
    )
    with tempfile.TemporaryDirectory(prefix="vae-model-") as tmp:
        weights = Path(tmp) / "model.safetensors"
        save_model(model, str(weights), extra={"run_id": run_id, "dataset_version": dataset_version})
        with warnings.catch_warnings():
            # An input example would only silence this: mlflow validates one by loading the model
            # in this process, which leaves the model's code folder on sys.path.
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            # Model.log is what mlflow.pyfunc.log_model calls, with the run id passed explicitly; the
            # fluent form needs a global active run, and leaving one (`with start_run(run_id)`) would
            # mark the still-training run FINISHED.
            info = Model.log(
                artifact_path=None,
                name=MODEL_ARTIFACT_NAME,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                python_model=str(_PYFUNC_FILE),  # a "model from code": no pickled class
                artifacts={WEIGHTS_ARTIFACT: str(weights)},
                code_paths=[vae_core.__path__[0]],  # the library travels with the model
                signature=model_signature(model),
                # Explicit requirements skip mlflow's inference, which loads the model in a subprocess (~7 s).
                pip_requirements=_pip_requirements(),
                registered_model_name=model_name,
                tags=tags,
            )
    version = int(info.registered_model_version)
    mlflow_client.set_registered_model_alias(model_name, alias, str(version))
    return version


def _pip_requirements() -> list[str]:
    """Pinned versions of the model's third-party dependencies, as installed here."""
    pins = []
    for dist in _MODEL_REQUIREMENTS:
        try:
            version = metadata.version(dist).split("+")[0]  # "2.13.0+cpu" -> "2.13.0"
        except metadata.PackageNotFoundError:
            continue
        pins.append(f"{dist}=={version}")
    return pins


# --- reading the registry: pinning a URI to one version, aliases, tags ---------------------------


@dataclass(frozen=True)
class PinnedModel:
    """One registered model version, resolved once from what the user named (`asked`)."""

    name: str
    version: int
    run_id: str
    dataset_name: str | None  # as the training run recorded them
    dataset_version: str | None
    asked: str
    model_id: str | None = None  # the MLflow LoggedModel behind the version, for linking runs to it

    @property
    def uri(self) -> str:
        """`models:/<name>/<version>`: the pinned form, unaffected by later alias moves."""
        return f"models:/{self.name}/{self.version}"


def pin_model(uri: str) -> PinnedModel:
    """Resolve `models:/NAME@ALIAS` or `models:/NAME/VERSION` to one version, now.

    Raises:
        ModelNotFoundError: the model, alias or version does not exist; the message lists what does.
    """
    from vae_core.names import parse_model_uri

    name, alias, version = parse_model_uri(uri)
    mlflow_client = client()
    try:
        model = mlflow_client.get_registered_model(name)
    except MlflowException as e:
        if not _missing(e):  # a server away, a permission: not "no such model"
            raise
        names = sorted(m.name for m in mlflow_client.search_registered_models(max_results=1000)
                       if not m.name.endswith(GATE_LOCK_SUFFIX))  # a champion gate's lock is no model
        raise ModelNotFoundError(f"no registered model {name!r} in {mlflow_client.tracking_uri}; registered "
                                 f"models: {', '.join(names) or 'none'}") from None
    if alias is not None:
        if alias not in model.aliases:
            have = ", ".join(f"@{a} -> version {v}" for a, v in sorted(model.aliases.items()))
            raise ModelNotFoundError(f"model {name!r} has no alias {alias!r}; its aliases: {have or 'none'}")
        version = int(model.aliases[alias])
    try:
        mv = mlflow_client.get_model_version(name, str(version))
    except MlflowException as e:
        if not _missing(e):
            raise
        versions = sorted(int(v.version) for v in mlflow_client.search_model_versions(f"name='{name}'"))
        raise ModelNotFoundError(f"model {name!r} has no version {version}; its versions: "
                                 f"{', '.join(map(str, versions)) or 'none'}") from None
    run_tags = mlflow_client.get_run(mv.run_id).data.tags if mv.run_id else {}
    return PinnedModel(name=name, version=int(mv.version), run_id=mv.run_id, asked=uri,
                       dataset_name=run_tags.get("dataset_name"),
                       dataset_version=mv.tags.get("dataset_version") or run_tags.get("dataset_version"),
                       model_id=getattr(mv, "model_id", None))


def _missing(e: MlflowException) -> bool:
    return e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def alias_version(name: str, alias: str) -> int | None:
    """The version `alias` points at now, None when it points nowhere."""
    aliases = client().get_registered_model(name).aliases
    return int(aliases[alias]) if alias in aliases else None


def load_pinned(pinned: PinnedModel) -> ConvVAE:
    """The ConvVAE of a pinned version, from its safetensors weights (nothing unpickled)."""
    from vae_core.model.weights import load_model

    with tempfile.TemporaryDirectory(prefix="vae-model-") as tmp:
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{pinned.uri}/artifacts/model.safetensors", dst_path=tmp)
        return load_model(path).eval()


def set_version_tags(name: str, version: int, tags: dict[str, str]) -> None:
    """Set tags on one model version (values cut to the registry's 5,000 characters)."""
    mlflow_client = client()
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, str(version), key, str(value)[:5000])


def set_alias(name: str, alias: str, version: int) -> None:
    """Point `alias` at `version`: one registry call, so a reader sees the old version or the new one."""
    client().set_registered_model_alias(name, alias, str(version))


def versions_trained_on(name: str, dataset_version: str) -> list[tuple[int, dict[str, str]]]:
    """(version, tags) of every version of `name` trained on `dataset_version` (its `dataset_version` tag),
    newest first; an empty list when `name` is not registered."""
    found = client().search_model_versions(f"name='{name}'")
    return sorted(((int(mv.version), dict(mv.tags)) for mv in found
                   if mv.tags.get("dataset_version") == dataset_version), reverse=True)
