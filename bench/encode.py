"""encode-dataset's throughput against the bare encoder on in-memory tensors, measured in the same run.

    .venv/bin/python bench/encode.py [--sizes 10000,35000,70000] [--batch 1024] [--workers 1]

In a throwaway VAE_HOME it ingests MNIST once per size (`--limit`, spread over train/val/test), registers
an untrained `mnist`-preset model (the weights do not change the work) and runs the `encode-dataset` flow
on every split, as `vae encode` does. For each size it prints:

- bare: `vae_core.model.encode.encode_and_score` (latents and outlier scores, as the job's actors) on the same
  images held in memory, same model, batch and threads;
- pipeline: rows / encode seconds (Ray Data read, actor pool, driver publishing files, after Ray is up);
- steady: rows after the first latents came back / seconds since then (actor start-up excluded; with few
  blocks, as at 10,000 images, it is rough: rows already encoded when the first block arrives count);
- fixed costs apart: the Prefect server, pinning and downloading the model (plan), starting Ray, and the
  time to the first latents (actor start: a process, torch, the model).

The steady/bare ratio is the figure to hold against the 0.8 target; time should grow linearly with the
images, so pipeline images/s should not fall as the size grows.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def bare_images_per_s(model, images: np.ndarray, batch: int, threads: int) -> float:
    from vae_core.model.encode import encode_and_score

    torch.set_num_threads(threads)
    encode_and_score(model, images[:batch], batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    encode_and_score(model, images, batch_size=batch)
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,35000,70000")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    home = tempfile.mkdtemp(prefix="bench-encode-")
    os.environ["VAE_HOME"] = home
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from flows.cli.prefect import load_flow
    from flows.tracking import registry, runs as tracking
    from vae_core import load_config
    from vae_core.data.shards import open_dataset, read_split_u8
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.model.vae import ConvVAE
    from vae_core.requests import EncodeRequest, IngestRequest
    from vae_core.settings import data_root

    t0 = time.perf_counter()
    def flow():
        from flows.encode import encode_dataset

        return encode_dataset

    encode_dataset = load_flow(flow, debug=False)
    prefect_s = time.perf_counter() - t0
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in sizes:
        run_ingest(IngestRequest(source=str(MNIST), name=f"mnist{n}", limit=n))
    cfg = load_config("mnist")
    model = ConvVAE(cfg.model).eval()
    run_id = tracking.start_training_run("bench", "untrained", cfg, "mnist", "bench", home)
    tracking.RunLogger(run_id).finish()
    version = registry.log_and_register_model(run_id, model, "vae-bench", "bench")
    threads = max(1, round((os.cpu_count() or 1) / args.workers))
    print(f"{os.cpu_count()} CPUs, {args.workers} actor(s) x {threads} threads, batch {args.batch}; Prefect server "
          f"start {prefect_s:.1f} s")
    print(f"{'images':>7} {'bare img/s':>11} {'pipeline':>9} {'steady':>8} {'steady/bare':>12} {'pipe/bare':>10} "
          f"{'plan s':>7} {'ray s':>6} {'1st out s':>10} {'encode s':>9} {'wall s':>7}")
    for n in sizes:
        info = open_dataset(data_root(), f"mnist{n}")
        images = np.concatenate([read_split_u8(info, s)[0] for s in ("train", "val", "test") if info.counts[s]])
        bare = bare_images_per_s(model, images, args.batch, threads)
        t0 = time.perf_counter()
        out = encode_dataset(EncodeRequest(model=f"models:/vae-bench/{version}", dataset=f"mnist{n}",
                                           batch_size=args.batch, workers=args.workers))
        wall = time.perf_counter() - t0
        s = out.seconds
        steady = out.steady_images_per_s or float("nan")  # None: every row came in the first batch
        print(f"{len(images):>7,} {bare:>11,.0f} {out.images_per_s:>9,.0f} {steady:>8,.0f} "
              f"{steady / bare:>12.2f} {out.images_per_s / bare:>10.2f} {s.plan:>7.1f} "
              f"{s.ray_start:>6.1f} {s.first_latents:>10.1f} {s.encode:>9.1f} {wall:>7.1f}")


if __name__ == "__main__":
    main()
