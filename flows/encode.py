"""The `encode-dataset` flow: a registered model version and a dataset version in; the latent and the outlier
score (negative ELBO) of every image out, as one Parquet file per input shard plus a manifest.

    plan (check the output location, pin the model, download it once, check shapes, sort shards into
          done / reuse / encode)
      ->  reuse (copy encodings of identical shards by the same model from another dataset version)
      ->  encode (Ray Data reads the shards, verifying each against the manifest's checksum; an actor pool
          runs the encoder; the driver publishes each shard's file when all its rows are back)
      ->  manifest, MLflow run, Prefect artifact

Exactly once: an output file is named by its input shard's SHA-256 and the model's identity (name, version
and weights digest) and appears atomically, only when it holds every row of its shard, each once (checked
against the shard's ids). A re-run skips published files, so a job killed halfway and run again encodes
only what is missing, and a new dataset version encodes only the shards it does not share with one
already encoded by the same model. Two runs of one request into one folder both succeed: each file and
the manifest are replaced whole. `overwrite` encodes everything again. The file layout and the read API
are `vae_core.data.embeddings`.
"""

from __future__ import annotations

import contextlib
import posixpath
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.distributed.cluster import ShardMismatchError, data_context, quiet, ray_session, read_shards, reserve
from flows.tracking import registry, runs as tracking
from flows.tracking.registry import PinnedModel
from vae_core.data import embeddings
from vae_core.data.output_location import check_output_location
from vae_core.data.shards import DatasetInfo, ShardInfo, fit_model, open_dataset
from vae_core.errors import EncodeError
from vae_core.requests import EncodeRequest
from vae_core.results import EncodeResult, EncodeSeconds
from vae_core.settings import data_root, embeddings_root
from vae_core.storage import arrow_filesystem, remove_temporaries, resolve, to_url

State = Literal["done", "reuse", "encode"]


@dataclass
class ShardJob:
    """One input shard and what this run does about its output file."""

    split: str
    shard: ShardInfo
    source: str  # the shard's path on the dataset's filesystem
    name: str  # "<split>/<sha256>-v<model version>-<model key>-f3.parquet", relative to the output folder
    state: State
    reuse_from: str | None = None  # path of an identical shard's encoding under another dataset version


@dataclass
class Plan:
    """Everything decided before any image is encoded."""

    model: PinnedModel
    identity: embeddings.ModelIdentity  # the model exactly: what output files are keyed by
    info: DatasetInfo
    out: str  # output folder path on `fs`
    fs: Any = field(repr=False)
    latent_dim: int
    jobs: list[ShardJob]
    plan_s: float = 0.0  # pinning and downloading the model, checking shapes, sorting shards

    @property
    def url(self) -> str:
        return to_url(self.fs, self.out)

    def rows(self, state: State) -> int:
        return sum(j.shard.rows for j in self.jobs if j.state == state)


@task(name="plan-encoding", cache_policy=NO_CACHE)
def plan_task(req: EncodeRequest) -> tuple[Plan, bytes]:
    """Check the output location; pin the model and download it once; check it fits the dataset; decide
    each shard's fate. Returns the plan and the model's serialised weights."""
    from vae_core.model.weights import model_to_bytes

    t0 = time.perf_counter()
    if req.out:
        check_output(req.out)  # before the registry, the download or Ray: nothing is touched yet
    pinned = registry.pin_model(req.model)
    info = open_dataset(data_root(), *req.dataset_ref())
    model = registry.load_pinned(pinned)
    fit_model(info, model.config, pinned.uri, EncodeError, "encode a dataset of the shape the model was trained on")
    if not any(info.counts.get(s) for s in req.splits):
        have = ", ".join(f"{s} {n:,}" for s, n in info.counts.items())
        raise EncodeError(f"splits {', '.join(req.splits)} of {info.name}@{info.version} are empty ({have})")
    weights = model_to_bytes(model)
    identity = embeddings.ModelIdentity.of(pinned.name, pinned.version, weights)
    out_url = req.out or embeddings.default_dir(embeddings_root(), pinned.name, pinned.version, info.name, info.version)
    if not req.out:
        check_output(out_url)  # VAE_EMBEDDINGS_ROOT may point into the data root
    fs, out = resolve(out_url)
    for folder in [out, *(posixpath.join(out, s) for s in req.splits)]:  # the folders this run writes, no deeper
        remove_temporaries(fs, folder)  # a killed run's half-written files (a live run's stay)
    reusable = {} if req.overwrite else embeddings.reusable_files(fs, out, identity)
    jobs = [_job(req, info, identity, fs, out, reusable, split, shard)
            for split in req.splits if (s := info.manifest.splits.get(split)) for shard in s.shards]
    return Plan(model=pinned, identity=identity, info=info, out=out, fs=fs, latent_dim=model.latent_dim, jobs=jobs,
                plan_s=time.perf_counter() - t0), weights


