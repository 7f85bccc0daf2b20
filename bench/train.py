"""The train-vae pipeline against the bare vae_core loop, measured side by side in one run.

    .venv/bin/python bench/train.py [--images 20000] [--epochs 5] [--preset mnist]
    .venv/bin/python bench/train.py --quality-minutes 20 --iw-samples 1000   # test NLL on full MNIST
    .venv/bin/python bench/train.py --quality-minutes 20 --set model.hidden_dim=256   # a variant
    .venv/bin/python bench/train.py --quality-minutes 5 --iw-samples 100 --test-images 2000   # a quick comparison
    .venv/bin/python bench/train.py --quality-minutes 10 --preset mnist-gpu --device cuda   # the GPU preset
    .venv/bin/python bench/train.py --repeat 3 --cases memory1   # three alternating pairs, median ratio

Throughput: MNIST (from ../shared/data/mnist) is ingested once; then, with the same model, batch and
torch threads:
  - bare:      `Fit.run` (the workers' epoch loop) on an in-memory uint8 tensor, no Ray, no MLflow, no Prefect;
  - pipeline:  the `train-vae` flow's training (Ray Train + DDP + checkpoints + MLflow) with 1 worker,
               then 2 workers, both holding the split in memory, then 1 worker streaming it through Ray
               Data; steady-state images/s is the mean over epochs after the first, as the workers
               report it, and fixed costs (Ray start, model registration) are reported apart.
Bare loops run before, between and after the pipelines; each pipeline is divided by the mean of the
bare loops on either side of it. Prints images/s and the ratios (target >= 0.9 for 1 worker).

Quality (--quality-minutes): trains --preset (default mnist) in one process on --device on all 60,000 training images
(dynamic binarisation) within that many minutes (train-vae's own train.time_budget_minutes: the epochs that
fit, the cosine running down over them), then reports the IWAE test NLL in nats
over the full 10,000-image test set with --iw-samples samples, and the learning curve.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
MNIST = REPO.parent / "shared" / "data" / "mnist"


def ingest_mnist(home: Path, limit: int | None) -> str:
    """Ingest MNIST into `home`; returns the dataset reference to train on."""
    from vae_core.ingestion.ingest import run_ingest
    from vae_core.requests import IngestRequest

    result = run_ingest(IngestRequest(source=str(MNIST), name="mnist", limit=limit, data_root=str(home / "datasets")))
    return f"mnist@{result.version}"


def bare_loop(train_x: torch.Tensor, preset: str, overrides: list[str], epochs: int) -> float:
    """Steady-state images/s of `Fit.run` in this process (the workers' epoch loop, without Ray's hooks): the
    mean over epochs after the first, each epoch's rate measured as the workers measure theirs."""
    from vae_core import load_config
    from vae_core.training.fit import Fit, steps_per_epoch
    from vae_core.training.hooks import Hooks
    from vae_core.training.loop import iterate_batches

    cfg = load_config(preset, [*overrides, f"train.epochs={epochs}"])
    fit = Fit.create(cfg, steps_per_epoch(len(train_x), cfg.train.batch_size))
    rates: list[float] = []
    fit.run(lambda epoch: iterate_batches(train_x, cfg.train.batch_size, generator=fit.order(epoch)),
            hooks=Hooks(on_epoch=lambda epoch, m: rates.append(m["images_per_s"])))
    return sum(rates[1:]) / len(rates[1:]) if len(rates) > 1 else rates[0]


def pipeline(dataset: str, preset: str, overrides: list[str], epochs: int, workers: int,
             memory_budget_mb: float) -> dict[str, float]:
    import mlflow

    from flows.train import train_vae
    from vae_core.requests import TrainRequest

    t0 = time.perf_counter()
    out = train_vae(TrainRequest(dataset=dataset, preset=preset, overrides=overrides, epochs=epochs, workers=workers,
                                 max_failures=0, memory_budget_mb=memory_budget_mb))
    wall = time.perf_counter() - t0
    history = mlflow.MlflowClient().get_metric_history(out.run_id, "epoch/images_per_s")
    rates = [h.value for h in sorted(history, key=lambda h: h.step)]
    steady = rates[1:] or rates
    return {
        "images_per_s": sum(steady) / len(steady),
        "ray_start_s": out.metrics["startup/ray_s"],
        "register_s": out.metrics["startup/register_s"],
        "wall_s": wall,
        "epoch_rates": rates,
    }


