"""Where a run's state lives: everything under one VAE_HOME (default ./.vae), each location overridable."""

from __future__ import annotations

import os
from pathlib import Path


def vae_home() -> str:
    """Root of all state; a local path or any fsspec URL."""
    return os.environ.get("VAE_HOME", str(Path(".vae").resolve()))


def data_root() -> str:
    return os.environ.get("VAE_DATA_ROOT", f"{vae_home().rstrip('/')}/datasets")


def checkpoint_root() -> str:
    return os.environ.get("VAE_CHECKPOINT_ROOT", f"{vae_home().rstrip('/')}/checkpoints")
