"""nightly-retrain end to end on real MNIST: the stage flows as child runs, a SQLite MLflow store, one VAE_HOME.

In order, on one VAE_HOME: a first run ingests, trains v1, makes it champion and encodes; the same source
again runs nothing after ingest; a changed source trains, evaluates and encodes again; a stage that fails
leaves the champion and its embeddings as they were. The retry wrapper is tested on its own.
"""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import httpx
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

pytestmark = pytest.mark.usefixtures("prefect_server")

MNIST_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
FIRST, CHANGED = 1500, 1200  # ingest limits: the source, then the source with other items
SMALL = {"model.hidden_channels": [16, 32], "model.hidden_dim": 64, "model.latent_dim": 8, "train.batch_size": 64,
         "train.kl_warmup_steps": 50, "train.lr": 3e-3}  # conftest's SMALL model
TRAIN = {"overrides": SMALL, "epochs": 1}
EVALUATE = {"iw_samples": 5, "limit": 200, "map_points": 50}


def _request(limit: int = FIRST, **options):
    from vae_core.requests import NightlyRequest

    return NightlyRequest(**{"ingest": {"source": str(MNIST_DIR), "name": "mnist", "limit": limit},
                             "train": TRAIN, "evaluate": EVALUATE, "retry_delay_s": 1, **options})


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A fresh VAE_HOME (datasets, MLflow store, embeddings) for the whole module, and one local Ray that
    train and encode join instead of each starting their own."""
    from flows.distributed.cluster import ray_session

    root = tmp_path_factory.mktemp("nightly_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAE_HOME", str(root))
        for key in ("MLFLOW_TRACKING_URI", "VAE_DATA_ROOT", "VAE_EMBEDDINGS_ROOT", "VAE_CHECKPOINT_ROOT",
                    "RAY_ADDRESS"):
            mp.delenv(key, raising=False)
        with ray_session():
            yield root


def _client():
    from flows.tracking import runs as tracking

    return tracking.client()


def _versions() -> list[int]:
    return sorted(int(v.version) for v in _client().search_model_versions("name='vae-mnist'"))


def _champion() -> int:
    return int(_client().get_registered_model("vae-mnist").aliases["champion"])


def _runs() -> int:
    """MLflow runs in every experiment of the store."""
    client = _client()
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids, max_results=10_000))


def _files(home: Path) -> dict[str, int]:
    """Every file under the embeddings root, with its mtime."""
    return {str(p): p.stat().st_mtime_ns for p in (home / "embeddings").rglob("*") if p.is_file()}


def _dataset(version: str | None = None):
    from vae_core.data.shards import open_dataset
    from vae_core.settings import data_root

    return open_dataset(data_root(), "mnist", version)


def _artifact(out) -> str:
    """The nightly-retrain-summary artifact of the run that returned `out`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["nightly-retrain-summary"])))
    [art] = [a for a in arts if a.flow_run_id == UUID(out.flow_runs["nightly"])]
    return art.data


@pytest.fixture(scope="module")
def first(home):
    from flows.nightly import nightly_retrain

    return nightly_retrain(_request())


