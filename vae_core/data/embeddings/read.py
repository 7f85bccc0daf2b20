"""Reading an embeddings folder through its manifest, and joining its rows with the dataset's images."""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vae_core.data.embeddings.format import check_split, embedding_schema
from vae_core.data.embeddings.manifest import read_manifest
from vae_core.data.shards import SPLITS, DatasetInfo, images_u8, read_shard_table
from vae_core.storage import resolve, to_url


def read_embeddings(url: str, splits: list[str] | None = None,
                    storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The rows of the files the manifest at `url` lists (of `splits`, default all), in manifest order.

    Every file must hold the rows the manifest says, in the manifest's schema (ValueError naming it).
    """
    manifest = read_manifest(url, storage_options)
    wanted = set(SPLITS if splits is None else [check_split(s) for s in splits])
    fs, base = resolve(url, storage_options)
    files = [f for split, fl in manifest.splits.items() if split in wanted for f in fl]
    schema = embedding_schema(manifest.latent_dim)
    paths = [posixpath.join(base, f.path) for f in files]
    try:  # one call for all files: object stores fetch them concurrently
        data = fs.cat(paths) if paths else {}
    except FileNotFoundError:
        missing = [to_url(fs, p) for p in paths if not fs.exists(p)]
        raise ValueError(f"{url}: files listed in the manifest are missing: {missing[:5]}") from None
    tables = []
    for f, path in zip(files, paths):
        table = pq.read_table(pa.BufferReader(data[path]))
        if table.num_rows != f.rows:
            raise ValueError(f"{to_url(fs, path)}: manifest says {f.rows} rows, file has {table.num_rows}")
        if not table.schema.equals(schema):
            raise ValueError(f"{to_url(fs, path)}: schema is not the embeddings schema with latent_dim "
                             f"{manifest.latent_dim}:\n{table.schema}")
        tables.append(table)
    return pa.concat_tables(tables) if tables else schema.empty_table()


def join_images(table: pa.Table, info: DatasetInfo, verify: bool = True) -> np.ndarray:
    """uint8 images (N, H, W, C) of the table's rows, in the table's order, from dataset version `info`.

    A row is matched by its split and id, reading only the shards of the splits present in the table,
    one at a time. Raises ValueError listing (up to 5) ids the dataset does not have.
    """
    ids = table.column("id").to_pylist()
    row_splits = table.column("split").to_pylist()
    if unknown := set(row_splits) - set(SPLITS):  # a split we cannot read could only end as "not found"
        raise ValueError(f"table has unknown split(s) {sorted(unknown)}; splits are {', '.join(SPLITS)}")
    first: dict[tuple[str, str], int] = {}  # (split, id) -> its first row in the table
    for i, key in enumerate(zip(row_splits, ids)):
        first.setdefault(key, i)
    out = np.empty((len(ids), *info.shape), dtype=np.uint8)
    filled = np.zeros(len(ids), dtype=bool)
    present = set(row_splits)
    for split in [s for s in SPLITS if s in present]:
        for shard in (info.manifest.splits[split].shards if split in info.manifest.splits else []):
            shard_table = read_shard_table(info, shard, verify)
            hits = [(r, first[(split, x)]) for r, x in enumerate(shard_table.column("id").to_pylist())
                    if (split, x) in first]
            if hits:
                rows, dest = (np.array(v, dtype=np.int64) for v in zip(*hits))
                out[dest] = images_u8(shard_table, info.shape)[rows]
                filled[dest] = True
    source = np.fromiter((first[k] for k in zip(row_splits, ids)), dtype=np.int64, count=len(ids))
    if missing := [ids[i] for i in np.flatnonzero(~filled[source])]:
        shown = list(dict.fromkeys(missing))
        raise ValueError(f"{len(shown)} id(s) not in dataset {info.name}@{info.version} under the split of their "
                         f"row: {shown[:5]}")
    repeated = source != np.arange(len(ids))
    out[repeated] = out[source[repeated]]  # rows whose (split, id) came earlier in the table
    return out
