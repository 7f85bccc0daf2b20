"""A file list: a CSV, Parquet or text file naming image files (URLs or paths) with optional labels.

This is how a producer, or an S3 Inventory report, hands over 10^8 keys without anyone listing a bucket:
nothing is listed, the list is read as it streams.

    url,label                          # CSV: a header; the column of files is url, path, key or file
    s3://bucket/a/001.png,cat          #      labels are class names (text) or class indices (integers)
    images/002.png,dog                 # a relative path is relative to the list's own folder

A text file (``.txt``, ``.lst``) holds one file per line and no labels. A Parquet list has the same
columns as a CSV; give ``--format filelist`` for it (a Parquet file is otherwise a table of images).
The column of files and the label column may be named with ``image_column`` and ``label_column``.

Each entry is an item whose id is the entry as written; the same entry twice is one item and a repeat.
The list is the input: while it is unchanged, a re-run finds the version it made without reading the
files it names, so a producer that rewrites files in place also writes a new list.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from vae_core.data.sources.base import LABEL_MAX, Format, Source, SourceError, SourceOptions
from vae_core.data.sources.listing import Unit, UnitListing, write_listing
from vae_core.data.sources.remote import check_url, open_fs
from vae_core.storage import resolve, to_url

SUFFIXES = (".csv", ".tsv", ".txt", ".lst")
FILE_COLUMNS = ("url", "path", "key", "file", "filename")
LABEL_COLUMNS = ("label", "labels", "class", "target")
READ_BLOCK = 1 << 22  # bytes of text per streamed CSV block


@dataclass(frozen=True)
class FileListLister:
    """Reads the list as it streams into a listing table; one unit, no storage listing (picklable)."""

    url: str
    storage_options: dict[str, Any] | None
    file_column: str
    label_column: str | None
    names: tuple[str, ...] | None  # text labels, sorted: their index is the label
    units: tuple[Unit, ...]

    def list_unit(self, unit: Unit, out_url: str, out_options: dict | None) -> UnitListing:
        fs, path = open_fs(self.url, self.storage_options)
        base = posixpath.dirname(to_url(fs, path))
        index = {n: i for i, n in enumerate(self.names or ())}

        def batches() -> Iterator[pa.RecordBatch]:
            for batch in _read(fs, path, self.url, [self.file_column, *filter(None, [self.label_column])]):
                entries = batch.column(self.file_column).cast(pa.string())
                if entries.null_count:
                    raise SourceError(f"{self.url}: column {self.file_column!r} has empty entries")
                ids = entries.to_pylist()
                urls = [e if "://" in e or e.startswith("/") else posixpath.join(base, e) for e in ids]
                for u in {u.split("://", 1)[0] for u in urls if "://" in u}:  # each protocol once
                    check_url(f"{u}://", self.storage_options)
                yield pa.record_batch({
                    "path": [u.encode() for u in urls], "id": ids, "source": urls, "size": pa.nulls(len(ids), pa.int64()),
                    "label": self._labels(batch, index), "error": pa.nulls(len(ids), pa.string())})

        out_fs, out_path = resolve(out_url, out_options)
        rows = write_listing(out_fs, out_path, batches())
        return UnitListing(unit, out_url, rows, None, self.names)

    def _labels(self, batch: pa.RecordBatch, index: dict[str, int]) -> pa.Array:
        if self.label_column is None:
            return pa.nulls(len(batch), pa.int32())
        col = batch.column(self.label_column)
        if self.names is not None:
            return pa.array([index[v] if v else None for v in col.cast(pa.string()).to_pylist()], pa.int32())
        top = pc.max(col).as_py()
        if top is not None and top > LABEL_MAX:
            raise SourceError(f"{self.url}: label {top} is above the largest label {LABEL_MAX} (int32); store "
                              "class indices 0..K-1")
        return pc.if_else(pc.less(col, 0), pa.scalar(None, col.type), col).cast(pa.int32())


def _read(fs: Any, path: str, url: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The list's rows, streamed in batches (columns as named; a text file's one column is `url`)."""
    lower = path.lower()
    with fs.open(path, "rb") as f:
        if lower.endswith((".parquet", ".pq")) or _is_parquet(fs, path):
            yield from pq.ParquetFile(f).iter_batches(columns=columns, batch_size=1 << 16)
            return
        text = lower.endswith((".txt", ".lst"))
        read = pacsv.ReadOptions(block_size=READ_BLOCK, column_names=["url"] if text else None)
        parse = pacsv.ParseOptions(delimiter="\t" if lower.endswith(".tsv") else "," if not text else "\x1f")
        convert = pacsv.ConvertOptions(include_columns=columns, column_types={columns[0]: pa.string()})
        yield from pacsv.open_csv(f, read_options=read, parse_options=parse, convert_options=convert)


def _is_parquet(fs: Any, path: str) -> bool:
    with fs.open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def _schema(fs: Any, path: str) -> pa.Schema:
    lower = path.lower()
    if lower.endswith((".txt", ".lst")):
        return pa.schema([("url", pa.string())])
    if lower.endswith((".parquet", ".pq")) or _is_parquet(fs, path):
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).schema_arrow
    delimiter = "\t" if lower.endswith(".tsv") else ","
    with fs.open(path, "rb") as f:
        reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16),
                                parse_options=pacsv.ParseOptions(delimiter=delimiter))
        return reader.schema


def _pick(names: list[str], wanted: str | None, usual: tuple[str, ...], what: str, url: str) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise SourceError(f"{url}: no column {wanted!r} for the {what} (columns: {', '.join(names)})")
        return wanted
    return next((n for n in names if n.lower() in usual), None)


def open_filelist(url: str, options: SourceOptions = SourceOptions()) -> Source:
    """A list file URL -> Source whose files are the entries (checked: the columns, text labels' names)."""
    fs, path = open_fs(url, options.storage_options)
    if not fs.isfile(path):
        raise SourceError(f"{url}: source not found" if not fs.exists(path) else f"{url}: not a file")
    schema = _schema(fs, path)
    column = _pick(schema.names, options.image_column, FILE_COLUMNS, "files", url)
    if column is None:
        raise SourceError(f"{url}: no column of files (expected one of {', '.join(FILE_COLUMNS)}, or name it "
                          f"with image_column; columns: {', '.join(schema.names)})")
    label = _pick(schema.names, options.label_column, LABEL_COLUMNS, "labels", url)
    names = None
    if label is not None and not pa.types.is_integer(schema.field(label).type):
        seen: set[str] = set()  # one entry per class, not per item
        for batch in _read(fs, path, url, [label]):
            seen.update(v for v in pc.unique(batch.column(0).cast(pa.string())).to_pylist() if v)  # '': no label
        names = tuple(sorted(seen))
    lister = FileListLister(url, options.storage_options, column, label, names, (Unit(0, path, False),))
    return Source(kind="filelist", url=url, lister=lister, ids_unique=False,
                  label_names=list(names) if names else None,
                  details={"file_column": column, "label_column": label})


FORMAT = Format("filelist", open_filelist, suffixes=SUFFIXES)
