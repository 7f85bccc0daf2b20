"""Import torchvision on machines where its compiled extension cannot load.

A torchvision wheel built for another torch (e.g. the CUDA build beside a CPU torch) fails at import
with "operator torchvision::nms does not exist": its Python code registers fake kernels for two
operators whose schemas the missing extension would have defined. Defining those two schemas first lets
the pure-Python parts (models, transforms, datasets, utils) import and run; the compiled ops (nms,
roi_align, torchvision.io decoders) stay unavailable, and vae_core decodes with PIL instead.

Where torchvision imports normally, `import_torchvision` is a plain import and changes nothing.
"""

from __future__ import annotations

import sys
import types

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_shim_lib: torch.library.Library | None = None  # kept alive: dropping it unregisters the schemas


def _forget_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision() -> types.ModuleType:
    """Return the torchvision module, defining the missing operator schemas only if its extension failed."""
    global _shim_lib
    try:
        import torchvision

        return torchvision
    except RuntimeError as err:
        ext = sys.modules.get("torchvision.extension")
        if "torchvision::" not in str(err) or ext is None or ext._has_ops():
            raise
    _forget_torchvision()
    _shim_lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _shim_lib.define(schema)
    import torchvision

    return torchvision


def shim_active() -> bool:
    """True when torchvision runs without its compiled extension (schemas defined here)."""
    return _shim_lib is not None


def import_torchmetrics() -> types.ModuleType:
    """Return torchmetrics, importing torchvision first through `import_torchvision` (torchmetrics imports
    torchvision at import time, and would fail where its extension cannot load)."""
    import_torchvision()
    import torchmetrics

    return torchmetrics
