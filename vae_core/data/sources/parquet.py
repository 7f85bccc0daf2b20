"""A Parquet table (one file or a folder of files) with a column of encoded image bytes.

Recognised layouts, as image datasets are commonly exported:

- an ``image`` struct ``{bytes: binary, path: string}`` (Hugging Face datasets' Image feature);
- a plain binary column of encoded files (PNG, JPEG, ...).

The image column is ``image_column`` if given, else one named image/img/picture, else the only
column of those types. Labels come from ``label_column`` or a column named label/labels/class/target:
integers are used as they are (names from Hugging Face ClassLabel metadata when present), strings
are mapped to the index of their sorted unique values. Splits come from a ``split`` column, else
from the file path (``data/train-00000-of-00001.parquet`` or ``test/part-0.parquet``). Ids come from
an ``id`` column, else ``<file>#<row>``.

Every file must give the columns used the same types. Integer labels must fit int32 (checked in one pass
over the label column before anything is decoded). Limits: a row group whose columns used inflate beyond
max_archive_mb fails the source (checked from the footers); an image cell above max_file_mb is quarantined.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vae_core.data.sources.base import (Format, RawBatch, Source, SourceError, SourceOptions, int32_labels, printable,
                                        split_from_name)
from vae_core.data.sources.limits import SourceLimits
from vae_core.data.sources.remote import open_fs
from vae_core.storage import to_url

BATCH = 512
SUFFIXES = (".parquet", ".pq")
IMAGE_NAMES = ("image", "img", "picture", "png", "jpg", "jpeg")
LABEL_NAMES = ("label", "labels", "class", "target")


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _is_image_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type)


def _pick_image_column(schema: pa.Schema, wanted: str | None, url: str) -> str:
    if wanted is not None:
        if wanted not in schema.names:
            raise SourceError(f"{url}: no column {wanted!r} (columns: {', '.join(schema.names)})")
        t = schema.field(wanted).type
        if not (_is_binary(t) or _is_image_struct(t)):
            raise SourceError(f"{url}: column {wanted!r} is {t}, not image bytes (binary or struct<bytes, path>)")
        return wanted
    candidates = [f.name for f in schema if _is_binary(f.type) or _is_image_struct(f.type)]
    if named := [c for c in candidates if c.lower() in IMAGE_NAMES]:
        return named[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise SourceError(f"{url}: no image-bytes column (binary or struct<bytes, path>) among {', '.join(schema.names)}")
    raise SourceError(f"{url}: several binary columns ({', '.join(candidates)}); name one with --image-column")


def _pick_label_column(schema: pa.Schema, wanted: str | None, url: str) -> str | None:
    if wanted is not None and wanted not in schema.names:
        raise SourceError(f"{url}: no label column {wanted!r} (columns: {', '.join(schema.names)})")
    name = wanted if wanted is not None else next((n for n in schema.names if n.lower() in LABEL_NAMES), None)
    if name is None:
        return None
    t = schema.field(name).type
    if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
            or pa.types.is_dictionary(t)):
        raise SourceError(f"{url}: label column {name!r} is {t}; expected integers or strings")
    return name


def _class_label_names(schema: pa.Schema, column: str) -> list[str] | None:
    """Names from Hugging Face datasets' ClassLabel metadata, if the export carries it."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][column]
        names = feature.get("names")
        return [str(n) for n in names] if names else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _split_of_path(rel: str) -> str | None:
    """The first split name among the path's words (``data/train-00000-of-00001.parquet`` -> train)."""
    return next(filter(None, map(split_from_name, re.split(r"[/_.\-]", rel))), None)


def _open_files(fs: fsspec.AbstractFileSystem, files: list[str]) -> list[tuple[str, pq.ParquetFile]]:
    opened = []
    for f in files:
        try:
            opened.append((f, pq.ParquetFile(fs.open(f, "rb"))))
        except Exception as e:  # ArrowInvalid on a corrupt footer, OSError on a truncated file
            raise SourceError(f"{to_url(fs, f)}: not a readable Parquet file ({e})") from None
    return opened


