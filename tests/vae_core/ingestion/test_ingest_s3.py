"""S3 (moto's server on 127.0.0.1) as the source, a prefix of class folders, and as the data root: the same
rows as a local copy of the images, and nothing left under the data root but the version's files."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from PIL import Image

import vae_core.data.shards.manifest
import vae_core.ingestion.publish
from vae_core.data.shards import open_dataset, read_split_u8
from vae_core.ingestion.ingest import Published, run_ingest
from vae_core.ingestion.publish import manifest_entries
from vae_core.requests import IngestRequest

RNG = np.random.default_rng(5)


def _images() -> dict[str, bytes]:
    """relative path -> bytes: 24 PNGs in two class folders, a corrupt file, a copy under the other class."""
    files = {}
    for i in range(24):
        buf = io.BytesIO()
        Image.fromarray(RNG.integers(0, 256, (6, 5), np.uint8)).save(buf, "PNG")
        files[f"{'ab'[i % 2]}/{i:02d}.png"] = buf.getvalue()
    files["a/broken.png"] = b"\x89PNG\r\n\x1a\n broken"
    files["b/copy.png"] = files["a/00.png"]
    return files


def _rows(root: str, version: str, options: dict | None = None) -> dict[str, dict[str, tuple[bytes, int]]]:
    """split -> id -> (pixel bytes, label) of a version."""
    info = open_dataset(root, "imgs", version, storage_options=options)
    out = {}
    for split in ("train", "val", "test"):
        x, y, ids = read_split_u8(info, split)
        out[split] = {i: (x[k].tobytes(), int(y[k])) for k, i in enumerate(ids)}
    return out


def _lists(r: Published, options: dict | None = None) -> dict[str, list[dict]]:
    return {kind: sorted(manifest_entries(r.url, r.manifest, kind, options), key=lambda e: e["id"])
            for kind in ("quarantine", "duplicates")}


@pytest.mark.slow
def test_s3_prefix_to_s3_root_matches_a_local_copy(s3, tmp_path, monkeypatch):
    fs, options = s3
    for module in (vae_core.ingestion.publish, vae_core.data.shards.manifest):
        monkeypatch.setattr(module, "LIST_BOUND", 0)  # every list in a side file: they are written to S3 too
    base = f"vae-bucket/ingest-{uuid.uuid4().hex[:8]}"
    files = _images()
    for rel, data in files.items():
        fs.pipe_file(f"{base}/images/{rel}", data)
        (tmp_path / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / rel).write_bytes(data)

    def ingest(source: str, root: str, remote: bool) -> Published:
        return run_ingest(IngestRequest(name="imgs", source=source, data_root=root, max_quarantine_fraction=0.1,
                                        source_options=options if remote else {},
                                        data_root_options=options if remote else {}))

    remote = ingest(f"s3://{base}/images/", f"s3://{base}/ds", True)
    local = ingest(str(tmp_path / "images"), str(tmp_path / "ds"), False)
    m = remote.manifest
    assert remote.created and remote.url == f"s3://{base}/ds/imgs/{remote.version}"
    assert (m.items.seen, m.items.ok, m.items.duplicates, m.items.quarantined) == (26, 24, 1, 1)
    assert m.source.kind == "folder" and m.label_names == ["a", "b"]

    # Ids are paths relative to the root, so rows, splits, labels and lists agree with the local copy; the
    # version does not: every row's `source` (s3://... against a local path) is in the shards it hashes.
    rows = _rows(f"s3://{base}/ds", remote.version, options)
    assert {s: len(v) for s, v in rows.items()} == m.counts and sum(m.counts.values()) == 24
    assert rows == _rows(str(tmp_path / "ds"), local.version)
    assert m.counts == local.manifest.counts and m.label_names == local.manifest.label_names
    strip = {"source": None}
    assert ([{**e, **strip} for e in _lists(remote, options)["quarantine"]]
            == [{**e, **strip} for e in _lists(local)["quarantine"]])
    assert [(d["id"], d["duplicate_of"]) for d in _lists(remote, options)["duplicates"]] == [("b/copy.png", "a/00.png")]
    assert _lists(remote, options)["quarantine"][0]["source"] == f"s3://{base}/images/a/broken.png"
    assert remote.version != local.version

    vdir = f"{base}/ds/imgs/{remote.version}"
    keys = sorted(k[len(vdir) + 1:] for k in fs.find(f"{base}/ds", refresh=True))
    shards = sorted(sh.path for info in m.splits.values() for sh in info.shards)
    assert keys == sorted(["manifest.json", "quarantine.parquet", "duplicates.parquet", *shards])  # no .ingest-*

    again = ingest(f"s3://{base}/images/", f"s3://{base}/ds", True)
    assert not again.created and again.version == remote.version
    assert sorted(fs.find(f"{base}/ds", refresh=True)) == [f"{vdir}/{k}" for k in keys]