def check_output(url: str) -> None:
    """EncodeError unless `url` is an output folder whose writes cannot reach a dataset (see
    `vae_core.data.output_location`)."""
    try:
        check_output_location(url, data_root())
    except ValueError as e:
        raise EncodeError(str(e)) from None


def _job(req: EncodeRequest, info: DatasetInfo, identity: embeddings.ModelIdentity, fs: Any, out: str,
         reusable: dict[str, str], split: str, shard: ShardInfo) -> ShardJob:
    name = f"{split}/{embeddings.file_name(shard.sha256, identity)}"
    job = ShardJob(split=split, shard=shard, source=posixpath.join(info.path, shard.path), name=name, state="encode")
    if req.overwrite:
        return job
    if embeddings.is_published(fs, posixpath.join(out, name), shard.rows):
        job.state = "done"
    elif (found := reusable.get(shard.sha256)) is not None and embeddings.can_reuse(fs, found, identity, shard.rows):
        job.state, job.reuse_from = "reuse", found
    return job


@task(name="reuse-encodings", cache_policy=NO_CACHE)
def reuse_task(plan: Plan) -> int:
    """Copy encodings of identical shards by the same model from other dataset versions, restamped;
    returns rows copied."""
    rows = 0
    for job in (j for j in plan.jobs if j.state == "reuse"):
        try:  # checked again: the file may have changed since the plan looked at it
            table = embeddings.reused(plan.fs, job.reuse_from, plan.identity, job.shard.rows, job.split,
                                      plan.info.version)
        except ValueError as e:
            raise EncodeError(f"{e}: it changed while this run copied it; run again") from None
        _write(plan, job.name, table)
        rows += table.num_rows
    return rows


def _scaling(req: EncodeRequest, resources: dict[str, float]) -> tuple[float, int]:
    """CPUs Ray reserves per actor, and torch threads per actor (`reserve`).

    Reads are cheap (no decoding: the shards hold raw pixels) but a Ray Data read task needs a whole free
    CPU to start, so by default the actors leave one CPU unreserved; their threads follow their share of
    the machine, whatever the request reserves.
    """
    return reserve(resources, req, EncodeError, spare=1.0, min_cpus=0.5)


@task(name="encode-shards", cache_policy=NO_CACHE)
def encode_task(plan: Plan, weights: bytes, req: EncodeRequest, progress: bool) -> dict[str, float]:
    """Run the encoder over every shard still to encode; publish each shard's file as it completes.

    Returns rows encoded, images/s of the encoding itself, and Ray's start-up seconds.
    """
    import ray
    import ray.data
    from tqdm.auto import tqdm

    from flows.distributed.encode_worker import ShardEncoder

    todo = [j for j in plan.jobs if j.state == "encode"]
    if not todo:
        return {"rows_encoded": 0.0}
    t0 = time.perf_counter()
    # Blocks of a few batches, not Ray Data's 128 MiB default: with whole-shard blocks the encoder starts
    # only once a shard is read and every latent comes back at the very end (no overlap, and a progress
    # bar that jumps from 0 to 100%).
    block_bytes = max(2**16, 2 * req.batch_size * plan.info.manifest.image_bytes)
    with ray_session() as resources, data_context(target_max_block_size=block_bytes, enable_progress_bars=False), \
            quiet("ray.data", progress):
        ray_s = time.perf_counter() - t0
        cpus, threads = _scaling(req, resources)
        ds = read_shards([j.source for j in todo], [j.shard for j in todo], arrow_filesystem(plan.info.fs),
                         ["id", "image", "label"], include_paths=True)
        latents = ds.map_batches(
            ShardEncoder, batch_size=req.batch_size, batch_format="pyarrow",
            fn_constructor_kwargs={"weights": weights, "threads": threads,
                                   "use_gpu": req.gpus_per_worker > 0},
            compute=ray.data.ActorPoolStrategy(size=req.workers), num_cpus=cpus,
            num_gpus=req.gpus_per_worker or None)
        total = sum(j.shard.rows for j in todo)
        first: list[float] = []  # when the first latents came back: what follows is the steady state
        first_rows = 0
        bars: list[tqdm] = []

        def arrived(batch: pa.Table) -> None:
            nonlocal first_rows
            if not first:
                first.append(time.perf_counter())
                first_rows = batch.num_rows
                # The bar starts with the first latents, after the actors started: Ray's core worker prints a
                # line on stderr as it creates each one (restartable actors with arguments in its object store),
                # which would cut a bar already drawn.
                bars.append(tqdm(total=total, desc=f"encode {plan.info.name}@{plan.info.version}", unit="img",
                                 disable=not progress))
            bars[0].update(batch.num_rows)

        try:
            with _shard_errors():
                publish_batches(plan, todo, latents.iter_batches(batch_size=None, batch_format="pyarrow"), arrived)
        finally:
            for bar in bars:
                bar.close()
        end = time.perf_counter()
        elapsed = end - t0 - ray_s
    return {"rows_encoded": float(total), "images_per_s": total / max(elapsed, 1e-9), "encode_s": elapsed,
            "startup/ray_s": ray_s, "startup/first_latents_s": (first[0] - t0 - ray_s) if first else 0.0,
            **steady_rate(total - first_rows, end - first[0] if first else 0.0)}


