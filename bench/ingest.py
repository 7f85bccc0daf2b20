"""The ingest-dataset pipeline against a bare baseline, measured side by side in one run.

    .venv/bin/python bench/ingest.py [--repeats 3] [--pngs 20000] [--json]

1. MNIST IDX -> shards (../shared/data/mnist, 70,000 images):
   - bare:      gunzip + np.frombuffer of the four IDX files, then one `pq.write_table` of the same
                table (id, image, label, source) with the same Parquet options the shards use;
   - pipeline:  `run_ingest` (validation, dedup, split assignment, stats, checksums, version hash,
                staging and atomic publish) into a fresh data root.
   Reported: images/s of both (best of --repeats, interleaved) and pipeline/bare (target >= 0.8).
2. A folder of --pngs PNG files (MNIST digits in class folders, generated into a temp dir):
   `run_ingest` with 1 and 2 decode workers, images/s of each (wall clock, pool start included),
   then the seconds of a re-run on the unchanged folder (found by its fingerprint, nothing decoded).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
MNIST = REPO.parent / "shared" / "data" / "mnist"
sys.path.insert(0, str(REPO))

from vae_core.data.shards import build_table, row_group_rows, writer_options  # noqa: E402
from vae_core.ingestion.ingest import run_ingest  # noqa: E402
from vae_core.requests import IngestRequest


def _idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def bare_mnist(out: Path) -> float:
    """The least work that turns MNIST IDX into one Parquet file of the same rows. -> seconds."""
    t = time.perf_counter()
    images, labels, ids, sources = [], [], [], []
    for prefix in ("train", "t10k"):
        x = _idx(MNIST / f"{prefix}-images-idx3-ubyte.gz")
        y = _idx(MNIST / f"{prefix}-labels-idx1-ubyte.gz")
        images.append(x)
        labels.append(y.astype(np.int32))
        ids += [f"{prefix}/{i}" for i in range(len(x))]
        src = str(MNIST / f"{prefix}-images-idx3-ubyte.gz")
        sources += [f"{src}#{i}" for i in range(len(x))]
    x = np.concatenate(images)[..., None]
    table = build_table(ids, x, np.concatenate(labels), sources)
    pq.write_table(table, out / "mnist.parquet", **writer_options(), row_group_size=row_group_rows(784))
    return time.perf_counter() - t


def pipeline(source: str, root: Path, workers: int = 0, rerun: bool = False) -> tuple[float, int]:
    """-> (seconds, images in the dataset) of one `run_ingest`: a full one into an empty data root, or
    with rerun, one that finds the version already there."""
    t = time.perf_counter()
    r = run_ingest(IngestRequest(name="bench", source=source, data_root=str(root), workers=workers,
                                max_quarantine_fraction=0.0))
    dt = time.perf_counter() - t
    assert r.created != rerun, "the re-run made a new version" if rerun else "the data root was not empty"
    return dt, r.manifest.items.ok


def make_png_folder(root: Path, n: int) -> None:
    """n MNIST digits as 28x28 greyscale PNGs in class folders 0..9."""
    from PIL import Image

    x = np.concatenate([_idx(MNIST / "train-images-idx3-ubyte.gz"), _idx(MNIST / "t10k-images-idx3-ubyte.gz")])
    y = np.concatenate([_idx(MNIST / "train-labels-idx1-ubyte.gz"), _idx(MNIST / "t10k-labels-idx1-ubyte.gz")])
    if n > len(x):
        raise SystemExit(f"--pngs {n}: only {len(x)} MNIST images to draw from")
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(x[i]).save(buf, "PNG")
        (root / str(int(y[i])) / f"{i:05d}.png").write_bytes(buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pngs", type=int, default=20_000)
    ap.add_argument("--json", action="store_true", help="also print one JSON object with every figure")
    args = ap.parse_args()

    results: dict[str, float | int] = {"cpus": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp_path = Path(tmp)
        # Warm-up: imports and the page cache, so neither side pays them in its timing.
        bare_mnist(tmp_path)
        pipeline(str(MNIST), tmp_path / "warm")
        bare, pipe = [], []
        for r in range(args.repeats):  # interleaved, so drift in machine load hits both sides
            bare.append(bare_mnist(tmp_path))
            dt, n = pipeline(str(MNIST), tmp_path / f"mnist-{r}")
            pipe.append(dt)
        n_mnist = 70_000
        assert n == n_mnist, n
        results |= {
            "mnist_images": n_mnist,
            "mnist_bare_images_per_s": round(n_mnist / min(bare)),
            "mnist_pipeline_images_per_s": round(n_mnist / min(pipe)),
            "mnist_ratio": round(min(bare) / min(pipe), 3),
            "mnist_bare_s": round(min(bare), 3),
            "mnist_pipeline_s": round(min(pipe), 3),
        }
        print(f"MNIST IDX -> shards, {n_mnist:,} images, best of {args.repeats}:")
        print(f"  bare (numpy decode + one pyarrow write): {results['mnist_bare_images_per_s']:>9,} images/s "
              f"({results['mnist_bare_s']:.3f} s)")
        print(f"  ingest-dataset pipeline:                 {results['mnist_pipeline_images_per_s']:>9,} images/s "
              f"({results['mnist_pipeline_s']:.3f} s)")
        print(f"  pipeline / bare: {results['mnist_ratio']:.3f}  (target >= 0.8)")

        folder = tmp_path / "pngs"
        t = time.perf_counter()
        make_png_folder(folder, args.pngs)
        print(f"\nPNG folder: {args.pngs:,} files written in {time.perf_counter() - t:.1f} s")
        for workers in (1, 2):
            dt, n = pipeline(str(folder), tmp_path / f"png-{workers}", workers=workers)
            results[f"png_{workers}_worker_images_per_s"] = round(n / dt)
            print(f"  {workers} worker{'s' if workers > 1 else ' '}: {round(n / dt):>7,} images/s ({dt:.2f} s, {n:,} images)")
        dt, _ = pipeline(str(folder), tmp_path / "png-2", workers=2, rerun=True)
        results["png_reingest_s"] = round(dt, 3)
        print(f"  re-ingest of the unchanged folder: {dt:.2f} s")
        results["png_images"] = args.pngs
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