def _check_same_types(fs: fsspec.AbstractFileSystem, opened: list[tuple[str, pq.ParquetFile]],
                      columns: list[str]) -> None:
    """SourceError naming the file whose `columns` differ in type from the first file's."""
    first, schema = opened[0][0], opened[0][1].schema_arrow
    for f, pf in opened[1:]:
        for c in columns:
            if (t := pf.schema_arrow.field(c).type) != (t0 := schema.field(c).type):
                raise SourceError(f"{to_url(fs, f)}: column '{c}' is {t} but {to_url(fs, first)} has {t0}; "
                                  "give the column one type in every file")


def _check_row_groups(fs: fsspec.AbstractFileSystem, opened: list[tuple[str, pq.ParquetFile]], columns: list[str],
                      limits: SourceLimits) -> None:
    """SourceError naming the file and row group whose `columns` inflate beyond max_archive_mb (footer sizes)."""
    for f, pf in opened:
        for k in range(pf.num_row_groups):
            rg = pf.metadata.row_group(k)
            size = sum(rg.column(j).total_uncompressed_size for j in range(rg.num_columns)
                       if rg.column(j).path_in_schema.split(".")[0] in columns)
            if problem := limits.archive_problem(size, f"row group {k} ({rg.num_rows} rows)"):
                raise SourceError(f"{to_url(fs, f)}: {problem}")


def _check_int_labels(fs: fsspec.AbstractFileSystem, opened: list[tuple[str, pq.ParquetFile]], column: str) -> None:
    """SourceError naming a label above int32's range (one pass over the label column, nothing decoded)."""
    for f, pf in opened:
        for col in _readable_row_groups(pf, column):
            if len(col) and (top := pc.max(col).as_py()) is not None:
                int32_labels(np.array([top]), to_url(fs, f))


def open_parquet(url: str, options: SourceOptions = SourceOptions()) -> Source:
    """Parquet file or folder URL -> Source. Schemas, columns, labels and row-group sizes are checked here."""
    fs, path = open_fs(url, options.storage_options)
    limits = options.limits
    if not fs.exists(path):
        raise SourceError(f"{url}: not found")
    if fs.isdir(path):
        all_files = sorted(fs.find(path))
        files = [f for f in all_files if f.endswith(SUFFIXES)]
        root = path
    else:
        all_files, files, root = [path], [path], posixpath.dirname(path)
    if not files:
        raise SourceError(f"{url}: empty source (no .parquet files)")
    opened = _open_files(fs, files)
    schema = opened[0][1].schema_arrow
    img_col = _pick_image_column(schema, options.image_column, to_url(fs, files[0]))
    lab_col = _pick_label_column(schema, options.label_column, to_url(fs, files[0]))
    for f, pf in opened[1:]:
        if pf.schema_arrow.names != schema.names:
            raise SourceError(f"{to_url(fs, f)}: columns {pf.schema_arrow.names} differ from "
                              f"{to_url(fs, files[0])}'s {schema.names}")
    id_col = "id" if "id" in schema.names else None
    split_col = "split" if "split" in schema.names else None
    columns = [c for c in (img_col, lab_col, id_col, split_col) if c]
    _check_same_types(fs, opened, columns)
    _check_row_groups(fs, opened, columns, limits)
    names, string_index = _label_names(opened, schema, lab_col)
    if lab_col and string_index is None:
        _check_int_labels(fs, opened, lab_col)
    rows = sum(pf.metadata.num_rows for _, pf in opened)
    if rows == 0:
        raise SourceError(f"{url}: empty source (0 rows)")

    reader = _Reader(url, options.storage_options, root, img_col, lab_col, id_col, split_col, string_index, limits)

    def batches() -> Iterator[RawBatch]:
        for f, pf in opened:
            row = 0
            for k in range(pf.num_row_groups):
                yield from reader.row_group(pf, f, k, row)
                row += pf.metadata.row_group(k).num_rows

    def parts() -> list[RowGroupPart]:
        """One part per row group, for tasks to read on their own (ids `<file>#<row>` are unique by file)."""
        out, start = [], 0
        for i, (f, pf) in enumerate(opened):
            row = 0
            for k in range(pf.num_row_groups):
                n = pf.metadata.row_group(k).num_rows
                out.append(RowGroupPart(f"p{i:05d}-{k:05d}", start, n, reader, f, k, row))
                start, row = start + n, row + n
        return out

    ids_unique = id_col is None and _distinct_names(files, root)
    return Source(
        kind="parquet", url=url, batches=batches, size=rows, label_names=names, ids_unique=ids_unique,
        # A folder of files whose ids cannot repeat is read by tasks, row group by row group.
        parts=parts if ids_unique and len(files) > 1 else None,
        splits=_source_splits(opened, root, split_col),
        details={"files": len(files), "ignored_files": len(all_files) - len(files), "image_column": img_col,
                 "label_column": lab_col},
    )


