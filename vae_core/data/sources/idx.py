"""MNIST-format IDX files (gzipped or not): ``<prefix>-images-idx3-ubyte[.gz]`` with ``<prefix>-labels-idx1-ubyte[.gz]``.

IDX layout: two zero bytes, a type byte (0x08 = unsigned byte), a byte with the number of dimensions,
one big-endian uint32 per dimension, then the values in C order. Images are (N, H, W) or (N, H, W, C);
labels are (N,). A folder's ``train`` files become the train split and its ``t10k`` / ``test`` files
the test split. Ids are ``<prefix>/<index>``; labels are the digit values, named "0".."9" for MNIST.
A file whose header declares more than max_archive_mb of values fails before anything is allocated, and
a labels file stops inflating there.
"""

from __future__ import annotations

import posixpath
import re
import threading
import zlib
from collections.abc import Iterator

import fsspec
import numpy as np

from vae_core.data.sources.base import Format, RawBatch, Source, SourceError, SourceOptions, printable, split_from_name
from vae_core.data.sources.limits import SourceLimits
from vae_core.data.sources.remote import open_fs
from vae_core.storage import to_url

IDX_NAME = re.compile(r"(?P<prefix>.+?)-(?P<kind>images|labels)[-.]idx(?P<ndim>\d)-ubyte(?P<gz>\.gz)?")  # fullmatch
BATCH = 16384
_UBYTE = 0x08


def is_idx_name(filename: str) -> bool:
    return IDX_NAME.fullmatch(posixpath.basename(filename)) is not None


def holds_idx(files: list[str]) -> bool:
    """Whether a folder is an IDX source: some file in it is named like an IDX file."""
    return any(is_idx_name(f) for f in files)


def _parse_header(data: bytes, url: str) -> tuple[tuple[int, ...], int]:
    """First bytes of an IDX file -> (shape, header length). SourceError on a wrong magic."""
    if len(data) < 4:
        raise SourceError(f"{url}: {len(data)} bytes is too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if data[0] != 0 or data[1] != 0 or data[2] != _UBYTE or not 1 <= data[3] <= 4:
        raise SourceError(f"{url}: wrong IDX magic 0x{magic:08x} (expected 0x000008nn: unsigned bytes, nn dimensions)")
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise SourceError(f"{url}: truncated IDX header ({len(data)} bytes, {header} needed)")
    return tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])), header


def _size_error(url: str, dims: tuple[int, ...], expected: int, got: int) -> SourceError:
    return SourceError(f"{url}: header declares shape {dims} = {expected} bytes but the file holds {got} "
                       f"({'truncated' if got < expected else 'trailing bytes'})")


def read_idx(fs: fsspec.AbstractFileSystem, path: str, url: str, limits: SourceLimits = SourceLimits()) -> np.ndarray:
    """One IDX file -> uint8 array of its declared shape. SourceError names `url` and the problem, including
    a file that is (or inflates to) more than max_archive_mb."""
    if path.endswith(".gz"):
        data = _gunzip(fs.cat_file(path), url, limits)
    elif problem := limits.archive_problem(fs.size(path), "the file"):
        raise SourceError(f"{url}: {problem}")
    else:
        data = fs.cat_file(path)
    dims, header = _parse_header(data, url)
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise _size_error(url, dims, expected, len(data) - header)
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _gunzip(data: bytes, url: str, limits: SourceLimits) -> bytes:
    """Inflate every gzip member of `data`, stopping one byte past max_archive_mb (then a SourceError)."""
    out, most = bytearray(), limits.max_archive_bytes + 1
    try:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        while data:
            out += d.decompress(data, most - len(out))
            if len(out) >= most:
                raise SourceError(f"{url}: {limits.archive_problem(len(out), 'the file')}")
            data = d.unused_data  # a further gzip member, if any
            if data:
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    except zlib.error as e:
        raise SourceError(f"{url}: not a readable gzip file ({e})") from None
    if not d.eof:
        raise SourceError(f"{url}: not a readable gzip file (truncated)")
    return bytes(out)


