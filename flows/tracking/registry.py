"""The registered model: logging a trained ConvVAE as an MLflow pyfunc, registering it, naming it.

The store itself (where it is, experiments, runs) is `flows.tracking.runs`'s; the pyfunc class that
loads the registered model is in `flows.tracking.pyfunc`.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from flows.tracking.runs import client
from vae_core.errors import ModelNotFoundError

if TYPE_CHECKING:
    from vae_core.evaluation.gate import Decision
    from vae_core.model.vae import ConvVAE

MODEL_ARTIFACT_NAME = "model"
# Third-party packages the registered model needs at load time (vae_core itself travels with it).
_MODEL_REQUIREMENTS = ("mlflow", "torch", "numpy", "pandas", "safetensors", "pydantic", "PyYAML", "fsspec")
_PYFUNC_FILE = Path(__file__).resolve().parent / "pyfunc.py"
WEIGHTS_ARTIFACT = "weights"  # the artifact key flows.tracking.pyfunc reads (not imported: it pulls in torch)
CHAMPION, CHALLENGER = "champion", "challenger"  # the aliases: the version served, the one trained last
GATE_LOCK_SUFFIX = ".gate-lock"  # `<name>.gate-lock`: a registered model only while a champion gate holds it
_GATE_HEAD = "Champion gate:"  # a version description's last paragraph, rewritten by each gate decision


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

    The version carries tags dataset_version and run_id and a description of what it was trained on; the
    registered model, when this creates it, a description of what it is and how to load it. Returns the new
    version number.
    """
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
    _log_pyfunc(run_id, logged.model_id, model, tags)
    dataset = run.data.tags.get("dataset_name", "?")
    _ensure_registered_model(model_name, dataset)
    mv = mlflow_client.create_model_version(
        model_name, f"models:/{logged.model_id}", run_id=run_id, tags=tags, model_id=logged.model_id,
        description=version_description(model, f"{dataset}@{dataset_version}", run.data.params.get("name"), run_id))
    _list_version(logged.model_id, model_name, int(mv.version))
    mlflow_client.set_registered_model_alias(model_name, alias, str(mv.version))
    return int(mv.version)


def _log_pyfunc(run_id: str, model_id: str, model: ConvVAE, tags: dict[str, str]) -> None:
    """Write the pyfunc's files (weights, code, requirements, signature, input example) into the logged model."""
    import vae_core  # torch-heavy; only registration needs it
    from vae_core.model.weights import save_model

    with tempfile.TemporaryDirectory(prefix="vae-model-") as tmp:
        weights = Path(tmp) / "model.safetensors"
        save_model(model, str(weights), extra={"run_id": run_id, "dataset_version": tags["dataset_version"]})
        # Model.log is what mlflow.pyfunc.log_model calls, with the run id passed explicitly; the fluent
        # form needs a global active run, and leaving one (`with start_run(run_id)`) would mark the
        # still-training run FINISHED. No registered_model_name: registering is done apart (see
        # _list_version for why).
        Model.log(
            artifact_path=None,
            name=MODEL_ARTIFACT_NAME,
            flavor=_UnvalidatedPyfunc,
            run_id=run_id,
            model_id=model_id,
            python_model=str(_PYFUNC_FILE),  # a "model from code": no pickled class
            artifacts={WEIGHTS_ARTIFACT: str(weights)},
            code_paths=[vae_core.__path__[0]],  # the library travels with the model
            signature=model_signature(model),
            input_example=input_example(model),
            # The example is checked against the signature only: mlflow's serving check would load and run
            # the model in this process, which costs time and leaves the model's code folder on sys.path.
            validate_serving_input=False,
            # Explicit requirements skip mlflow's inference, which loads the model in a subprocess (~7 s).
            pip_requirements=_pip_requirements(),
            tags=tags,
        )


