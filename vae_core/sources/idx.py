"""MNIST-format IDX files (gzipped or not): ``<prefix>-images-idx3-ubyte[.gz]`` with ``<prefix>-labels-idx1-ubyte[.gz]``.

IDX layout: two zero bytes, a type byte (0x08 = unsigned byte), a byte with the number of dimensions,
one big-endian uint32 per dimension, then the values in C order. Images are (N, H, W) or (N, H, W, C);
labels are (N,). A folder's ``train`` files become the train split and its ``t10k`` / ``test`` files
the test split. Ids are ``<prefix>/<index>``; labels are the digit values, named "0".."9" for MNIST.
"""

from __future__ import annotations

import gzip
import posixpath
import re
import zlib
from collections.abc import Iterator

import fsspec
import numpy as np

from vae_core.sources.base import RawBatch, Source, SourceError, split_from_name

IDX_NAME = re.compile(r"^(?P<prefix>.+?)-(?P<kind>images|labels)[-.]idx(?P<ndim>\d)-ubyte(?P<gz>\.gz)?$")
BATCH = 16384
_UBYTE = 0x08


def is_idx_name(filename: str) -> bool:
    return IDX_NAME.match(posixpath.basename(filename)) is not None


def read_idx(fs: fsspec.AbstractFileSystem, path: str, url: str) -> np.ndarray:
    """One IDX file -> uint8 array of its declared shape. SourceError names `url` and the problem."""
    data = fs.cat_file(path)
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise SourceError(f"{url}: not a readable gzip file ({e})") from None
    if len(data) < 4:
        raise SourceError(f"{url}: {len(data)} bytes is too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if data[0] != 0 or data[1] != 0 or data[2] != _UBYTE or not 1 <= data[3] <= 4:
        raise SourceError(f"{url}: wrong IDX magic 0x{magic:08x} (expected 0x000008nn: unsigned bytes, nn dimensions)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise SourceError(f"{url}: truncated IDX header ({len(data)} bytes, {header} needed)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise SourceError(
            f"{url}: header declares shape {dims} = {expected} bytes but the file holds {len(data) - header} "
            f"({'truncated' if len(data) - header < expected else 'trailing bytes'})"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _pairs(fs: fsspec.AbstractFileSystem, files: list[str], url: str) -> list[tuple[str, str, str | None]]:
    """Files -> [(prefix, images path, labels path or None)], sorted train first then test then others."""
    found: dict[tuple[str, str], str] = {}
    for f in files:
        m = IDX_NAME.match(posixpath.basename(f))
        if not m:
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


def open_idx(url: str, storage_options: dict | None = None) -> Source:
    """A folder (or one images file) of IDX files -> Source. Headers and counts are checked here."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    pairs = _pairs(fs, files, url)
    if not pairs:
        raise SourceError(f"{url}: no IDX files (<prefix>-images-idx3-ubyte[.gz]) found")
    if not fs.isdir(path):  # a single images file: pick up its labels file beside it
        siblings = sorted(fs.find(posixpath.dirname(path)))
        pairs = [p for p in _pairs(fs, siblings, url) if p[1] == pairs[0][1]]

    parts = []
    for prefix, img_path, lab_path in pairs:
        img_url = fs.unstrip_protocol(img_path)
        images = read_idx(fs, img_path, img_url)
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
            raise SourceError(f"{img_url}: images must be (N,H,W) or (N,H,W,1|3), header says {images.shape}")
        images = images[..., None] if images.ndim == 3 else images
        labels = None
        if lab_path is not None:
            lab_url = fs.unstrip_protocol(lab_path)
            labels = read_idx(fs, lab_path, lab_url)
            if labels.ndim != 1:
                raise SourceError(f"{lab_url}: labels must be 1-dimensional, header says {labels.shape}")
            if len(labels) != len(images):
                raise SourceError(f"{lab_url}: {len(labels)} labels for {len(images)} images in {img_url}")
        parts.append((prefix, img_url, images, labels))

    shapes = {p[2].shape[1:] for p in parts}
    max_label = max((int(p[3].max()) for p in parts if p[3] is not None and len(p[3])), default=-1)
    has_labels = all(p[3] is not None for p in parts)

    def batches() -> Iterator[RawBatch]:
        for prefix, img_url, images, labels in parts:
            split = split_from_name(prefix)
            for start in range(0, len(images), BATCH):
                stop = min(start + BATCH, len(images))
                idx = range(start, stop)
                lab = labels[start:stop].astype(np.int32) if labels is not None else np.full(stop - start, -1, np.int32)
                yield RawBatch(
                    ids=[f"{prefix}/{i}" for i in idx],
                    sources=[f"{img_url}#{i}" for i in idx],
                    labels=lab,
                    splits=[split] * (stop - start) if split else None,
                    pixels=images[start:stop],
                )

    return Source(
        kind="idx",
        url=url,
        batches=batches,
        size=sum(len(p[2]) for p in parts),
        shape=next(iter(shapes)) if len(shapes) == 1 else None,
        label_names=[str(i) for i in range(max_label + 1)] if has_labels and max_label >= 0 else None,
        splits=tuple(sorted({s for p in parts if (s := split_from_name(p[0]))})),
        details={"files": {p[0]: {"images": p[1], "count": len(p[2])} for p in parts}},
    )
