"""Save and load a model as safetensors with its config in the metadata: no pickle anywhere."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load, save as st_save

from vae_core.model.config import ModelConfig
from vae_core.model.vae import ConvVAE
from vae_core.storage import atomic_write_bytes, resolve

_CONFIG_KEY = "vae_model_config"


def model_to_bytes(model: ConvVAE, extra: dict[str, str] | None = None) -> bytes:
    """Serialise weights (made contiguous, CPU) plus the model config and `extra` string metadata."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {_CONFIG_KEY: model.config.model_dump_json(), **(extra or {})}
    return st_save(state, metadata=meta)


def model_from_bytes(blob: bytes) -> ConvVAE:
    """Rebuild a `ConvVAE` from `model_to_bytes` output; raises ValueError if the config is missing."""
    # The safetensors header is 8 bytes of length, then JSON; metadata lives under "__metadata__".
    header_len = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + header_len]).get("__metadata__", {})
    if _CONFIG_KEY not in meta:
        raise ValueError("weights carry no model config; were they written by vae_core.model.weights.save_model?")
    model = ConvVAE(ModelConfig.model_validate_json(meta[_CONFIG_KEY]))
    model.load_state_dict(st_load(blob))
    return model


def save_model(model: ConvVAE, url: str, extra: dict[str, str] | None = None) -> None:
    """Write the model to any fsspec URL atomically (temporary name, then one move)."""
    fs, path = resolve(url)
    atomic_write_bytes(fs, path, model_to_bytes(model, extra))


def load_model(url: str, map_location: str | torch.device = "cpu") -> ConvVAE:
    """Read a model written by `save_model` from any fsspec URL."""
    fs, path = resolve(url)  # the storage layer's filesystem: S3's retries and its error naming the object
    return model_from_bytes(fs.cat_file(path)).to(map_location)