@pytest.mark.slow
def test_first_run_ingests_trains_promotes_and_encodes(home, first):
    from prefect.client.orchestration import get_client

    from vae_core.data.embeddings import read_embeddings

    out = first
    version = out.dataset.version
    assert out.dataset.model_dump() == {"name": "mnist", "version": version, "changed": True,
                              "counts": _dataset(version).counts}
    assert out.trained == out.evaluated == 1 and out.promoted
    assert out.champion.model_dump() == {"before": None, "after": 1} and _champion() == 1 and _versions() == [1]
    # One epoch of 19 steps against a KL warm-up of 50: the training run's warning reaches the gate's reason.
    assert out.decision.reason.startswith("there is no champion yet; warning: training ended with beta 0.38, "
                                          "below its target 1"), out.decision.reason
    # Nothing to measure drift against: the champion was trained on this very version.
    assert out.skipped == {"drift": f"the champion v1 was trained on mnist@{version}"} and out.failed == {}
    # The embeddings of every split, by the champion: one row per image of the dataset version.
    assert out.embeddings.endswith(f"embeddings/vae-mnist/1/mnist/{version}")
    table = read_embeddings(out.embeddings)
    assert table.num_rows == out.encoded == sum(_dataset(version).counts.values()) == FIRST
    assert set(table.column("model_version").to_pylist()) == {1}
    assert set(out.mlflow_runs) == {"train", "evaluate", "encode"}
    # Every stage ran as a child flow run of this one.
    with get_client(sync_client=True) as client:
        parent = client.read_flow_run(UUID(out.flow_runs["nightly"]))
        for stage, name in (("ingest", "ingest-dataset"), ("train", "train-vae"), ("evaluate", "evaluate-vae"),
                            ("encode", "encode-dataset")):
            child = client.read_flow_run(UUID(out.flow_runs[stage]))
            assert child.parent_task_run_id is not None and client.read_flow(child.flow_id).name == name
            assert client.read_task_run(child.parent_task_run_id).flow_run_id == parent.id
    art = _artifact(out)
    assert f"new dataset version mnist@{version}" in art and "trained v1" in art
    assert "challenger v1 promoted: there is no champion yet" in art and f"encoded {FIRST:,} rows with v1" in art


@pytest.mark.slow
def test_the_nightly_logs_each_stages_start_and_outcome_itself(first):
    """`prefect deployment run nightly-retrain/nightly --watch` shows the nightly's own log, not its sub-flows':
    each stage's start and outcome is a line of the parent run, in order."""
    from flows.nightly import STAGES
    from tests.flows.test_flow_logs import _logs

    lines = _logs(UUID(first.flow_runs["nightly"]))
    starts = [lines.index(f"{stage}: started") if f"{stage}: started" in lines else -1 for stage in STAGES]
    assert -1 not in starts and starts == sorted(starts), lines
    for stage, start, end in zip(STAGES, starts, [*starts[1:], len(lines)]):
        outcome = [line for line in lines[start + 1:end] if line.startswith(f"{stage}: ")]
        assert outcome, f"no outcome line of {stage}: {lines}"
    text = "\n".join(lines)
    assert "ingest: new dataset version " in text and "train: trained v1 on " in text, text


@pytest.mark.slow
def test_same_source_runs_nothing_after_ingest(home, first):
    from flows.nightly import nightly_retrain

    versions, runs, files = _versions(), _runs(), _files(home)
    out = nightly_retrain(_request())
    version = first.dataset.version
    assert out.dataset.version == version and not out.dataset.changed
    assert out.trained is None and out.evaluated is None and not out.promoted and out.encoded is None
    assert out.champion.model_dump() == {"before": 1, "after": 1} and _champion() == 1
    assert _versions() == versions and _runs() == runs and _files(home) == files  # no version, run or file
    assert set(out.flow_runs) == {"nightly", "ingest"} and out.mlflow_runs == {}
    assert out.skipped == {
        "train": f"champion v1 trained on this version (mnist@{version}): no retraining",
        "evaluate": "no new model version to evaluate",
        "encode": f"champion v1 unchanged, dataset unchanged, and its embeddings of mnist@{version} are complete "
                  f"({FIRST:,} rows)",
        "drift": "the dataset is unchanged"}
    art = _artifact(out)
    assert f"dataset unchanged: mnist@{version} already ingested" in art
    assert "skipped: champion v1 trained on this version" in art and "Champion of `vae-mnist`: v1 -> v1" in art