class IdxImages:
    """An IDX images file whose header was checked at open and whose pixels arrive while in use.

    Gzipped files are inflated on a background thread into one preallocated array (zlib releases the
    GIL), so ingestion handles the first images while the rest is still being decompressed. A stream
    that ends early, fails its CRC, or holds more than the header declares raises SourceError from
    `rows`, naming the file.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, url: str, limits: SourceLimits = SourceLimits()):
        self.fs, self.path, self.url = fs, path, url
        if path.endswith(".gz"):
            with fs.open(path, "rb") as f:
                head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(f.read(1 << 16), 4 + 4 * 4)
            self.dims, self.header = _parse_header(head, url)
            self._check_declared(limits)
            self._check_gzip_size(int(np.prod(self.dims)))
        else:
            with fs.open(path, "rb") as f:
                self.dims, self.header = _parse_header(f.read(4 + 4 * 4), url)
            self._check_declared(limits)
            expected = int(np.prod(self.dims))
            if fs.size(path) - self.header != expected:
                raise _size_error(url, self.dims, expected, fs.size(path) - self.header)
        self.count = self.dims[0] if self.dims else 0
        self.row = int(np.prod(self.dims[1:]))
        self._flat: np.ndarray | None = None
        self._ready = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = False

    def _check_declared(self, limits: SourceLimits) -> None:
        # The pixels are held whole (a gzipped file is inflated into one preallocated array): the header's
        # shape must fit the limit before anything is allocated.
        if problem := limits.archive_problem(int(np.prod(self.dims, dtype=object)), f"the header's shape {self.dims}"):
            raise SourceError(f"{self.url}: {problem}")

    def _check_gzip_size(self, expected: int) -> None:
        # The gzip trailer holds the uncompressed size mod 2**32: a cheap check, before any inflating,
        # that the file is whole and matches its header.
        size = self.fs.size(self.path)
        tail = self.fs.cat_file(self.path, start=max(0, size - 4))
        isize = int.from_bytes(tail[-4:], "little") if len(tail) >= 4 else -1
        if isize != (self.header + expected) % 2**32:
            raise SourceError(f"{self.url}: gzip trailer says {isize} bytes but the IDX header declares shape "
                              f"{self.dims} = {self.header + expected} bytes (truncated or corrupt file)")

    def start(self) -> None:
        """Begin reading pixels (idempotent)."""
        if self._flat is not None:
            return
        if not self.path.endswith(".gz"):
            self._flat = np.frombuffer(self.fs.cat_file(self.path), np.uint8)
            self._ready = len(self._flat) - self.header
            return
        self._flat = np.empty(self.header + self.count * self.row, np.uint8)
        threading.Thread(target=self._inflate, name=f"gunzip {posixpath.basename(self.path)}", daemon=True).start()

    def stop(self) -> None:
        self._stop = True

    def _inflate(self) -> None:
        assert self._flat is not None
        out, pos = self._flat, 0
        try:
            with self.fs.open(self.path, "rb") as f:
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                while not self._stop and (chunk := f.read(1 << 20)):
                    while chunk:
                        piece = d.decompress(chunk)
                        if pos + len(piece) > len(out):
                            raise _size_error(self.url, self.dims, len(out) - self.header, pos + len(piece) - self.header)
                        out[pos : pos + len(piece)] = np.frombuffer(piece, np.uint8)
                        pos += len(piece)
                        chunk = d.unused_data  # a further gzip member, if any
                        if chunk:
                            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    with self._cond:
                        self._ready = max(0, pos - self.header)
                        self._cond.notify_all()
                if not self._stop and (not d.eof or pos != len(out)):
                    raise _size_error(self.url, self.dims, len(out) - self.header, pos - self.header)
        except zlib.error as e:
            self._fail(SourceError(f"{self.url}: corrupt gzip data ({e})"))
        except BaseException as e:
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        with self._cond:
            self._error = e
            self._cond.notify_all()

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Images start..stop as uint8 (stop-start, *dims[1:]), waiting for them to be inflated."""
        self.start()
        need = stop * self.row
        with self._cond:
            self._cond.wait_for(lambda: self._ready >= need or self._error is not None)
            if self._error is not None:
                raise self._error
        assert self._flat is not None  # holds the header too, as the file does
        h = self.header
        return self._flat[h + start * self.row : h + stop * self.row].reshape(stop - start, *self.dims[1:])


