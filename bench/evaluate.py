"""Cost of evaluating MNIST test: the scoring pass at several K against a bare IWAE loop in the same run.

    .venv/bin/python bench/evaluate.py [--images 10000] [--ks 10,100,1000] [--max-work 2e6] [--device cpu]

For each K it times, on the same images and model (the `mnist` preset's architecture; the weights do
not change the work):

- bare: `iwae_log_likelihood` over the images in batches, nothing else: the cost no evaluation avoids;
- pipeline: `vae_core.evaluation.scores.score_split`, the pass `evaluate-vae` runs (ELBO, IWAE, reconstructions,
  PSNR, SSIM, latents, per-batch seeded noise).

It prints seconds, images/s, pipeline/bare, and the time for 10,000 images. Work is K x images decoder
passes; a (K, images) pair above `--max-work` is measured on fewer images and scaled up to 10,000 (the
cost is linear in the images by construction: batches are independent), and the table says so.
Linearity in K: the last column divides each K's time per image by K's ratio to the smallest K; a flat
column is linear. Where it is not, the fixed per-image cost (encoder, reconstruction, metrics) is what
shows at small K.
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch

from vae_core import load_config
from vae_core.evaluation.scores import _DECODES_PER_CHUNK, score_split
from vae_core.model.iwae import iwae_log_likelihood
from vae_core.model.vae import ConvVAE

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"


def mnist_test(n: int) -> np.ndarray:
    with gzip.open(MNIST) as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)[:n].copy()


@torch.no_grad()
def bare(model: ConvVAE, images: np.ndarray, k: int, batch: int, device: torch.device) -> float:
    """Seconds for the IWAE bound alone: binarise, encode, K decodes per image."""
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
    gen = torch.Generator(device=device).manual_seed(0)
    chunk = max(1, _DECODES_PER_CHUNK.get(device.type, 5_000) // batch)
    _sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(images), batch):
        x, target = model.likelihood.prepare(x_all[start : start + batch].to(device), generator=gen)
        iwae_log_likelihood(model, x, target, k=k, chunk=chunk, generator=gen)
    _sync(device)
    return time.perf_counter() - t0


def pipeline(model: ConvVAE, images: np.ndarray, k: int, batch: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    score_split(model, images, k=k, batch_size=batch, devices=[device])
    _sync(device)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--ks", default="10,100,1000")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--max-work", type=float, default=2e6, help="most K x images decoder passes measured per K")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    model = ConvVAE(load_config("mnist").model).to(device).eval()
    images = mnist_test(args.images)
    ks = [int(k) for k in args.ks.split(",")]
    score_split(model, images[: args.batch], k=2, batch_size=args.batch, devices=[device])  # warm-up
    print(f"device {device}, torch threads {torch.get_num_threads()}, {len(images):,} MNIST test images, "
          f"batch {args.batch}")
    print(f"{'K':>6} {'images':>7} {'bare s':>8} {'pipeline s':>11} {'ratio':>6} {'img/s':>8} "
          f"{'10k images s':>13} {'s/img per unit K':>17}")
    base = None
    for k in ks:
        n = int(min(len(images), max(args.batch, args.max_work // k)))
        sub = images[:n]
        b = bare(model, sub, k, args.batch, device)
        t = pipeline(model, sub, k, args.batch, device)
        per_image = t / n
        base = base or (per_image, k)
        scaled = "" if n == len(images) else " (scaled)"
        print(f"{k:>6} {n:>7,} {b:>8.2f} {t:>11.2f} {t / b:>6.2f} {n / t:>8.1f} {per_image * 10_000:>13.1f}"
              f"{scaled} {per_image / (k / base[1]):>12.2e}")


if __name__ == "__main__":
    main()
