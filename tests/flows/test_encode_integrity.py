"""encode-dataset's output can never be wrong and it never destroys anything.

Another model's latents are never reused; an output location that could reach a dataset is refused before
any work; two runs of one request into one folder both succeed, and files a user or a live run put there
survive; the publishing step sorts rows into shard order, refuses duplicated or missing ids, and writes
atomically (a write killed midway leaves nothing); a failed write names its file; Ctrl-C ends `vae encode`
with 130 and leaves no temporaries or manifest.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pytest

from tests.processes import eventually, survivors

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def home(tmp_path_factory, mnist_home, register_model):
    """2,000 MNIST images in 17 shards; vae-a v1 (untrained) and vae-b v1 (one epoch: other weights); one local
    Ray that the encodes run here join instead of each starting its own (the commands start theirs)."""
    from flows.distributed.cluster import ray_session

    with mnist_home(tmp_path_factory.mktemp("integrity_home"), limit=2000, shard_mb=0.1) as root:
        register_model(epochs=0, name="vae-a")
        register_model(epochs=1, name="vae-b")
        with ray_session():
            yield root


def _encode(**request):
    from flows.encode import encode_dataset
    from vae_core.requests import EncodeRequest

    return encode_dataset(EncodeRequest(**{"model": "models:/vae-a/1", "dataset": "mnist", **request}))


def _dataset():
    from vae_core.data.shards import open_dataset
    from vae_core.settings import data_root

    return open_dataset(data_root(), "mnist")


def _env(home: Path) -> dict[str, str]:
    """A `vae` command's environment: this VAE_HOME, and the session's Prefect server (a temporary one per
    command would add its start-up, about 20 s, and nothing these tests look at: tests/flows/cli/ stop those)."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"}
    return {**env, "VAE_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_API_URL": PREFECT_API_URL.value()}


