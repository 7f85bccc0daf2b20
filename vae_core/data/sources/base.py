"""What every image source hands to ingestion: batches of items, plus a description of the source.

A source is read in batches so that memory stays bounded however large it is. Items come either
already decoded (IDX, NumPy, built-ins: `RawBatch.pixels`) or as encoded file bytes that ingestion
decodes in its tasks (folders, file lists, Parquet: `RawBatch.encoded`).

Each source module declares its `Format` (name, how detection recognises it, how it opens); the
registry in `vae_core.data.sources.formats` lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from vae_core.data.sources.limits import SourceLimits

# Names a source may use for its own splits, mapped to the dataset's split names.
SPLIT_ALIASES: dict[str, str] = {
    **dict.fromkeys(("train", "training"), "train"),
    **dict.fromkeys(("val", "valid", "validation", "dev"), "val"),
    **dict.fromkeys(("test", "testing", "t10k"), "test"),
}


class SourceError(ValueError):
    """The source as a whole is unusable (missing, empty, wrong format, inconsistent).

    The message names the file or value at fault. Raised before any expensive work.
    """


class LocalFile(NamedTuple):
    """An encoded image still on local disk: the decoding process reads it itself, which spares the
    parent reading every file and piping its bytes to a worker."""

    path: str


@dataclass
class RawBatch:
    """A batch of n items in source order.

    ids: n unique, stable ids; sources: n locations (file, or file#index);
    labels: int32 (n,), -1 where there is none; splits: the source's own split per item
    ("train"/"val"/"test"), or None when the source has no splits of its own.
    Exactly one of pixels (uint8 (n, H, W, C)) and encoded (n file contents, or `LocalFile`s the
    decoder reads itself) is set.
    errors: per item, a problem found before decoding (e.g. unreadable file), else None.
    """

    ids: list[str]
    sources: list[str]
    labels: np.ndarray
    splits: list[str | None] | None = None
    pixels: np.ndarray | None = None
    encoded: list[Any] | None = None  # bytes, or a LocalFile for the decoder to read
    errors: list[str | None] | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if (self.pixels is None) == (self.encoded is None):
            raise ValueError("a RawBatch holds either pixels or encoded bytes")
        # Every field holds one entry per item; an optional one may be None.
        bad = {k: len(v) for k, v in vars(self).items() if v is not None and len(v) != n}
        if bad:
            raise ValueError(f"RawBatch of {n} ids has mismatched lengths {bad}")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def concat(cls, batches: list["RawBatch"]) -> "RawBatch":
        """The items of `batches`, one after another (they hold the same fields)."""
        first = batches[0]
        out: dict[str, Any] = {}
        for k, v in vars(first).items():
            parts = [getattr(b, k) for b in batches]
            out[k] = None if v is None else np.concatenate(parts) if isinstance(v, np.ndarray) else \
                [x for p in parts for x in p]
        return cls(**out)

    def take(self, at: np.ndarray) -> "RawBatch":
        """The items at positions `at` (int array), in that order (every field is per item)."""
        pick = at.tolist()
        return RawBatch(**{k: v if v is None else v[at] if isinstance(v, np.ndarray) else [v[i] for i in pick]
                           for k, v in vars(self).items()})


@dataclass
class Source:
    """An opened, validated source.

    batches() yields every item exactly once, in a deterministic order; a source of many files has a
    `lister` instead (its files are listed and read in parts by tasks: `vae_core.data.sources.listing`).
    size is the item count when known up front (for progress bars).
    splits: the dataset splits the source has of its own (empty when it has none).
    ids_unique: whether the source guarantees unique ids (else ingestion checks them).
    fingerprint: a digest of what the source reads, taken before reading it (file paths, sizes and
    modification stamps; see `detect.source_fingerprint`), so that a re-run can tell unchanged input
    without decoding it; None when unknown.
    """

    kind: str
    url: str
    batches: Callable[[], Iterator[RawBatch]] | None = None
    lister: Any = None  # sources of many files: a lister (`listing.Unit`s and how to list one) instead of batches
    parts: Callable[[], list[Any]] | None = None  # parts that tasks read on their own (each has `read()`), if any
    size: int | None = None
    label_names: list[str] | None = None
    splits: tuple[str, ...] = ()
    ids_unique: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None


class SourceOptions(NamedTuple):
    """What opening a source takes besides its URL (every opener gets all of it and reads what it needs)."""

    storage_options: dict | None = None
    image_column: str | None = None
    label_column: str | None = None
    limits: SourceLimits = SourceLimits()


@dataclass(frozen=True)
class Format:
    """One source format as detection and opening see it.

    name: the request's `format` value and `Source.kind`.
    open: (url, options) -> an opened, validated Source.
    prefix: a URL starting with it is this format, without looking at any storage (``builtin:``); such a
    source lists no files, so its URL is its fingerprint.
    suffixes: a single file whose lower-cased name ends with one of them is this format.
    file_name: a single file whose lower-cased name it accepts is this format (when no suffix decides);
    file_hint: what the error for an unknown file calls such a file.
    folder: a folder whose files (recursive, hidden ones left out) it accepts is this format.
    any_folder: a folder that no format's `folder` accepts is this format.
    reads_siblings: a single file is read with the files beside it (its fingerprint lists them too).
    listed: the source's fingerprint comes from listing its files (`Source.lister`), not from opening it.
    """

    name: str
    open: Callable[[str, SourceOptions], Source]
    prefix: str | None = None
    suffixes: tuple[str, ...] = ()
    file_name: Callable[[str], bool] | None = None
    file_hint: str = ""
    folder: Callable[[list[str]], bool] | None = None
    any_folder: bool = False
    reads_siblings: bool = False
    listed: bool = False


LABEL_MAX = 2**31 - 1  # labels are int32 in the dataset


def int32_labels(values: np.ndarray, where: str) -> np.ndarray:
    """Integer labels of any width -> int32 (n,), -1 for negative ("no label"). A label above LABEL_MAX is a
    SourceError naming it and `where`: a narrowing cast would wrap it into another class without a word."""
    if values.size and values.max() > LABEL_MAX:
        raise SourceError(f"{where}: label {int(values.max())} is above the largest label {LABEL_MAX} (int32); "
                          "store class indices 0..K-1 (and their names as label_names)")
    return np.where(values < 0, -1, values).astype(np.int32)


def printable(name: str) -> str:
    """A file name as text that encodes: the bytes `os` could not decode (held as lone surrogates,
    U+DC80..U+DCFF) become ``%XX``, so the name stays distinct and can be written to Parquet and JSON."""
    if not any("\udc80" <= c <= "\udcff" for c in name):
        return name
    return "".join(f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else c for c in name)


def split_from_name(name: str) -> str | None:
    """'train' / 'validation' / 't10k' ... -> dataset split name, else None."""
    return SPLIT_ALIASES.get(name.lower())
