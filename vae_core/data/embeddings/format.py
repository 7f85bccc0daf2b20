"""The embeddings table: its Arrow schema, building one from latents and scores, restamping a reused one, and
latent columns as float32 matrices."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from vae_core.data.shards import SPLITS
from vae_core.names import check_name

#: The format of the files and manifest written now. 3 added the per-image scores (`SCORES`); files of an
#: earlier format are still read, never reused or completed.
FORMAT = 3
#: Per-image scores of format 3 on, float32 nats: the negative ELBO (null for an autoencoder, which has no
#: KL) and the reconstruction term -log p(x|z) of the same posterior sample.
SCORES = ("neg_elbo", "recon_error")


def embedding_schema(latent_dim: int, table_format: int = FORMAT) -> pa.Schema:
    """Arrow schema of one embeddings file of `table_format` whose latents have `latent_dim` = L dimensions."""
    if latent_dim < 1:
        raise ValueError(f"latent_dim must be positive, got {latent_dim}")
    vector = pa.list_(pa.float32(), latent_dim)
    scores = [pa.field("neg_elbo", pa.float32(), nullable=True),
              pa.field("recon_error", pa.float32(), nullable=False)] if table_format >= 3 else []
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("label", pa.int32(), nullable=True),
        pa.field("mean", vector, nullable=False),
        pa.field("logvar", vector, nullable=False),
        *scores,
        pa.field("model_name", pa.string(), nullable=False),
        pa.field("model_version", pa.int32(), nullable=False),
        pa.field("dataset_version", pa.string(), nullable=False),
    ])


def check_split(split: str) -> str:
    """`split` if it is one of the dataset splits, else ValueError listing them."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    return split


def check_model_version(model_version: int) -> int:
    """`model_version` as an int if it is a registry version (a positive whole number), else ValueError."""
    if isinstance(model_version, bool) or not isinstance(model_version, (int, np.integer)) or model_version < 1:
        raise ValueError(f"model version {model_version!r} is not a positive whole number")
    return int(model_version)


def vectors(x: np.ndarray) -> pa.FixedSizeListArray:
    """float (N, L) -> fixed_size_list<float32>[L]; a C-contiguous float32 buffer goes to Arrow without a copy."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), x.shape[1])


def _constant(value: Any, type_: pa.DataType, n: int) -> pa.Array:
    """`value` repeated `n` times, as one Arrow array (the stamps of a table's rows)."""
    return pa.repeat(pa.scalar(value, type_), n)


def build_table(ids: list[str], split: str, labels: np.ndarray, mean: np.ndarray, logvar: np.ndarray,
                model_name: str, model_version: int, dataset_version: str, *, neg_elbo: np.ndarray,
                recon_error: np.ndarray) -> pa.Table:
    """Latents and scores of one shard's rows -> Arrow table in `embedding_schema(L)`.

    ids: N strings; labels: int (N,) with -1 meaning "no label" (stored as null); mean, logvar:
    float (N, L), both finite; neg_elbo, recon_error: float (N,) nats, finite, except an autoencoder's
    neg_elbo (its logvar is -inf throughout), which is stored as null.
    """
    n = len(ids)
    # Cast first: a float64 beyond float32's range only becomes inf here.
    mean, logvar = np.asarray(mean, dtype=np.float32), np.asarray(logvar, dtype=np.float32)
    if mean.ndim != 2 or mean.shape[0] != n or mean.shape[1] < 1 or logvar.shape != mean.shape:
        raise ValueError(f"{n} ids need mean and logvar of shape ({n}, L), got {mean.shape} and {logvar.shape}")
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{n} ids but labels of shape {labels.shape}")
    # A NaN or inf latent means a broken model or input; stored, it would poison every downstream statistic.
    # The one exception is an autoencoder's logvar: -inf everywhere, its point mass's zero variance.
    point = logvar.size > 0 and bool(np.isneginf(logvar).all())
    for what, x in (("mean", mean),) + (() if point else (("logvar", logvar),)):
        if (bad := np.flatnonzero(~np.isfinite(x).all(axis=1))).size:
            raise ValueError(f"non-finite {what} for {bad.size} row(s), e.g. id {ids[bad[0]]!r}")
    neg_elbo, recon_error = _scores(ids, neg_elbo, recon_error, point)
    check_split(split)
    check_name(model_name, "model name")
    check_name(dataset_version, "dataset version")
    labels = labels.astype(np.int32, copy=False)
    columns = [
        pa.array(ids, pa.string()),
        _constant(split, pa.string(), n),
        pa.array(labels, type=pa.int32(), mask=labels < 0),
        vectors(mean),
        vectors(logvar),
        pa.array(neg_elbo, type=pa.float32(), mask=np.full(n, point)),
        pa.array(recon_error, type=pa.float32()),
        _constant(model_name, pa.string(), n),
        _constant(check_model_version(model_version), pa.int32(), n),
        _constant(dataset_version, pa.string(), n),
    ]
    return pa.Table.from_arrays(columns, schema=embedding_schema(mean.shape[1]))


def _scores(ids: list[str], neg_elbo: np.ndarray, recon_error: np.ndarray, point: bool
            ) -> tuple[np.ndarray, np.ndarray]:
    """The scores as float32 (N,), checked finite (an autoencoder's neg_elbo is not looked at: it has none)."""
    scores = {"neg_elbo": np.asarray(neg_elbo, dtype=np.float32), "recon_error": np.asarray(recon_error, np.float32)}
    for what, x in scores.items():
        if x.shape != (len(ids),):
            raise ValueError(f"{len(ids)} ids need {what} of shape ({len(ids)},), got {x.shape}")
        if (bad := np.flatnonzero(~np.isfinite(x))).size and not (point and what == "neg_elbo"):
            raise ValueError(f"non-finite {what} for {bad.size} row(s), e.g. id {ids[bad[0]]!r}")
    return scores["neg_elbo"], scores["recon_error"]


def restamp(table: pa.Table, split: str, dataset_version: str) -> pa.Table:
    """The same rows with `split` and `dataset_version` replaced: an encoding reused for another dataset
    version (same shard bytes, same model) needs no model work, only new stamps."""
    check_split(split)
    check_name(dataset_version, "dataset version")
    for name, value in (("split", split), ("dataset_version", dataset_version)):
        i = table.schema.get_field_index(name)
        if i < 0:
            raise ValueError(f"table has no {name!r} column; columns are {table.column_names}")
        table = table.set_column(i, table.schema.field(i), _constant(value, pa.string(), table.num_rows))
    return table


def matrix(table: pa.Table, column: str) -> np.ndarray:
    """A fixed_size_list<float32>[L] column as float32 (N, L), viewing Arrow's buffer where it is one chunk."""
    chunks = table.column(column)
    # combine_chunks copies even a single chunk, so that case takes the chunk itself.
    col = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()
    if not (pa.types.is_fixed_size_list(col.type) and col.type.value_type == pa.float32()):
        raise ValueError(f"column {column!r} is {col.type}, not fixed_size_list<float32>")
    if col.null_count:
        raise ValueError(f"column {column!r} has {col.null_count} null rows")
    # flatten() honours the array's offset (a slice of a table); `.values` would not.
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(col), col.type.list_size)


def latents(table: pa.Table) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Embeddings table -> (ids, mean float32 (N, L), logvar float32 (N, L)).

    The arrays are read-only views of Arrow's buffers when a column is one chunk (copies otherwise).
    """
    return table.column("id").to_pylist(), matrix(table, "mean"), matrix(table, "logvar")
