"""Evaluating one model on one split: its numbers (`evaluate_model`) and its pictures (`draw_pictures`).

The numbers, all on the split's images and keyed without the split (the flow adds it):

- the scoring pass (`vae_core.evaluation.scores`): -ELBO and its terms, the IWAE NLL at K in nats and bits/dim,
  reconstruction MSE, PSNR and SSIM, KL per latent dimension;
- `active_units` (Burda et al. 2015);
- where the dataset has labels, `knn_accuracy` and `linear_probe_accuracy` of the latent means, fitted
  on the train split's latent means (`vae_core.evaluation.latent_metrics`);
- with a feature classifier, `frechet_samples` and `frechet_reconstructions`: the Fréchet distance of
  prior samples and of reconstructions to the real images, in the classifier's feature space
  (`vae_core.model.feature_net`, the offline stand-in for FID); where the classifier's held-out accuracy
  is known, it and chance (1/K) are kept apart from the split's numbers (`Evaluation.classifier`), and a
  note says when it is too low for the distances to be trusted (`feature_net.unreliable_features`);
- `sharpness_reconstructions` and `sharpness_samples`: the mean Laplacian variance of reconstructions and
  of prior samples over the real images' (`vae_core.evaluation.sharpness`; 1.0 is as sharp as the split, blurry
  below). Every model has them: they need neither labels nor a feature classifier.

The split streams (`EvalData.split`): scores are summed batch by batch (`ScoreTotals`), the latent means'
variance is a running moment, the Fréchet and sharpness measures keep running sums, and only a seeded sample
of rows (`SeededSample`: `sample_rows` latent means for the probes and maps, `picture_rows` images for the
pictures) is kept. Memory does not grow with the split; the numbers built on the sample say so in `notes`.

Label-based numbers on unlabelled data, and sharpness on a split without edges (blank images), are left
out with a note, never an error.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from vae_core.data.shards.read import RowBatch
from vae_core.evaluation.latent_metrics import RunningVariance, count_active, latent_probes
from vae_core.evaluation.sample import SeededSample
from vae_core.evaluation.scores import BatchScores, ScoreTotals, score_batches
from vae_core.evaluation.sharpness import SharpnessMeter
from vae_core.model.encode import encode_images
from vae_core.model.feature_net import FrechetScorer, unreliable_features
from vae_core.model.pictures import grid, reconstruction_grid
from vae_core.model.vae import ConvVAE

SAMPLE_ROWS = 20_000  # latent means the probes and maps use: their cost grows faster than the split's
PICTURE_ROWS = 32


@dataclass
class EvalData:
    """What an evaluation reads: the split scored, as a function giving its rows in batches of a size (read
    once per model), and the seeded sample of the reference split (train) the latent probes fit on."""

    split: Callable[[int], Iterable[RowBatch]]
    reference: RowBatch | None = None
    reference_rows: int = 0  # rows of the whole reference split, for the notes

    @staticmethod
    def from_arrays(images: np.ndarray, labels: np.ndarray, reference: RowBatch | None = None) -> EvalData:
        """A split held in memory: images uint8 (N, H, W, C), labels int (N,) with -1 for "no label";
        ids are the row numbers."""
        labels = np.asarray(labels, dtype=np.int32)

        def split(batch_size: int) -> Iterator[RowBatch]:
            for at in range(0, len(images), batch_size):
                yield RowBatch(images[at : at + batch_size], labels[at : at + batch_size],
                               [str(i) for i in range(at, min(at + batch_size, len(images)))])

        return EvalData(split, reference, len(reference) if reference is not None else 0)


@dataclass
class Evaluation:
    """One model's numbers on one split, what was left out and why, and what the pictures are drawn from."""

    metrics: dict[str, float]
    images: int  # images scored
    sample: SeededSample  # "mean" (S, L) float32 and "label" (S,) of a seeded sample of the split
    pictures: SeededSample  # "image" (P, H, W, C), "recon" (P, C, H, W) uint8 and "label" (P,)
    unit_variance: np.ndarray  # (L,) variance of each latent mean across the split
    notes: list[str] = field(default_factory=list)
    # The feature classifier's own numbers (features/classifier_accuracy, features/chance_accuracy): measured
    # on its held-out rows, not on the split, so they are keyed apart from `metrics`.
    classifier: dict[str, float] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return bool((self.sample["label"] >= 0).any())

    def keyed(self, split: str) -> dict[str, float]:
        """Every number as it is logged and reported: the split's as `<split>/<name>`, then the classifier's."""
        return {f"{split}/{k}": v for k, v in self.metrics.items()} | self.classifier