@dataclass(frozen=True)
class _Reader:
    """How rows of this source's files become items (picklable: tasks read row groups with it)."""

    url: str
    storage_options: dict | None
    root: str
    img_col: str
    lab_col: str | None
    id_col: str | None
    split_col: str | None
    string_index: dict[str, int] | None
    limits: SourceLimits

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.img_col, self.lab_col, self.id_col, self.split_col) if c]

    def row_group(self, pf: pq.ParquetFile, f: str, k: int, row: int) -> Iterator[RawBatch]:
        """Row group `k` of file `f` (its first row is the file's row `row`) as batches of items. A corrupt page
        behind a valid footer costs the rows of its row group (quarantined, the file and group named), not the run."""
        fs, _ = open_fs(self.url, self.storage_options)
        rel, full = printable(posixpath.relpath(f, self.root)), printable(to_url(fs, f))
        try:
            table = pf.read_row_group(k, columns=self.columns)
        except (OSError, pa.ArrowException) as e:
            yield _unreadable_row_group(pf, k, row, rel, full, self.id_col, e)
            return
        for rb in table.to_batches(max_chunksize=BATCH):
            yield self.raw_batch(rb, rel, full, row)
            row += rb.num_rows

    def raw_batch(self, rb: pa.RecordBatch, rel: str, full: str, row: int) -> RawBatch:
        """A record batch of file `rel` (URL `full`) whose first row is the file's row `row`, as items."""
        n = rb.num_rows
        encoded, errors = _image_bytes(rb.column(self.img_col), self.limits)
        ids = ([str(v) for v in rb.column(self.id_col).to_pylist()] if self.id_col
               else [f"{rel}#{i}" for i in range(row, row + n)])
        splits: list[str | None] | None = None
        if self.split_col:
            splits = [split_from_name(str(s)) if s is not None else None for s in rb.column(self.split_col).to_pylist()]
        elif path_split := _split_of_path(rel):
            splits = [path_split] * n
        labels = _labels(rb.column(self.lab_col), self.string_index, full) if self.lab_col else np.full(n, -1, np.int32)
        return RawBatch(ids=ids, sources=[f"{full}#{i}" for i in range(row, row + n)], labels=labels, splits=splits,
                        encoded=encoded, errors=errors)


@dataclass(frozen=True)
class RowGroupPart:
    """One row group of one file of a Parquet folder: `size` items from position `start` of the source order."""

    key: str
    start: int
    size: int
    reader: _Reader
    file: str
    group: int
    row: int

    def read(self) -> RawBatch:
        """The row group's items as one batch (runs in a task: opens the file itself)."""
        fs, _ = open_fs(self.reader.url, self.reader.storage_options)
        with fs.open(self.file, "rb") as f:
            got = list(self.reader.row_group(pq.ParquetFile(f), self.file, self.group, self.row))
        return got[0] if len(got) == 1 else RawBatch.concat(got)


def is_parquet_folder(files: list[str]) -> bool:
    """Whether a folder's files are a Parquet source: all of them Parquet or a README (a dataset card beside
    the data, as on the Hugging Face Hub), and at least one Parquet."""
    parquet = [f.endswith(SUFFIXES) for f in files]
    return any(parquet) and all(p or posixpath.basename(f).lower().startswith("readme") for p, f in zip(parquet, files))


FORMAT = Format("parquet", open_parquet, suffixes=SUFFIXES, folder=is_parquet_folder)


def _distinct_names(files: list[str], root: str) -> bool:
    """Whether the files' names stay distinct once escaped (`printable`), so that `<file>#<row>` ids are unique."""
    return len({printable(posixpath.relpath(f, root)) for f in files}) == len(files)


