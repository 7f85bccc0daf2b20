"""The `evaluate-vae` flow: a registered model version in; its metrics, pictures, report and the champion
gate's decision out.

    pin (URI -> one version, and the champion as it is now)  ->  load (dataset, shape and split checks)
      ->  score the challenger  ->  score the champion (same split, K, seed)  ->  gate  ->  report

The alias in the request is resolved once, in `pin`; everything after uses the pinned version. Every
check that can fail (unknown model, alias or version, a dataset the model does not fit, an empty split,
more GPUs than the machine has) runs before any image is scored. Metrics go to the model's training run
as `<split>/<metric>` (`test/nll_k100`), pictures and the HTML report to that run's
`evaluation/<split>_k<K>/` and to `$VAE_HOME/reports/<model>/<version>/`; the decision is recorded as
`gate.*` tags on the model version before `champion` moves, so `@champion` only ever names a version
that was evaluated.

The split is never held whole: `load` gives a stream of its batches (`iter_split`) and a seeded sample of the
reference split; scoring keeps running sums (`vae_core.evaluation.evaluate`), in this process or, with
`workers` > 1, over a Ray Data actor pool (`flows.distributed.evaluate_worker`) whose passes merge here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.tracking import registry, runs as tracking
from flows.tracking.evaluation import log_evaluation, summary_markdown, training_warnings, write_report
from flows.run_log import run_logger, timed
from flows.tracking.registry import CHALLENGER, CHAMPION, PinnedModel
from flows.tracking.registry_lock import gate_lock
from vae_core.data.shards import DatasetInfo, fit_model, open_dataset
from vae_core.errors import EvaluateError
from vae_core.names import parse_dataset_ref
from vae_core.requests import EvaluateRequest
from vae_core.results import ChampionScores, EvaluateResult
from vae_core.settings import data_root


@dataclass(frozen=True)
class Target:
    """What is evaluated, pinned once: the model version, the champion at the start, the dataset, and the
    version's training warnings ({name: sentence}, its training run's `warning/<name>` tags)."""

    model: PinnedModel
    champion: PinnedModel | None
    dataset: DatasetInfo
    warnings: dict[str, str] = field(default_factory=dict)


@task(name="pin-model", cache_policy=NO_CACHE)
def pin_task(req: EvaluateRequest) -> Target:
    """Resolve the model URI and the current champion to versions; open the dataset; check the split; read the
    version's training warnings."""
    model = registry.pin_model(req.model)
    champion = None
    if req.promote and (version := registry.alias_version(model.name, CHAMPION)) is not None:
        champion = registry.pin_model(f"models:/{model.name}/{version}")
    return Target(model=model, champion=champion, dataset=_open_dataset(req, model),
                  warnings=training_warnings(model.run_id))


def _open_dataset(req: EvaluateRequest, model: PinnedModel) -> DatasetInfo:
    if req.dataset:
        name, version = parse_dataset_ref(req.dataset)
    elif model.dataset_name:
        name, version = model.dataset_name, model.dataset_version
    else:
        raise EvaluateError(f"{model.uri} records no dataset it was trained on; name one with --dataset NAME[@VERSION]")
    info = open_dataset(data_root(), name, version)
    if info.counts.get(req.split, 0) == 0:
        have = ", ".join(f"{s} {n:,}" for s, n in info.counts.items())
        raise EvaluateError(f"split {req.split!r} of dataset {info.name}@{info.version} is empty ({have or 'no images'})")
    return info


LIKELIHOOD_METRICS = ("nll", "bits_per_dim", "neg_elbo")  # bounds of log p(x): a VAE's, never an autoencoder's


@task(name="load-data", cache_policy=NO_CACHE)
def load_task(req: EvaluateRequest, target: Target) -> tuple[dict[str, Any], Any]:
    """Both models (shapes checked against the dataset), the split as a stream of batches, and a seeded sample
    of the reference split that latent probes fit on (train; val when train itself is scored)."""
    from vae_core.data.shards import iter_split, sample_split
    from vae_core.evaluation.evaluate import EvalData

    models = {CHALLENGER: registry.load_pinned(target.model)}
    if target.champion and target.champion.version != target.model.version:
        models[CHAMPION] = registry.load_pinned(target.champion)
    for role, model in models.items():
        pinned = target.champion if role == CHAMPION else target.model
        fit_model(target.dataset, model.config, pinned.uri, EvaluateError,
                  "evaluate it on the dataset it was trained on (--dataset)")
    if req.promote and req.metric in LIKELIHOOD_METRICS and any(m.config.kind == "ae" for m in models.values()):
        raise EvaluateError(f"the champion gate compares {req.metric}, which an autoencoder (model.kind=ae) does not "
                            "have: choose --metric frechet_samples (or mse, ssim, knn_accuracy, ...) or --no-promote")
    info = target.dataset
    reference = "val" if req.split == "train" else "train"
    rows = info.counts.get(reference, 0)
    sample = sample_split(info, reference, req.sample_rows, req.seed) if rows else None
    return models, EvalData(lambda batch_size: iter_split(info, req.split, batch_size, req.limit), sample, rows)


