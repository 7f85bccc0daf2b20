"""How sharp images are, relative to real ones: the variance of the Laplacian (Pech-Pacheco et al. 2000).

A plain VAE's Gaussian or Bernoulli decoder averages over what it is unsure of, so its images are blurry:
few strong second derivatives, a low Laplacian variance. `SharpnessMeter` reports the generated images'
mean Laplacian variance over the real images', so 1.0 is "as sharp as the data" and a blurry model
scores below it. Noise raises the Laplacian too: a ratio above 1 can mean speckle, not detail.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

# The 4-neighbour Laplacian, the usual kernel of the blur measure.
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_variance(images: torch.Tensor) -> torch.Tensor:
    """Per-image variance of the 3x3 Laplacian of the grey-level image, (B,) float32 on images' device.

    images: (B, C, H, W), uint8 or floats in [0, 1] (both give the same number), H, W >= 3.
    """
    if images.ndim != 4 or images.shape[-1] < 3 or images.shape[-2] < 3:
        raise ValueError(f"images must be (B, C, H, W) with H, W >= 3, got {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    # Edges between colour channels are not sharpness: average channels to one grey level first.
    grey = x.mean(dim=1, keepdim=True)
    # No padding ('valid'): a zero or reflected border would add edges that are not in the image.
    response = F.conv2d(grey, _LAPLACIAN.to(grey.device).view(1, 1, 3, 3))
    # correction=0: a 3x3 image leaves one response, whose spread is 0, not NaN.
    return response.flatten(1).var(dim=1, correction=0)


class _RunningMean:
    """The mean of per-image values added batch by batch: a float64 sum and a count on the CPU, exact
    enough over millions of images and independent of the device the values come from."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, values: torch.Tensor) -> None:
        """Add per-image values, (B,)."""
        self.total += float(values.double().sum())
        self.count += len(values)

    @property
    def mean(self) -> float:
        return self.total / self.count


class SharpnessMeter:
    """Sharpness of image sets relative to one real image set, streamed in batches on any device.

    `add_real(batch)` for each batch of real images (once), then `relative(batches)` per image set;
    or `reset()`, `update(batch)`... `compute()` to measure a stream another consumer also reads.
    """

    def __init__(self) -> None:
        self._real, self._measured = _RunningMean(), _RunningMean()

    def add_real(self, images: torch.Tensor) -> None:
        """Add a batch of real images, (B, C, H, W) uint8 or floats in [0, 1]."""
        self._real.add(laplacian_variance(images))

    def merge(self, other: SharpnessMeter) -> None:
        """Add the real and measured images another meter saw (another part of the split)."""
        for mine, theirs in ((self._real, other._real), (self._measured, other._measured)):
            mine.total += theirs.total
            mine.count += theirs.count

    def reset(self) -> None:
        """Forget the measured images (the real ones stay)."""
        self._measured = _RunningMean()

    def update(self, images: torch.Tensor) -> None:
        """Measure a batch of images, (B, C, H, W) uint8 or floats in [0, 1]."""
        self._measured.add(laplacian_variance(images))

    def compute(self) -> float:
        """Mean Laplacian variance of the images measured since `reset`, over the real images' mean."""
        if self._real.count == 0 or self._measured.count == 0:
            raise ValueError(f"sharpness needs real and measured images, got {self._real.count} real "
                             f"and {self._measured.count} measured")
        real = self._real.mean
        if real <= 0.0:
            raise ValueError(f"the {self._real.count} real images have no edges at all (Laplacian variance 0, "
                             "e.g. constant images): sharpness relative to them is undefined")
        return self._measured.mean / real

    def relative(self, batches: Iterable[torch.Tensor]) -> float:
        """Sharpness of the images in `batches` (each (B, C, H, W)) relative to the real ones: 1.0 is
        as sharp as real, below 1 blurrier."""
        self.reset()
        for batch in batches:
            self.update(batch)
        return self.compute()
