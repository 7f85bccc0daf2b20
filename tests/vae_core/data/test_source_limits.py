"""Resource limits on what a source may make ingestion read or allocate: bytes per file, pixels per image,
decompressed bytes per archive. Files over a limit are quarantined with the limit named; archives over it fail
before they are inflated, naming the limit and the option that raises it."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vae_core.data.sources.base import SourceError
from vae_core.data.sources.detect import open_source
from vae_core.ingestion.ingest import run_ingest
from vae_core.requests import IngestRequest

RNG = np.random.default_rng(5)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _folder(root: Path, n: int = 9) -> None:
    for i in range(n):
        (root / "k").mkdir(parents=True, exist_ok=True)
        (root / f"k/{i}.png").write_bytes(_png(RNG.integers(0, 256, (6, 6), np.uint8)))


def _ingest(tmp_path: Path, source: str, **kw):
    return run_ingest(IngestRequest(name="t", source=source, data_root=str(tmp_path / "ds"), workers=1,
                                    max_quarantine_fraction=0.5, **kw))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height 1-bit pixels, with a small all-zero image stream."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    body = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_a_file_above_max_file_mb_is_quarantined_with_the_limit_named(tmp_path):
    _folder(tmp_path / "src")
    (tmp_path / "src/k/big.png").write_bytes(_png(RNG.integers(0, 256, (64, 64, 3), np.uint8)))
    r = _ingest(tmp_path, str(tmp_path / "src"), max_file_mb=0.01)
    assert [q.id for q in r.manifest.quarantine] == ["k/big.png"]
    assert "max_file_mb" in r.manifest.quarantine[0].reason and r.manifest.items.ok == 9


def test_a_2gb_sparse_file_is_quarantined_by_default_without_reading_it(tmp_path):
    _folder(tmp_path / "src")
    with open(tmp_path / "src/k/sparse.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(2 * 2**30)  # a hole: 2 GiB long, nothing on disk
    r = _ingest(tmp_path, str(tmp_path / "src"))
    assert [q.id for q in r.manifest.quarantine] == ["k/sparse.png"]
    assert "max_file_mb" in r.manifest.quarantine[0].reason


def test_a_remote_file_above_max_file_mb_is_quarantined_without_reading_it(tmp_path):
    import uuid

    import fsspec

    base = f"memory://limits-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for i in range(9):
        fs.pipe_file(f"{base}/k/{i}.png", _png(RNG.integers(0, 256, (6, 6), np.uint8)))
    fs.pipe_file(f"{base}/k/big.png", _png(RNG.integers(0, 256, (64, 64, 3), np.uint8)))
    r = _ingest(tmp_path, base, max_file_mb=0.01)
    assert [(q.id, "max_file_mb" in q.reason) for q in r.manifest.quarantine] == [("k/big.png", True)]


def test_an_image_above_max_image_pixels_is_quarantined_before_decoding(tmp_path):
    _folder(tmp_path / "src")
    (tmp_path / "src/k/wide.png").write_bytes(_png(RNG.integers(0, 256, (40, 40), np.uint8)))
    r = _ingest(tmp_path, str(tmp_path / "src"), max_image_pixels=1000)
    assert [q.id for q in r.manifest.quarantine] == ["k/wide.png"]
    assert "40x40" in r.manifest.quarantine[0].reason and "max_image_pixels" in r.manifest.quarantine[0].reason


def test_a_100_megapixel_png_is_quarantined_by_default(tmp_path):
    _folder(tmp_path / "src")
    (tmp_path / "src/k/bomb.png").write_bytes(_png_header_only(10_000, 10_000))  # ~12 KB on disk
    r = _ingest(tmp_path, str(tmp_path / "src"))
    assert [q.id for q in r.manifest.quarantine] == ["k/bomb.png"]
    assert "max_image_pixels" in r.manifest.quarantine[0].reason


def test_an_npz_above_max_archive_mb_fails_naming_the_limit(tmp_path):
    np.savez_compressed(tmp_path / "zeros.npz", images=np.zeros((64, 256, 256), np.uint8))  # 4 MiB inflated
    with pytest.raises(SourceError, match=r"zeros.npz: 'images' .*4\.0 MiB.* max_archive_mb=1"):
        _ingest(tmp_path, str(tmp_path / "zeros.npz"), max_archive_mb=1)


@pytest.mark.parametrize("shape", [(100_000, 1000, 1000), (1700, 1000, 1000)])  # 93 GiB, 1.6 GiB declared
def test_an_npz_declaring_a_huge_array_fails_by_default_before_allocating(tmp_path, shape):
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("images.npy", buf.getvalue() + bytes(4096))
    with pytest.raises(SourceError, match=r"bomb.npz: .*max_archive_mb"):
        open_source(str(tmp_path / "bomb.npz"))


def test_an_idx_file_declaring_a_huge_shape_fails_before_allocating(tmp_path):
    # 2**20 images of 1024x1024: header + pixels is 16 mod 2**32, so the gzip trailer agrees with the header.
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (2**20, 1024, 1024))
    data = bytearray(gzip.compress(header))
    (tmp_path / "x-images-idx3-ubyte.gz").write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"x-images-idx3-ubyte.gz: .*max_archive_mb"):
        open_source(str(tmp_path))


def test_an_idx_labels_file_that_inflates_beyond_the_limit_fails(tmp_path):
    (tmp_path / "x-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + b"".join(
        d.to_bytes(4, "big") for d in (4, 2, 2)) + bytes(16))
    labels = bytes([0, 0, 8, 1]) + (3 * 2**20).to_bytes(4, "big") + bytes(3 * 2**20)
    (tmp_path / "x-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    with pytest.raises(SourceError, match=r"x-labels-idx1-ubyte.gz: .*max_archive_mb=1"):
        _ingest(tmp_path, str(tmp_path), max_archive_mb=1)


def test_parquet_image_bytes_above_max_file_mb_are_quarantined(tmp_path):
    blobs = [_png(RNG.integers(0, 256, (6, 6), np.uint8)) for _ in range(9)]
    blobs.append(_png(RNG.integers(0, 256, (6, 6), np.uint8)) + bytes(20_000))  # trailing bytes: still a PNG
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary())}), tmp_path / "t.parquet")
    r = _ingest(tmp_path, str(tmp_path / "t.parquet"), max_file_mb=0.01)
    assert [(q.id, "max_file_mb" in q.reason) for q in r.manifest.quarantine] == [("t.parquet#9", True)]


def test_a_parquet_row_group_above_max_archive_mb_fails_naming_the_limit(tmp_path):
    blobs = [bytes(2**20) for _ in range(4)]  # 4 MiB of zeros, a few KiB compressed
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary())}), tmp_path / "z.parquet", compression="zstd")
    with pytest.raises(SourceError, match=r"z.parquet: row group 0 .*max_archive_mb=1"):
        _ingest(tmp_path, str(tmp_path / "z.parquet"), max_archive_mb=1)


@pytest.mark.parametrize("field", ["max_file_mb", "max_image_pixels", "max_archive_mb"])
def test_limits_must_be_positive(field):
    with pytest.raises(ValueError, match=field):
        IngestRequest(name="t", source="builtin:digits", **{field: 0})


def test_raising_a_limit_ingests_what_it_quarantined_before(tmp_path):
    _folder(tmp_path / "src")
    (tmp_path / "src/k/big.png").write_bytes(_png(RNG.integers(0, 256, (6, 6), np.uint8)) + bytes(20_000))
    first = _ingest(tmp_path, str(tmp_path / "src"), max_file_mb=0.01)
    assert [q.id for q in first.manifest.quarantine] == ["k/big.png"]
    again = _ingest(tmp_path, str(tmp_path / "src"))  # the same files, a higher limit: not the same dataset
    assert again.version != first.version and again.manifest.items.ok == 10 and not again.manifest.quarantine
