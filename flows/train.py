"""The `train-vae` flow: a dataset version in, one MLflow run and one registered model version out.

    prepare (dataset, config, shape check, MLflow run)  ->  fit (Ray Train, DDP)  ->  register (@challenger)

Everything that can be wrong with the request (unknown dataset, empty split, an image size the
architecture cannot take) fails in `prepare`, before Ray starts; the request itself was validated
before Prefect started. Ray lives here and in `flows.distributed.train_worker`; MLflow in `flows.tracking.runs` and
`flows.tracking.registry`; the training setup in `vae_core.training.fit`.

Data: a split whose pixels fit `memory_budget_mb` is held by each worker as one uint8 tensor; a
larger one streams from its Parquet shards through Ray Data (`streaming_split`, one disjoint, equally
sized part per worker each epoch). Ray Data only ever gets whole CPUs that training leaves free, so
when a split streams the workers leave one CPU unreserved.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.distributed.cluster import ray_session, read_shards, reserve
from flows.tracking import registry, runs as tracking
from flows.run_log import run_lines, run_logger
from flows.tracking.progress import Progress
from vae_core import VAEConfig, load_config
from vae_core.data.shards import DatasetInfo, fit_model, open_dataset, shard_paths
from vae_core.errors import TrainError, VAEError
from vae_core.requests import TrainRequest
from vae_core.results import TrainResult
from vae_core.settings import checkpoint_root, data_root
from vae_core.storage import arrow_filesystem, is_local, resolve

if TYPE_CHECKING:
    from flows.distributed.train_worker import DataPlan, WorkerSpec


def resolve_config(req: TrainRequest, info: DatasetInfo) -> VAEConfig:
    """Preset + overrides + epochs + the dataset's image shape; a shape the architecture cannot take
    is an error."""
    cfg = load_config(req.preset, req.overrides, req.objective)
    if req.epochs:
        cfg.train.epochs = req.epochs
    return fit_model(info, cfg, req.preset, TrainError)


def perceptual_weights(cfg: VAEConfig, info: DatasetInfo) -> str | None:
    """The file of the perceptual loss's network, checked before any run starts: the config's own, or
    the dataset version's feature classifier (the one evaluate-vae scores with; trained and cached here
    when missing), which then goes into the config (so the run's parameters name it and every worker
    reads the same file). None when the objective has no perceptual term or names its own file."""
    from vae_core.training.perceptual import check_perceptual_weights

    pcfg = cfg.objective.perceptual
    if pcfg.weight == 0:
        return None
    if pcfg.weights is not None or pcfg.network != "classifier":
        check_perceptual_weights(pcfg)
        return None
    from flows.evaluate import classifier_data
    from vae_core.model.feature_net import load_or_train_feature_net

    try:
        _, net_info = load_or_train_feature_net(info.name, info.version, *classifier_data(info, seed=0),
                                                shape=info.shape,
                                                progress=lambda line: logging.getLogger(__name__).info(line))
    except ValueError as e:  # no labels: no classifier to take features from
        raise TrainError(f"the perceptual loss's classifier cannot be trained on {info.name}@{info.version}: {e}; "
                         "set objective.perceptual.network=vgg16 with objective.perceptual.weights=FILE") from None
    return net_info["path"]


def plan_data(info: DatasetInfo, memory_budget_mb: float) -> DataPlan:
    """How each split the workers use reaches them: "memory" (one uint8 tensor) or "stream" (Ray Data)."""
    if info.counts.get("train", 0) == 0:
        raise TrainError(f"dataset {info.name}@{info.version} has no training images")
    budget = memory_budget_mb * 2**20
    return {split: "memory" if rows * info.manifest.image_bytes <= budget else "stream"
            for split in ("train", "val") if (rows := info.counts.get(split, 0))}


def _scaling(req: TrainRequest, resources: dict[str, float], streaming: bool) -> tuple[float, int]:
    """CPUs reserved per worker and torch threads per worker (`reserve`): 10% of the cluster left over for
    Ray's own tasks, or a whole CPU when a split streams (Ray Data gets only whole CPUs training leaves)."""
    data_cpu = "which streams the splits over memory_budget_mb: lower cpus_per_worker or raise memory_budget_mb"
    return reserve(resources, req, TrainError, spare=1.0 if streaming else None, min_cpus=0.1,
                   data_cpu=data_cpu if streaming else None, threads=req.cpus_per_worker)