def _pairs(fs: fsspec.AbstractFileSystem, files: list[str], url: str) -> list[tuple[str, str, str | None]]:
    """Files -> [(prefix, images path, labels path or None)], sorted train first then test then others."""
    found: dict[tuple[str, str], str] = {}
    for f in files:
        if not (m := IDX_NAME.fullmatch(posixpath.basename(f))):
            continue
        key = (m["prefix"], m["kind"])
        if key in found:
            raise SourceError(f"{url}: both {posixpath.basename(found[key])} and {posixpath.basename(f)} hold "
                              f"{m['prefix']} {m['kind']}; keep one")
        found[key] = f
    prefixes = sorted({p for p, _ in found})
    pairs = []
    for p in prefixes:
        if (p, "images") not in found:
            raise SourceError(f"{url}: {posixpath.basename(found[(p, 'labels')])} has no matching {p}-images file")
        pairs.append((p, found[(p, "images")], found.get((p, "labels"))))
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(pairs, key=lambda t: (order.get(split_from_name(t[0]) or "", 3), t[0]))


def open_idx(url: str, options: SourceOptions = SourceOptions()) -> Source:
    """A folder (or one images file) of IDX files -> Source. Headers, sizes and counts are checked here."""
    fs, path = open_fs(url, options.storage_options)
    limits = options.limits
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    pairs = _pairs(fs, files, url)
    if not pairs:
        raise SourceError(f"{url}: no IDX files (<prefix>-images-idx3-ubyte[.gz]) found")
    if not fs.isdir(path):  # a single images file: pick up its labels file beside it
        siblings = sorted(fs.find(posixpath.dirname(path)))
        pairs = [p for p in _pairs(fs, siblings, url) if p[1] == pairs[0][1]]

    parts: list[tuple[str, str, IdxImages, np.ndarray | None]] = []
    for prefix, img_path, lab_path in pairs:
        img_url = to_url(fs, img_path)
        images = IdxImages(fs, img_path, img_url, limits)
        if len(images.dims) not in (3, 4) or (len(images.dims) == 4 and images.dims[3] not in (1, 3)):
            raise SourceError(f"{img_url}: images must be (N,H,W) or (N,H,W,1|3), header says {images.dims}")
        if 0 in images.dims[1:3]:
            raise SourceError(f"{img_url}: images have zero height or width (header says {images.dims}); "
                              "each image needs at least 1x1 pixels")
        labels = None
        if lab_path is not None:
            lab_url = to_url(fs, lab_path)
            labels = read_idx(fs, lab_path, lab_url, limits)
            if labels.ndim != 1:
                raise SourceError(f"{lab_url}: labels must be 1-dimensional, header says {labels.shape}")
            if len(labels) != images.count:
                raise SourceError(f"{lab_url}: {len(labels)} labels for {images.count} images in {img_url}")
        parts.append((printable(prefix), printable(img_url), images, labels))

    max_label = max((int(p[3].max()) for p in parts if p[3] is not None and len(p[3])), default=-1)
    has_labels = all(p[3] is not None for p in parts)

    def batches() -> Iterator[RawBatch]:
        try:
            for prefix, img_url, images, labels in parts:
                split = split_from_name(prefix)
                shape = (*images.dims[1:3], images.dims[3] if len(images.dims) == 4 else 1)  # (H, W, C)
                images.start()
                for start in range(0, images.count, BATCH):
                    stop = min(start + BATCH, images.count)
                    idx = range(start, stop)
                    lab = (labels[start:stop].astype(np.int32) if labels is not None
                           else np.full(stop - start, -1, np.int32))
                    yield RawBatch(
                        ids=[f"{prefix}/{i}" for i in idx],
                        sources=[f"{img_url}#{i}" for i in idx],
                        labels=lab,
                        splits=[split] * (stop - start) if split else None,
                        pixels=images.rows(start, stop).reshape(stop - start, *shape),
                    )
        finally:
            for p in parts:
                p[2].stop()

    return Source(
        kind="idx", url=url, batches=batches, size=sum(p[2].count for p in parts),
        label_names=[str(i) for i in range(max_label + 1)] if has_labels and max_label >= 0 else None,
        splits=tuple(sorted({s for p in parts if (s := split_from_name(p[0]))})),
        details={"files": {p[0]: {"images": p[1], "count": p[2].count} for p in parts}},
    )


# A single images file is read with its labels file, which sits beside it.
FORMAT = Format("idx", open_idx, file_name=is_idx_name, file_hint="an IDX file", folder=holds_idx,
                reads_siblings=True)
