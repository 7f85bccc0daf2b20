"""vae_core: the VAE library (models, likelihoods, losses, training functions, weights, pictures).

Pure PyTorch / NumPy / Arrow: it never imports prefect, ray or mlflow, so it runs anywhere. The names
below load on first use, so `import vae_core.requests` (the command line's options) pulls in no torch.
"""

from importlib import import_module

_EXPORTS = {"ConvVAE": "model.vae", "Posterior": "model.vae", "ModelConfig": "model.config",
            "TrainConfig": "model.config", "VAEConfig": "model.config", "load_config": "model.config"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"vae_core.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vae_core' has no attribute {name!r}")