def _worker_spec(req: TrainRequest, info: DatasetInfo, cfg: VAEConfig, run_id: str, threads: int,
                 plan: DataPlan) -> WorkerSpec:
    from flows.distributed.train_worker import WorkerSpec
    from vae_core.training.fit import steps_per_epoch  # torch: not at import, which the nightly does for every run

    return WorkerSpec(config=cfg, run_id=run_id, data_root=data_root(), dataset=info.name, version=info.version,
                      data=plan, steps_per_epoch=steps_per_epoch(info.counts["train"], cfg.train.batch_size,
                                                                 req.workers),
                      threads_per_worker=threads)


def worker_error(err: BaseException) -> BaseException:
    """The error to raise for a failed `trainer.fit()`: what a worker raised, as it raised it, when that
    is a library error (NonFiniteLossError, ...), else a TrainError naming the cause.

    Ray Train V2 raises a WorkerGroupError whose `worker_failures` maps ranks to the workers' errors,
    each wrapped with its traceback text (`_base_exc` holds the original, pickled across intact).
    A library error on any rank wins over the others' collateral errors.
    """
    found = [getattr(e, "_base_exc", e) for e in (getattr(err, "worker_failures", None) or {}).values()]
    # An error of a Ray Data read task (a shard failing its checksum) reaches the worker inside Ray's
    # RayTaskError, whose text is a traceback; the error itself is its `cause`.
    found = [c if isinstance(c := getattr(e, "cause", None), VAEError) else e for e in found]
    if typed := [e for e in found if isinstance(e, VAEError)]:
        return typed[0]
    cause = (found or [err])[0]
    text = str(cause).strip()
    return TrainError(f"training failed: {text.splitlines()[-1] if text else type(cause).__name__}")


def stream_split(info: DatasetInfo, split: str):
    """A Ray Dataset of one split's `image` column, read from the shards the manifest lists."""
    # Every shard is checked against the manifest's size and SHA-256 as it is read.
    ds = read_shards(shard_paths(info, split), info.manifest.splits[split].shards, arrow_filesystem(info.fs), ["image"])
    # A fresh block order every epoch; workers add a local shuffle buffer on top.
    return ds.randomize_block_order() if split == "train" else ds


def checkpoint_storage(url: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train from any fsspec URL (s3://, gs://, a local path).

    Going through fsspec means checkpoints reach whatever the datasets reach, with the same
    credentials and endpoints (AWS_ENDPOINT_URL, ...), rather than through a second set of clients.
    """
    fs, path = resolve(url)
    return (path, None) if is_local(fs) else (path, arrow_filesystem(fs))


def fit(req: TrainRequest, info: DatasetInfo, cfg: VAEConfig, run_id: str,
        plan: DataPlan, progress: bool = False) -> tuple[Any, dict[str, float]]:
    """Run Ray Train; returns (final checkpoint, final metrics) plus start-up timings in the metrics.

    A line per epoch, worker failure and resumption goes to the run's log while it runs (`run_lines`:
    plain on stderr too with `progress`).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from flows.distributed.train_worker import FailureRecorder, checkpoint_staging, train_loop_per_worker

    t0 = time.perf_counter()
    with ray_session() as resources:
        ray_start = time.perf_counter() - t0
        streamed = [split for split, how in plan.items() if how == "stream"]
        cpus, threads = _scaling(req, resources, streaming=bool(streamed))
        ckpt_path, ckpt_fs = checkpoint_storage(checkpoint_root())
        env = {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "VAE_", "AWS_"))}
        env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=_worker_spec(req, info, cfg, run_id, threads, plan),
            datasets={split: stream_split(info, split) for split in streamed},
            dataset_config=DataConfig(datasets_to_split=streamed),
            scaling_config=ScalingConfig(
                num_workers=req.workers,
                use_gpu=req.gpus_per_worker > 0,
                resources_per_worker={"CPU": cpus, **({"GPU": req.gpus_per_worker} if req.gpus_per_worker else {})},
            ),
            run_config=RunConfig(
                name=run_id,
                storage_path=ckpt_path,
                storage_filesystem=ckpt_fs,
                failure_config=FailureConfig(max_failures=req.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                worker_runtime_env={"env_vars": env},
                callbacks=[FailureRecorder(run_id, env["MLFLOW_TRACKING_URI"])],
            ),
        )
        try:
            with Progress(run_id, cfg.train.epochs, run_lines(progress)):
                result = trainer.fit()
        except Exception as e:  # Ray wraps worker errors: raise the typed one a worker raised
            raise worker_error(e) from e
        finally:
            # The workers are gone, however the run ended (Ctrl-C's SystemExit included), and one killed while
            # it staged a checkpoint left the folder behind: this node's goes now, before Ray's slow shutdown
            # (a remote node's goes when the next rank 0 stages there).
            shutil.rmtree(checkpoint_staging(run_id), ignore_errors=True)
        if result.error is not None:
            raise worker_error(result.error) from result.error
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    metrics["startup/ray_s"] = ray_start
    metrics["startup/total_fit_s"] = time.perf_counter() - t0
    return result.checkpoint, metrics


