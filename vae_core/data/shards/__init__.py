"""The dataset shard format: Arrow schema, manifest, and the reader API other stages use.

Layout (any fsspec URL as the root)::

    <data_root>/<name>/<version>/manifest.json
    <data_root>/<name>/<version>/train/<sha256>.parquet     (each shard named by its checksum)
    <data_root>/<name>/<version>/val/<sha256>.parquet
    <data_root>/<name>/<version>/test/<sha256>.parquet
    <data_root>/<name>/<version>/quarantine.parquet         (only when the lists are too long for the manifest)

One row per image (see `shard_schema`): ``id`` string, ``image`` fixed_size_binary[H*W*C] holding raw
uint8 pixels in HWC order, ``label`` int32 (null where the source has none), ``source`` string.
Shards are zstd-compressed Parquet; versions written before shards were named by checksum have
``part-00000.parquet`` names, which read the same. ``manifest.json`` is written last, so a version folder without a
manifest is an unfinished write and every reader ignores it.

Reader API (what training and encoding build on)::

    info = open_dataset("s3://bucket/datasets", "mnist")          # latest version
    images, labels, ids = read_split_u8(info, "train")            # (N,H,W,C) uint8, (N,) int32, list[str]
    for rows in iter_split(info, "test", batch_size=500): ...      # RowBatch: the same rows, bounded memory
    sample = sample_split(info, "train", rows=20_000, seed=0)      # a seeded sample, bounded memory
    urls = shard_paths(info, "val", urls=True)                     # full URLs, in row order
    info.shape, info.counts, info.manifest.label_names              # (H, W, C), rows per split, ...

`labels` uses -1 where a row has no label. A streaming reader (Ray Data in `train-vae`) reads
`shard_paths(info, split)` through `arrow_filesystem(info.fs)` and turns each batch into pixels with
`images_u8`.

Modules: `format` (names, schema, writer options, checksums), `manifest` (the manifest's models and
loading), `dataset` (finding and opening a version, its integrity checks, `fit_model`), `read` (rows and
pixels). Atomic writes and URL helpers are `vae_core.storage`'s.
"""

from vae_core.data.shards.dataset import (DatasetInfo, check_shard_files, check_shard_schema, dataset_dir, fit_model,
                                          list_versions, open_dataset)
from vae_core.data.shards.format import (COMPRESSION, FORMAT, MANIFEST, SHA256_HEX, SHARD_PATH, SPLITS, build_table,
                                         check_sha256, row_group_rows, sha256_hex, shard_schema, writer_options)
from vae_core.data.shards.manifest import (DuplicateEntry, ItemCounts, Manifest, QuarantineEntry, ShardInfo,
                                           SourceDescription, SplitInfo, load_manifest, read_manifest)
from vae_core.data.shards.read import (RowBatch, images_u8, iter_split, read_shard_table, read_split_u8, sample_split,
                                      shard_paths, table_to_u8)

__all__ = [
    "COMPRESSION", "FORMAT", "MANIFEST", "SHA256_HEX", "SHARD_PATH", "SPLITS", "DatasetInfo", "DuplicateEntry",
    "ItemCounts", "Manifest", "RowBatch", "iter_split", "sample_split", "QuarantineEntry", "ShardInfo", "SourceDescription", "SplitInfo", "build_table",
    "check_sha256", "check_shard_files", "check_shard_schema", "dataset_dir", "fit_model", "images_u8",
    "list_versions", "load_manifest", "open_dataset", "read_manifest", "read_shard_table", "read_split_u8",
    "row_group_rows", "sha256_hex", "shard_paths", "shard_schema", "table_to_u8", "writer_options",
]
