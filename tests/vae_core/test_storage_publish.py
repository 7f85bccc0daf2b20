"""Publishing a version under the data root when the upload is interrupted: readers see nothing, and
the re-run completes it and leaves no temporary behind."""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from vae_core.data.shards import MANIFEST, SPLITS, list_versions, open_dataset, read_split_u8
from vae_core.ingestion import publish as pub
from vae_core.ingestion.ingest import (decode_parts, list_source, open_source_for, run_ingest, work_base,
                                       write_shards)
from vae_core.ingestion.work import locked
from vae_core.errors import IngestError
from vae_core.requests import IngestRequest
from vae_core.storage import is_temporary, resolve, temporary_name

ROWS = 60


@pytest.fixture(params=["local", "memory"])
def data_root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "ds")
        return
    url = f"memory://publish-{uuid.uuid4().hex}"
    yield url
    fs, path = resolve(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def _request(tmp_path: Path, data_root: str) -> IngestRequest:
    """60 distinct images: train, val and test each get a shard, so the upload has three files."""
    np.savez(tmp_path / "src.npz", images=np.random.default_rng(5).integers(0, 256, (ROWS, 4, 4), np.uint8))
    return IngestRequest(name="toy", source=str(tmp_path / "src.npz"), data_root=data_root, workers=1)


def _files(data_root: str) -> list[str]:
    fs, path = resolve(data_root)
    fs.invalidate_cache(path)
    return fs.find(path)


def _interrupted_run(cfg: IngestRequest, monkeypatch) -> None:
    """run_ingest, with the second shard's move into the version folder interrupted (Ctrl-C) after the first."""
    fs, _ = resolve(cfg.root())
    real = type(fs).mv
    moves: list[str] = []

    def mv(self, src, dest, *args, **kw):
        if "/.ingest-" in dest:  # the work folder's own atomic writes
            return real(self, src, dest, *args, **kw)
        moves.append(dest)
        if len(moves) < 2:
            return real(self, src, dest, *args, **kw)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(type(fs), "mv", mv)
        with pytest.raises(KeyboardInterrupt):
            run_ingest(cfg)
    assert len(moves) == 2


def _assert_complete(data_root: str) -> None:
    info = open_dataset(data_root, "toy")
    ids = [i for s in SPLITS for i in read_split_u8(info, s)[2]]
    assert sorted(ids, key=int) == [str(i) for i in range(ROWS)]
    assert not [f for f in _files(data_root) if is_temporary(posixpath.basename(f))]


def test_interrupted_publish_leaves_nothing_a_reader_sees_and_a_rerun_completes(tmp_path, monkeypatch, data_root):
    cfg = _request(tmp_path, data_root)
    _interrupted_run(cfg, monkeypatch)
    left = [f for f in _files(data_root) if "/.ingest-" not in f]  # the work folder stays for the re-run
    assert len(left) == 1 and not [f for f in left if ".tmp-" in f or f.endswith(MANIFEST)]  # one shard
    assert list_versions(data_root, "toy") == []
    with pytest.raises(FileNotFoundError, match="no dataset 'toy'"):
        open_dataset(data_root, "toy")
    r = run_ingest(cfg)
    assert r.created and list_versions(data_root, "toy") == [r.version] and r.manifest.items.ok == ROWS
    _assert_complete(data_root)


def test_rerun_removes_temporaries_a_killed_run_left(tmp_path, monkeypatch, data_root):
    cfg = _request(tmp_path, data_root)
    _interrupted_run(cfg, monkeypatch)
    fs, root = resolve(data_root)
    [vdir] = [p for p in fs.ls(posixpath.join(root, "toy"), detail=False)  # the unfinished version folder
              if not posixpath.basename(p).startswith(".")]
    planted = [_dead_writers_temporary(posixpath.join(vdir, MANIFEST)),
               _dead_writers_temporary(posixpath.join(vdir, "train", "part-00000.parquet"))]
    for p in planted:  # as a SIGKILL mid-upload leaves them: no process left to clean up
        fs.pipe_file(p, b"partial upload")
    run_ingest(cfg)
    _assert_complete(data_root)


def _dead_writers_temporary(path: str) -> str:
    """The temporary name a process that has since exited would have used for `path`."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return temporary_name(path).replace(f"-{os.getpid()}-", f"-{int(child.stdout)}-")


def test_cleanup_spares_what_this_program_did_not_write_and_live_writers(tmp_path, monkeypatch, data_root):
    """A re-run removes only its own scheme's temporaries whose writer is gone, only in the folders it writes."""
    cfg = _request(tmp_path, data_root)
    _interrupted_run(cfg, monkeypatch)
    fs, root = resolve(data_root)
    [vdir] = [p for p in fs.ls(posixpath.join(root, "toy"), detail=False) if not posixpath.basename(p).startswith(".")]
    dead = _dead_writers_temporary(posixpath.join(vdir, "val", "part-00000.parquet"))
    spared = [temporary_name(posixpath.join(vdir, "train", "part-00000.parquet")),  # a live writer (this process)
              posixpath.join(vdir, "train", ".notes.tmp-0123abcd"),  # a user's file that only looks like one
              posixpath.join(vdir, "train", "extra", _dead_writers_temporary("x.parquet").split("/")[-1]),  # below
              posixpath.join(root, _dead_writers_temporary("toy").split("/")[-1])]  # beside the dataset
    for p in [dead, *spared]:
        fs.makedirs(posixpath.dirname(p), exist_ok=True)
        fs.pipe_file(p, b"someone's bytes")
    run_ingest(cfg)
    fs.invalidate_cache(root)
    assert not fs.exists(dead)
    assert all(fs.cat_file(p) == b"someone's bytes" for p in spared)


def test_of_two_runs_publishing_at_once_the_first_manifest_stays(tmp_path, monkeypatch, data_root):
    """A run whose publishing overlaps another run's of the same input that finishes first reports the version
    as found, and the manifest readers may already have seen (its created_at) is not replaced."""
    cfg = _request(tmp_path, data_root)
    source = open_source_for(cfg)
    with locked(work_base(cfg, source), None):
        listed = list_source(source, cfg)
        decoded = decode_parts(listed, cfg)
        buckets = write_shards(decoded)
        totals = {**decoded.totals}
        manifest = pub.build_manifest(decoded.job, source, totals, buckets, {"o": 1}, {})
    fs, _ = resolve(cfg.root())
    real = type(fs).mv
    other: list = []

    def mv(self, src, dest, *args, **kw):
        if not other and "/.ingest-" not in dest:  # the other run publishes all of it while this one moves its first shard
            other.append(None)
            other[0] = pub.publish(decoded.job, manifest)
        return real(self, src, dest, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(type(fs), "mv", mv)
        url, created, mine = pub.publish(decoded.job, manifest)
    assert other[0][1] and not created and url == other[0][0]
    assert mine == other[0][2] == open_dataset(data_root, "toy").manifest
    _assert_complete(data_root)


def test_a_second_run_of_a_source_in_use_stops_with_a_clear_error(tmp_path, data_root):
    """While one run holds the work folder, another of the same request and source stops before any work;
    a lock left by a process that is gone is taken over."""
    cfg = _request(tmp_path, data_root)
    base = work_base(cfg, open_source_for(cfg))
    with locked(base, None):
        with pytest.raises(IngestError, match="is in use by another ingestion run"):
            run_ingest(cfg)
    fs, path = resolve(base)
    fs.pipe_file(_dead_writers_temporary(posixpath.join(path, "lock")), b"")  # as a SIGKILL leaves it
    assert run_ingest(cfg).manifest.items.ok == ROWS


def _concurrent_ingests(tmp_path: Path, source: Path, data_root: Path) -> list[subprocess.CompletedProcess]:
    """Two `vae ingest --no-prefect --json` of one source and name, started together."""
    args = [sys.executable, "-m", "flows.cli.app", "ingest", str(source), "--name", "toy", "--data-root", str(data_root),
            "--shard-mb", "0.05", "--workers", "1", "--no-prefect", "--json"]
    env = {**os.environ, "VAE_HOME": str(tmp_path / "home"), "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]


@pytest.mark.timeout(600)
def test_two_ingests_of_one_name_at_once_both_succeed_with_one_complete_version(tmp_path):
    """Real processes, a few times: each ends well (or, at worst, with a one-line "in use" error), one of them
    created the version, both name it, and it is complete, with no temporary or staging folder left."""
    source = tmp_path / "src.npz"
    np.savez(source, images=np.random.default_rng(9).integers(0, 256, (2000, 16, 16), np.uint8))
    for attempt in range(3):
        data_root = tmp_path / f"ds{attempt}"
        runs = _concurrent_ingests(tmp_path, source, data_root)
        for r in runs:
            assert r.returncode == 0 or (r.returncode == 1 and "in use" in r.stderr), r.stderr[-2000:]
            assert "Traceback" not in r.stderr and "Errno" not in r.stderr, r.stderr[-2000:]
        outs = [json.loads(r.stdout) for r in runs if r.returncode == 0]
        assert len({o["version"] for o in outs}) == 1 and sum(o["created"] for o in outs) == 1, outs
        info = open_dataset(str(data_root), "toy")
        assert info.version == outs[0]["version"] and sum(info.counts.values()) == 2000
        assert sum(len(read_split_u8(info, s)[2]) for s in SPLITS) == 2000  # every shard verified
        assert not [f for f in _files(str(data_root)) if is_temporary(posixpath.basename(f))]
