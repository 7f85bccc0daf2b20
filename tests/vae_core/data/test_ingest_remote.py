"""Sources and data roots at fsspec URLs: memory://, s3:// against moto's server on 127.0.0.1, http:// against
http.server on 127.0.0.1; which protocols and hosts a request may name."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vae_core.data.shards import open_dataset, read_split_u8, shard_paths
from vae_core.data.sources.base import SourceError
from vae_core.data.sources.detect import open_source
from vae_core.ingestion.ingest import run_ingest
from vae_core.requests import IngestRequest

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

    from flows.cli.app import app

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


# ------------------------------------------------------------------------ protocols and addresses

@contextlib.contextmanager
def _http_server(root: Path, redirect: dict[str, str] | None = None) -> Iterator[str]:
    """A real http.server on 127.0.0.1 serving `root` (paths in `redirect` answer 302 to their target)."""
    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            if redirect and self.path in redirect:
                self.send_response(302)
                self.send_header("Location", redirect[self.path])
                self.end_headers()
                return
            super().do_GET()

        do_HEAD = do_GET

        def log_message(self, *args):  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/images/", "https://example.com/x.npz",
                                 "simplecache::memory://x/y.npz", "ftp://127.0.0.1/x", "zip://a.png::memory://x.zip"])
def test_protocols_outside_the_setting_are_refused_with_how_to_allow_them(url):
    with pytest.raises(SourceError, match=r"protocol '\w+' is not allowed.*VAE_ALLOWED_PROTOCOLS"):
        open_source(url)
    with pytest.raises(ValueError, match=r"protocol '\w+' is not allowed.*VAE_ALLOWED_PROTOCOLS"):
        IngestRequest(name="x", source=url)  # a deployment parameter is refused before any work


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/latest/",
                                 "http://metadata.google.internal/computeMetadata/v1/", "http://2852039166/x",
                                 "http://0xa9fea9fe/x", "http://[::ffff:169.254.169.254]/x", "http://[fe80::1]/x"])
def test_link_local_and_metadata_addresses_are_refused_even_when_http_is_allowed(url, monkeypatch):
    monkeypatch.setenv("VAE_ALLOWED_PROTOCOLS", "file,memory,http,https")
    with pytest.raises(SourceError, match="link-local or cloud metadata address"):
        open_source(url)
    with pytest.raises(ValueError, match="link-local or cloud metadata address"):
        IngestRequest(name="x", source=url)


def test_an_endpoint_in_the_source_options_is_checked_too():
    options = {"client_kwargs": {"endpoint_url": "http://169.254.169.254:80"}}
    with pytest.raises(SourceError, match="169.254.169.254.*link-local or cloud metadata address"):
        open_source("s3://bucket/images", storage_options=options)
    with pytest.raises(ValueError, match="link-local or cloud metadata address"):
        IngestRequest(name="x", source="s3://bucket/images", source_options=options)


def test_an_http_folder_is_ingested_when_http_is_allowed(tmp_path, monkeypatch):
    files = _folder(12)
    for rel, data in files.items():
        (tmp_path / "www" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "www" / rel).write_bytes(data)
    monkeypatch.setenv("VAE_ALLOWED_PROTOCOLS", "file,memory,http")  # 127.0.0.1 is not link-local: allowed
    with _http_server(tmp_path / "www") as base:
        r = run_ingest(IngestRequest(name="web", source=f"{base}/", data_root=str(tmp_path / "ds"), workers=1,
                                     max_quarantine_fraction=0.2))
    m = r.manifest
    assert m.items.seen == len(files)
    assert (m.items.ok, m.items.duplicates, m.items.quarantined) == (12, 1, 1)
    assert m.quarantine[0].id == "a/broken.png" and m.label_names == ["a", "b"]


def test_an_http_redirect_to_a_metadata_address_is_refused(tmp_path, monkeypatch):
    files = _folder(10)
    for rel, data in files.items():
        (tmp_path / "www" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "www" / rel).write_bytes(data)
    monkeypatch.setenv("VAE_ALLOWED_PROTOCOLS", "file,memory,http")
    with _http_server(tmp_path / "www", {"/a/000.png": "http://169.254.169.254/latest/meta-data/"}) as base:
        r = run_ingest(IngestRequest(name="web", source=f"{base}/", data_root=str(tmp_path / "ds"), workers=1,
                                     max_quarantine_fraction=0.3))
    reasons = {q.id: q.reason for q in r.manifest.quarantine}
    assert "link-local or cloud metadata address" in reasons["a/000.png"]


def test_s3_without_credentials_is_a_source_error_naming_the_url(s3, monkeypatch):
    import s3fs

    fs, options = s3
    fs.pipe_file("vae-bucket/nocred/a/0.png", _png(RNG.integers(0, 256, (4, 4), np.uint8)))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(SourceError, match=r"s3://vae-bucket/nocred: .*credentials.*AWS_ACCESS_KEY_ID") as e:
        open_source("s3://vae-bucket/nocred", storage_options=options)
    assert "\n" not in str(e.value)


def test_a_missing_bucket_is_a_source_error_naming_the_url(s3):
    _, options = s3
    with pytest.raises(SourceError, match=r"s3://no-such-bucket-here/x: source not found"):
        open_source("s3://no-such-bucket-here/x", storage_options=options)


@pytest.mark.parametrize("field", ["data_root", "out"])
def test_other_request_urls_follow_the_same_rule(field, monkeypatch):
    from vae_core.requests import EncodeRequest

    def build(url: str):
        if field == "out":
            return EncodeRequest(model="models:/m/1", dataset="d", out=url)
        return IngestRequest(name="x", source="builtin:digits", data_root=url)

    with pytest.raises(ValueError, match="protocol 'http' is not allowed"):
        build("http://127.0.0.1:9/x")
    monkeypatch.setenv("VAE_ALLOWED_PROTOCOLS", "file,memory,http")
    with pytest.raises(ValueError, match="link-local or cloud metadata address"):
        build("http://169.254.169.254/x")
    assert build("memory://fine/x")
