"""The vae_core training loop against a bare PyTorch loop and the machine's measured matmul rate.

    .venv/bin/python bench/train_loop.py [--preset mnist] [--device cpu|cuda] [--batches 128,512,2048,8192]
                                         [--seconds 10] [--threads N]
    .venv/bin/python bench/train_loop.py --device cuda            # the GPU table: batches 128 ... 8192

For each batch size, with the same model, loss, data and precision on both sides:
  - vae_core: `Fit.train_epoch` (metrics summed on the device and read every `log_every` steps, the
    non-finite guard, gradient-norm clipping, fused AdamW) on the split held on the device as uint8;
  - bare: the same forward and -ELBO, `backward`, fused AdamW `step`, and nothing else (no metrics, no
    guard, no clipping): what no training loop can avoid.
Runs alternate (bare, vae_core, bare, ...) and each side keeps its best of --repeat runs, so a burst of
other work on a shared machine does not decide the ratio. Prints images/s of both and their ratio, the
model's FLOPs per training image (forward + backward, torch's FlopCounterMode), and the achieved FLOP/s
over the best matmul rate measured just before on the same device (bf16 on a GPU, fp32 on a CPU).
On a GPU the data are real-shaped random bytes: pixel values do not change the work done.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from vae_core import ConvVAE, VAEConfig, load_config
from vae_core.model.losses import beta_at, negative_elbo
from vae_core.model.precision import autocast
from vae_core.training.fit import Fit, steps_per_epoch
from vae_core.training.loop import iterate_batches


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, seconds: float = 3.0) -> float:
    """Best sustained FLOP/s of a square matmul: bf16 8192^2 on a GPU, fp32 1024^2 on a CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - start))
    return best


def flops_per_image(cfg: VAEConfig, device: torch.device) -> float:
    fit = Fit.create(cfg, steps_per_epoch=1, device=device)
    x = torch.randint(0, 256, (cfg.train.batch_size, *cfg.model.input_shape), dtype=torch.uint8, device=device)
    with FlopCounterMode(display=False) as fc:
        fit.train_epoch([x])
    return fc.get_total_flops() / cfg.train.batch_size


def vae_core_loop(cfg: VAEConfig, data: torch.Tensor, seconds: float) -> float:
    """images/s of `Fit.train_epoch` over `data` (uint8 (N, H, W, C) on the device), after a warm-up epoch."""
    bs = cfg.train.batch_size
    fit = Fit.create(cfg, steps_per_epoch(len(data), bs), device=data.device)
    fit.train_epoch(iterate_batches(data, bs, generator=fit.order(0)))  # allocations, kernel selection
    sync(data.device)
    seen, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        seen += int(fit.train_epoch(iterate_batches(data, bs, generator=fit.order(fit.state.epoch + 1)))["images"])
    sync(data.device)
    return seen / (time.perf_counter() - start)


def bare_loop(cfg: VAEConfig, data: torch.Tensor, seconds: float) -> float:
    """images/s of the same model and loss with nothing around them."""
    device, bs, tcfg = data.device, cfg.train.batch_size, cfg.train
    torch.manual_seed(tcfg.seed)
    model = ConvVAE(cfg.model).to(device)
    if device.type == "cuda" and tcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay, fused=True)
    gen = torch.Generator(device=device).manual_seed(0)
    step = 0

    def epoch() -> int:
        nonlocal step
        n = 0
        for x_u8 in iterate_batches(data, bs, generator=torch.Generator().manual_seed(step)):
            x, target = model.likelihood.prepare(x_u8, generator=gen)
            with autocast(device, tcfg.amp):
                params, posterior = model(x, generator=gen)
            loss = negative_elbo(model.likelihood.log_prob(params, target), posterior.kl_per_dim(),
                                 beta_at(step, tcfg))["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            n += len(x_u8)
        return n

    epoch()
    sync(device)
    seen, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        seen += epoch()
    sync(device)
    return seen / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: the preset's on a CPU; "
                    "128,512,2048,8192 on a GPU)")
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per run")
    ap.add_argument("--repeat", type=int, default=2, help="runs per side per batch (best kept)")
    ap.add_argument("--images", type=int, default=60_000, help="images held on the device")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = load_config(args.preset)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else \
        ([128, 512, 2048, 8192] if device.type == "cuda" else [base.train.batch_size])
    c, h, w = base.model.input_shape
    data = torch.randint(0, 256, (args.images, h, w, c), dtype=torch.uint8, device=device)
    peak = matmul_rate(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"preset={args.preset} device={name} torch={torch.__version__} images={args.images} "
          f"matmul={peak / 1e12:.2f} TFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'})")
    print("| batch | vae_core images/s | bare images/s | ratio | MFLOP/image | vae_core TFLOP/s | of matmul |")
    print("|---|---|---|---|---|---|---|")
    for bs in batches:
        cfg = base.model_copy(deep=True)
        cfg.train.batch_size = bs
        fpi = flops_per_image(cfg, device)
        bare = core = 0.0
        for _ in range(args.repeat):  # alternating, best of each: a busy spell hits both sides alike
            bare = max(bare, bare_loop(cfg, data, args.seconds))
            core = max(core, vae_core_loop(cfg, data, args.seconds))
        achieved = core * fpi
        print(f"| {bs:,} | {core:,.0f} | {bare:,.0f} | {core / bare:.2f} | {fpi / 1e6:.2f} | "
              f"{achieved / 1e12:.3f} | {achieved / peak:.3f} |", flush=True)


if __name__ == "__main__":
    main()
