"""One pass over a split that scores every image: ELBO terms, IWAE log-likelihood, reconstruction error.

What the per-image numbers are:

- `log_px`, `kl`: the two ELBO terms for one posterior sample, nats per image (β = 1, no free bits).
- `iwae`: the importance-weighted bound of log p(x) with K samples (`vae_core.model.iwae`); equal to the ELBO
  in expectation at K = 1, tighter as K grows.
- `mse`, `psnr`, `ssim`: the posterior mean's reconstruction against the original in [0, 1]
  (torchmetrics' PSNR and SSIM, per image).
- An autoencoder (`model.kind=ae`) has no likelihood bound: its `kl` and `iwae` are NaN and its summary
  leaves out every number built on them (it keeps `recon_nll`, the likelihood of the image at its code).
- `mean`, `logvar`: the posterior of the image itself (no binarisation or dequantisation noise), the
  embedding that latent metrics and pictures use and that the registered model's `predict` returns.

A split streams: `score_batches` scores batches as they come and `ScoreTotals` keeps running sums, so the
split-level numbers need memory for one batch whatever the split's size; `score_split` keeps every image's
scores, for a split that fits in memory (tests, benchmarks).

Every batch draws its noise from its own generator, seeded from (seed, batch index), so a split scores
the same whichever devices, and however many, share the batches: two models compared on the same
split, K and seed see the same binarisation of the same images. Several devices (`devices=["cuda:0",
"cuda:1"]`) each hold a copy of the model and take every n-th batch in a thread of their own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np
import torch

from vae_core.model.iwae import iwae_log_likelihood
from vae_core.model.losses import bits_per_dim
from vae_core.model.tv import import_torchmetrics
from vae_core.model.vae import ConvVAE

# Decoder passes per IWAE chunk: a GPU wants many at once; on a CPU more only costs memory.
_DECODES_PER_CHUNK = {"cpu": 5_000, "cuda": 100_000}
PER_IMAGE = ("log_px", "kl", "iwae", "mse", "psnr", "ssim")


@dataclass
class BatchScores:
    """Per-image scores of B images; arrays are float32, rows in the batch's order."""

    log_px: np.ndarray  # (B,) log p(x|z) for one posterior sample, nats
    kl: np.ndarray  # (B,) KL(q(z|x) || p(z)), nats
    iwae: np.ndarray  # (B,) IWAE bound of log p(x) with K samples, nats
    mse: np.ndarray  # (B,) mean squared error of the posterior mean's reconstruction, [0, 1] scale
    psnr: np.ndarray  # (B,) dB, data range 1
    ssim: np.ndarray  # (B,)
    kl_per_dim: np.ndarray  # (B, L) KL per latent dimension, nats
    mean: np.ndarray  # (B, L) posterior means of the images themselves: the embedding
    logvar: np.ndarray  # (B, L)
    reconstructions: np.ndarray  # (B, C, H, W) uint8, the posterior mean's decoded image

    def __len__(self) -> int:
        return len(self.log_px)