def _images(req: EvaluateRequest, target: Target) -> int:
    """How many images the split scores."""
    n = target.dataset.counts[req.split]
    return min(n, req.limit) if req.limit else n


@task(name="feature-classifier", cache_policy=NO_CACHE)
def feature_task(target: Target, data: Any, req: EvaluateRequest, progress: bool) -> tuple[Any, dict[str, Any]]:
    """The dataset version's feature classifier (trained once on a seeded sample of train, then cached) and a
    Fréchet scorer holding the split's real images; (None, reason) on unlabelled data."""
    import sys

    import torch

    from vae_core.evaluation.scores import devices_for
    from vae_core.model.feature_net import FrechetScorer, load_or_train_feature_net

    if data.reference is None or not (data.reference.labels >= 0).any():
        return None, {"skipped": "no labelled reference split to train the feature classifier on"}
    info = target.dataset
    device = devices_for(req.gpus)[0]
    say = (lambda line: print(line, file=sys.stderr)) if progress else None
    log = run_logger()
    with timed(log, f"feature classifier of {info.name}@{info.version} (loaded, or trained once)"):
        net, net_info = load_or_train_feature_net(info.name, info.version, *classifier_data(info, req.seed),
                                                  seed=req.seed, device=device, progress=say, shape=info.shape)
    with timed(log, f"features of the {req.split} split's real images"):
        scorer = FrechetScorer(net, device=device, accuracy=net_info["test_accuracy"])
        for rows in data.split(req.batch_size):
            scorer.add_real(torch.from_numpy(rows.images).permute(0, 3, 1, 2))
    return scorer, net_info


def classifier_data(info: DatasetInfo, seed: int) -> tuple[Any, Any]:
    """What a feature classifier trains and is measured on, read only when it is not cached: seeded samples
    of the train and test splits, bounded (`feature_net.sample_rows`)."""
    from vae_core.data.shards import sample_split
    from vae_core.model.feature_net import sample_rows

    train_rows, test_rows = sample_rows(info.manifest.image_bytes)

    def train() -> tuple:
        rows = sample_split(info, "train", train_rows, seed)
        return rows.images, rows.labels

    def test() -> tuple | None:
        if not info.counts.get("test"):
            return None
        rows = sample_split(info, "test", test_rows, seed)
        return rows.images, rows.labels

    return train, test


@task(name="score", cache_policy=NO_CACHE)
def score_task(model: Any, target: Target, data: Any, req: EvaluateRequest, scorer: Any, net_info: dict[str, Any],
               label: str, progress: bool) -> Any:
    """One model's evaluation: in this process, or over a Ray Data actor pool with `workers` > 1."""
    from tqdm.auto import tqdm

    from vae_core.evaluation.evaluate import evaluate_model
    from vae_core.evaluation.scores import devices_for

    devices = devices_for(req.gpus)
    what = f"scoring {label} on {_images(req, target):,} {req.split} images (K={req.iw_samples})"
    with timed(run_logger(), what), tqdm(total=_images(req, target), desc=f"score {label} (K={req.iw_samples})",
                                         unit="img", disable=not progress) as bar:
        if req.workers > 1:
            return _score_on_ray(model, target.dataset, data, req, scorer, net_info.get("path"), bar.update)
        return evaluate_model(model.to(devices[0]), data, k=req.iw_samples, seed=req.seed, batch_size=req.batch_size,
                              devices=devices, frechet=scorer, on_batch=bar.update, sample_rows=req.sample_rows)


