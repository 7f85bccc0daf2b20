"""A seeded sample of a stream of rows, of a fixed size however long the stream.

The parts of an evaluation whose cost grows faster than the split (the k-NN and linear probes, PCA and
t-SNE maps) and the pictures work on a sample; `SeededSample` keeps it while the split streams past. The
sample is the k rows with the smallest `vae_core.data.splits.sample_keys` (id, seed): the same rows
whatever the batch size, the order or the number of workers that read the split, and the same rows
`vae_core.data.shards.sample_split` picks from a dataset.

Stratified by a column (the pictures' "label"), it takes the classes in turn instead: each class's
smallest key, then each class's second smallest, and so on, so a split stored one class after another
still shows every class. Each of the K classes seen keeps its ceil(size / K) smallest keys (a class with
fewer rows leaves its places empty), and beyond `size` classes the `size` with the smallest keys are shown.
"""

from __future__ import annotations

import math

import numpy as np

from vae_core.data.splits import sample_keys


def _rank_within(strata: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each row's place (0, 1, ...) by key among the rows of its stratum."""
    order = np.lexsort((keys, strata))  # by stratum, then key
    ordered = strata[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(order)]))  # where each sorted row's stratum begins
    rank = np.empty(len(keys), dtype=np.int64)
    rank[order] = np.arange(len(order)) - first
    return rank


class SeededSample:
    """The `size` rows with the smallest sample keys seen so far, and their columns; with `stratify`, the
    rows of each value of that column in turn (module docstring)."""

    def __init__(self, size: int, seed: int, stratify: str | None = None) -> None:
        if size < 1:
            raise ValueError(f"a sample needs at least 1 row, got size={size}")
        self.size, self.seed, self.stratify = size, seed, stratify
        self.seen = 0
        self._strata: set[int] = set()  # every value of the stratify column seen, kept or not
        self._keys = np.empty(0)
        self._columns: dict[str, np.ndarray] = {}

    def add(self, ids: list[str], **columns: np.ndarray) -> None:
        """Offer rows: their ids and columns with one row per id (every call the same column names)."""
        if self.stratify is not None and self.stratify not in columns:
            raise ValueError(f"a sample stratified by {self.stratify!r} needs that column, got {sorted(columns)}")
        self.seen += len(ids)
        self._offer(sample_keys(ids, self.seed), columns)

    def merge(self, other: SeededSample) -> None:
        """Offer the rows another sample (of another part of the split, same seed) kept."""
        if other.seed != self.seed:
            raise ValueError(f"cannot merge samples of seeds {other.seed} and {self.seed}")
        self.seen += other.seen
        self._strata |= other._strata
        if len(other._keys):
            self._offer(other._keys, other._columns)

    def _offer(self, keys: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        keys = np.concatenate([self._keys, keys])
        joined = {name: np.concatenate([self._columns[name], col]) if name in self._columns else np.asarray(col)
                  for name, col in columns.items()}
        strata = np.zeros(len(keys), dtype=np.int64) if self.stratify is None else joined[self.stratify]
        self._strata.update(np.unique(strata).tolist())
        # The quota only shrinks as classes appear, so a row it drops is never needed again, and the rows kept
        # are each class's smallest keys whatever the order or the parts the split was read in.
        quota = math.ceil(self.size / len(self._strata))
        rank = _rank_within(strata, keys)
        keep = np.flatnonzero(rank < quota)
        keep = keep[np.lexsort((keys[keep], rank[keep]))]  # the classes in turn, each in key order
        if quota == 1:  # more classes than places: the `size` classes whose smallest keys are smallest
            keep = keep[: self.size]
        self._keys = keys[keep]
        self._columns = {name: col[keep] for name, col in joined.items()}

    def __len__(self) -> int:
        return min(len(self._keys), self.size)

    def __getitem__(self, name: str) -> np.ndarray:
        """A column of the sampled rows, in key order (stratified: the classes in turn)."""
        return self._columns[name][: self.size]

    def describe(self, what: str) -> str:
        """"all 9,800 rows of <what>" or "a seeded sample of 20,000 of the 100,000 rows of <what>"."""
        if len(self) == self.seen:
            return f"all {self.seen:,} rows of {what}"
        by = "" if self.stratify is None else f", stratified by {self.stratify}"
        return f"a seeded sample (seed {self.seed}{by}) of {len(self):,} of the {self.seen:,} rows of {what}"


def stratified_rows(ids: list[str], labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Row numbers into `ids` of the seeded sample of `size` rows stratified by label (the classes in turn):
    the images a grid shows of a split held in memory, the same for the same seed."""
    sample = SeededSample(size, seed, stratify="label")
    sample.add(ids, row=np.arange(len(ids)), label=np.asarray(labels))
    return sample["row"]