class SplitPass:
    """What a pass over a split keeps, none of it growing with the split: the scores' running sums, the latent
    means' running moments, the seeded samples, and the sharpness meter's sums. Passes over disjoint parts of
    a split (on several workers) `merge` into the pass over the whole."""

    def __init__(self, model: ConvVAE, k: int, seed: int, sample_rows: int = SAMPLE_ROWS) -> None:
        c, h, w = model.config.input_shape
        self.totals = ScoreTotals(k, c * h * w, point=model.config.kind == "ae")
        self.moments = RunningVariance()
        self.sample = SeededSample(sample_rows, seed)  # "mean", "label"
        self.pictures = SeededSample(PICTURE_ROWS, seed, stratify="label")  # "image", "recon", "label"
        self.sharpness = SharpnessMeter()

    def add(self, rows: RowBatch, scores: BatchScores, frechet: FrechetScorer | None) -> None:
        """Keep what the module docstring says of one scored batch; its reconstructions go to `frechet`."""
        self.totals.add(scores)
        self.moments.add(scores.mean)
        self.sample.add(rows.ids, mean=scores.mean, label=rows.labels)
        self.pictures.add(rows.ids, image=rows.images, recon=scores.reconstructions, label=rows.labels)
        recon = torch.from_numpy(scores.reconstructions)
        self.sharpness.add_real(torch.from_numpy(rows.images).permute(0, 3, 1, 2))
        self.sharpness.update(recon)
        if frechet is not None:
            frechet.add_fake(recon)

    def merge(self, other: SplitPass) -> None:
        self.totals.merge(other.totals)
        self.moments.merge(other.moments)
        self.sample.merge(other.sample)
        self.pictures.merge(other.pictures)
        self.sharpness.merge(other.sharpness)


def evaluate_model(
    model: ConvVAE,
    data: EvalData,
    k: int,
    seed: int = 0,
    batch_size: int = 500,
    devices: list[torch.device] | None = None,
    frechet: FrechetScorer | None = None,
    on_batch: Callable[[int], None] | None = None,
    sample_rows: int = SAMPLE_ROWS,
) -> Evaluation:
    """Every number in the module docstring for `model` on `data`, in one pass over the split and one over
    as many prior samples; `frechet` already holds the real images' features (one scorer serves every
    model compared on the split)."""
    split = SplitPass(model, k, seed, sample_rows)
    if frechet is not None:
        frechet.reset_fake()
    read: deque[RowBatch] = deque()  # the rows of the batches being scored: one per device at most

    def images() -> Iterator[np.ndarray]:
        for rows in data.split(batch_size):
            read.append(rows)
            yield rows.images

    for scores in score_batches(model, images(), k=k, seed=seed, devices=devices, on_batch=on_batch):
        split.add(read.popleft(), scores, frechet)
    return finish(model, split, data, seed, batch_size, devices, frechet)


def finish(model: ConvVAE, split: SplitPass, data: EvalData, seed: int, batch_size: int,
           devices: list[torch.device] | None, frechet: FrechetScorer | None) -> Evaluation:
    """The numbers of a finished pass (`frechet` holding its reconstructions' features), the prior samples'
    measures and the probes."""
    metrics = split.totals.summary()
    metrics["active_units"] = float(count_active(split.moments.variance))
    notes: list[str] = []
    if frechet is not None:
        metrics["frechet_reconstructions"] = frechet.compute()
    try:
        metrics["sharpness_reconstructions"] = split.sharpness.compute()
    except ValueError as e:  # a split without edges (blank images): nothing to be as sharp as
        notes.append(f"sharpness skipped: {e}")
    metrics.update(_prior_metrics(model, split.totals.count, batch_size, seed, frechet,
                                  split.sharpness if "sharpness_reconstructions" in metrics else None))
    probes, probe_notes = _probes(model, data, split.sample, seed, batch_size, devices)
    metrics.update(probes)
    notes += probe_notes
    classifier, classifier_notes = _classifier(frechet)
    return Evaluation(metrics=metrics, images=split.totals.count, sample=split.sample, pictures=split.pictures,
                      unit_variance=split.moments.variance, notes=notes + classifier_notes, classifier=classifier)


def _classifier(frechet: FrechetScorer | None) -> tuple[dict[str, float], list[str]]:
    """The feature classifier's held-out accuracy beside chance, and a note when it is too low for the
    Fréchet distances to be trusted; nothing when there is no classifier or its accuracy is not known."""
    if frechet is None or frechet.accuracy is None:
        return {}, []
    classes = frechet.net.num_classes
    numbers = {"features/classifier_accuracy": frechet.accuracy, "features/chance_accuracy": 1.0 / classes}
    problem = unreliable_features(frechet.accuracy, classes)
    return numbers, [] if problem is None else [f"Fréchet distances unreliable: {problem}"]