def steady_rate(rows: int, seconds: float) -> dict[str, float]:
    """`steady_images_per_s` of the `rows` that came back in the `seconds` after the first latents; nothing
    when none did (every row in the first batch: a run too short to have a steady state, not a rate of 0)."""
    return {"steady_images_per_s": rows / seconds} if rows > 0 and seconds > 0 else {}


@contextlib.contextmanager
def _shard_errors() -> Iterator[None]:
    """A shard that failed its checksum in a Ray read task ends the run with an EncodeError naming it
    (Ray wraps the reader's error, with its traceback, in its own)."""
    try:
        yield
    except Exception as e:
        seen, cause = set(), e
        while cause is not None and id(cause) not in seen:
            if type(cause) is ShardMismatchError:  # the error itself, not Ray's subclass that wraps it
                raise EncodeError(str(cause)) from None
            seen.add(id(cause))
            cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
        raise


def publish_batches(plan: Plan, todo: list[ShardJob], batches: Iterable[pa.Table],
                    arrived: Callable[[pa.Table], None] = lambda batch: None) -> None:
    """Collect latent batches (rows of any shards of `todo`, in any order) by their ``path`` column and
    publish each shard's file once all its rows are there; then fail if any shard came back incomplete.

    `arrived` sees every batch as it comes (progress, timing). Nothing of an incomplete shard is written.
    """
    by_path = {j.source: j for j in todo}
    pending: dict[str, list[pa.Table]] = defaultdict(list)
    got: dict[str, int] = defaultdict(int)
    for batch in batches:
        arrived(batch)
        for path, part in _by_source(batch):
            job = by_path.get(path)
            if job is None:
                raise RuntimeError(f"latents came back for {path}, which this run did not read")
            got[path] += part.num_rows
            if got[path] > job.shard.rows:
                raise RuntimeError(f"{job.name}: {got[path]} rows came back for a shard of {job.shard.rows}")
            pending[path].append(part)
            if got[path] == job.shard.rows:
                _publish(plan, job, pa.concat_tables(pending.pop(path)))
    missing = [j.name for j in todo if got[j.source] != j.shard.rows]
    if missing:
        raise RuntimeError(f"{len(missing)} shards came back incomplete, first {missing[0]}; nothing of them was "
                           "published: run again")


