"""Embeddings files: one Parquet file per input shard, written whole or not at all, found again for reuse
(an identical shard encoded by the same model under another dataset version), and checked before reuse."""

from __future__ import annotations

import logging
import posixpath

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vae_core.data.embeddings.format import FORMAT, build_table, matrix, restamp
from vae_core.data.embeddings.identity import ModelIdentity
from vae_core.data.embeddings.manifest import EmbeddingManifest
from vae_core.data.shards import COMPRESSION, MANIFEST
from vae_core.names import NAME_RULE
from vae_core.storage import atomic_write_bytes, to_url

log = logging.getLogger(__name__)


def parquet_bytes(table: pa.Table) -> bytes:
    """One embeddings table as zstd Parquet bytes (a single row group below ~64 MiB of latents)."""
    row_bytes = 8 * max(1, table.schema.field("mean").type.list_size) + 8  # mean + logvar, scores: float32 each
    sink = pa.BufferOutputStream()
    # Dictionaries pay off only for the repeated stamps; the float vectors are all distinct.
    pq.write_table(table, sink, compression=COMPRESSION, row_group_size=max(1, (64 << 20) // row_bytes),
                   use_dictionary=["split", "label", "model_name", "model_version", "dataset_version"],
                   write_statistics=["id", "label"])
    return sink.getvalue().to_pybytes()


def write_file(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write `table` to `path` atomically: readers see the whole file or none."""
    atomic_write_bytes(fs, path, parquet_bytes(table))


def reusable_files(fs: fsspec.AbstractFileSystem, out_path: str, model: ModelIdentity) -> dict[str, str]:
    """{input shard sha256: path of its encoding} from the sibling folders of `out_path` whose manifest
    says they were encoded by exactly `model` (name, version and weights digest).

    `out_path` is a path on `fs` (as `resolve` gives it). Only files a finished sibling's manifest lists
    count: a folder without a manifest (an unfinished run), of another model or of an earlier format (no
    weights digest, or no scores) offers nothing. The caller still checks a file's rows (`check_rows`) before
    copying it. Where several siblings hold a shard, the first folder in sorted order wins.
    """
    out_path = out_path.rstrip("/")
    parent = posixpath.dirname(out_path)
    fs.invalidate_cache(parent)  # object stores cache listings; another run may have published since
    found: dict[str, str] = {}
    for path in sorted(fs.glob(posixpath.join(parent, "*", MANIFEST))):
        folder = posixpath.dirname(path)
        if folder == out_path or not NAME_RULE.fullmatch(posixpath.basename(folder)):
            continue
        try:
            manifest = EmbeddingManifest.model_validate_json(fs.cat_file(path))
        except (ValueError, OSError):
            continue  # not an embeddings folder (or unreadable): nothing to reuse from it
        if manifest.identity != model or manifest.format != FORMAT:
            continue
        for files in manifest.splits.values():
            for f in files:
                found.setdefault(f.source_sha256, posixpath.join(folder, f.path))
    return found


def check_rows(table: pa.Table, model: ModelIdentity, rows: int, where: str) -> None:
    """ValueError naming `where` unless `table` has `rows` rows, every one stamped with `model`'s name and
    version (the columns `model_name` and `model_version` are enough; others may be left out)."""
    if table.num_rows != rows:
        raise ValueError(f"{where}: {table.num_rows} rows, its input shard has {rows}")
    names = pc.unique(table.column("model_name")).to_pylist()
    versions = pc.unique(table.column("model_version")).to_pylist()
    if names != [model.name] or versions != [model.version]:
        raise ValueError(f"{where}: rows of model {names} version {versions}, not {model.name} v{model.version}")


def is_published(fs: fsspec.AbstractFileSystem, path: str, rows: int) -> bool:
    """A file is at `path` and holds `rows` rows (its footer says so; nothing else is read)."""
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows == rows
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return False


def can_reuse(fs: fsspec.AbstractFileSystem, path: str, model: ModelIdentity, rows: int) -> bool:
    """Whether another folder's file at `path` holds `rows` rows, all of `model` (its manifest said so; its
    rows must agree). Anything else is encoded again, not copied."""
    try:
        with fs.open(path, "rb") as f:
            stamps = pq.read_table(f, columns=["model_name", "model_version"])
        check_rows(stamps, model, rows, to_url(fs, path))
    except (OSError, ValueError, KeyError) as e:
        log.warning("not reusing %s (encoding its shard instead): %s", to_url(fs, path), e)
        return False
    return True


def reused(fs: fsspec.AbstractFileSystem, path: str, model: ModelIdentity, rows: int, split: str,
           dataset_version: str) -> pa.Table:
    """The rows of another dataset version's file at `path`, restamped with `split` and `dataset_version`;
    ValueError (from `check_rows`) unless they are still `rows` rows of `model`."""
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    check_rows(table, model, rows, to_url(fs, path))
    return restamp(table, split, dataset_version)


def in_order(rows: pa.Table, order: list[str], where: str) -> pa.Table:
    """`rows` sorted into the shard's id order `order`; RuntimeError naming `where` unless they hold every id
    of the shard exactly once."""
    ids = rows.column("id").to_pylist()
    position = {id_: i for i, id_ in enumerate(order)}
    if len(ids) != len(order) or len(set(ids)) != len(ids) or any(i not in position for i in ids):
        raise RuntimeError(f"{where}: the encoded rows are not the shard's ids, each once")
    return rows.take(np.argsort([position[i] for i in ids], kind="stable"))


def shard_table(rows: pa.Table, order: list[str], where: str, split: str, model: ModelIdentity,
                dataset_version: str) -> pa.Table:
    """One input shard's embeddings table, in the shard's id order `order`, from its latent rows in any order
    (columns id, label, mean, logvar, neg_elbo and recon_error, NaN for none; others are ignored), after
    checking every id is there once."""
    rows = in_order(rows, order, where)
    labels = rows.column("label").fill_null(-1).to_numpy().astype(np.int32)
    scores = {k: rows.column(k).to_numpy(zero_copy_only=False) for k in ("neg_elbo", "recon_error")}
    return build_table(rows.column("id").to_pylist(), split, labels, matrix(rows, "mean"), matrix(rows, "logvar"),
                       model.name, model.version, dataset_version, **scores)