def quality(minutes: float, iw_samples: int, home: Path, dataset: str, preset: str, overrides: list[str],
            device: str = "cpu", test_images: int | None = None) -> None:
    from vae_core import load_config
    from vae_core.data.shards import open_dataset, read_split_u8
    from vae_core.training.fit import Fit, steps_per_epoch
    from vae_core.training.hooks import Hooks
    from vae_core.training.loop import iterate_batches

    name, version = dataset.split("@")
    info = open_dataset(str(home / "datasets"), name, version)
    # Held on the device, as the train-vae worker holds a split that fits train.device_data_mb.
    train_x = torch.cat([torch.from_numpy(read_split_u8(info, s)[0]) for s in ("train", "val")
                         if info.counts.get(s)]).to(device)
    test_x = torch.from_numpy(read_split_u8(info, "test")[0][:test_images]).to(device)
    # train-vae's own time budget: as many epochs as fit, the cosine running down over them.
    cfg = load_config(preset, [f"train.time_budget_minutes={minutes}", "train.epochs=100000", *overrides])
    bs = cfg.train.batch_size
    fit = Fit.create(cfg, steps_per_epoch(len(train_x), bs), device)
    curve: list[tuple[int, float, float]] = []

    def learning_curve(epoch: int, m: dict[str, float]) -> None:
        curve.append((epoch, m["elapsed_s"], -m["elbo"]))
        print(f"epoch {epoch:3d}  {m['elapsed_s']:7.1f}s  train -ELBO {-m['elbo']:.2f}", flush=True)

    fit.run(lambda epoch: iterate_batches(train_x, bs, generator=fit.order(epoch)),
            hooks=Hooks(on_epoch=learning_curve))
    t_eval = time.perf_counter()
    test = fit.evaluate(iterate_batches(test_x, 100, shuffle=False), iw_samples=iw_samples)
    print(json.dumps({
        "preset": preset, "overrides": overrides, "device": device, "train_minutes": fit.state.elapsed_s / 60,
        "epochs": len(curve), "test_images": len(test_x),
        "iw_samples": iw_samples, "test_nll_nats": test["nll"], "test_neg_elbo": test["loss"],
        "eval_minutes": (time.perf_counter() - t_eval) / 60,
        "curve": [{"epoch": e, "seconds": round(s, 1), "train_neg_elbo": round(v, 2)} for e, s, v in curve],
    }, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20_000, help="MNIST training images for the throughput runs")
    ap.add_argument("--epochs", type=int, default=5, help="per throughput run; the steady state is the mean "
                    "over epochs after the first (a streamed split still warms up in the second)")
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--quality-minutes", type=float, default=0.0)
    ap.add_argument("--iw-samples", type=int, default=1000)
    ap.add_argument("--test-images", type=int, default=None,
                    help="score only the first N test images (quick comparisons; the target is on all 10,000)")
    ap.add_argument("--device", default="cpu", help="the quality run's device (cpu, cuda)")
    ap.add_argument("--repeat", type=int, default=1, help="alternating bare/pipeline pairs per case; prints the "
                    "median ratio, which a noisy machine settles better than one pair")
    ap.add_argument("--cases", nargs="*", default=None, choices=["memory1", "memory2", "stream1"],
                    help="only these: memory1 (1 worker, in memory), memory2 (2 workers), stream1 (1 worker, "
                    "streamed through Ray Data); default all")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override key=value for the quality run (repeatable)")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="vae-bench-"))
    os.environ["VAE_HOME"] = str(home)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from flows.tracking import runs as tracking

    tracking.configure()
    if args.quality_minutes:
        quality(args.quality_minutes, args.iw_samples, home, ingest_mnist(home, None), args.preset, args.overrides,
                args.device, args.test_images)
        return

    dataset = ingest_mnist(home, args.images)
    from vae_core.data.shards import open_dataset, read_split_u8

    name, version = dataset.split("@")
    train_np, _, _ = read_split_u8(open_dataset(str(home / "datasets"), name, version), "train")
    threads = torch.get_num_threads()
    overrides: list[str] = ["train.image_every=1000"]
    print(f"images={len(train_np)} preset={args.preset} epochs={args.epochs} torch_threads={threads}")
    # Bare loops and pipelines alternate, and each pipeline is compared with the mean of the bare loops
    # just before and just after it, so drift in what else the machine is doing affects both sides alike.
    every = {"memory1": ("1 worker, in memory", 1, 4096.0), "memory2": ("2 workers, in memory", 2, 4096.0),
             "stream1": ("1 worker, streamed", 1, 0.01)}
    cases = [every[key] for key in (args.cases or every)]
    ratios: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    for rep in range(1, args.repeat + 1):
        bare = [bare_loop(torch.from_numpy(train_np), args.preset, overrides, args.epochs)]
        for label, workers, budget in cases:
            p = pipeline(dataset, args.preset, overrides, args.epochs, workers, budget)
            bare.append(bare_loop(torch.from_numpy(train_np), args.preset, overrides, args.epochs))
            base = (bare[-2] + bare[-1]) / 2
            ratios[label].append(p["images_per_s"] / base)
            print(f"[{rep}/{args.repeat}] pipeline {label:22s} {p['images_per_s']:6.0f} images/s  bare {base:6.0f}  "
                  f"ratio {ratios[label][-1]:.3f}  (ray start {p['ray_start_s']:.1f}s, registration "
                  f"{p['register_s']:.1f}s, wall {p['wall_s']:.1f}s; images/s by epoch "
                  f"{', '.join(f'{r:.0f}' for r in p['epoch_rates'])})", flush=True)
    if args.repeat > 1:
        for label, rs in ratios.items():
            print(f"pipeline/bare {label:22s} median {statistics.median(rs):.3f}  (min {min(rs):.3f}, max {max(rs):.3f}, "
                  f"{len(rs)} pairs)")


if __name__ == "__main__":
    sys.exit(main())
