"""Reading an embeddings folder through its manifest, joining its rows with the dataset's images, and the
images a model finds least like its training data (`outliers`)."""

from __future__ import annotations

import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vae_core.data.embeddings.format import FORMAT, SCORES, check_split, embedding_schema
from vae_core.data.embeddings.manifest import read_manifest
from vae_core.data.shards import SPLITS, DatasetInfo, images_u8, read_shard_table
from vae_core.storage import resolve, to_url


def read_embeddings(url: str, splits: list[str] | None = None,
                    storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The rows of the files the manifest at `url` lists (of `splits`, default all), in manifest order.

    Every file must hold the rows the manifest says, in the schema of the manifest's format (ValueError naming
    it): an output of format 1 or 2 reads without the `SCORES` columns.
    """
    manifest = read_manifest(url, storage_options)
    wanted = set(SPLITS if splits is None else [check_split(s) for s in splits])
    fs, base = resolve(url, storage_options)
    files = [f for split, fl in manifest.splits.items() if split in wanted for f in fl]
    schema = embedding_schema(manifest.latent_dim, manifest.format)
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
            raise ValueError(f"{to_url(fs, path)}: schema is not the format {manifest.format} embeddings schema "
                             f"with latent_dim {manifest.latent_dim}:\n{table.schema}")
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


def outliers(table: pa.Table, info: DatasetInfo, n: int = 16, by: str = "neg_elbo"
             ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The `n` rows of `table` scoring highest on `by` (``neg_elbo`` or ``recon_error``, nats per image:
    higher is less like the model's training data), highest first, ties by id; with their images from
    dataset version `info` (`join_images`).

    Returns (ids, scores float32 (n,), images uint8 (n, H, W, C)); fewer than `n` when the table has fewer
    scored rows. Rows whose score is null (an autoencoder's neg_elbo) are left out. ValueError, before any
    image is read, for `n` below 1, another `by`, a table written before the scores existed, or a table
    with no scored row.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if by not in SCORES:
        raise ValueError(f"by must be one of {', '.join(SCORES)}, got {by!r}")
    if by not in table.column_names:
        raise ValueError(f"the embeddings have no {by!r} column: they were written before format {FORMAT}; "
                         "encode them again (vae encode) to score every image")
    scored = table.filter(pc.is_valid(table.column(by)))
    if table.num_rows and not scored.num_rows:
        raise ValueError(f"no row has a {by} (an autoencoder's rows have no ELBO): rank by recon_error instead")
    order = pc.sort_indices(scored, sort_keys=[(by, "descending"), ("id", "ascending")])
    top = scored.take(order[:n])
    scores = top.column(by).to_numpy(zero_copy_only=False).astype(np.float32)
    return top.column("id").to_pylist(), scores, join_images(top, info)
