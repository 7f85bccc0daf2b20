"""A NumPy ``.npz`` archive: ``images`` (N, H, W) or (N, H, W, C) and optionally ``labels`` (N,).

Optional extras: ``ids`` (N,) strings (default: the index), ``label_names`` (K,) strings.
Images must be integers in 0..255 (uint8, or a wider integer type whose values fit); floats are
refused because their scale (0..1 or 0..255) is a guess. The archive is loaded without pickle.
Labels below 0 mean "no label".
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from vae_core.shards import resolve, to_url
from vae_core.sources.base import RawBatch, Source, SourceError

BATCH = 16384


def _images(arr: np.ndarray, url: str) -> np.ndarray:
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] not in (1, 3)):
        raise SourceError(f"{url}: 'images' must be (N,H,W) or (N,H,W,1|3), got shape {arr.shape}")
    if arr.dtype == np.bool_:
        raise SourceError(f"{url}: 'images' is boolean; store 0/255 uint8 pixels")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer):
            raise SourceError(f"{url}: 'images' has dtype {arr.dtype}; store uint8 pixels in 0..255")
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 255:
            raise SourceError(f"{url}: 'images' ({arr.dtype}) has values {lo}..{hi}, outside 0..255")
        arr = arr.astype(np.uint8)
    return arr[..., None] if arr.ndim == 3 else arr


def open_npz(url: str, storage_options: dict | None = None) -> Source:
    """.npz URL -> Source; shapes, dtypes and counts are checked here."""
    fs, path = resolve(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise SourceError(f"{url}: file not found") from None
    if magic != b"PK\x03\x04":  # np.load would take anything else for a pickle and say so, unhelpfully
        raise SourceError(f"{url}: not a readable .npz archive (not a zip file)")
    try:
        with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise SourceError(f"{url}: file not found") from None
    except ValueError as e:  # includes "Object arrays cannot be loaded when allow_pickle=False"
        raise SourceError(f"{url}: unreadable .npz ({e})") from None
    except Exception as e:  # zipfile.BadZipFile, EOFError, OSError on a truncated or foreign file
        raise SourceError(f"{url}: not a readable .npz archive ({type(e).__name__}: {e})") from None
    if "images" not in arrays:
        raise SourceError(f"{url}: no 'images' array (has {sorted(arrays) or 'nothing'})")
    images = _images(arrays["images"], url)
    n = len(images)
    if n == 0:
        raise SourceError(f"{url}: empty source ('images' holds 0 images)")
    labels = np.full(n, -1, np.int32)
    if "labels" in arrays:
        lab = arrays["labels"]
        if lab.ndim != 1 or not np.issubdtype(lab.dtype, np.integer):
            raise SourceError(f"{url}: 'labels' must be a 1-D integer array, got {lab.dtype} {lab.shape}")
        if len(lab) != n:
            raise SourceError(f"{url}: {len(lab)} labels for {n} images")
        labels = np.where(lab < 0, -1, lab).astype(np.int32)
    ids = [str(i) for i in range(n)]
    if "ids" in arrays:
        ids = [str(i) for i in arrays["ids"].tolist()]
        if len(ids) != n:
            raise SourceError(f"{url}: {len(ids)} ids for {n} images")
    names = [str(x) for x in arrays["label_names"].tolist()] if "label_names" in arrays else None
    if names is not None and labels.max(initial=-1) >= len(names):
        raise SourceError(f"{url}: label {int(labels.max())} has no entry in label_names ({len(names)} names)")
    full = to_url(fs, path)

    def batches() -> Iterator[RawBatch]:
        for start in range(0, n, BATCH):
            stop = min(start + BATCH, n)
            yield RawBatch(ids=ids[start:stop], sources=[f"{full}#{i}" for i in range(start, stop)],
                           labels=labels[start:stop], pixels=images[start:stop])

    return Source(kind="npz", url=url, batches=batches, size=n, label_names=names, ids_unique="ids" not in arrays,
                  details={"arrays": sorted(arrays)})
