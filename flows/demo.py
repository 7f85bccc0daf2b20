"""`vae demo`: the offline end-to-end run on scikit-learn's digits, on one machine, in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vae_core import load_config
from vae_core.fit import Fit, steps_per_epoch
from vae_core.settings import vae_home
from vae_core.sources.digits import load_digits_u8
from vae_core.train import iterate_batches
from vae_core.weights import save_model


def run_demo(out: Path | None = None, epochs: int = 20, progress: bool = True) -> dict:
    """Train the `digits` preset on 1,500 digits, score the rest with IWAE, write pictures and weights."""
    out = Path(out or os.path.join(vae_home(), "demo"))
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config("digits", {"train.epochs": epochs})
    images, _ = load_digits_u8()
    train_x, test_x = torch.from_numpy(images[:1500]), torch.from_numpy(images[1500:])

    fit = Fit.create(cfg, steps_per_epoch(len(train_x), cfg.train.batch_size))
    bar = tqdm(range(1, cfg.train.epochs + 1), desc="train digits", unit="epoch", disable=not progress)
    for epoch in bar:
        m = fit.train_epoch(iterate_batches(train_x, cfg.train.batch_size, generator=fit.order(epoch)))
        bar.set_postfix(loss=f"{m['loss']:.1f}", kl=f"{m['kl']:.1f}")
    test = fit.evaluate(iterate_batches(test_x, 100, shuffle=False), iw_samples=200)

    sizes = {"samples": (400, 400), "reconstructions": (400, 400), "interpolation": (500, 50)}
    paths = {k: out / f"{k}.png" for k in sizes}
    for kind, image in fit.previews(test_x[:32].permute(0, 3, 1, 2)).items():
        image.resize(sizes[kind], 0).save(paths[kind])
    paths["weights"] = out / "model.safetensors"
    save_model(fit.model, str(paths["weights"]))
    return {
        "test_nll": test["nll"],
        "test_bits_per_dim": test["bits_per_dim"],
        "test_elbo": -test["loss"],
        **{k: str(v) for k, v in paths.items()},
    }
