"""A NumPy ``.npz`` archive: ``images`` (N, H, W) or (N, H, W, C) and optionally ``labels`` (N,).

Optional extras: ``ids`` (N,) strings (default: the index), ``label_names`` (K,) strings.
Images must be integers in 0..255 (uint8, or a wider integer type whose values fit); floats are
refused because their scale (0..1 or 0..255) is a guess. The archive is loaded without pickle.
Labels below 0 mean "no label"; labels above 2**31-1 are an error (the dataset stores int32).
Each array's size is read from its .npy header before anything is inflated: an archive whose arrays
would take more than max_archive_mb fails, naming the array and the limit.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from typing import IO

import numpy as np

from vae_core.data.sources.base import Format, RawBatch, Source, SourceError, SourceOptions, int32_labels
from vae_core.data.sources.limits import SourceLimits
from vae_core.data.sources.remote import open_fs
from vae_core.storage import to_url

BATCH = 16384


def _images(arr: np.ndarray, url: str) -> np.ndarray:
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] not in (1, 3)):
        raise SourceError(f"{url}: 'images' must be (N,H,W) or (N,H,W,1|3), got shape {arr.shape}")
    if 0 in arr.shape[1:3]:
        raise SourceError(f"{url}: 'images' have zero height or width (shape {arr.shape}); "
                          "each image needs at least 1x1 pixels")
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


def _declared_sizes(f: IO[bytes]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Each array's (shape, dtype) as its .npy header declares it; only the headers are inflated."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0,
               (3, 0): np.lib.format.read_array_header_2_0}  # 3.0 is 2.0 with a UTF-8 header
    out = {}
    with zipfile.ZipFile(f) as z:
        for name in z.namelist():
            if not name.endswith(".npy"):
                continue
            with z.open(name) as member:
                version = np.lib.format.read_magic(member)
                if version not in readers:
                    raise ValueError(f"{name} has .npy format version {version}")
                shape, _, dtype = readers[version](member)
            out[name.removesuffix(".npy")] = (tuple(shape), dtype)
    return out


def _check_declared(f: IO[bytes], url: str, limits: SourceLimits) -> None:
    """SourceError naming the array and the limit when the arrays would inflate beyond max_archive_mb."""
    declared = _declared_sizes(f)
    sizes = {k: int(np.prod(shape, dtype=object)) * dtype.itemsize for k, (shape, dtype) in declared.items()}
    for k, (shape, dtype) in declared.items():
        if problem := limits.archive_problem(sizes[k], f"'{k}' {shape} {dtype}"):
            raise SourceError(f"{url}: {problem}")
    if problem := limits.archive_problem(sum(sizes.values()), f"the arrays ({', '.join(sorted(sizes))}) together"):
        raise SourceError(f"{url}: {problem}")


def open_npz(url: str, options: SourceOptions = SourceOptions()) -> Source:
    """.npz URL -> Source; sizes (from the headers), shapes, dtypes and counts are checked here."""
    fs, path = open_fs(url, options.storage_options)
    try:
        with fs.open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise SourceError(f"{url}: file not found") from None
    if magic != b"PK\x03\x04":  # np.load would take anything else for a pickle and say so, unhelpfully
        raise SourceError(f"{url}: not a readable .npz archive (not a zip file)")
    try:
        with fs.open(path, "rb") as f:
            _check_declared(f, url, options.limits)
        with fs.open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except SourceError:
        raise
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
        labels = int32_labels(lab, url)
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


FORMAT = Format("npz", open_npz, suffixes=(".npz",))
