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

Every batch draws its noise from its own generator, seeded from (seed, batch index), so a split scores
the same whichever devices, and however many, share the batches: two models compared on the same
split, K and seed see the same binarisation of the same images. Several devices (`devices=["cuda:0",
"cuda:1"]`) each hold a copy of the model and take every n-th batch in a thread of their own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from vae_core.model.iwae import iwae_log_likelihood
from vae_core.model.losses import bits_per_dim
from vae_core.model.tv import import_torchmetrics
from vae_core.model.vae import ConvVAE

# Decoder passes per IWAE chunk: a GPU wants many at once; on a CPU more only costs memory.
_DECODES_PER_CHUNK = {"cpu": 5_000, "cuda": 100_000}


@dataclass
class SplitScores:
    """Per-image scores of one split; arrays are float32 with N rows in the split's order."""

    log_px: np.ndarray  # (N,) log p(x|z) for one posterior sample, nats
    kl: np.ndarray  # (N,) KL(q(z|x) || p(z)), nats
    kl_per_dim: np.ndarray  # (L,) KL per latent dimension of the ELBO's posterior, mean over images, nats
    iwae: np.ndarray  # (N,) IWAE bound of log p(x) with `k` samples, nats
    mse: np.ndarray  # (N,) mean squared error of the posterior mean's reconstruction, [0, 1] scale
    psnr: np.ndarray  # (N,) dB, data range 1
    ssim: np.ndarray  # (N,)
    mean: np.ndarray  # (N, L) posterior means of the images themselves: the embedding
    logvar: np.ndarray  # (N, L)
    reconstructions: np.ndarray  # (N, C, H, W) uint8, the posterior mean's decoded image
    k: int
    dims: int  # C*H*W, for bits per dimension
    point: bool = False  # an autoencoder's scores: no KL, no IWAE bound

    def summary(self) -> dict[str, float]:
        """Split-level numbers: means of the per-image scores, NLL in nats and bits/dim, KL per dim."""
        if self.point:
            return {"recon_nll": float(-self.log_px.mean()), "mse": float(self.mse.mean()),
                    "psnr": float(self.psnr.mean()), "ssim": float(self.ssim.mean())}
        neg_elbo = float(-(self.log_px - self.kl).mean())
        nll = float(-self.iwae.mean())
        out = {
            "neg_elbo": neg_elbo,
            "recon_nll": float(-self.log_px.mean()),
            "kl": float(self.kl.mean()),
            "elbo_bits_per_dim": bits_per_dim(neg_elbo, self.dims),
            f"nll_k{self.k}": nll,
            f"bits_per_dim_k{self.k}": bits_per_dim(nll, self.dims),
            "mse": float(self.mse.mean()),
            "psnr": float(self.psnr.mean()),
            "ssim": float(self.ssim.mean()),
        }
        out.update({f"kl_dim_{i:02d}": float(v) for i, v in enumerate(self.kl_per_dim)})
        return out


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


def score_split(
    model: ConvVAE,
    images: np.ndarray | torch.Tensor,
    k: int = 100,
    seed: int = 0,
    batch_size: int = 500,
    devices: list[torch.device] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> SplitScores:
    """Score uint8 images (N, H, W, C) with `model`; see the module docstring for what and how.

    `on_batch(n_images)` is called after each batch (progress bars). Raises ValueError for an empty
    split, a batch size or K below 1, or images not in the model's shape.
    """
    images = torch.as_tensor(images)
    c, h, w = model.config.input_shape
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (h, w, c):
        raise ValueError(f"expected uint8 images of shape (N, {h}, {w}, {c}), got {images.dtype} {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("no images to score: the split is empty")
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be at least 1, got k={k}, batch_size={batch_size}")
    devices = devices or [next(model.parameters()).device]
    starts = list(range(0, len(images), batch_size))
    out = _empty(len(images), model, k)

    def run(rank: int) -> None:
        device = devices[rank]
        replica = model if next(model.parameters()).device == device else copy.deepcopy(model).to(device)
        replica.eval()
        for b in range(rank, len(starts), len(devices)):
            batch = images[starts[b] : starts[b] + batch_size].permute(0, 3, 1, 2)
            _score_batch(replica, batch, k, _batch_generator(device, seed, b), out, starts[b])
            if on_batch:
                on_batch(len(batch))

    if len(devices) == 1:
        run(0)
    else:
        with ThreadPoolExecutor(len(devices)) as pool:
            list(pool.map(run, range(len(devices))))  # list(): re-raises a thread's error here
    return _finish(out, k, c * h * w, point=model.config.kind == "ae")


def _batch_generator(device: torch.device, seed: int, batch: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch)


def _empty(n: int, model: ConvVAE, k: int) -> dict[str, np.ndarray]:
    c, h, w = model.config.input_shape
    latent = model.latent_dim
    out = {key: np.empty(n, np.float32) for key in ("log_px", "kl", "iwae", "mse", "psnr", "ssim")}
    out.update(mean=np.empty((n, latent), np.float32), logvar=np.empty((n, latent), np.float32),
               kl_per_dim=np.empty((n, latent), np.float32), reconstructions=np.empty((n, c, h, w), np.uint8))
    return out


@torch.no_grad()
def _score_batch(model: ConvVAE, x_u8: torch.Tensor, k: int, generator: torch.Generator,
                 out: dict[str, np.ndarray], at: int) -> None:
    """Score one uint8 batch (B, C, H, W) into rows [at, at + B) of `out`."""
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
    rows = slice(at, at + b)
    fn = import_torchmetrics().functional.image
    out["psnr"][rows] = _np(fn.peak_signal_noise_ratio(recon, original, data_range=1.0, reduction="none",
                                                       dim=(1, 2, 3)))
    out["ssim"][rows] = _np(fn.structural_similarity_index_measure(
        recon, original, data_range=1.0, reduction="none", kernel_size=ssim_kernel(*recon.shape[-2:])))
    out["mse"][rows] = _np((recon - original).square().mean(dim=(1, 2, 3)))
    out["log_px"][rows] = _np(log_px)
    out["kl_per_dim"][rows] = np.nan if posterior.is_point else _np(posterior.kl_per_dim())
    out["kl"][rows] = out["kl_per_dim"][rows].sum(-1)
    out["iwae"][rows] = np.nan if iwae is None else _np(iwae)
    out["mean"][rows] = _np(embedding.mean)
    out["logvar"][rows] = _np(embedding.logvar)
    out["reconstructions"][rows] = _np(recon.mul(255).round()).astype(np.uint8)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _finish(out: dict[str, np.ndarray], k: int, dims: int, point: bool) -> SplitScores:
    kl_rows = out.pop("kl_per_dim")
    bad = [key for key in (("log_px",) if point else ("log_px", "kl", "iwae")) if not np.isfinite(out[key]).all()]
    if bad:
        raise ValueError(f"the model gives non-finite {', '.join(bad)} on this split; it cannot be scored")
    return SplitScores(kl_per_dim=kl_rows.mean(0), k=k, dims=dims, point=point, **out)

