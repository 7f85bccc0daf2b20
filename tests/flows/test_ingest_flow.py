"""`vae ingest` and the `ingest-dataset` Prefect flow, on Prefect's real engine.

Without PREFECT_API_URL, Prefect starts its temporary local server once per test process (shared with
the other flow tests); tests/conftest.py points PREFECT_HOME at a throwaway folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli.app import app
from vae_core.data.shards import open_dataset, read_split_u8

pytestmark = pytest.mark.usefixtures("prefect_server", "one_ray")


@pytest.fixture(scope="module")
def one_ray():
    """One local Ray that this module's in-process flows join (`ray_session` joins an initialised Ray), instead
    of each starting and stopping its own, seconds each; the commands run as processes start theirs. Every
    request names its data root, so no worker needs an environment set after the Ray started."""
    from flows.distributed.cluster import ray_session

    with ray_session():
        yield


def _folder(root, n=30):
    rng = np.random.default_rng(5)
    for i in range(n):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), np.uint8)).save(buf, "PNG")
        (root / f"c{i % 3}" / f"{i}.png").write_bytes(buf.getvalue())
    (root / "c0" / "notes.txt").write_text("hello")
    return root


def test_cli_json_in_process(tmp_path):
    runner = CliRunner()
    args = ["ingest", "builtin:digits", "--name", "digits", "--data-root", str(tmp_path), "--no-prefect", "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    out = json.loads(first.stdout)
    assert {"name", "version", "path", "counts", "quarantined"} <= set(out)
    assert out["name"] == "digits" and out["created"] and out["quarantined"] == 0
    assert sum(out["counts"].values()) + out["duplicates"] == 1797
    assert out["path"] == str(tmp_path / "digits" / out["version"])
    again = json.loads(runner.invoke(app, args).stdout)
    assert again["version"] == out["version"] and not again["created"]


def test_cli_errors_are_one_clear_line(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["ingest", str(tmp_path / "missing"), "--name", "x", "--data-root", str(tmp_path),
                            "--no-prefect"])
    assert r.exit_code == 1 and "missing: source not found" in r.stderr
    r = runner.invoke(app, ["ingest", "builtin:digits", "--name", "x", "--channels", "2", "--image-size", "8,8",
                            "--data-root", str(tmp_path), "--no-prefect"])
    assert r.exit_code == 1 and "channels: Input should be 1 or 3" in r.stderr
    r = runner.invoke(app, ["ingest", "builtin:digits", "--name", "x", "--image-size", "eight", "--no-prefect"])
    assert r.exit_code == 1 and "image size 'eight' is not H,W" in r.stderr


@pytest.mark.slow
def test_flow_through_the_cli_writes_dataset_and_artifact(tmp_path):
    from prefect.artifacts import Artifact

    src = _folder(tmp_path / "src")
    r = CliRunner().invoke(app, ["ingest", str(src), "--name", "Shapes_v1", "--data-root", str(tmp_path / "ds"),
                                 "--image-size", "8,8", "--channels", "1", "--fit", "pad",
                                 "--max-quarantine-fraction", "0.1", "--workers", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # stdout holds the JSON only; Prefect logs go to stderr
    assert out["shape"] == [8, 8, 1] and out["quarantined"] == 1 and out["seen"] == 31
    info = open_dataset(str(tmp_path / "ds"), "Shapes_v1")
    assert info.version == out["version"]
    assert read_split_u8(info, "train")[0].shape[1:] == (8, 8, 1)

    art = Artifact.get("ingest-shapes-v1")
    assert art is not None and art.type == "markdown"
    md = art.data
    assert f"version `{out['version']}`" in md and "| train |" in md and "c0/notes.txt" in md
    assert "30 ok + 0 duplicates + 1 quarantined" in md


@pytest.mark.slow
def test_flow_fails_fast_on_a_bad_source(tmp_path):
    from flows.ingest import ingest_dataset
    from vae_core.data.sources.base import SourceError
    from vae_core.requests import IngestRequest

    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x03" + bytes(12))
    with pytest.raises(SourceError, match="wrong IDX magic"):
        ingest_dataset(IngestRequest(source=str(tmp_path), name="bad", data_root=str(tmp_path / "ds")))
    with pytest.raises(SourceError, match="wrong IDX magic"):  # the JSON a deployment run passes
        ingest_dataset(request={"source": str(tmp_path), "name": "bad", "data_root": str(tmp_path / "ds")})
    assert not (tmp_path / "ds").exists()


def test_flow_rerun_on_unchanged_input_decodes_nothing(tmp_path, monkeypatch):
    import flows.ingest
    from vae_core.requests import IngestRequest

    _folder(tmp_path / "src", n=12)
    req = IngestRequest(source=str(tmp_path / "src"), name="pngs", data_root=str(tmp_path / "ds"), workers=1,
                        max_quarantine_fraction=0.2)
    first = flows.ingest.ingest_dataset(req)
    assert sum(n.rows for n in first.nodes) == first.seen

    def no_decoding(*args, **kwargs):
        raise AssertionError("the unchanged input was decoded again")

    monkeypatch.setattr(flows.ingest, "decode_parts", no_decoding)
    again = flows.ingest.ingest_dataset(req)
    assert (again.version, again.created, again.nodes) == (first.version, False, [])
    assert not list((tmp_path / "ds" / "pngs").glob(".ingest-*"))  # nor a work folder left behind


def test_a_flow_stopped_before_publishing_resumes_without_decoding_again(tmp_path, monkeypatch):
    """Between write-shards and publish-version (a Ctrl-C, Prefect failing to start the task), the finished
    parts and shards stay in the work folder, and the next run publishes them without decoding anything."""
    import flows.ingest
    from vae_core.requests import IngestRequest

    _folder(tmp_path / "src", n=12)
    req = IngestRequest(source=str(tmp_path / "src"), name="pngs", data_root=str(tmp_path / "ds"), workers=1,
                        max_quarantine_fraction=0.2)

    def api_gone(*args, **kwargs):
        raise RuntimeError("the API went away before publish-version started")

    with monkeypatch.context() as m:
        m.setattr(flows.ingest, "publish_task", api_gone)
        with pytest.raises(RuntimeError, match="went away"):
            flows.ingest.ingest_dataset(req)
    assert list((tmp_path / "ds" / "pngs").glob(".ingest-*/run-*/shards/commit/*.json"))
    again = flows.ingest.ingest_dataset(req)
    assert again.created and again.nodes == [] and again.seen == 13  # 12 images and one file that is not


def _slow_folder(root: Path, classes: int = 7, per_class: int = 100, distinct: int = 16) -> Path:
    """`classes` folders of `per_class` large smooth PNGs, `distinct` of them different: written in seconds,
    decoded in many more. Each class folder is its own part, committed long before the last is decoded."""
    y, x = np.mgrid[0:1024, 0:1024]
    blobs = []
    for i in range(distinct):
        buf = io.BytesIO()
        Image.fromarray(np.stack([(x * (i + 1)) % 256, (y * (i + 2)) % 256, (x + y) % 256], -1).astype(np.uint8)
                        ).save(buf, "PNG")
        blobs.append(buf.getvalue())
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{c}" / f"{i:04d}.png").write_bytes(blobs[(c * per_class + i) % distinct])
    return root


@pytest.mark.timeout(600)
def test_a_killed_ingest_resumes_from_its_committed_parts(tmp_path):
    """SIGKILL skips every clean-up: what the killed run committed stays in the work folder under the data root
    (not the system temp folder), and the next run takes over its lock, decodes only the parts not committed,
    and gives the same version as a run never interrupted."""
    data, scratch = tmp_path / "data", tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "VAE_HOME": str(tmp_path / "vae"), "TMPDIR": str(scratch), "MLFLOW_DISABLE_TELEMETRY": "true"}
    cli = [sys.executable, "-m", "flows.cli.app", "ingest"]
    slow = [*cli, str(_slow_folder(tmp_path / "src")), "--name", "slow", "--workers", "1", "--image-size", "16,16",
            "--shard-mb", "0.005", "--no-prefect", "--json"]
    proc = subprocess.Popen([*slow, "--data-root", str(data)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    commits = lambda: list(data.glob("slow/.ingest-*/run-*/parts/commit/*.json"))  # noqa: E731
    try:
        deadline = time.monotonic() + 240
        while len(commits()) < 2:  # two class folders decoded and committed
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in commits()}
    assert not list(scratch.iterdir()) and not list(data.glob("slow/[!.]*"))  # no version, nothing in temp
    r = subprocess.run([*slow, "--data-root", str(data)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed = json.loads(r.stdout)
    assert resumed["created"] and resumed["seen"] == 700
    assert sum(n["rows"] for n in resumed["nodes"]) <= 700 - 100 * len(done)  # committed parts not decoded again
    whole = subprocess.run([*slow, "--data-root", str(tmp_path / "whole")], env=env, capture_output=True, text=True)
    assert json.loads(whole.stdout)["version"] == resumed["version"], whole.stderr[-2000:]
    assert not list(data.glob("slow/.ingest-*"))


def test_duplicates_under_another_label_are_counted_by_the_command_and_the_flow(tmp_path):
    from flows.ingest import ingest_dataset
    from vae_core.requests import IngestRequest

    _folder(tmp_path / "src", n=6)
    (tmp_path / "src" / "c0" / "notes.txt").unlink()
    (tmp_path / "src" / "c1" / "copy.png").write_bytes((tmp_path / "src" / "c0" / "0.png").read_bytes())
    args = ["ingest", str(tmp_path / "src"), "--name", "noisy", "--data-root", str(tmp_path / "a"), "--no-prefect"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "1 duplicates disagree with the kept copy on their label" in r.stdout, r.output
    out = ingest_dataset(IngestRequest(source=str(tmp_path / "src"), name="noisy", data_root=str(tmp_path / "b")))
    assert (out.duplicates, out.label_conflicts) == (1, 1)
