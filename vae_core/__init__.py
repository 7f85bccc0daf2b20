"""vae_core: the VAE library (models, likelihoods, losses, training functions, weights, pictures).

Pure PyTorch / NumPy / Arrow: it never imports prefect, ray or mlflow, so it runs anywhere.
"""

from vae_core.config import ModelConfig, TrainConfig, VAEConfig, load_config
from vae_core.model import ConvVAE, Posterior

__all__ = ["ConvVAE", "ModelConfig", "Posterior", "TrainConfig", "VAEConfig", "load_config"]
