"""Reading a dataset version's rows: shard paths for streaming readers, one shard as an Arrow table, a split
streamed in batches (`iter_split`), a seeded sample of it (`sample_split`), a whole split as uint8 pixels, and
Arrow image columns as pixels without a copy."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

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
        rows = _shard_rows(info, sh, verify)
        images[at : at + len(rows)] = rows.images
        labels[at : at + len(rows)] = rows.labels
        ids.extend(rows.ids)
        at += len(rows)
    return images, labels, ids


@dataclass
class RowBatch:
    """Rows of a split: images uint8 (B, H, W, C), labels int32 (B,) with -1 for "no label", ids (B,)."""

    images: np.ndarray
    labels: np.ndarray
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def concat(batches: list[RowBatch], shape: tuple[int, int, int]) -> RowBatch:
        if not batches:
            return RowBatch(np.empty((0, *shape), np.uint8), np.empty(0, np.int32), [])
        return RowBatch(np.concatenate([b.images for b in batches]), np.concatenate([b.labels for b in batches]),
                        [i for b in batches for i in b.ids])


def _shard_rows(info: DatasetInfo, shard: ShardInfo, verify: bool) -> RowBatch:
    rows = RowBatch(*table_to_u8(read_shard_table(info, shard, verify), info.shape))
    if len(rows) != shard.rows:
        raise ValueError(damaged(info, shard, f"holds {len(rows)} rows, the manifest {shard.rows}"))
    return rows


def iter_split(info: DatasetInfo, split: str, batch_size: int, limit: int | None = None,
               verify: bool = True) -> Iterator[RowBatch]:
    """The split's rows in `read_split_u8`'s order, in batches of exactly `batch_size` (the last may be shorter),
    the first `limit` rows only when given. One shard and one batch are in memory at a time, so a split of any
    size streams in bounded memory; the batches are the ones slicing the whole split would give, so seeded
    per-batch work scores the same either way."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    left = sum(sh.rows for sh in _split_shards(info, split)) if limit is None else limit
    pending: list[RowBatch] = []
    held = 0
    for shard in _split_shards(info, split):
        if left <= 0:
            break
        rows = _shard_rows(info, shard, verify)
        rows = RowBatch(rows.images[:left], rows.labels[:left], rows.ids[:left])
        left -= len(rows)
        at = 0
        while at < len(rows):
            take = min(batch_size - held, len(rows) - at)
            pending.append(RowBatch(rows.images[at : at + take], rows.labels[at : at + take], rows.ids[at : at + take]))
            held, at = held + take, at + take
            if held == batch_size:
                yield RowBatch.concat(pending, info.shape)
                pending, held = [], 0
    if pending:
        yield RowBatch.concat(pending, info.shape)


def sample_split(info: DatasetInfo, split: str, rows: int, seed: int, verify: bool = True) -> RowBatch:
    """A seeded sample of `rows` rows of the split (the whole split when it is no larger), in split order.

    The sample is the rows with the smallest `sample_keys` (id, seed). Two passes keep memory bounded by
    the sample: the first reads only the id column to find the cut, the second reads the chosen rows.
    """
    from vae_core.data.splits import sample_keys  # late: splits imports this package's format

    shards = _split_shards(info, split)
    if rows >= sum(sh.rows for sh in shards):
        return RowBatch.concat([_shard_rows(info, sh, verify) for sh in shards], info.shape)
    smallest = np.empty(0)  # the `rows` smallest keys so far
    for sh in shards:
        with info.fs.open(posixpath.join(info.path, sh.path), "rb") as f:
            ids = pq.read_table(f, columns=["id"]).column("id").to_pylist()
        smallest = np.concatenate([smallest, sample_keys(ids, seed)])
        if len(smallest) > rows:
            smallest = np.partition(smallest, rows - 1)[:rows]
    cut = smallest.max()
    chosen = []
    for sh in shards:
        batch = _shard_rows(info, sh, verify)
        keep = np.flatnonzero(sample_keys(batch.ids, seed) <= cut)
        chosen.append(RowBatch(batch.images[keep], batch.labels[keep], [batch.ids[i] for i in keep]))
    return RowBatch.concat(chosen, info.shape)