def _prior_metrics(model: ConvVAE, n: int, batch_size: int, seed: int, frechet: FrechetScorer | None,
                   sharpness: SharpnessMeter | None) -> dict[str, float]:
    """`frechet_samples` and `sharpness_samples` of n prior samples: one seeded draw, read by both measures
    batch by batch (the sharpness of the very samples the Fréchet distance saw, one decoder pass)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    samples = _prior_samples(model, n, batch_size, generator)
    if sharpness is not None:
        sharpness.reset()
        samples = _measured(samples, sharpness)
    out = {}
    if frechet is not None:
        out["frechet_samples"] = frechet.distance(samples)
    elif sharpness is not None:
        deque(samples, maxlen=0)  # read for the sharpness alone
    if sharpness is not None:
        out["sharpness_samples"] = sharpness.compute()
    return out


def _probes(model: ConvVAE, data: EvalData, sample: SeededSample, seed: int, batch_size: int,
            devices: list[torch.device] | None) -> tuple[dict[str, float], list[str]]:
    """k-NN and linear-probe accuracy of the sampled latent means, fitted on the reference sample's."""
    ref = data.reference
    if ref is None or not (ref.labels >= 0).any():
        return {}, ["k-NN and linear probe skipped: no labelled train split to fit them on"]
    model.to(devices[0] if devices else next(model.parameters()).device)
    train_mean, _ = encode_images(model, ref.images, batch_size=batch_size)
    probes, notes = latent_probes(train_mean, ref.labels, sample["mean"], sample["label"], seed=seed)
    if probes and (len(sample) < sample.seen or len(ref) < data.reference_rows):
        notes.append(f"k-NN and linear probe: {sample.describe('the split')}, fitted on "
                     f"{len(ref):,} of the {data.reference_rows:,} reference rows (seeded)")
    return probes, notes


def _prior_samples(model: ConvVAE, n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """n images from the prior in batches, (B, C, H, W) in [0, 1]."""
    for start in range(0, n, batch_size):
        yield model.sample(min(batch_size, n - start), generator=generator)


def _measured(batches: Iterable[torch.Tensor], meter: SharpnessMeter) -> Iterator[torch.Tensor]:
    """Each batch, unchanged, after `meter` has measured it: one stream for two consumers, none held."""
    for batch in batches:
        meter.update(batch)
        yield batch


def draw_pictures(model: ConvVAE, evaluation: Evaluation, seed: int = 0, map_points: int = 2000,
                  label_names: list[str] | None = None) -> dict[str, Image.Image]:
    """What a person looks at: "reconstructions" (originals above reconstructions), "samples" from the prior,
    "interpolations" between pairs of split images, "traversals" of the most active latent dimensions and
    "latent_pca" / "latent_tsne" maps of the latent means coloured by label, their legends naming classes by
    `label_names` (the dataset's); all from the evaluation's seeded samples of the split (the pictures' one
    stratified by label, so every class is shown)."""
    from vae_core.evaluation.pictures import interpolation_grid, latent_maps, traversal_grid

    device = next(model.parameters()).device
    shown = evaluation.pictures
    originals = torch.from_numpy(np.ascontiguousarray(shown["image"])).permute(0, 3, 1, 2)
    recons = torch.from_numpy(shown["recon"])
    pictures = {
        "reconstructions": reconstruction_grid(originals.float() / 255, recons.float() / 255),
        "samples": grid(model.sample(64, generator=torch.Generator(device=device).manual_seed(seed))),
    }
    pairs = _pairs(originals, shown["label"], count=8)
    if pairs is not None:
        pictures["interpolations"] = interpolation_grid(model, pairs, steps=10)
    top = [int(d) for d in np.argsort(-evaluation.unit_variance)[:8]]
    pictures["traversals"] = traversal_grid(model, originals[0], top)
    sample = evaluation.sample
    if len(sample) >= 3:
        labels = sample["label"] if evaluation.labelled else None
        pictures.update(latent_maps(sample["mean"], labels, max_points=map_points, seed=seed,
                                    label_names=label_names))
    return pictures


def _pairs(images: torch.Tensor, labels: np.ndarray, count: int) -> torch.Tensor | None:
    """Up to `count` pairs of images (N, C, H, W) uint8, as (P, 2, C, H, W); with labels, each pair spans two
    classes (the interesting path), else images i and i + count."""
    n = len(images)
    if n < 2:
        return None
    labelled = bool((labels >= 0).any())
    chosen: list[tuple[int, int]] = []
    for i in range(min(count, n // 2)):
        j = next((j for j in range(i + 1, n) if labels[j] != labels[i]), i + 1) if labelled \
            else min(i + count, n - 1)
        chosen.append((i, j))
    return images[torch.tensor(chosen)]
