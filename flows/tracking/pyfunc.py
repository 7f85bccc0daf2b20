"""The registered model: an MLflow pyfunc whose `predict` encodes uint8 images into latent Gaussians.

How to pull it, what `predict` takes and returns, decoding and sampling, and what a version stores:
docs/models.md. This file is logged as a "model from code" (see `flows.tracking.registry`): MLflow executes it
under a generated module name at load time, with the copy of `vae_core` that travels in the model's
`code/` folder, so loading needs neither `flows` nor Prefect nor Ray.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from vae_core.model.encode import DEFAULT_BATCH_SIZE, encode_images
from vae_core.model.vae import ConvVAE
from vae_core.model.weights import load_model

WEIGHTS_ARTIFACT = "weights"


class VAEPyfunc(mlflow.pyfunc.PythonModel):
    """Encodes uint8 images with a `ConvVAE` into the posterior's mean and log-variance.

    After `mlflow.pyfunc.load_model(uri)`, `loaded.unwrap_python_model().model` is the ConvVAE.
    """

    def __init__(self) -> None:
        self.model: ConvVAE | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Rebuild the ConvVAE from the safetensors artifact (config from its metadata)."""
        self.model = load_model(context.artifacts[WEIGHTS_ARTIFACT]).eval()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images the model takes."""
        c, h, w = self._model().config.input_shape
        return (h, w, c)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """uint8 images (N, H, W, C) -> {"mean": (N, L), "logvar": (N, L)} float32 arrays.

        `params={"batch_size": n}` bounds memory (default 256 images per forward pass).
        """
        batch_size = int((params or {}).get("batch_size") or DEFAULT_BATCH_SIZE)
        mean, logvar = encode_images(self._model(), as_images(model_input, self.image_shape), batch_size)
        return {"mean": mean, "logvar": logvar}

    def _model(self) -> ConvVAE:
        if self.model is None:
            raise RuntimeError("VAEPyfunc has no model: load it with mlflow.pyfunc.load_model(uri)")
        return self.model


def as_images(model_input: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """Coerce a batch to a uint8 (N, H, W, C) array, or raise ValueError naming expected vs got.

    Accepts (N, H, W, C); (N, H, W) when C == 1; (N, H*W*C) flattened rows; a DataFrame of
    flattened pixel columns or of one column holding per-image arrays.
    """
    h, w, c = shape
    arr = _to_array(model_input)
    if arr.ndim == 3 and c == 1 and arr.shape[1:] == (h, w):
        arr = arr[..., None]
    elif arr.ndim == 2 and arr.shape[1] == h * w * c:
        arr = arr.reshape(-1, h, w, c)
    if arr.ndim != 4 or arr.shape[1:] != (h, w, c):
        also = f" or (N, {h}, {w})" if c == 1 else ""
        raise ValueError(f"expected uint8 images of shape (N, {h}, {w}, {c}){also}, got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels (0..255), got dtype {arr.dtype}")
    # torch.from_numpy needs a writable, aligned array; copy only when the input is not one.
    return np.require(arr, requirements=["A", "W"])


def _to_array(model_input: Any) -> np.ndarray:
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] == 1 and len(model_input) and not np.isscalar(model_input.iloc[0, 0]):
            return np.stack([np.asarray(v) for v in model_input.iloc[:, 0]])
        return model_input.to_numpy()
    if isinstance(model_input, torch.Tensor):
        return model_input.detach().cpu().numpy()
    return np.asarray(model_input)


# MLflow loads a "model from code" by executing this file under a generated module name and keeping
# the object given to set_model. A plain `import flows.tracking.pyfunc` registers nothing.
if __name__ != "flows.tracking.pyfunc":
    mlflow.models.set_model(VAEPyfunc())
