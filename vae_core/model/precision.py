"""The precision a forward pass runs in: what training, evaluation and encoding share."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU when enabled; a no-op on CPU (where bf16 convs are slower, not faster)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