class ScoreTotals:
    """Running sums of per-image scores: a split's numbers in memory for one batch, whatever its size."""

    def __init__(self, k: int, dims: int, point: bool = False) -> None:
        self.k, self.dims, self.point = k, dims, point  # dims: C*H*W, for bits per dimension
        self.count = 0
        self.sums = dict.fromkeys(PER_IMAGE, 0.0)
        self.kl_dim_sums: np.ndarray | None = None  # (L,)

    def add(self, scores: BatchScores) -> None:
        """Add one batch; ValueError when a score a bound is built on is not finite (a model that cannot be
        scored), before any more of the split is scored."""
        bad = [key for key in (("log_px",) if self.point else ("log_px", "kl", "iwae"))
               if not np.isfinite(getattr(scores, key)).all()]
        if bad:
            raise ValueError(f"the model gives non-finite {', '.join(bad)} on this split; it cannot be scored")
        for key in PER_IMAGE:
            self.sums[key] += float(getattr(scores, key).sum(dtype=np.float64))
        dims = scores.kl_per_dim.sum(0, dtype=np.float64)
        self.kl_dim_sums = dims if self.kl_dim_sums is None else self.kl_dim_sums + dims
        self.count += len(scores)

    def merge(self, other: ScoreTotals) -> None:
        """Add the sums of another part of the split (scored elsewhere)."""
        for key in PER_IMAGE:
            self.sums[key] += other.sums[key]
        if other.kl_dim_sums is not None:
            self.kl_dim_sums = other.kl_dim_sums if self.kl_dim_sums is None else self.kl_dim_sums + other.kl_dim_sums
        self.count += other.count

    def mean(self, key: str) -> float:
        return self.sums[key] / self.count

    def summary(self) -> dict[str, float]:
        """Split-level numbers: means of the per-image scores, NLL in nats and bits/dim, KL per dim."""
        if self.count == 0:
            raise ValueError("no images to score: the split is empty")
        if self.point:
            return {"recon_nll": -self.mean("log_px"), "mse": self.mean("mse"), "psnr": self.mean("psnr"),
                    "ssim": self.mean("ssim")}
        neg_elbo = self.mean("kl") - self.mean("log_px")
        nll = -self.mean("iwae")
        out = {
            "neg_elbo": neg_elbo,
            "recon_nll": -self.mean("log_px"),
            "kl": self.mean("kl"),
            "elbo_bits_per_dim": bits_per_dim(neg_elbo, self.dims),
            f"nll_k{self.k}": nll,
            f"bits_per_dim_k{self.k}": bits_per_dim(nll, self.dims),
            "mse": self.mean("mse"),
            "psnr": self.mean("psnr"),
            "ssim": self.mean("ssim"),
        }
        assert self.kl_dim_sums is not None
        out.update({f"kl_dim_{i:02d}": float(v) / self.count for i, v in enumerate(self.kl_dim_sums)})
        return out


@dataclass
class SplitScores:
    """Every image's scores of a split held in memory: `BatchScores`' arrays over N rows, and its totals."""

    scores: BatchScores
    totals: ScoreTotals

    def __getattr__(self, name: str) -> np.ndarray:  # the per-image arrays: s.mean, s.iwae, ...
        scores = self.__dict__.get("scores")
        if scores is None:  # not built yet (copy, pickle): no per-image arrays to give
            raise AttributeError(name)
        return getattr(scores, name)

    @property
    def kl_per_dim(self) -> np.ndarray:
        """(L,) KL per latent dimension, mean over the images, nats."""
        return self.scores.kl_per_dim.mean(0)

    def summary(self) -> dict[str, float]:
        return self.totals.summary()


def devices_for(gpus: int) -> list[torch.device]:
    """The devices an evaluation with `gpus` GPUs runs on: the CPU for 0, else cuda:0..gpus-1.

    Raises:
        ValueError: more GPUs asked for than this machine has.
    """
    if gpus <= 0:
        return [torch.device("cpu")]
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > found:
        raise ValueError(f"--gpus {gpus} asks for {gpus} CUDA devices, but this machine has {found}")
    return [torch.device("cuda", i) for i in range(gpus)]


def ssim_kernel(height: int, width: int) -> int:
    """SSIM's Gaussian window: the usual 11, or the largest odd size the image holds (8x8 digits: 7)."""
    side = min(11, height, width)
    return side if side % 2 else side - 1