def _score_on_ray(model: Any, info: DatasetInfo, data: Any, req: EvaluateRequest, scorer: Any,
                  feature_net: str | None, on_batch: Any) -> Any:
    """The scoring pass as Ray Data `map_batches` over `workers` actors (`BatchScorer`: the same code as in
    process), each batch's pass merged here as it arrives; then the prior samples and probes here."""
    import copy
    import pickle

    import ray.data

    from flows.distributed.cluster import data_context, ray_session, read_shards, reserve
    from flows.distributed.evaluate_worker import BatchScorer
    from vae_core.data.shards import shard_paths
    from vae_core.evaluation.evaluate import SplitPass, finish
    from vae_core.model.weights import model_to_bytes
    from vae_core.storage import arrow_filesystem

    split = SplitPass(model, req.iw_samples, req.seed, req.sample_rows)
    if scorer is not None:
        scorer.reset_fake()
    block_bytes = max(2**16, 2 * req.batch_size * info.manifest.image_bytes)  # blocks of a few batches
    options = copy.copy(ray.data.DataContext.get_current().execution_options)
    options.preserve_order = options.preserve_order or bool(req.limit)  # --limit: the first N rows, as in process
    with ray_session() as resources, data_context(target_max_block_size=block_bytes, enable_progress_bars=False,
                                                  execution_options=options):
        cpus, threads = reserve(resources, req, EvaluateError, spare=1.0, min_cpus=0.5)
        ds = read_shards(shard_paths(info, req.split), info.manifest.splits[req.split].shards,
                         arrow_filesystem(info.fs), ["id", "image", "label"])
        parts = (ds.limit(req.limit) if req.limit else ds).map_batches(
            BatchScorer, batch_size=req.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"weights": model_to_bytes(model), "feature_net": feature_net if scorer else None,
                                   "k": req.iw_samples, "seed": req.seed, "sample_rows": req.sample_rows,
                                   "threads": threads},
            compute=ray.data.ActorPoolStrategy(size=req.workers), num_cpus=cpus)
        for batch in parts.iter_batches(batch_size=None, batch_format="pyarrow"):
            for rows, blob in zip(batch.column("rows").to_pylist(), batch.column("part").to_pylist()):
                part, sums = pickle.loads(blob)  # written by our own actors
                split.merge(part)
                if scorer is not None:
                    scorer.add_fake_sums(sums)
                on_batch(rows)
    return finish(model, split, data, req.seed, req.batch_size, None, scorer)


@task(name="report", cache_policy=NO_CACHE)
def report_task(req: EvaluateRequest, target: Target, model: Any, evaluation: Any,
                facts: dict[str, str]) -> dict[str, str]:
    """Pictures and the HTML report, written under $VAE_HOME/reports and logged to the training run."""
    from vae_core.evaluation.evaluate import draw_pictures

    with timed(run_logger(), "pictures and the HTML report"):
        pictures = draw_pictures(model, evaluation, seed=req.seed, map_points=req.map_points,
                                 label_names=target.dataset.manifest.label_names)
        return write_report(target.model, req, facts, evaluation, pictures)


@task(name="champion-gate", cache_policy=NO_CACHE)
def gate_task(req: EvaluateRequest, target: Target, mine: dict[str, float],
              theirs: dict[str, float] | None) -> Any:
    """Decide, record the decision on the version, then (only then) move `champion`."""
    from vae_core.evaluation.gate import HIGHER_IS_BETTER, decide, metric_key

    key = metric_key(req.metric, req.iw_samples)
    if key not in mine:
        raise EvaluateError(f"the gate's metric {key!r} was not computed on this dataset (no labels?); "
                            f"choose one of: {', '.join(sorted(k for k in mine if not k.startswith('kl_dim')))}")
    champion = target.champion
    decision = decide(f"{req.split}/{key}", mine[key], target.model.version,
                      None if champion is None or theirs is None else theirs.get(key, float("nan")),
                      None if champion is None else champion.version, req.margin, req.metric in HIGHER_IS_BETTER)
    with gate_lock(target.model.name):  # read, record and move as one step among concurrent gates
        now = registry.alias_version(target.model.name, CHAMPION)
        if decision.promote and now != (champion.version if champion else None):
            # Someone moved champion while this ran: what was compared is no longer what is served.
            decision = dataclasses.replace(decision, promote=False, reason=f"champion moved to version {now} "
                                           "during this evaluation; re-run to compare against it")
        decision = decision.with_warnings(target.warnings.values())  # what training warned of stays beside it
        if now != target.model.version:  # the champion keeps the record that promoted it
            registry.set_version_tags(target.model.name, target.model.version, decision.tags())
            registry.describe_gate(target.model.name, target.model.version, decision)
        if decision.promote:
            registry.set_alias(target.model.name, CHAMPION, target.model.version)
    run_logger().info(_gate_line(decision))
    return decision


