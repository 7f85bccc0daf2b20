"""The scorer that runs inside Ray Data's actor pool for `evaluate-vae --workers N` (N > 1).

Each actor builds the model once from the weights the driver serialised (through Ray's object store) and,
where the evaluation has a Fréchet scorer, loads the dataset's cached feature classifier. It scores each
batch of shard rows with the code a one-process evaluation runs (`SplitPass`, `score_batches`) and returns
the batch's pass, pickled, with its reconstructions' Fréchet sums: the driver merges them as they arrive.
"""

from __future__ import annotations

import pickle

import pyarrow as pa
import torch

from vae_core.data.shards import RowBatch, table_to_u8
from vae_core.data.splits import sample_keys
from vae_core.evaluation.evaluate import SplitPass
from vae_core.evaluation.scores import score_batches
from vae_core.model.feature_net import FrechetScorer, load_feature_net
from vae_core.model.weights import model_from_bytes


class BatchScorer:
    """Ray Data callable class: a batch of (id, image, label) rows -> one row holding the batch's pass."""

    def __init__(self, weights: bytes, feature_net: str | None, k: int, seed: int, sample_rows: int,
                 threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.model = model_from_bytes(weights).eval()
        c, h, w = self.model.config.input_shape
        self.shape = (h, w, c)
        self.k, self.seed, self.sample_rows = k, seed, sample_rows
        self.frechet = FrechetScorer(load_feature_net(feature_net)[0]) if feature_net else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = RowBatch(*table_to_u8(batch, self.shape))
        part = SplitPass(self.model, self.k, self.seed, self.sample_rows)
        if self.frechet is not None:
            self.frechet.reset_fake()
        # A batch's noise is seeded by its first row's id: the same numbers whichever actor scores it.
        first = int(sample_keys(rows.ids[:1], self.seed)[0] * 2**31)
        for scores in score_batches(self.model, [rows.images], k=self.k, seed=self.seed, first_batch=first):
            part.add(rows, scores, self.frechet)
        sums = self.frechet.fake_sums() if self.frechet is not None else None
        return pa.table({"rows": [len(rows)], "part": [pickle.dumps((part, sums))]})
