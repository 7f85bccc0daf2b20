"""Training throughput of the vae_core loop against a roofline measured in the same run.

    .venv/bin/python bench/train_loop.py [--preset mnist] [--seconds 20] [--threads 2]

Prints images/s of `train_epoch` on in-memory uint8 batches (the preset's model and batch), the model's
FLOPs per training image (forward + backward, counted by torch's FlopCounterMode), the GFLOP/s that
implies, and that over the best GFLOP/s of a matmul and a convolution probe run on the same threads
just before. Pixel values do not change the work done, so the batches are random bytes.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from vae_core import load_config
from vae_core.fit import Fit, steps_per_epoch
from vae_core.train import iterate_batches


def _gflops(fn, flops: float, seconds: float) -> float:
    fn()  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return flops * n / (time.perf_counter() - start) / 1e9


def roofline(seconds: float = 3.0) -> dict[str, float]:
    """Best sustained GFLOP/s of fp32 matmul and of a training-sized convolution on this machine."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x, conv = torch.randn(128, 32, 14, 14), torch.nn.Conv2d(32, 64, 4, stride=2, padding=1)
    with FlopCounterMode(display=False) as fc:
        conv(x)
    with torch.no_grad():
        return {
            "matmul": _gflops(lambda: a @ b, 2 * 1024**3, seconds),
            "conv": _gflops(lambda: conv(x), fc.get_total_flops(), seconds),
        }


def flops_per_image(preset: str) -> float:
    cfg = load_config(preset)
    fit = Fit.create(cfg, steps_per_epoch=1)
    x = torch.randint(0, 256, (cfg.train.batch_size, *cfg.model.input_shape), dtype=torch.uint8)
    with FlopCounterMode(display=False) as fc:
        fit.train_epoch([x])
    return fc.get_total_flops() / cfg.train.batch_size


def loop_images_per_s(preset: str, seconds: float) -> float:
    cfg = load_config(preset)
    c, h, w = cfg.model.input_shape
    data = torch.randint(0, 256, (cfg.train.batch_size * 20, h, w, c), dtype=torch.uint8)
    fit = Fit.create(cfg, steps_per_epoch(len(data), cfg.train.batch_size))
    fit.train_epoch(iterate_batches(data[: cfg.train.batch_size * 3], cfg.train.batch_size))  # warm-up
    seen, elapsed = 0.0, 0.0
    while elapsed < seconds:
        m = fit.train_epoch(iterate_batches(data, cfg.train.batch_size, generator=fit.order(fit.state.epoch + 1)))
        seen += m["images"]
        elapsed += m["images"] / m["images_per_s"]
    return seen / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    peak = roofline()
    fpi = flops_per_image(args.preset)
    ips = loop_images_per_s(args.preset, args.seconds)
    achieved = ips * fpi / 1e9
    best = max(peak.values())
    print(f"preset={args.preset} threads={args.threads} batch={load_config(args.preset).train.batch_size}")
    print(f"probe matmul     {peak['matmul']:8.1f} GFLOP/s")
    print(f"probe conv       {peak['conv']:8.1f} GFLOP/s")
    print(f"model            {fpi / 1e6:8.2f} MFLOP per training image (fwd+bwd)")
    print(f"train loop       {ips:8.0f} images/s = {achieved:.1f} GFLOP/s")
    print(f"fraction of roofline (train / best probe): {achieved / best:.3f}")


if __name__ == "__main__":
    main()
