"""The corpora of bench/scale.py: MNIST digits shifted and rotated at random, as Parquet files or a PNG folder.

Images are made in batches (torch's `affine_grid` + `grid_sample`: a shift of up to +-3 pixels and a rotation
of up to +-15 degrees per image, seeded) and encoded as PNG by hand (one zlib call per image, twice as fast as
PIL's encoder for 28x28 greys), so that 10^6 images take well under a minute and only one batch of encoded files
is ever held. A finished corpus is marked by a `<folder>.done` file beside it (not in it: the ingest would read
it) and reused by later runs with the same N and seed.
"""

from __future__ import annotations

import math
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from bench.ingest import mnist  # all 70,000 digits and labels

BATCH = 50_000  # images made and encoded at once: one Parquet file
ROW_GROUP = 10_000  # rows per Parquet row group: a Ray task of the ingest reads one
MIN_FILES = 4  # so that even the smallest corpus is a folder of several files, read in tasks
MAX_SHIFT = 3.0  # pixels
MAX_DEGREES = 15.0


def transform(digits: np.ndarray, gen: torch.Generator) -> np.ndarray:
    """uint8 (n, 28, 28) -> the same digits each shifted by up to MAX_SHIFT pixels and rotated by up to
    MAX_DEGREES (bilinear, black outside), uint8 (n, 28, 28)."""
    n, h, w = digits.shape
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(MAX_DEGREES)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * MAX_SHIFT
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, -shift[:, 0] * 2 / w], 1),  # grid units: 2 per image width
                         torch.stack([sin, cos, -shift[:, 1] * 2 / h], 1)], 1)
    x = torch.from_numpy(digits).unsqueeze(1).float()
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(1).round().clamp(0, 255).to(torch.uint8).numpy()


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes(images: np.ndarray) -> list[bytes]:
    """uint8 (n, H, W) greys -> one PNG file each (8-bit grey, no filter: the zlib stream is the whole cost)."""
    _, h, w = images.shape
    head = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    tail = _chunk(b"IEND", b"")
    rows = np.zeros((len(images), h, w + 1), np.uint8)  # each scanline starts with its filter type, 0
    rows[:, :, 1:] = images
    return [head + _chunk(b"IDAT", zlib.compress(r.tobytes())) + tail for r in rows]


def batches(n: int, seed: int, batch: int = BATCH) -> Iterator[tuple[list[bytes], np.ndarray]]:
    """The corpus of n images, batch by batch: (PNG files, int32 labels). Digits are drawn with replacement
    from MNIST's 70,000 (train and test); the same (n, seed) gives the same images."""
    digits, labels = mnist()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        pick = rng.integers(0, len(digits), min(batch, n - start))
        yield png_bytes(transform(digits[pick], gen)), labels[pick].astype(np.int32)


def _done(folder: Path) -> Path:
    return folder.with_name(folder.name + ".done")


def _fresh(folder: Path) -> bool:
    """Whether `folder` must be written: not finished by an earlier run (a partial one is removed)."""
    if _done(folder).exists():
        return False
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return True


def parquet_corpus(work: Path, n: int, seed: int) -> Path:
    """A folder of Parquet files (columns `image`: PNG bytes, `label`: int32) holding the n-image corpus, at
    least MIN_FILES files of at most BATCH rows; made once per (n, seed) under `work`."""
    folder = work / "corpus" / f"parquet-{n}-seed{seed}"
    if _fresh(folder):
        per_file = min(BATCH, math.ceil(n / MIN_FILES))
        for i, (files, labels) in enumerate(batches(n, seed, per_file)):
            table = pa.table({"image": pa.array(files, pa.binary()), "label": pa.array(labels, pa.int32())})
            pq.write_table(table, folder / f"part-{i:05d}.parquet", row_group_size=ROW_GROUP)
        _done(folder).touch()
    return folder


def png_corpus(work: Path, n: int, seed: int) -> Path:
    """The n-image corpus as PNG files in class folders 0..9 (the same images as `parquet_corpus(n, seed)`);
    made once per (n, seed) under `work`."""
    folder = work / "corpus" / f"png-{n}-seed{seed}"
    if _fresh(folder):
        for c in range(10):
            (folder / str(c)).mkdir()
        row = 0
        for files, labels in batches(n, seed, min(BATCH, math.ceil(n / MIN_FILES))):
            for data, label in zip(files, labels):
                (folder / str(label) / f"{row:07d}.png").write_bytes(data)
                row += 1
        _done(folder).touch()
    return folder
