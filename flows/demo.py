"""`vae demo`: the offline end-to-end run on scikit-learn's digits, on one machine, in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flows.settings import vae_home
from vae_core import ConvVAE, load_config
from vae_core.pictures import grid, reconstruction_grid
from vae_core.sources.digits import load_digits_u8
from vae_core.train import (
    TrainState,
    evaluate,
    iterate_batches,
    make_optimizer,
    make_scheduler,
    seed_everything,
    train_epoch,
)
from vae_core.weights import save_model


def run_demo(out: Path | None = None, epochs: int = 20, progress: bool = True) -> dict:
    """Train the `digits` preset on 1,500 digits, score the rest with IWAE, write pictures and weights."""
    out = Path(out or os.path.join(vae_home(), "demo"))
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config("digits", [f"train.epochs={epochs}"])
    images, _ = load_digits_u8()
    train_x, test_x = torch.from_numpy(images[:1500]), torch.from_numpy(images[1500:])

    gen = seed_everything(cfg.train.seed)
    model = ConvVAE(cfg.model)
    opt = make_optimizer(model, cfg.train)
    steps_per_epoch = -(-len(train_x) // cfg.train.batch_size)
    sched = make_scheduler(opt, cfg.train, steps_per_epoch * cfg.train.epochs)
    state = TrainState()
    bar = tqdm(range(cfg.train.epochs), desc="train digits", unit="epoch", disable=not progress)
    for _ in bar:
        m = train_epoch(model, opt, iterate_batches(train_x, cfg.train.batch_size, generator=gen), state,
                        cfg.train, sched, gen)
        bar.set_postfix(loss=f"{m['loss']:.1f}", kl=f"{m['kl']:.1f}")
    test = evaluate(model, iterate_batches(test_x, 100, shuffle=False), gen, iw_samples=200)

    paths = {
        "samples": out / "samples.png",
        "reconstructions": out / "reconstructions.png",
        "interpolation": out / "interpolation.png",
        "weights": out / "model.safetensors",
    }
    grid(model.sample(64, generator=gen)).resize((400, 400), 0).save(paths["samples"])
    batch = test_x[:32].permute(0, 3, 1, 2)
    reconstruction_grid(batch.float() / 255, model.reconstruct(batch)).resize((400, 400), 0).save(
        paths["reconstructions"])
    grid(model.interpolate(batch[0], batch[1], 10), nrow=10).resize((500, 50), 0).save(paths["interpolation"])
    save_model(model, str(paths["weights"]))
    return {
        "test_nll": test["nll"],
        "test_bits_per_dim": test["bits_per_dim"],
        "test_elbo": -test["loss"],
        **{k: str(v) for k, v in paths.items()},
    }
