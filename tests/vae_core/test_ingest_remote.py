"""Sources and data roots at fsspec URLs: memory://, and s3:// against moto's server on 127.0.0.1."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
from PIL import Image

from vae_core.requests import IngestRequest
from vae_core.ingest import run_ingest
from vae_core.shards import open_dataset, read_split_u8, shard_paths

RNG = np.random.default_rng(11)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _folder(n: int = 40) -> dict[str, bytes]:
    """relative path -> file bytes: n PNGs in two classes, one corrupt file, one duplicate."""
    files = {f"{'ab'[i % 2]}/{i:03d}.png": _png(RNG.integers(0, 256, (9, 7), np.uint8)) for i in range(n)}
    files["a/broken.png"] = b"\x89PNG broken"
    files["b/copy.png"] = files["a/000.png"]
    return files


def test_memory_source_and_memory_root():
    base = f"memory://ingest-{uuid.uuid4().hex}"
    import fsspec

    fs = fsspec.filesystem("memory")
    files = _folder()
    for rel, data in files.items():
        fs.pipe_file(f"{base}/src/{rel}", data)
    cfg = IngestRequest(name="mem", source=f"{base}/src", data_root=f"{base}/ds", workers=2, max_quarantine_fraction=0.1)
    r = run_ingest(cfg)  # decoding happens in worker processes; the bytes come from this process
    m = r.manifest
    assert r.url.startswith("memory://") and m.items.seen == len(files)
    assert (m.items.ok, m.items.duplicates, m.items.quarantined) == (40, 1, 1)
    info = open_dataset(f"{base}/ds", "mem")
    x, _, ids = read_split_u8(info, "train")
    k = ids.index(next(i for i in ids if i.endswith(".png")))
    np.testing.assert_array_equal(x[k, :, :, 0], np.asarray(Image.open(io.BytesIO(files[ids[k]]))))
    assert not run_ingest(cfg).created


def test_s3_round_trip(s3):
    fs, options = s3
    files = _folder()
    for rel, data in files.items():
        fs.pipe_file(f"vae-bucket/src/{rel}", data)
    cfg = IngestRequest(name="remote", source="s3://vae-bucket/src", data_root="s3://vae-bucket/datasets",
                       source_options=options, data_root_options=options, workers=1, max_quarantine_fraction=0.1)
    r = run_ingest(cfg)
    assert r.created and r.url == f"s3://vae-bucket/datasets/remote/{r.version}"
    m = r.manifest
    assert (m.items.ok, m.items.duplicates, m.items.quarantined) == (40, 1, 1)
    assert m.quarantine[0].source == "s3://vae-bucket/src/a/broken.png"

    keys = fs.find("vae-bucket/datasets", refresh=True)
    assert f"vae-bucket/datasets/remote/{r.version}/manifest.json" in keys
    assert not [k for k in keys if ".tmp-" in k]  # temporary names were all moved into place
    manifest = json.loads(fs.cat_file(f"vae-bucket/datasets/remote/{r.version}/manifest.json"))
    assert manifest["version"] == r.version and manifest["items"]["seen"] == len(files)

    info = open_dataset("s3://vae-bucket/datasets", "remote", storage_options=options)
    assert shard_paths(info, "train", urls=True)[0].startswith(f"s3://vae-bucket/datasets/remote/{r.version}/train/")
    got = {}
    for s in ("train", "val", "test"):
        x, y, ids = read_split_u8(info, s)
        got.update({i: (x[k], y[k]) for k, i in enumerate(ids)})
    assert len(got) == 40
    for rel, (img, label) in got.items():
        np.testing.assert_array_equal(img[:, :, 0], np.asarray(Image.open(io.BytesIO(files[rel]))))
        assert label == "ab".index(rel[0])

    before = sorted(fs.find("vae-bucket/datasets", refresh=True))
    again = run_ingest(cfg)
    assert not again.created and again.version == r.version
    assert sorted(fs.find("vae-bucket/datasets", refresh=True)) == before


def test_cli_reaches_s3_through_the_usual_aws_variables(s3, monkeypatch):
    """`vae ingest` has no storage flags: an S3-compatible endpoint comes from AWS_ENDPOINT_URL."""
    import s3fs
    from typer.testing import CliRunner

    from flows.cli import app

    fs, options = s3
    fs.pipe_file("vae-bucket/cli-src/train-images-idx3-ubyte", bytes([0, 0, 8, 3]) + b"".join(
        d.to_bytes(4, "big") for d in (20, 3, 3)) + RNG.integers(0, 256, 180, np.uint8).tobytes())
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["client_kwargs"]["endpoint_url"])
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        r = CliRunner().invoke(app, ["ingest", "s3://vae-bucket/cli-src", "--name", "cli", "--data-root",
                                     "s3://vae-bucket/cli-ds", "--no-prefect", "--json"])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["path"] == f"s3://vae-bucket/cli-ds/cli/{out['version']}"
    assert out["counts"]["train"] + out["counts"]["val"] == 20 and out["shape"] == [3, 3, 1]
    assert fs.exists(f"vae-bucket/cli-ds/cli/{out['version']}/manifest.json")