@pytest.mark.slow
def test_embeddings_under_the_champions_name_by_other_weights_are_a_gap(home, first):
    """Name and version alone can alias two models: complete embeddings whose manifest does not record the
    champion's weights digest (here: written before digests were recorded) are not the champion's."""
    import os

    from flows.nightly_rules import embeddings_gap
    from flows.tracking.registry import pin_model
    from vae_core.data.embeddings import read_manifest

    champion, version = pin_model("models:/vae-mnist@champion"), first.dataset.version
    args = (champion, "mnist", version, _dataset(version).counts,
            _request().encode_request(champion.uri, f"mnist@{version}"))
    out, gap = embeddings_gap(*args)
    assert gap is None
    manifest_path = Path(out) / "manifest.json"
    before = manifest_path.read_text()
    manifest = read_manifest(out)
    legacy = {s: [f.model_copy(update={"path": f"{s}/{f.source_sha256}-v{champion.version}.parquet"}) for f in files]
              for s, files in manifest.splits.items()}
    links = [(Path(out) / f.path, Path(out) / g.path) for s in legacy for f, g in zip(manifest.splits[s], legacy[s])]
    try:
        for src, dst in links:  # the same complete files, under the names a digest-less manifest gives them
            os.link(src, dst)
        manifest_path.write_text(manifest.model_copy(update={"format": 1, "weights_sha256": None,
                                                             "splits": legacy}).to_json())
        assert read_manifest(out).identity is None  # a valid manifest, every file there
        _, gap = embeddings_gap(*args)
        assert gap is not None and "a model whose weights were not recorded, not of vae-mnist v1" in gap
    finally:
        manifest_path.write_text(before)
        for _, dst in links:
            dst.unlink(missing_ok=True)


@pytest.mark.slow
def test_a_stage_that_meets_a_transient_error_is_run_again(home, first, monkeypatch):
    from prefect import flow

    import flows.nightly
    from flows.ingest import ingest_dataset

    tries = []

    @flow(name="ingest-dataset")
    def ingest_once_away(request, progress: bool = False):
        tries.append(1)
        if len(tries) == 1:
            raise ConnectionError("the data root's server is restarting")
        return ingest_dataset.fn(request, progress)

    monkeypatch.setattr(flows.nightly, "ingest_dataset", ingest_once_away)
    out = flows.nightly.nightly_retrain(_request(retry_delay_s=0))
    assert len(tries) == 2 and out.failed == {} and out.dataset.version == first.dataset.version


@pytest.mark.slow
def test_changed_source_trains_evaluates_and_encodes_with_the_champion(home, first):
    from flows.nightly import nightly_retrain
    from vae_core.data.embeddings import read_embeddings

    out = nightly_retrain(_request(CHANGED))
    version = out.dataset.version
    assert out.dataset.changed and version != first.dataset.version
    assert out.trained == out.evaluated == 2 and _versions() == [1, 2]
    champion = 2 if out.promoted else 1  # whichever the gate chose
    assert out.champion.model_dump() == {"before": 1, "after": champion} and _champion() == champion
    assert out.decision.champion_version == 1
    assert out.notes["evaluate"].startswith(f"challenger v2 {'promoted' if out.promoted else 'kept out'}: "
                                               "test/nll_k5 ")
    assert out.embeddings.endswith(f"embeddings/vae-mnist/{champion}/mnist/{version}")
    table = read_embeddings(out.embeddings)
    assert table.num_rows == out.encoded == sum(_dataset(version).counts.values()) == CHANGED
    assert set(table.column("dataset_version").to_pylist()) == {version}
    assert "dataset changed" in out.notes["encode"]
    # The first version's embeddings by v1 are still all there.
    assert read_embeddings(first.embeddings).num_rows == FIRST
    if champion == 1:  # v1 scored the new version: its outlier scores and latents against v1's training data
        assert out.notes["drift"].startswith(f"against mnist@{first.dataset.version} (the champion's training "
                                             "data), by v1: "), out.notes
        assert out.drift["current_rows"] == CHANGED and 0 <= out.drift["share_above_p99"] <= 1
        picture = home / "reports" / "vae-mnist" / "1" / "drift" / f"{version}.png"
        assert picture.is_file() and str(picture) in out.notes["drift"]
        assert "## Drift against the champion's training data" in _artifact(out)
    else:
        assert out.skipped["drift"] == f"the champion v2 was trained on mnist@{version}"

    # The night after, the same source: whether v2 won or lost, it is not trained again.
    versions, runs, files = _versions(), _runs(), _files(home)
    again = nightly_retrain(_request(CHANGED))
    assert again.trained is None and again.encoded is None and again.champion.after == champion
    assert _versions() == versions and _runs() == runs and _files(home) == files
    assert again.skipped["train"].startswith(
        f"champion v2 trained on this version (mnist@{version})" if champion == 2 else
        f"v2 was already trained on mnist@{version} and the gate kept it out (test/nll_k5 ")


