"""The embeddings format: one Parquet file of VAE latents per dataset shard, and its manifest.

Layout (any fsspec URL as the root)::

    <root>/<model name>/<model version>/<dataset>/<dataset version>/manifest.json
    <root>/<model name>/<model version>/<dataset>/<dataset version>/<split>/<file_name(shard sha256, model)>

One row per image (see `embedding_schema`): ``id``, ``split``, ``label`` (null where the dataset has
none), the posterior ``mean`` and ``logvar`` as fixed_size_list<float32>[L], the outlier scores
``neg_elbo`` and ``recon_error`` (float32 nats; format 3 on), and the model and dataset version that
produced them. A file is named after the checksum of the input shard and the model that
encoded it (`ModelIdentity`: registered name, version and the SHA-256 of its weights), so a shard whose
bytes did not change between two dataset versions keeps its encoding: `reusable_files` finds it through
the manifests of sibling folders encoded by the same model, and `restamp` only rewrites the split and
dataset version. ``manifest.json`` is written last; readers go through it (`read_embeddings`), never
through a folder listing. `check_output_location` keeps an output folder away from the datasets.

    table = read_embeddings("s3://b/embeddings/vae-mnist/3/mnist/3f2a", splits=["test"])
    ids, mean, logvar = latents(table)                 # list[str], float32 (N, L), float32 (N, L)
    images = join_images(table, open_dataset(data_root, "mnist", "3f2a"))   # uint8 (N, H, W, C)
    ids, scores, images = outliers(table, open_dataset(data_root, "mnist", "3f2a"), n=16)  # highest neg_elbo

Modules: `format` (the table), `identity` (model identity, file names, folders), `manifest`, `files`
(writing, reuse, a shard's table from its latents), `read`.
"""

from vae_core.data.embeddings.files import (can_reuse, check_rows, in_order, is_published, parquet_bytes,
                                            reusable_files, reused, shard_table, write_file)
from vae_core.data.embeddings.format import (FORMAT, SCORES, build_table, check_model_version, check_split,
                                             embedding_schema, latents, matrix, restamp, vectors)
from vae_core.data.embeddings.identity import ModelIdentity, default_dir, file_name, legacy_file_name
from vae_core.data.embeddings.manifest import (EmbeddingFile, EmbeddingManifest, read_manifest, with_earlier_splits,
                                               write_manifest)
from vae_core.data.embeddings.read import join_images, outliers, read_embeddings

__all__ = [
    "FORMAT", "SCORES", "EmbeddingFile", "EmbeddingManifest", "ModelIdentity", "build_table", "can_reuse",
    "check_model_version", "check_rows", "check_split", "default_dir", "embedding_schema", "file_name", "in_order",
    "is_published", "join_images", "latents", "legacy_file_name", "matrix", "outliers", "parquet_bytes",
    "read_embeddings", "read_manifest", "restamp", "reusable_files", "reused", "shard_table", "vectors",
    "with_earlier_splits", "write_file", "write_manifest",
]
