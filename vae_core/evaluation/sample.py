"""A seeded sample of a stream of rows, of a fixed size however long the stream.

The parts of an evaluation whose cost grows faster than the split (the k-NN and linear probes, PCA and
t-SNE maps) and the pictures work on a sample; `SeededSample` keeps it while the split streams past. The
sample is the k rows with the smallest `vae_core.data.splits.sample_keys` (id, seed): the same rows
whatever the batch size, the order or the number of workers that read the split, and the same rows
`vae_core.data.shards.sample_split` picks from a dataset.
"""

from __future__ import annotations

import numpy as np

from vae_core.data.splits import sample_keys


class SeededSample:
    """The `size` rows with the smallest sample keys seen so far, and their columns."""

    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError(f"a sample needs at least 1 row, got size={size}")
        self.size, self.seed = size, seed
        self.seen = 0
        self._keys = np.empty(0)
        self._columns: dict[str, np.ndarray] = {}

    def add(self, ids: list[str], **columns: np.ndarray) -> None:
        """Offer rows: their ids and columns with one row per id (every call the same column names)."""
        self.seen += len(ids)
        self._offer(sample_keys(ids, self.seed), columns)

    def merge(self, other: SeededSample) -> None:
        """Offer the rows another sample (of another part of the split, same seed) kept."""
        if other.seed != self.seed:
            raise ValueError(f"cannot merge samples of seeds {other.seed} and {self.seed}")
        self.seen += other.seen
        if len(other):
            self._offer(other._keys, other._columns)

    def _offer(self, keys: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        keys = np.concatenate([self._keys, keys])
        joined = {name: np.concatenate([self._columns[name], col]) if name in self._columns else np.asarray(col)
                  for name, col in columns.items()}
        keep = np.arange(len(keys)) if len(keys) <= self.size else np.argpartition(keys, self.size - 1)[: self.size]
        keep = keep[np.argsort(keys[keep], kind="stable")]  # in key order: a seeded shuffle of the split
        self._keys = keys[keep]
        self._columns = {name: col[keep] for name, col in joined.items()}

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, name: str) -> np.ndarray:
        """A column of the sampled rows, in key order."""
        return self._columns[name]

    def describe(self, what: str) -> str:
        """"all 9,800 rows of <what>" or "a seeded sample of 20,000 of the 100,000 rows of <what>"."""
        if len(self) == self.seen:
            return f"all {self.seen:,} rows of {what}"
        return f"a seeded sample (seed {self.seed}) of {len(self):,} of the {self.seen:,} rows of {what}"