def _unreadable_row_group(pf: pq.ParquetFile, k: int, first: int, rel: str, full: str, id_col: str | None,
                          error: Exception) -> RawBatch:
    """The rows of row group `k` (file rows first..) as items quarantined because the group cannot be read.

    Ids are those a readable group would give (`<file>#<row>`, or the id column if it alone still reads);
    when the id column is unreadable too, `<file>#rg<k>:<row within the group>`, which no readable row has.
    """
    n = pf.metadata.row_group(k).num_rows
    ids = [f"{rel}#{i}" for i in range(first, first + n)]
    if id_col:
        try:
            ids = [str(v) for v in pf.read_row_group(k, columns=[id_col]).column(id_col).to_pylist()]
        except (OSError, pa.ArrowException):
            ids = [f"{rel}#rg{k}:{i}" for i in range(n)]
    reason = f"{full}: row group {k} cannot be read ({' '.join(str(error).split())})"  # one line, as every reason
    return RawBatch(ids=ids, sources=[f"{full}#{i}" for i in range(first, first + n)], labels=np.full(n, -1, np.int32),
                    encoded=[None] * n, errors=[reason] * n)


def _readable_row_groups(pf: pq.ParquetFile, column: str) -> Iterator[pa.ChunkedArray]:
    """`column` of each row group that can be read; `batches` quarantines the rows of the others."""
    for k in range(pf.num_row_groups):
        try:
            col = pf.read_row_group(k, columns=[column]).column(column)
        except (OSError, pa.ArrowException):
            continue
        yield col


def _source_splits(opened: list[tuple[str, pq.ParquetFile]], root: str, split_col: str | None) -> tuple[str, ...]:
    """The splits present: from the split column's values (one cheap pass), else from file paths."""
    found: set[str] = set()
    for f, pf in opened:
        if split_col:
            values = {v for col in _readable_row_groups(pf, split_col) for v in col.unique().to_pylist()}
            found.update(s for v in values if v is not None and (s := split_from_name(str(v))))
        elif (s := _split_of_path(posixpath.relpath(f, root))):
            found.add(s)
    return tuple(sorted(found))


def _label_names(opened: list[tuple[str, pq.ParquetFile]], schema: pa.Schema,
                 lab_col: str | None) -> tuple[list[str] | None, dict[str, int] | None]:
    """-> (label names, map from string label to index when labels are strings)."""
    if lab_col is None:
        return None, None
    t = schema.field(lab_col).type
    if pa.types.is_integer(t):
        return _class_label_names(schema, lab_col), None
    values: set[str] = set()
    for _, pf in opened:  # one cheap pass over the label column only
        for col in _readable_row_groups(pf, lab_col):
            values.update(str(v) for v in col.to_pylist() if v is not None)
    names = sorted(values)
    return names, {n: i for i, n in enumerate(names)}


def _labels(col: pa.Array, string_index: dict[str, int] | None, where: str) -> np.ndarray:
    """Label column batch (of file `where`) -> int32 (n,), -1 for null or negative."""
    if string_index is not None:
        return np.array([string_index[str(v)] if v is not None else -1 for v in col.to_pylist()], dtype=np.int32)
    labels = int32_labels(col.fill_null(0).to_numpy(zero_copy_only=False), where)  # 0: any integer type holds it
    labels[~col.is_valid().to_numpy(zero_copy_only=False)] = -1
    return labels


def _image_bytes(col: pa.Array, limits: SourceLimits) -> tuple[list[bytes | None], list[str | None]]:
    """Image column batch -> per row (bytes or None, problem or None)."""
    paths: list[Any] = [None] * len(col)
    if pa.types.is_struct(col.type):
        data = col.field("bytes").to_pylist()
        if col.type.get_field_index("path") >= 0:
            paths = col.field("path").to_pylist()
        valid = col.is_valid().to_pylist()
        data = [d if v else None for d, v in zip(data, valid)]
    else:
        data = col.to_pylist()
    errors: list[str | None] = []
    for d, p in zip(data, paths):
        if d is None:
            errors.append(f"no image bytes in the row (path: {p})" if p else "no image bytes in the row (null)")
        elif len(d) == 0:
            errors.append("empty image bytes (0 bytes)")
        else:
            errors.append(limits.file_problem(len(d)))
    return [d if e is None else None for d, e in zip(data, errors)], errors