@pytest.mark.slow
def test_a_failed_stage_leaves_champion_and_embeddings_as_they_were(home):
    from flows.nightly import StageError, nightly_retrain
    from vae_core.storage import is_temporary

    champion, versions, files = _champion(), _versions(), _files(home)
    # Train fails at run time (an override the model config does not have): no version, no alias move.
    state = nightly_retrain(_request(CHANGED, retrain="always", train={**TRAIN, "overrides": {"model.nope": 1}}),
                            return_state=True)
    assert state.is_failed()
    with pytest.raises(StageError, match=r"stopped at train: ConfigError: model.nope: no such key") as failed:
        state.result()
    assert failed.value.stage == "train"
    assert _champion() == champion and _versions() == versions and _files(home) == files

    # Encode fails at run time (more CPUs per actor than the machine has) on embeddings with a file missing:
    # the other files and the manifest are not touched, the missing one not half-written.
    out_dir = home / "embeddings" / "vae-mnist" / str(champion) / "mnist" / _dataset(None).version  # the newest
    removed = sorted((out_dir / "train").glob("*.parquet"))[0]
    removed.unlink()
    files = _files(home)
    with pytest.raises(StageError, match=r"stopped at encode: EncodeError: .* exceed the cluster's") as failed:
        nightly_retrain(_request(CHANGED, encode={"cpus_per_worker": 64}))
    assert failed.value.stage == "encode"
    assert _champion() == champion and _versions() == versions and _files(home) == files and not removed.exists()
    assert not [p for p in out_dir.rglob("*") if is_temporary(p.name)]  # no half-written file


