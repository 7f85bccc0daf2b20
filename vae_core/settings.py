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


def prefect_home() -> str | None:
    """`$VAE_HOME/prefect`: where the `vae` command keeps Prefect's state (its temporary server's SQLite
    database too, so migrations run once) beside everything else; None when VAE_HOME is not a local folder."""
    scheme, sep, path = vae_home().partition("://")
    if sep and scheme != "file":
        return None
    return str(Path(path if sep else scheme).expanduser().resolve() / "prefect")


def feature_net_root() -> str:
    """Cached feature classifiers for the Fréchet distance, one per dataset version."""
    return os.environ.get("VAE_FEATURE_NET_ROOT", f"{vae_home().rstrip('/')}/feature_nets")


def reports_root() -> str:
    """Evaluation pictures and reports: `<reports_root>/<model>/<version>/`."""
    return os.environ.get("VAE_REPORTS_ROOT", f"{vae_home().rstrip('/')}/reports")


def embeddings_root() -> str:
    """Bulk encodings: `<embeddings_root>/<model>/<version>/<dataset>/<dataset version>/`."""
    return os.environ.get("VAE_EMBEDDINGS_ROOT", f"{vae_home().rstrip('/')}/embeddings")


# Protocols a request may name for its source or data root: local files, the object stores and memory.
# Anything that reaches arbitrary hosts (http, ftp, sftp, ...) or wraps other URLs (simplecache::, zip::)
# is opt-in, because a request's URL is chosen by whoever starts a run, not by whoever runs it.
DEFAULT_PROTOCOLS = ("file", "local", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
PROTOCOLS_ENV = "VAE_ALLOWED_PROTOCOLS"


def allowed_protocols() -> tuple[str, ...]:
    """The fsspec protocols a source or data root may use: `VAE_ALLOWED_PROTOCOLS` (comma-separated, e.g.
    `file,s3,memory,https`) where the run executes, else `DEFAULT_PROTOCOLS`."""
    raw = os.environ.get(PROTOCOLS_ENV)
    if raw is None:
        return DEFAULT_PROTOCOLS
    return tuple(dict.fromkeys(p.strip().lower() for p in raw.split(",") if p.strip()))