class _UnvalidatedPyfunc:
    """mlflow.pyfunc as a flavor for Model.log, taking its `validate_serving_input` option: Model.log reads it,
    then hands every option to the flavor's save_model, and mlflow.pyfunc.save_model refuses unknown ones."""

    @staticmethod
    def save_model(validate_serving_input: bool = True, **kwargs: Any) -> None:
        mlflow.pyfunc.save_model(**kwargs)


def input_example(model: ConvVAE) -> np.ndarray:
    """One mid-grey uint8 image in the model's (1, H, W, C) input shape: the input example logged with it."""
    c, h, w = model.config.input_shape
    return np.full((1, h, w, c), 128, np.uint8)


def _ensure_registered_model(name: str, dataset: str) -> None:
    """Create registered model `name` with its description, or describe it if it exists without one (a
    description someone wrote is kept). Reads first: the model exists for every version but the first."""
    mlflow_client = client()
    description = model_description(name, dataset)
    try:
        if not mlflow_client.get_registered_model(name).description:
            mlflow_client.update_registered_model(name, description=description)
        return
    except MlflowException as e:
        if not _missing(e):
            raise
    try:
        mlflow_client.create_registered_model(name, description=description)
    except MlflowException as e:  # a concurrent registration created it in between: it describes it
        if e.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
            raise


def model_description(name: str, dataset: str) -> str:
    """The registered model's description: what it is and how to load it."""
    return (f"A variational autoencoder (VAE) trained on the `{dataset}` dataset: one version per train-vae run. "
            f"`@{CHAMPION}` is the version evaluate-vae's gate promoted, `@{CHALLENGER}` the newest.\n\n"
            f"Load: `mlflow.pyfunc.load_model(\"{model_uri(name, CHAMPION)}\")`; its `predict(images)` takes uint8 "
            "images (N, H, W, C) and returns {\"mean\", \"logvar\"} float32 (N, latent_dim). "
            "`.unwrap_python_model().model` is the torch module, for decode and sample (docs/models.md).")


def version_description(model: ConvVAE, dataset: str, config: str | None, run_id: str) -> str:
    """A version's description at registration: its data (`name@version`), config, run and shapes; the
    gate's outcome follows (`describe_gate`)."""
    c, h, w = model.config.input_shape
    return (f"Trained on `{dataset}` with the `{config or 'unnamed'}` config in MLflow run `{run_id}`. Takes uint8 "
            f"images (N, {h}, {w}, {c}) to latents of {model.latent_dim} dimensions.\n\n"
            f"{_GATE_HEAD} not evaluated yet.")


def describe_gate(name: str, version: int, decision: Decision) -> None:
    """Put the champion gate's outcome (promoted or kept, and why) in the version's description, in place
    of the one before."""
    mlflow_client = client()
    before = mlflow_client.get_model_version(name, str(version)).description or ""
    kept = before.split(f"\n\n{_GATE_HEAD}")[0] if before else ""
    outcome = f"{_GATE_HEAD} {'promoted' if decision.promote else 'kept'}: {decision.reason}."
    mlflow_client.update_model_version(name, str(version), description=f"{kept}\n\n{outcome}".strip())


def _list_version(model_id: str, name: str, version: int) -> None:
    """List `name` version `version` once in the logged model's `mlflow.modelVersions` tag.

    A tracking server adds the version to that tag itself when it creates one; mlflow's log_model then adds it
    again on the client, so a version listed itself twice. A local store adds nothing.
    """
    mlflow_client = client()
    listed = json.loads(mlflow_client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if any(v["name"] == name and str(v["version"]) == str(version) for v in listed):
        return
    listed.append({"name": name, "version": version})
    mlflow_client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})


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
                       model_id=getattr(mv, "model_id", None) or _logged_model_id(mv.source))


def _logged_model_id(source: str | None) -> str | None:
    """The LoggedModel id in a version's source `models:/m-<hex>`: MLflow's SQL registries keep no model_id
    column, so a version read back from them has none."""
    name = (source or "").removeprefix("models:/")
    return name if name != source and re.fullmatch(r"m-[0-9a-f]+", name) else None


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