def _by_source(batch: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """(source path, rows of the batch from that shard) for each shard in the batch."""
    paths = batch.column("path")
    for path in pc.unique(paths).to_pylist():
        yield path, batch.filter(pc.equal(paths, path))


def _publish(plan: Plan, job: ShardJob, rows: pa.Table) -> None:
    """Write one shard's encodings, in the shard's row order, after checking every id is there once.

    `rows`: the shard's latents in any order, columns id, label, mean, logvar, neg_elbo and recon_error
    (others are ignored).
    """
    with plan.info.fs.open(job.source, "rb") as f:
        order = pq.read_table(f, columns=["id"]).column("id").to_pylist()
    _write(plan, job.name, embeddings.shard_table(rows, order, job.name, job.split, plan.identity, plan.info.version))


def _write(plan: Plan, name: str, table: pa.Table) -> None:
    """Publish `table` as the output folder's file `name`, atomically; a failed write names the file."""
    path = posixpath.join(plan.out, name)
    try:
        embeddings.write_file(plan.fs, path, table)
    except OSError as e:
        raise EncodeError(_write_error(to_url(plan.fs, path), e)) from None


def _write_error(url: str, e: OSError) -> str:
    """One line for a failed write of `url`: what the system said, and what to do."""
    return (f"cannot write {url}: {e.strerror or e}: free space there (or fix its permissions) or choose "
            "another --out, then run again; what is already written is kept")


def _manifest(plan: Plan, req: EncodeRequest, images_per_s: float | None) -> embeddings.EmbeddingManifest:
    """The manifest of the output folder: every file of the requested splits, with its rows and source, and
    the splits an earlier run of the same model and dataset version encoded into it."""
    splits: dict[str, list[embeddings.EmbeddingFile]] = {s: [] for s in req.splits}
    for job in plan.jobs:
        reused = posixpath.basename(posixpath.dirname(posixpath.dirname(job.reuse_from))) if job.reuse_from else None
        splits[job.split].append(embeddings.EmbeddingFile(path=job.name, rows=job.shard.rows,
                                                          source_sha256=job.shard.sha256, reused_from=reused))
    manifest = embeddings.EmbeddingManifest(
        model_name=plan.model.name, model_version=plan.model.version, model_uri=plan.model.uri,
        weights_sha256=plan.identity.weights_sha256,
        dataset=plan.info.name, dataset_version=plan.info.version, latent_dim=plan.latent_dim, splits=splits,
        counts={s: sum(f.rows for f in files) for s, files in splits.items()}, images_per_s=images_per_s)
    return embeddings.with_earlier_splits(manifest, plan.url, storage_options=plan.fs.storage_options)


@task(name="record-encoding", cache_policy=NO_CACHE)
def record_task(plan: Plan, req: EncodeRequest, stats: dict[str, float], reused: int) -> str:
    """The MLflow run that records what this job did, linked to the model version; returns its id."""
    run_id = tracking.start_run(req.experiment, f"{plan.model.name}-v{plan.model.version}-{plan.info.name}", {
        "model_name": plan.model.name, "model_version": str(plan.model.version), "model_uri": plan.model.uri,
        "dataset_name": plan.info.name, "dataset_version": plan.info.version, "output": plan.url})
    if plan.model.model_id:
        tracking.log_model_input(run_id, plan.model.model_id)
    run = tracking.RunLogger(run_id)
    run.log_metrics({**stats, "startup/plan_s": plan.plan_s, "rows_reused": float(reused),
                     "rows_skipped": float(plan.rows("done")),
                     "rows_total": float(sum(j.shard.rows for j in plan.jobs))}, step=0)
    run.finish()
    return run_id


@flow(name="encode-dataset")
def encode_dataset(request: EncodeRequest, progress: bool = False) -> EncodeResult:
    """Encode every image of a dataset version's splits with a registered model version.

    Returns what `vae encode --json` prints: the output URL, rows per split, rows encoded / reused / already
    there, images/s of the encoding, the pinned model, the dataset version and the MLflow run.
    """
    tracking.configure()
    plan, weights = plan_task(request)
    reused = reuse_task(plan)
    stats = encode_task(plan, weights, request, progress)
    manifest = _manifest(plan, request, stats.get("images_per_s"))
    try:
        embeddings.write_manifest(plan.fs, plan.out, manifest)
    except OSError as e:
        raise EncodeError(_write_error(posixpath.join(plan.url, "manifest.json"), e)) from None
    run_id = record_task(plan, request, stats, reused)
    out = EncodeResult(
        output=plan.url, rows={s: manifest.counts[s] for s in request.splits},
        rows_encoded=int(stats["rows_encoded"]), rows_reused=reused, rows_already_there=plan.rows("done"),
        images_per_s=stats.get("images_per_s"), model_uri=plan.model.uri, asked=plan.model.asked,
        dataset=plan.info.name, dataset_version=plan.info.version, run_id=run_id,
        seconds=EncodeSeconds(plan=plan.plan_s, ray_start=stats.get("startup/ray_s", 0.0),
                              first_latents=stats.get("startup/first_latents_s", 0.0),
                              encode=stats.get("encode_s", 0.0)),
        steady_images_per_s=stats.get("steady_images_per_s"))
    create_markdown_artifact(markdown=_summary(out), key="encode-dataset-summary",
                             description=f"{plan.model.uri} on {plan.info.name}@{plan.info.version}")
    return out


def _summary(out: EncodeResult) -> str:
    rows = "\n".join(f"| {split} | {n:,} |" for split, n in out.rows.items())
    speed = f"{out.images_per_s:,.0f} images/s" if out.images_per_s else "nothing to encode"
    return (f"# encode-dataset: {out.dataset}@{out.dataset_version}\n\n"
            f"- Model: `{out.model_uri}` (asked for `{out.asked}`)\n"
            f"- Output: `{out.output}`\n"
            f"- Rows encoded {out.rows_encoded:,}, reused from another dataset version {out.rows_reused:,}, "
            f"already there {out.rows_already_there:,}; {speed}\n"
            f"- MLflow run: `{out.run_id}` ({tracking.run_url(out.run_id)})\n\n"
            f"| split | rows |\n|---|---|\n{rows}\n")
