"""How far bf16 moves the latents a registered model gives, against float32: the bound `encode-dataset` has
on a GPU, where its actors encode in bf16.

    .venv/bin/python bench/encode_precision.py [--model models:/vae-mnist@champion] [--images 5000]

Encodes MNIST test images with `vae_core.model.encode.encode_images` in float32 and again under bf16 autocast
(on the GPU when there is one, else the CPU's bf16 autocast, which rounds the same way but accumulates in
another order) and prints the largest, mean and 99th-percentile absolute differences of the means and
log-variances, beside the typical size of a mean and the largest difference relative to each dimension's
spread across the images. Uses the store `$MLFLOW_TRACKING_URI` or `$VAE_HOME/mlflow.db`.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import torch

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="models:/vae-mnist@champion")
    p.add_argument("--images", type=int, default=5000)
    args = p.parse_args()

    from flows.tracking import registry
    from vae_core.model.encode import encode_images

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = registry.load_pinned(registry.pin_model(args.model)).to(device)
    with gzip.open(MNIST) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)[: args.images].copy()
    mean32, logvar32 = encode_images(model, images, batch_size=1024)
    with torch.autocast(device.type, dtype=torch.bfloat16):  # encode_images' own amp acts on a GPU only
        mean16, logvar16 = encode_images(model, images, batch_size=1024)
    d_mean, d_logvar = np.abs(mean16 - mean32), np.abs(logvar16 - logvar32)
    print(f"{args.model} on {device}, {len(images):,} MNIST test images, bf16 against float32")
    print(f"mean:   max {d_mean.max():.4f}, mean {d_mean.mean():.5f}, p99 {np.quantile(d_mean, 0.99):.4f}; "
          f"typical |mean| {np.abs(mean32).mean():.3f}; max / per-dimension std {(d_mean / mean32.std(0)).max():.4f}")
    print(f"logvar: max {d_logvar.max():.4f}, mean {d_logvar.mean():.5f}, p99 {np.quantile(d_logvar, 0.99):.4f}")


if __name__ == "__main__":
    main()
