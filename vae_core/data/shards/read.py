"""Reading a dataset version's rows: shard paths for streaming readers, one shard as an Arrow table, a whole
split as uint8 pixels, and Arrow image columns as pixels without a copy."""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vae_core.data.shards.dataset import DatasetInfo, damaged
from vae_core.data.shards.format import SPLITS, sha256_hex
from vae_core.data.shards.manifest import ShardInfo
from vae_core.storage import to_url


def _split_shards(info: DatasetInfo, split: str) -> list[ShardInfo]:
    """The manifest's shards of `split`, in row order (empty for an empty split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    s = info.manifest.splits.get(split)
    return s.shards if s else []


def shard_paths(info: DatasetInfo, split: str, urls: bool = False) -> list[str]:
    """Paths of the Parquet shards of `split` on `info.fs` (full URLs with `urls`), in row order."""
    paths = [posixpath.join(info.path, sh.path) for sh in _split_shards(info, split)]
    return [to_url(info.fs, p) for p in paths] if urls else paths


def read_shard_table(info: DatasetInfo, shard: ShardInfo, verify: bool = True) -> pa.Table:
    """One shard as an Arrow table; with verify, its SHA-256 must match the manifest."""
    try:
        data = info.fs.cat_file(posixpath.join(info.path, shard.path))
    except FileNotFoundError:
        raise FileNotFoundError(damaged(info, shard, "is missing")) from None
    if verify and sha256_hex(data) != shard.sha256:
        raise ValueError(damaged(info, shard, "does not match the manifest's checksum (corrupt or replaced)"))
    return pq.read_table(pa.BufferReader(data))


def images_u8(table: pa.Table, shape: tuple[int, int, int]) -> np.ndarray:
    """The `image` column of a shard table (or of any slice of one) as uint8 (N, H, W, C), without a copy.

    The array is read-only: it views Arrow's buffer.
    """
    n = table.num_rows
    col = table.column("image").combine_chunks()
    width = col.type.byte_width
    if width != int(np.prod(shape)):
        raise ValueError(f"image column holds {width} bytes per row, manifest shape {shape} needs {int(np.prod(shape))}")
    pixels = np.frombuffer(col.buffers()[1], dtype=np.uint8, count=n * width, offset=col.offset * width)
    return pixels.reshape(n, *shape)


def table_to_u8(table: pa.Table, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Shard table -> (images uint8 (N,H,W,C), labels int32 (N,) with -1 for null, ids)."""
    labels = table.column("label").fill_null(-1).to_numpy().astype(np.int32, copy=False)
    return images_u8(table, shape), labels, table.column("id").to_pylist()


def read_split_u8(info: DatasetInfo, split: str, verify: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Whole split in memory: images uint8 (N, H, W, C), labels int32 (N,) with -1 for "no label", ids.

    Rows come in shard order, which is the order ingestion wrote them (stable across reads).
    With verify (default), every shard's SHA-256 is checked against the manifest.
    """
    shards = _split_shards(info, split)
    n = sum(sh.rows for sh in shards)
    images = np.empty((n, *info.shape), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int32)
    ids: list[str] = []
    at = 0
    for sh in shards:
        x, y, i = table_to_u8(read_shard_table(info, sh, verify), info.shape)
        if len(i) != sh.rows:
            raise ValueError(damaged(info, sh, f"holds {len(i)} rows, the manifest {sh.rows}"))
        images[at : at + len(i)] = x
        labels[at : at + len(i)] = y
        ids.extend(i)
        at += len(i)
    return images, labels, ids
