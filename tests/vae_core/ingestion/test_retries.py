"""Transient storage errors: retried with backoff and counted; quarantined only when they persist; permanent
ones (a missing file) not retried. The store is a registered fsspec filesystem that drops connections."""

from __future__ import annotations

import asyncio
import io
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry
from PIL import Image

from vae_core.data.shards import open_dataset, read_split_u8
from vae_core.data.sources import listing
from vae_core.data.sources.limits import SourceLimits
from vae_core.ingestion.ingest import Published, run_ingest
from vae_core.requests import IngestRequest

RNG = np.random.default_rng(9)
FAIL_FIRST = 2  # reads of each file that fail before one succeeds


class FlakyStore(MemoryFileSystem):
    """An in-memory store whose first FAIL_FIRST reads of each file (and every read of a file in `dead`)
    raise ConnectionError, through `open` and `cat_file` alike; `reads` counts the reads per path."""

    protocol = "flaky"
    store: dict = {}  # its own files, not memory://'s
    pseudo_dirs = [""]
    dead: set[str] = set()
    reads: Counter = Counter()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("flaky://") if isinstance(path, str) else path)

    def _flake(self, path: str) -> None:
        path = self._strip_protocol(path)
        self.reads[path] += 1
        if path in self.store and (path in self.dead or self.reads[path] <= FAIL_FIRST):
            raise ConnectionError(f"connection reset by peer reading {path}")

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._flake(path)
        return super().cat_file(path, start, end, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            self._flake(path)
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def flaky(monkeypatch) -> type[FlakyStore]:
    """FlakyStore registered as flaky://, allowed, empty, with a short backoff."""
    fsspec.register_implementation("flaky", FlakyStore, clobber=True)
    monkeypatch.setenv("VAE_ALLOWED_PROTOCOLS", "file,memory,flaky")
    monkeypatch.setattr(listing, "RETRY_BASE_S", 0.01)
    FlakyStore.store.clear()
    FlakyStore.dead.clear()
    FlakyStore.reads.clear()
    yield FlakyStore
    FlakyStore.store.clear()
    FlakyStore.clear_instance_cache()
    _registry.pop("flaky", None)  # registered for this test only (fsspec has no public undo)


def _images(fs: FlakyStore, folder: str, n: int) -> dict[str, np.ndarray]:
    """n PNGs of random 4x5 grey pixels under `folder` of the store; -> path -> pixels."""
    out = {}
    for i in range(n):
        arr = RNG.integers(0, 256, (4, 5), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        fs.pipe_file(f"{folder}/{i}.png", buf.getvalue())
        out[f"/{folder}/{i}.png"] = arr
    return out


def _check(r: Published, good: dict[str, np.ndarray], dead: str, store: type[FlakyStore]) -> None:
    """Every good image ingested after FAIL_FIRST failed reads; `dead` read RETRY_TRIES times, then
    quarantined; retries counted: FAIL_FIRST per good image, RETRY_TRIES - 1 for the dead one."""
    m = r.manifest
    assert m.items.ok == len(good) and m.items.quarantined >= 1
    [reason] = [q.reason for q in m.quarantine if q.source.endswith(dead)]
    assert reason.startswith("cannot read: ConnectionError: connection reset")
    assert store.reads[dead] == listing.RETRY_TRIES
    assert {p: store.reads[p] for p in good} == {p: FAIL_FIRST + 1 for p in good}
    assert r.retries == r.summary().retries == FAIL_FIRST * len(good) + listing.RETRY_TRIES - 1


def test_a_file_list_on_a_flaky_store_is_read_through_retries(flaky, tmp_path):
    """Sizes unknown (a file list): each file is read through `open`, capped at the size limit."""
    good = _images(flaky(), "imgs", 6)
    flaky().pipe_file("imgs/dead.png", b"never read")
    flaky.dead.add("/imgs/dead.png")
    entries = [f"flaky:/{p}" for p in good] + ["flaky://imgs/dead.png", "flaky://imgs/missing.png"]
    (tmp_path / "list.txt").write_text("\n".join(entries) + "\n")
    r = run_ingest(IngestRequest(name="flaky", source=str(tmp_path / "list.txt"), data_root=str(tmp_path / "ds"),
                                 max_quarantine_fraction=0.5))
    _check(r, good, "/imgs/dead.png", flaky)
    missing = next(q for q in r.manifest.quarantine if q.id == "flaky://imgs/missing.png")
    assert missing.reason.startswith("cannot read: FileNotFoundError")
    assert flaky.reads["/imgs/missing.png"] == 1  # a missing file is not retried
    _same_pixels(tmp_path / "ds", r, {f"flaky:/{p}": a for p, a in good.items()})


def test_a_folder_on_a_flaky_store_is_read_through_retries(flaky, tmp_path):
    """Sizes listed (a folder): each file is read whole with `cat_file`."""
    good = _images(flaky(), "src/a", 5)
    flaky().pipe_file("src/a/dead.png", b"never read")
    flaky.dead.add("/src/a/dead.png")
    r = run_ingest(IngestRequest(name="flaky", source="flaky://src", data_root=str(tmp_path / "ds"),
                                 max_quarantine_fraction=0.5))
    _check(r, good, "/src/a/dead.png", flaky)
    _same_pixels(tmp_path / "ds", r, {p.removeprefix("/src/"): a for p, a in good.items()})


def _same_pixels(root: Path, r: Published, want: dict[str, np.ndarray]) -> None:
    info = open_dataset(str(root), "flaky", r.version)
    got = {}
    for split in ("train", "val", "test"):
        x, _, ids = read_split_u8(info, split)
        got.update({i: x[k, :, :, 0] for k, i in enumerate(ids)})
    assert set(got) == set(want)
    for i, arr in want.items():
        np.testing.assert_array_equal(got[i], arr)


class FlakyAsync(AsyncFileSystem):
    """An async store of `files` whose `_cat_file` fails the first FAIL_FIRST times per path."""

    protocol = "flakyasync"

    def __init__(self, files: dict[str, bytes], **kwargs):
        super().__init__(skip_instance_cache=True, **kwargs)
        self.files, self.reads = files, Counter()

    async def _cat_file(self, path, start=None, end=None, **kwargs):
        self.reads[path] += 1
        await asyncio.sleep(0)
        if path not in self.files:
            raise FileNotFoundError(path)
        if self.reads[path] <= FAIL_FIRST:
            raise ConnectionError(f"connection reset by peer reading {path}")
        return self.files[path]


def test_an_async_store_is_retried_concurrently(monkeypatch):
    """Object stores (s3fs, gcsfs) are async: their reads are gathered, and each failed one retried."""
    monkeypatch.setattr(listing, "RETRY_BASE_S", 0.01)
    fs = FlakyAsync({f"b/{i}": bytes([i]) * 10 for i in range(4)})
    paths = [*fs.files, "b/missing"]
    got, retries = listing.read_with_retries(fs, paths, [10] * 5, SourceLimits())
    assert got[:4] == [bytes([i]) * 10 for i in range(4)] and isinstance(got[4], FileNotFoundError)
    assert retries == FAIL_FIRST * 4 and fs.reads == {**{p: FAIL_FIRST + 1 for p in fs.files}, "b/missing": 1}
