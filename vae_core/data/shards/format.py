"""The shard format itself: folder layout names, the Arrow schema of a shard, how shards are written, and
the SHA-256 rule of every checksum the formats record."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
import pyarrow as pa

FORMAT = "vae-shards/1"
SPLITS: tuple[str, ...] = ("train", "val", "test")
MANIFEST = "manifest.json"
COMPRESSION = "zstd"
# A shard's path in the manifest: a plain Parquet file name directly in its split's folder. Readers join it
# to the version folder, so anything else (absolute, '..', deeper folders) could make them read elsewhere.
SHARD_PATH = re.compile(r"(?P<split>train|val|test)/[A-Za-z0-9][A-Za-z0-9._-]*\.parquet")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # shard checksums also name files (encode's outputs)


def shard_schema(image_bytes: int) -> pa.Schema:
    """Arrow schema of one shard whose images are `image_bytes` = H*W*C bytes each."""
    if image_bytes < 1:
        raise ValueError(f"image_bytes must be positive, got {image_bytes}")
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(image_bytes), nullable=False),
        pa.field("label", pa.int32(), nullable=True),
        pa.field("source", pa.string(), nullable=False),
    ])


def build_table(ids: list[str], images: np.ndarray, labels: np.ndarray, sources: list[str]) -> pa.Table:
    """Rows -> Arrow table in the shard schema.

    images: uint8 (N, H, W, C), C-contiguous; labels: int32 (N,), -1 meaning "no label".
    The pixel buffer is handed to Arrow without a copy.
    """
    n = len(ids)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n:
        raise ValueError(f"images must be uint8 (N,H,W,C) with N={n}, got {images.dtype} {images.shape}")
    if labels.shape != (n,) or len(sources) != n:
        raise ValueError(f"{n} ids but labels {labels.shape} and {len(sources)} sources")
    row = int(np.prod(images.shape[1:]))
    pixels = np.ascontiguousarray(images)
    image_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(row), n, [None, pa.py_buffer(pixels)])
    labels = labels.astype(np.int32, copy=False)
    label_col = pa.array(labels, type=pa.int32(), mask=labels < 0)
    columns = [pa.array(ids, pa.string()), image_col, label_col, pa.array(sources, pa.string())]
    return pa.Table.from_arrays(columns, schema=shard_schema(row))


def writer_options() -> dict[str, Any]:
    """Keyword arguments for `pq.ParquetWriter` (and `pq.write_table`) used for every shard.

    Dictionary encoding and statistics are switched off for the pixel column: every value is distinct
    and min/max of raw pixels helps no reader, so both would only cost time.
    """
    return {"compression": COMPRESSION, "use_dictionary": ["label", "source"], "write_statistics": ["id", "label"]}


def row_group_rows(image_bytes: int) -> int:
    """Rows per Parquet row group: ~16 MiB of pixels, so a streaming reader never holds a whole shard."""
    return max(1, (16 << 20) // image_bytes)


def sha256_hex(data: bytes | memoryview) -> str:
    """Lowercase hex SHA-256 of `data`: the checksum every manifest records."""
    return hashlib.sha256(data).hexdigest()


def check_sha256(value: str, what: str) -> str:
    """`value` if it is a SHA-256 as the formats record it (64 lowercase hex digits), else ValueError naming
    `what`: a checksum also names files, so nothing else may pass."""
    if not SHA256_HEX.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not a lowercase hex SHA-256")
    return value