@task(name="prepare-training")
def prepare_task(req: TrainRequest) -> tuple[DatasetInfo, VAEConfig, str, DataPlan]:
    info = open_dataset(data_root(), *req.dataset_ref())
    plan = plan_data(info, req.memory_budget_mb)
    cfg = resolve_config(req, info)
    if (classifier := perceptual_weights(cfg, info)) is not None:
        cfg.objective.perceptual.weights = classifier
    tracking.configure()
    run_id = tracking.start_training_run(
        req.experiment, f"{info.name}-{cfg.name}", cfg, info.name, info.version, info.url,
        extra_tags={"workers": str(req.workers), **{f"data.{split}": how for split, how in plan.items()}},
    )
    return info, cfg, run_id, plan


fit_task = task(name="fit")(fit)


@task(name="register-model")
def register_task(run_id: str, checkpoint: Any, model_name: str, dataset_version: str) -> tuple[int, float]:
    from flows.distributed.train_worker import WEIGHTS
    from vae_core.model.weights import load_model

    t0 = time.perf_counter()
    with checkpoint.as_directory() as d:
        model = load_model(os.path.join(d, WEIGHTS))
    version = registry.log_and_register_model(run_id, model, model_name, dataset_version)
    return version, time.perf_counter() - t0


def kl_warning(req: TrainRequest, info: DatasetInfo, cfg: VAEConfig, metrics: dict[str, float]) -> str | None:
    """The sentence a run ending with β below its target gets (`kl_shortfall`), for the epochs it trained."""
    from vae_core.model.losses import kl_shortfall  # torch: not at import, which the nightly does for every run
    from vae_core.training.fit import steps_per_epoch

    steps = steps_per_epoch(info.counts["train"], cfg.train.batch_size, req.workers)
    return kl_shortfall(cfg.train, steps, round(metrics.get("epoch", cfg.train.epochs)))


def _summary_markdown(out: TrainResult) -> str:
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(out.metrics.items()))
    return (
        f"# train-vae: {out.dataset}\n\n"
        f"- MLflow run: `{out.run_id}` ({out.run_url})\n"
        f"- Model: `{out.model_uri}` = `{out.model_name}` version {out.model_version}\n"
        f"- Dataset version: `{out.dataset_version}`\n\n| metric | value |\n|---|---|\n{rows}\n"
    )


@flow(name="train-vae")
def train_vae(request: TrainRequest, progress: bool = False) -> TrainResult:
    """Train a VAE on a dataset version with Ray Train and register it as `vae-<dataset>@challenger`.

    Returns what `vae train --json` prints: run id and URL, model name, version and URI, dataset
    version, final metrics and start-up timings. Marks the MLflow run FAILED on any error. A line per
    epoch, worker failure and resumption goes to the flow run's log; `progress` shows them plain on stderr
    instead of in Prefect's console format (`vae demo`).
    """
    info, cfg, run_id, plan = prepare_task(request)
    run = tracking.RunLogger(run_id)
    monitor = tracking.start_system_metrics(run_id)  # CPU, memory, GPU of the driver's node
    try:
        checkpoint, metrics = fit_task(request, info, cfg, run_id, plan, progress)
        if warning := kl_warning(request, info, cfg, metrics):  # evaluate-vae carries `warning/*` to its gate
            run.set_tags({"warning/kl_warmup": warning})
            run_logger(api_only=progress).warning("warning: %s", warning)  # `vae train` prints the result's
        name = request.model_name or registry.default_model_name(info.name)
        version, register_s = register_task(run_id, checkpoint, name, info.version)
        metrics["startup/register_s"] = register_s
        run.log_metrics({k: v for k, v in metrics.items() if k.startswith("startup/")}, step=0)
    except BaseException:
        tracking.stop_system_metrics(monitor)
        run.finish("FAILED")
        raise
    tracking.stop_system_metrics(monitor)
    run.finish("FINISHED")
    out = TrainResult(run_id=run_id, run_url=tracking.run_url(run_id), model_name=name, model_version=version,
                      model_uri=registry.model_uri(name, registry.CHALLENGER), dataset=info.name,
                      dataset_version=info.version, metrics=metrics, warnings=[warning] if warning else [])
    create_markdown_artifact(markdown=_summary_markdown(out), key="train-vae-summary",
                             description=f"MLflow run {run_id}, model {name} v{version}")
    return out
