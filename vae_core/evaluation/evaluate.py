"""Evaluating one model on one split: its numbers (`evaluate_model`) and its pictures (`draw_pictures`).

The numbers, all on the split's images and keyed without the split (the flow adds it):

- the scoring pass (`vae_core.evaluation.scores`): -ELBO and its terms, the IWAE NLL at K in nats and bits/dim,
  reconstruction MSE, PSNR and SSIM, KL per latent dimension;
- `active_units` (Burda et al. 2015);
- where the dataset has labels, `knn_accuracy` and `linear_probe_accuracy` of the latent means, fitted
  on the train split's latent means (`vae_core.evaluation.latent_metrics`);
- with a feature classifier, `frechet_samples` and `frechet_reconstructions`: the Fréchet distance of
  prior samples and of reconstructions to the real images, in the classifier's feature space
  (`vae_core.model.feature_net`, the offline stand-in for FID);
- `sharpness_reconstructions` and `sharpness_samples`: the mean Laplacian variance of reconstructions and
  of prior samples over the real images' (`vae_core.evaluation.sharpness`; 1.0 is as sharp as the split, blurry
  below). Every model has them: they need neither labels nor a feature classifier.

Label-based numbers on unlabelled data, and sharpness on a split without edges (blank images), are left
out with a note, never an error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from vae_core.evaluation.latent_metrics import active_units, latent_probes
from vae_core.evaluation.scores import SplitScores, score_split
from vae_core.evaluation.sharpness import SharpnessMeter
from vae_core.model.encode import encode_images
from vae_core.model.feature_net import FrechetScorer
from vae_core.model.pictures import grid, reconstruction_grid
from vae_core.model.vae import ConvVAE


@dataclass
class EvalData:
    """The images an evaluation reads: the split scored, and the train split for the latent probes.

    Images are uint8 (N, H, W, C); labels int (N,) with -1 for "no label".
    """

    images: np.ndarray
    labels: np.ndarray
    train_images: np.ndarray | None = None
    train_labels: np.ndarray | None = None

    @property
    def labelled(self) -> bool:
        return bool((self.labels >= 0).any())


@dataclass
class Evaluation:
    """One model's numbers on one split, what was left out and why, and the per-image scores."""

    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)
    scores: SplitScores | None = None
    unit_variance: np.ndarray | None = None  # (L,) variance of each latent mean across the split


def evaluate_model(
    model: ConvVAE,
    data: EvalData,
    k: int,
    seed: int = 0,
    batch_size: int = 500,
    devices: list[torch.device] | None = None,
    frechet: FrechetScorer | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Evaluation:
    """Every number in the module docstring for `model` on `data`; `frechet` already holds the real
    images' features (one scorer serves every model compared on the split)."""
    scores = score_split(model, data.images, k=k, seed=seed, batch_size=batch_size, devices=devices,
                         on_batch=on_batch)
    metrics = scores.summary()
    active, variance = active_units(scores.mean)
    metrics["active_units"] = float(active)
    notes: list[str] = []
    if data.train_images is not None and data.train_labels is not None:
        model.to(devices[0] if devices else next(model.parameters()).device)
        train_mean, _ = encode_images(model, data.train_images, batch_size=batch_size)
        probes, probe_notes = latent_probes(train_mean, data.train_labels, scores.mean, data.labels, seed=seed)
        metrics.update(probes)
        notes += probe_notes
    else:
        notes.append("k-NN and linear probe skipped: no labelled train split to fit them on")
    sharpness: SharpnessMeter | None = SharpnessMeter()
    real = torch.from_numpy(data.images).permute(0, 3, 1, 2)
    for start in range(0, len(real), batch_size):
        sharpness.add_real(real[start : start + batch_size])
    recon = torch.from_numpy(scores.reconstructions)
    try:
        metrics["sharpness_reconstructions"] = sharpness.relative(_batches(recon, batch_size))
    except ValueError as e:  # a split without edges (blank images): nothing to be as sharp as
        notes.append(f"sharpness skipped: {e}")
        sharpness = None
    # One draw of the prior, seeded as ever, read by both measures batch by batch: the sharpness of the
    # very samples the Fréchet distance saw, and no second pass through the decoder.
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    samples = _prior_samples(model, len(data.images), batch_size, generator)
    if frechet is not None:
        if sharpness is not None:
            sharpness.reset()
            samples = _measured(samples, sharpness)
        metrics["frechet_samples"] = frechet.distance(samples)
        if sharpness is not None:
            metrics["sharpness_samples"] = sharpness.compute()
        metrics["frechet_reconstructions"] = frechet.distance(_batches(recon, batch_size))
    elif sharpness is not None:
        metrics["sharpness_samples"] = sharpness.relative(samples)
    return Evaluation(metrics=metrics, notes=notes, scores=scores, unit_variance=variance)


def _prior_samples(model: ConvVAE, n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """n images from the prior in batches, (B, C, H, W) in [0, 1]."""
    for start in range(0, n, batch_size):
        yield model.sample(min(batch_size, n - start), generator=generator)


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    return (images[i : i + batch_size] for i in range(0, len(images), batch_size))


def _measured(batches: Iterable[torch.Tensor], meter: SharpnessMeter) -> Iterator[torch.Tensor]:
    """Each batch, unchanged, after `meter` has measured it: one stream for two consumers, none held."""
    for batch in batches:
        meter.update(batch)
        yield batch


def draw_pictures(model: ConvVAE, data: EvalData, evaluation: Evaluation, seed: int = 0,
                  map_points: int = 2000) -> dict[str, Image.Image]:
    """What a person looks at: "reconstructions" (originals above reconstructions), "samples" from the prior,
    "interpolations" between pairs of split images, "traversals" of the most active latent dimensions and
    "latent_pca" / "latent_tsne" maps of the latent means coloured by label."""
    from vae_core.evaluation.pictures import interpolation_grid, latent_maps, traversal_grid

    scores = evaluation.scores
    assert scores is not None and evaluation.unit_variance is not None
    device = next(model.parameters()).device
    originals = torch.from_numpy(np.ascontiguousarray(data.images[:32])).permute(0, 3, 1, 2)
    recons = torch.from_numpy(scores.reconstructions[: len(originals)])
    pictures = {
        "reconstructions": reconstruction_grid(originals.float() / 255, recons.float() / 255),
        "samples": grid(model.sample(64, generator=torch.Generator(device=device).manual_seed(seed))),
    }
    pairs = _pairs(data, count=8)
    if pairs is not None:
        pictures["interpolations"] = interpolation_grid(model, pairs, steps=10)
    top = [int(d) for d in np.argsort(-evaluation.unit_variance)[:8]]
    pictures["traversals"] = traversal_grid(model, originals[0], top)
    labels = data.labels if data.labelled else None
    if len(scores.mean) >= 3:
        pictures.update(latent_maps(scores.mean, labels, max_points=map_points, seed=seed))
    return pictures


def _pairs(data: EvalData, count: int) -> torch.Tensor | None:
    """Up to `count` pairs of split images, (P, 2, C, H, W) uint8; with labels, each pair spans two
    classes (the interesting path), else images i and i + count."""
    n = len(data.images)
    if n < 2:
        return None
    chosen: list[tuple[int, int]] = []
    for i in range(min(count, n // 2)):
        j = next((j for j in range(i + 1, n) if data.labels[j] != data.labels[i]), i + 1) if data.labelled \
            else min(i + count, n - 1)
        chosen.append((i, j))
    idx = torch.tensor(chosen)
    images = torch.from_numpy(np.ascontiguousarray(data.images)).permute(0, 3, 1, 2)
    return images[idx]