def score_batches(
    model: ConvVAE,
    batches: Iterable[np.ndarray | torch.Tensor],
    k: int = 100,
    seed: int = 0,
    devices: list[torch.device] | None = None,
    on_batch: Callable[[int], None] | None = None,
    first_batch: int = 0,
) -> Iterator[BatchScores]:
    """Score uint8 batches (B, H, W, C) with `model` as they come, yielding each batch's scores in order.

    Batch b draws its noise from (seed, first_batch + b), and with several devices goes to device b mod n; at
    most one batch per device is in memory. `on_batch(n_images)` is called after each batch (progress bars).
    Raises ValueError for K below 1, images not in the model's shape, or no images at all.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got k={k}")
    devices = devices or [next(model.parameters()).device]
    home = next(model.parameters()).device
    replicas = [(model if device == home else copy.deepcopy(model).to(device)).eval() for device in devices]

    def run(b: int, images: np.ndarray | torch.Tensor) -> BatchScores:
        replica = replicas[b % len(devices)]
        x_u8 = _checked(replica, torch.as_tensor(images)).permute(0, 3, 1, 2)
        return _score_batch(replica, x_u8, k, _batch_generator(devices[b % len(devices)], seed, first_batch + b))

    scored = [0]

    def done(scores: BatchScores) -> BatchScores:
        scored[0] += len(scores)
        if on_batch:
            on_batch(len(scores))
        return scores

    batches = (images for images in batches if len(images))
    if len(devices) == 1:
        for b, images in enumerate(batches):
            yield done(run(b, images))
    else:
        with ThreadPoolExecutor(len(devices)) as pool:
            window: list = []  # one batch in flight per device
            for b, images in enumerate(batches):
                window.append(pool.submit(run, b, images))
                if len(window) == len(devices):
                    yield from (done(future.result()) for future in window)
                    window = []
            yield from (done(future.result()) for future in window)
    if scored[0] == 0:
        raise ValueError("no images to score: the split is empty")


def score_split(
    model: ConvVAE,
    images: np.ndarray | torch.Tensor,
    k: int = 100,
    seed: int = 0,
    batch_size: int = 500,
    devices: list[torch.device] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> SplitScores:
    """Score uint8 images (N, H, W, C) held in memory, keeping every image's scores (`score_batches` in
    batches of `batch_size`). Raises ValueError as `score_batches` does, and for a batch size below 1."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    images = torch.as_tensor(images)
    c, h, w = model.config.input_shape
    totals = ScoreTotals(k, c * h * w, point=model.config.kind == "ae")
    parts = []
    for scores in score_batches(model, images.split(batch_size), k=k, seed=seed, devices=devices,
                                on_batch=on_batch):
        totals.add(scores)
        parts.append(scores)
    joined = BatchScores(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(BatchScores)})
    return SplitScores(scores=joined, totals=totals)


def _checked(model: ConvVAE, images: torch.Tensor) -> torch.Tensor:
    c, h, w = model.config.input_shape
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (h, w, c):
        raise ValueError(f"expected uint8 images of shape (N, {h}, {w}, {c}), got {images.dtype} {tuple(images.shape)}")
    return images


def _batch_generator(device: torch.device, seed: int, batch: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch)


@torch.no_grad()
def _score_batch(model: ConvVAE, x_u8: torch.Tensor, k: int, generator: torch.Generator) -> BatchScores:
    """Score one uint8 batch (B, C, H, W)."""
    device = generator.device
    x_u8 = x_u8.to(device, non_blocking=True)
    b = len(x_u8)
    x, target = model.likelihood.prepare(x_u8, generator=generator)
    posterior = model.encode(x)
    log_px = model.likelihood.log_prob(model.decode(posterior.sample(generator)), target)
    chunk = max(1, _DECODES_PER_CHUNK.get(device.type, 5_000) // b)
    iwae = None if posterior.is_point else iwae_log_likelihood(model, x, target, k=k, chunk=chunk,
                                                               generator=generator)
    # The embedding and the reconstruction are of the image itself (`prepare_eval`: no binarisation or
    # dequantisation noise), as the registered model's `predict` encodes it; the ELBO and IWAE terms
    # above score the likelihood's prepared input, as training does.
    embedding = model.encode(model.prepare_eval(x_u8))
    recon = model.likelihood.mean(model.decode(embedding.mean)).float().clamp(0, 1)
    original = x_u8.float() / 255.0
    fn = import_torchmetrics().functional.image
    nan = np.full(b, np.nan, np.float32)
    kl_per_dim = np.full((b, model.latent_dim), np.nan, np.float32) if posterior.is_point \
        else _np(posterior.kl_per_dim())
    return BatchScores(
        log_px=_np(log_px), kl=kl_per_dim.sum(-1), iwae=nan if iwae is None else _np(iwae),
        mse=_np((recon - original).square().mean(dim=(1, 2, 3))),
        psnr=_np(fn.peak_signal_noise_ratio(recon, original, data_range=1.0, reduction="none", dim=(1, 2, 3))),
        ssim=_np(fn.structural_similarity_index_measure(
            recon, original, data_range=1.0, reduction="none", kernel_size=ssim_kernel(*recon.shape[-2:]))),
        kl_per_dim=kl_per_dim, mean=_np(embedding.mean), logvar=_np(embedding.logvar),
        reconstructions=_np(recon.mul(255).round()).astype(np.uint8))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