def _gate_line(d: Any) -> str:
    """The gate's decision as one log line: the verdict, both versions' numbers, the reason."""
    theirs = "no champion" if d.champion_version is None else f"champion v{d.champion_version}" + \
        ("" if d.champion is None else f" {d.champion:.4g}")
    return (f"champion gate: v{d.challenger_version} {'promoted' if d.promote else 'kept out'}: {d.metric} "
            f"{d.challenger:.4g} against {theirs} (margin {d.margin:g}): {d.reason}")


@flow(name="evaluate-vae")
def evaluate_vae(request: EvaluateRequest, progress: bool = False) -> EvaluateResult:
    """Score a registered model on a dataset split, draw and report it, and run the champion gate.

    Returns what `vae evaluate --json` prints: the pinned model, dataset, metrics (`<split>/<name>`), notes,
    the feature classifier's accuracy, the champion's metrics, the decision and where the report is.
    """
    from vae_core.evaluation.scores import devices_for

    devices_for(request.gpus)  # more GPUs than the machine has: fail before anything loads
    tracking.configure()
    target = pin_task(request)
    models, data = load_task(request, target)
    scorer, net_info = feature_task(target, data, request, progress)
    _check_gate_features(request, net_info)
    mine = score_task(models[CHALLENGER], target, data, request, scorer, net_info, f"v{target.model.version}", progress)
    theirs = None
    if CHAMPION in models:
        theirs = score_task(models[CHAMPION], target, data, request, scorer, net_info,
                            f"champion v{target.champion.version}", progress)
    mine.notes.extend(f"training warning ({name}): {text}" for name, text in target.warnings.items())
    facts = _facts(request, target, mine.images, net_info)
    log_evaluation(target.model, request, mine, facts)
    if theirs is not None:
        log_evaluation(target.champion, request, theirs, facts)
    decision = gate_task(request, target, mine.metrics, theirs.metrics if theirs else None) if request.promote \
        else None
    if decision is not None:
        facts["champion gate"] = f"{'promoted' if decision.promote else 'not promoted'}: {decision.reason}"
    paths = report_task(request, target, models[CHALLENGER], mine, facts)
    out = _result(request, target, mine, theirs, net_info, decision, paths)
    create_markdown_artifact(markdown=summary_markdown(out), key="evaluate-vae-summary",
                             description=f"{target.model.uri} on {out.dataset}@{out.dataset_version}")
    return out


def _check_gate_features(req: EvaluateRequest, net_info: dict[str, Any]) -> None:
    """Stop before scoring when the gate would compare Fréchet distances of a classifier too weak to trust."""
    from vae_core.evaluation.gate import refusal
    from vae_core.model.feature_net import unreliable_features

    if not req.promote or "test_accuracy" not in net_info:
        return
    why = refusal(req.metric, unreliable_features(net_info["test_accuracy"], net_info["num_classes"]))
    if why is not None:
        raise EvaluateError(why)


def _facts(req: EvaluateRequest, target: Target, n: int, net_info: dict[str, Any]) -> dict[str, str]:
    facts = {"model": target.model.uri, "asked for": target.model.asked,
             "dataset": f"{target.dataset.name}@{target.dataset.version}", "split": req.split,
             "images": f"{n:,}", "K (IWAE samples)": str(req.iw_samples), "seed": str(req.seed)}
    if "test_accuracy" in net_info:
        facts["feature classifier"] = (f"accuracy {net_info['test_accuracy']:.4f} on {net_info['accuracy_split']} "
                                       f"({'cached' if net_info['cached'] else 'trained now'})")
    return facts


def _result(req: EvaluateRequest, target: Target, mine: Any, theirs: Any, net_info: dict[str, Any],
            decision: Any, paths: dict[str, str]) -> EvaluateResult:
    return EvaluateResult(
        model_name=target.model.name, model_version=target.model.version, model_uri=target.model.uri,
        asked=target.model.asked, run_id=target.model.run_id, run_url=tracking.run_url(target.model.run_id),
        dataset=target.dataset.name, dataset_version=target.dataset.version, split=req.split,
        images=mine.images, iw_samples=req.iw_samples, seed=req.seed,
        metrics=mine.keyed(req.split), notes=mine.notes, feature_classifier=net_info,
        champion=None if theirs is None else ChampionScores(
            version=target.champion.version, metrics=theirs.keyed(req.split)),
        decision=decision, report=paths)
