"""The encoder that runs inside Ray Data's actor pool for `encode-dataset`.

Each actor builds the model once from the weights the driver downloaded (passed as bytes through Ray's
object store, so no actor pulls from the registry) and then turns Arrow batches of shard rows into
latents and outlier scores with `vae_core.model.encode.encode_and_score`, built on the same encoder the
registered model's `predict` calls.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from vae_core.data.embeddings import vectors
from vae_core.data.shards import images_u8
from vae_core.model.encode import encode_and_score
from vae_core.model.weights import model_from_bytes


class ShardEncoder:
    """Ray Data callable class: a batch of (path, id, image, label) rows -> (path, id, label, mean, logvar,
    neg_elbo, recon_error)."""

    def __init__(self, weights: bytes, threads: int, use_gpu: bool) -> None:
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = model_from_bytes(weights).to(self.device).eval()
        if use_gpu:  # convolutions read NHWC batches without a layout copy on the GPU
            self.model = self.model.to(memory_format=torch.channels_last)
        c, h, w = self.model.config.input_shape
        self.shape = (h, w, c)
        self.amp = use_gpu

    def __call__(self, batch: pa.Table) -> pa.Table:
        # images_u8 is a read-only view of Arrow's buffer; torch wants a writable array (one memcpy per batch).
        images = np.array(images_u8(batch, self.shape))
        out = encode_and_score(self.model, images, batch_size=max(1, len(images)), amp=self.amp)
        return pa.table({"path": batch.column("path"), "id": batch.column("id"), "label": batch.column("label"),
                         "mean": vectors(out.mean), "logvar": vectors(out.logvar),
                         "neg_elbo": pa.array(out.neg_elbo, pa.float32()),
                         "recon_error": pa.array(out.recon_error, pa.float32())})