def _vae(*args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli.app", *args]


# ------------------------------------------------------------------------------------- model identity


def test_another_models_latents_are_never_reused(home, tmp_path):
    from vae_core.data.embeddings import latents, read_embeddings, read_manifest
    from vae_core.data.shards import read_split_u8

    info = _dataset()
    a = _encode(splits=["test"], out=str(tmp_path / "x" / "a"))
    b = _encode(model="models:/vae-b/1", splits=["test"], out=str(tmp_path / "x" / "b"))
    assert a.rows_encoded == b.rows_encoded == info.counts["test"] and b.rows_reused == 0
    table = read_embeddings(b.output)
    assert set(table.column("model_name").to_pylist()) == {"vae-b"}
    images, _, ids = read_split_u8(info, "test")
    assert table.column("id").to_pylist() == ids
    expected = mlflow.pyfunc.load_model("models:/vae-b/1").predict(images)
    np.testing.assert_allclose(latents(table)[1], expected["mean"], rtol=0, atol=1e-5)
    assert not np.allclose(latents(read_embeddings(a.output))[1], expected["mean"], atol=1e-3)
    # The weights digest is recorded, and the same model into a sibling folder does reuse.
    assert read_manifest(b.output).weights_sha256 != read_manifest(a.output).weights_sha256
    again = _encode(splits=["test"], out=str(tmp_path / "x" / "a2"))
    assert again.rows_reused == info.counts["test"] and again.rows_encoded == 0
    # Another model into the folder of the first: A's files there are not taken as done (B's own, in the
    # sibling folder, are reused).
    over = _encode(model="models:/vae-b/1", splits=["test"], out=a.output)
    assert over.rows_already_there == 0 and over.rows_reused == info.counts["test"]
    table = read_embeddings(a.output)
    assert set(table.column("model_name").to_pylist()) == {"vae-b"}
    np.testing.assert_allclose(latents(table)[1], expected["mean"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------- output location


def test_an_output_location_that_could_reach_a_dataset_is_refused_before_any_work(home, tmp_path, monkeypatch):
    from vae_core.errors import EncodeError

    info = _dataset()
    root = str(home / "datasets")
    before = {p: p.read_bytes() for p in Path(info.path).rglob("*")  if p.is_file()}
    link = tmp_path / "link"
    link.symlink_to(home)
    monkeypatch.chdir(home / "datasets" / "mnist")
    # An unknown model: the location is refused before the registry is asked.
    for out in [info.path, f"file://{info.path}", info.version, f"{info.path}/../../..", str(link / "datasets"),
                f"{info.path}/train"]:
        with pytest.raises(EncodeError, match=f"output {out} .*the data root {root}|output {out} is inside the "
                           f"dataset folder {info.path}"):
            _encode(model="models:/nothing-registered/1", out=out)
    assert {p: p.read_bytes() for p in Path(info.path).rglob("*") if p.is_file()} == before
    monkeypatch.setenv("VAE_EMBEDDINGS_ROOT", f"{root}/embeddings")
    with pytest.raises(EncodeError, match=f"is inside the data root {root}"):
        _encode(splits=["test"])


# -------------------------------------------------------------------------------------- concurrent runs


@pytest.mark.timeout(900)
def test_two_concurrent_runs_into_one_folder_both_succeed_and_spare_other_files(home, tmp_path):
    from vae_core.data.embeddings import read_embeddings
    from vae_core.storage import temporary_name

    out = tmp_path / "together"
    (out / "test" / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    live = Path(temporary_name(str(out / "test" / "x.parquet")))  # a live process's (this one's) write
    live.write_bytes(b"half")
    dead = Path(temporary_name(str(out / "test" / "y.parquet")).replace(f"-{os.getpid()}-", "-999999999-"))
    dead.write_bytes(b"a killed run's")  # its writer is gone: removed
    below = out / "test" / "sub" / dead.name
    below.write_bytes(b"not in a folder encode writes")  # never looked at
    cmd = _vae("encode", "--model", "models:/vae-a/1", "--dataset", "mnist", "--splits", "test", "--out", str(out),
               "--json")
    procs = [subprocess.Popen(cmd, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=800) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in results]
    info = _dataset()
    table = read_embeddings(str(out))
    assert sorted(table.column("id").to_pylist()) == sorted(set(table.column("id").to_pylist()))
    assert table.num_rows == info.counts["test"]
    assert (out / "notes.txt").read_text() == "mine" and live.exists() and below.exists() and not dead.exists()
    assert [json.loads(o.splitlines()[-1])["output"] for o, _ in results] == [str(out)] * 2


# --------------------------------------------------------------------------------------- publishing step


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """scikit-learn's digits in shards of ~330 images."""
    from vae_core.data.shards import open_dataset
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    root = str(tmp_path_factory.mktemp("digits"))
    run_ingest(IngestRequest(source="builtin:digits", name="digits", data_root=root, shard_mb=0.02, workers=1))
    return open_dataset(root, "digits")


@pytest.fixture
def plan(digits, tmp_path):
    """A plan for the first two train shards of the digits into `tmp_path/out`, with no model behind it: the
    publishing step needs none (the latents below are made up)."""
    from flows.encode import Plan, ShardJob
    from flows.tracking.registry import PinnedModel
    from vae_core.data.embeddings import ModelIdentity, file_name
    from vae_core.storage import resolve

    info = digits
    identity = ModelIdentity.of("vae-a", 1, b"weights")
    fs, out = resolve(str(tmp_path / "out"))
    jobs = [ShardJob(split="train", shard=shard, source=posixpath.join(info.path, shard.path), state="encode",
                     name=f"train/{file_name(shard.sha256, identity)}")
            for shard in info.manifest.splits["train"].shards[:2]]
    assert len(jobs) == 2
    model = PinnedModel(name="vae-a", version=1, run_id="r", dataset_name="digits", dataset_version=info.version,
                        asked="models:/vae-a/1")
    return Plan(model=model, identity=identity, info=info, out=out, fs=fs, latent_dim=3, jobs=jobs)


def _latents(job) -> pa.Table:
    """Made-up latents of every row of `job`'s shard, in shard order: mean = [row, row, row], logvar = -row,
    neg_elbo = 100 + row, recon_error = 90 + row."""
    import pyarrow.parquet as pq

    ids = pq.read_table(job.source, columns=["id"]).column("id")
    n = len(ids)
    row = np.repeat(np.arange(n, dtype=np.float32), 3)
    vectors = lambda x: pa.FixedSizeListArray.from_arrays(pa.array(x), 3)  # noqa: E731
    return pa.table({"path": [job.source] * n, "id": ids, "label": pa.array(np.zeros(n, np.int32)),
                     "mean": vectors(row), "logvar": vectors(-row),
                     "neg_elbo": pa.array(100 + row[::3]), "recon_error": pa.array(90 + row[::3])})


def _published(plan) -> dict[str, pa.Table]:
    import pyarrow.parquet as pq

    return {j.name: pq.read_table(posixpath.join(plan.out, j.name)) for j in plan.jobs
            if os.path.exists(posixpath.join(plan.out, j.name))}


def _leftovers(plan) -> list[Path]:
    return [p for p in Path(plan.out).rglob(".*")]


def test_shuffled_rows_of_several_shards_are_published_in_shard_order(plan):
    from flows.encode import publish_batches
    from vae_core.data.embeddings import latents

    rows = pa.concat_tables([_latents(j) for j in plan.jobs])
    shuffled = rows.take(np.random.default_rng(0).permutation(rows.num_rows))
    batches = [shuffled.slice(i, 50) for i in range(0, shuffled.num_rows, 50)]
    publish_batches(plan, plan.jobs, batches)
    files = _published(plan)
    assert list(files) == [j.name for j in plan.jobs]
    for job in plan.jobs:
        expected = _latents(job)
        ids, mean, logvar = latents(files[job.name])
        assert ids == expected.column("id").to_pylist()
        np.testing.assert_array_equal(mean[:, 0], np.arange(len(ids)))
        np.testing.assert_array_equal(logvar[:, 0], -np.arange(len(ids)))
        np.testing.assert_array_equal(files[job.name].column("neg_elbo").to_numpy(), 100 + np.arange(len(ids)))
        assert set(files[job.name].column("dataset_version").to_pylist()) == {plan.info.version}


def test_duplicated_or_missing_rows_publish_nothing(plan):
    from flows.encode import publish_batches

    first, second = (_latents(j) for j in plan.jobs)
    duplicated = pa.concat_tables([first.slice(0, first.num_rows - 1), first.slice(0, 1)])  # one id twice, one gone
    with pytest.raises(RuntimeError, match=f"{plan.jobs[0].name}: the encoded rows are not the shard's ids, each once"):
        publish_batches(plan, plan.jobs[:1], [duplicated])
    with pytest.raises(RuntimeError, match=f"1 shards came back incomplete, first {plan.jobs[1].name}"):
        publish_batches(plan, plan.jobs, [first, second.slice(1)])
    assert list(_published(plan)) == [plan.jobs[0].name]  # the complete shard only
    with pytest.raises(RuntimeError, match=f"{plan.jobs[0].name}: .* rows came back for a shard of"):
        publish_batches(plan, plan.jobs[:1], [first, first.slice(0, 1)])


def test_a_write_killed_midway_leaves_no_file_and_no_temporary(plan, monkeypatch):
    from flows.encode import publish_batches

    def half_then_killed(path, data, **kwargs):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(plan.fs, "pipe_file", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        publish_batches(plan, plan.jobs[:1], [_latents(plan.jobs[0])])
    assert _published(plan) == {} and _leftovers(plan) == []


def test_a_full_disk_names_the_file_and_what_to_do(plan, monkeypatch):
    from flows.encode import publish_batches
    from vae_core.errors import EncodeError

    def full(path, data, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(plan.fs, "pipe_file", full)
    target = posixpath.join(plan.out, plan.jobs[0].name)
    with pytest.raises(EncodeError, match=f"^cannot write {target}: No space left on device: free space there .*"
                       "choose another --out"):
        publish_batches(plan, plan.jobs[:1], [_latents(plan.jobs[0])])
    assert _published(plan) == {} and _leftovers(plan) == []


# ---------------------------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_stops_encode_within_seconds_leaving_nothing_behind(home, tmp_path):
    out = tmp_path / "interrupted"
    cmd = _vae("encode", "--model", "models:/vae-a/1", "--dataset", "mnist", "--out", str(out), "--batch-size", "8")
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(cmd, env=_env(home), stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and not list(out.rglob("*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
        start = time.monotonic()
        code = proc.wait(timeout=60)
        took = time.monotonic() - start
        # Ray's per-node agents (ray::DashboardAgent) wind down on their own clock once the raylet is gone: on a
        # loaded 2-core machine that took over 10 s once. What must not happen is that they stay.
        assert eventually(lambda: not survivors(proc.pid), 30, every=0.1), survivors(proc.pid)
    finally:
        if survivors(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    assert code == 130 and took < 15, (code, took, stderr[-3000:])
    assert "interrupted" in stderr.splitlines() and "Traceback" not in stderr, stderr[-3000:]
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.rglob(".*")], list(out.rglob("*"))  # no temporaries
