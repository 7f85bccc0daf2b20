"""scikit-learn's 8x8 handwritten digits: shipped with the package, so demos run offline."""

from __future__ import annotations

import numpy as np


def load_digits_u8() -> tuple[np.ndarray, np.ndarray]:
    """-> images uint8 (1797, 8, 8, 1) scaled from 0..16 to 0..255, labels int32 (1797,)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int32)
