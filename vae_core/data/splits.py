"""How items get their split.

An item keeps the source's own split (MNIST's train/t10k, folders named train/val/test, Parquet
files or a split column). Items without one are split by a hash of their id: test if
u < test_fraction, val if u < test_fraction + val_fraction, with u = hash(id) in [0, 1). When the
source has no val split of its own, val is carved from its train items the same way (u <
val_fraction). The split of an item therefore depends only on its id: adding items never moves old
ones between splits.
"""

from __future__ import annotations

import numpy as np

from vae_core.data.shards.format import SPLITS


def id_hash_unit(ids: list[str]) -> np.ndarray:
    """ids -> float64 (n,) in [0, 1), a fixed function of each id alone.

    h = FNV-1a (64-bit) over the id's Unicode code points, xor its length, then MurmurHash3's 64-bit
    finaliser for avalanche; u = (h >> 11) / 2**53. Vectorised over the batch (a per-id cryptographic
    hash costs more than everything else ingestion does to an MNIST image), and simple to recompute.
    Changing it would move items between splits. (An earlier version also ran the FNV loop over the
    zero padding up to the batch's longest id, so an id's split depended on its batch; fixing that
    gave every source whose ids differ in length a new dataset version, once.)
    """
    n = len(ids)
    if n == 0:
        return np.zeros(0)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=n)
    order = np.argsort(-lengths, kind="stable")  # longest first: the ids still running at column j are a prefix
    points = np.array(ids, dtype=str).view(np.uint32).reshape(n, -1)[order]  # zero-padded to the longest id
    running = np.searchsorted(-lengths[order], -np.arange(points.shape[1]), side="left")  # ids longer than j
    h = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    prime = np.uint64(0x100000001B3)
    for j, k in enumerate(running):
        h[:k] ^= points[:k, j]
        h[:k] *= prime
    h ^= lengths[order].astype(np.uint64)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    h ^= h >> np.uint64(33)
    u = np.empty(n)
    u[order] = (h >> np.uint64(11)).astype(np.float64) / 2.0**53
    return u


_SPLIT_CODE: dict[str | None, int] = {None: -1, **{s: i for i, s in enumerate(SPLITS)}}


def assign_splits(ids: list[str], source_splits: list[str | None] | None, val_fraction: float,
                  test_fraction: float, carve_val: bool) -> np.ndarray:
    """-> int8 (n,) split codes (index into SPLITS: 0 train, 1 val, 2 test). See the module docstring."""
    u = id_hash_unit(ids)
    hashed = np.where(u < test_fraction, 2, np.where(u < test_fraction + val_fraction, 1, 0)).astype(np.int8)
    if source_splits is None:
        return hashed
    own = np.fromiter(map(_SPLIT_CODE.__getitem__, source_splits), dtype=np.int8, count=len(source_splits))
    if carve_val:
        own = np.where((own == 0) & (u < val_fraction), 1, own).astype(np.int8)
    return np.where(own < 0, hashed, own).astype(np.int8)


def sample_keys(ids: list[str], seed: int) -> np.ndarray:
    """ids -> float64 (n,) in [0, 1): each row's place in the seeded sample of a split.

    A seeded sample of k rows is the k rows with the smallest keys. A key depends only on the id and the
    seed, so the sample is the same however the split is read (in one pass, in batches, in shards on
    several workers, in any order) and a sample of a larger k holds the smaller one.
    """
    return id_hash_unit([f"{seed}/{i}" for i in ids])