def test_retries_transient_errors_only_and_never_a_vae_error():
    from flows.retries import call_with_retries, is_transient
    from vae_core.errors import (ConfigError, EncodeError, EvaluateError, ModelNotFoundError, NonFiniteLossError,
                                 TrainError)

    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection refused")
        return "done"

    assert call_with_retries(flaky, retries=2, delay_s=1.5, sleep=sleeps.append) == "done"
    assert len(calls) == 3 and sleeps == [1.5, 3.0]

    for error in (TrainError("no training images"), NonFiniteLossError("loss is nan"), ConfigError("no such key"),
                  EvaluateError("empty split"), EncodeError("shape"), ModelNotFoundError("no version 9")):
        calls.clear(), sleeps.clear()

        def model_error(error=error):
            calls.append(1)
            raise error

        with pytest.raises(type(error)):
            call_with_retries(model_error, retries=3, delay_s=1, sleep=sleeps.append)
        assert len(calls) == 1 and sleeps == [], error

    calls.clear(), sleeps.clear()

    def away():
        calls.append(1)
        raise MlflowException("API request failed", error_code=TEMPORARILY_UNAVAILABLE)

    with pytest.raises(MlflowException):  # the last try's error, once the retries are spent
        call_with_retries(away, retries=2, delay_s=0.5, sleep=sleeps.append)
    assert len(calls) == 3 and sleeps == [0.5, 1.0]

    request = httpx.Request("GET", "http://mlflow/api")
    assert is_transient(OSError("input/output error")) and is_transient(TimeoutError())
    assert is_transient(httpx.ConnectError("refused", request=request))
    assert is_transient(httpx.HTTPStatusError("bad gateway", request=request, response=httpx.Response(502)))
    assert not is_transient(httpx.HTTPStatusError("not found", request=request, response=httpx.Response(404)))
    assert not is_transient(MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not is_transient(FileNotFoundError("no dataset 'mnist'")) and not is_transient(PermissionError())
    assert not is_transient(ValueError("bad")) and not is_transient(RuntimeError("bug"))
    assert not is_transient(EncodeError("x"))


def test_train_rule():
    from flows.nightly_rules import TrainPlan, plan_training
    from flows.tracking.registry import PinnedModel

    def champion(version: int, trained_on: str) -> PinnedModel:
        return PinnedModel(name="vae-mnist", version=version, run_id="r", dataset_name="mnist",
                           dataset_version=trained_on, asked="models:/vae-mnist@champion")

    def plan(champ, on_version=(), retrain="on-change"):
        return plan_training(_request(retrain=retrain), "vae-mnist", champ, "mnist", "new", list(on_version))

    assert plan(None) == TrainPlan(True, None, "no champion of vae-mnist yet")
    assert plan(champion(3, "old")) == TrainPlan(True, None, "champion v3 was trained on mnist@old, not mnist@new")
    assert plan(champion(3, "new"), retrain="always") == TrainPlan(True, None, "retrain='always'")
    assert plan(champion(3, "new")) == TrainPlan(False, None,
                                                 "champion v3 trained on this version (mnist@new): no retraining")
    kept = plan(champion(3, "old"), [(4, {"gate.decision": "kept", "gate.reason": "worse"})])
    assert not kept.train and kept.evaluate is None and "v4 was already trained on mnist@new and the gate kept it " \
        "out (worse)" in kept.reason
    # Trained by a run that stopped before the gate: evaluated now, not trained again.
    resumed = plan(champion(3, "old"), [(5, {"dataset_version": "new"}), (4, {"gate.decision": "kept"})])
    assert not resumed.train and resumed.evaluate == 5 and "not evaluated yet" in resumed.reason
    assert plan(None, [(1, {"dataset_version": "new"})]).evaluate == 1


def test_request_round_trips_through_json_and_names_bad_options():
    import json

    from pydantic import ValidationError

    from vae_core.requests import NightlyRequest

    r = _request(encode={"splits": "test,val"}, train={**TRAIN, "model_name": "vae-digits"})
    again = NightlyRequest.model_validate(json.loads(r.model_dump_json()))
    assert again == r and again.encode.splits == ["test", "val"] and r.encode.model_fields_set == {"splits"}
    assert r.train_request("mnist@abc").model_name == "vae-digits"
    assert r.evaluate_request("models:/vae-digits/3", "mnist@abc").promote
    assert r.encode_request("models:/vae-digits/3", "mnist@abc").splits == ["test", "val"]
    with pytest.raises(ValidationError, match=r"train.epochs\n  Input should be greater than or equal to 1"):
        _request(train={"epochs": 0})
    with pytest.raises(ValidationError, match=r"promote cannot be set here"):
        _request(evaluate={"promote": False})
    with pytest.raises(ValidationError, match=r"encode.workerz\n  Extra inputs are not permitted"):
        _request(encode={"workerz": 2})
    with pytest.raises(ValidationError, match=r"train.model_name\n  Value error, model name '../x' must use only"):
        _request(train={"model_name": "../x"})  # the request's own checks come with its fields


def test_stage_options_are_the_stage_requests_fields_less_those_the_flow_sets():
    from vae_core.requests import (EncodeOptions, EncodeRequest, EvaluateOptions, EvaluateRequest, TrainOptions,
                                   TrainRequest)

    for options, request, fixed in ((TrainOptions, TrainRequest, {"dataset"}),
                                    (EvaluateOptions, EvaluateRequest, {"model", "dataset", "promote"}),
                                    (EncodeOptions, EncodeRequest, {"model", "dataset"})):
        assert list(options.model_fields) == [f for f in request.model_fields if f not in fixed]
        for name, field in options.model_fields.items():
            theirs = request.model_fields[name]
            assert (field.annotation, field.default, field.description, field.metadata) == \
                (theirs.annotation, theirs.default, theirs.description, theirs.metadata), name


def test_this_jobs_ray_workers_run_at_ordinary_priority_with_fixed_allocator_thresholds(home):
    """Ray's default worker niceness is 15: under any other load the training workers would yield their
    cores and train at a fraction of the bare loop's speed. ray_session runs this job's at 0, and with
    glibc's malloc thresholds fixed (adaptive ones cost a training thread 30% in page faults)."""
    import os

    import ray

    from flows.distributed.cluster import ALLOCATOR_ENV

    @ray.remote(num_cpus=0.1)
    def worker() -> tuple[int, dict[str, str]]:
        return os.getpriority(os.PRIO_PROCESS, 0), {k: os.environ.get(k, "") for k in ALLOCATOR_ENV}

    niceness, env = ray.get(worker.remote(), timeout=60)
    assert niceness == 0
    assert env == ALLOCATOR_ENV and int(env["MALLOC_MMAP_THRESHOLD_"]) == 32 << 20
