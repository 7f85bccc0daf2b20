"""The registered model: an MLflow pyfunc whose `predict` encodes images into latent Gaussians.

Pull and use it from any process that can reach the tracking server::

    import mlflow, numpy as np

    loaded = mlflow.pyfunc.load_model("models:/vae-digits@champion")
    out = loaded.predict(images_u8)          # images: uint8 (N, H, W, C), the dataset's shape
    out["mean"], out["logvar"]               # float32 (N, latent_dim) each
    vae = loaded.unwrap_python_model().model # the vae_core.model.ConvVAE (eval mode, CPU)
    vae.decode(torch.from_numpy(out["mean"]))  # likelihood parameters (N, P*C, H, W)
    vae.sample(16)                           # 16 images from the prior, (16, C, H, W) in [0, 1]

How it is stored (see `flows.registry.log_and_register_model`):

- weights: a safetensors file written by `vae_core.weights.save_model` (config in its metadata), read
  back with `vae_core.weights.load_model`; nothing is unpickled;
- code: this file is logged as a "model from code": MLflow executes it under a generated module name
  and keeps the object given to `mlflow.models.set_model`, so loading does not need the `flows`
  package. A copy of `vae_core` travels in the model's `code/` folder, so the model loads with the
  library it was trained with even where `vae_core` is not installed (where it is already imported,
  the imported one is used).

Input: the signature is a uint8 TensorSpec (-1, H, W, C), which `PyFuncModel.predict` enforces
before this code runs (wrong shape or dtype -> `mlflow.exceptions.MlflowException` naming both). It
also accepts a one-column DataFrame of flattened pixel lists (MLflow reshapes it). Called directly
(`loaded.unwrap_python_model().predict(None, x)`), `predict` additionally takes (N, H, W) for
one-channel models and (N, H*W*C) flattened rows, and raises ValueError on a shape mismatch.

Output: a dict `{"mean": float32 (N, L), "logvar": float32 (N, L)}` of numpy arrays; MLflow passes
a PythonModel's return value through unchanged.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from vae_core.encode import DEFAULT_BATCH_SIZE, encode_images
from vae_core.model import ConvVAE
from vae_core.weights import load_model

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
# the object given to set_model. A plain `import flows.pyfunc` registers nothing.
if __name__ != "flows.pyfunc":
    mlflow.models.set_model(VAEPyfunc())
