"""Sources shipped with the installed packages, so demos run offline: ``builtin:digits``.

``builtin:digits`` is scikit-learn's 8x8 handwritten digits (1,797 images, 1 channel, labels 0..9),
scaled from 0..16 to 0..255. It has no splits of its own, so ingestion splits it by id hash.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from vae_core.data.sources.base import Format, RawBatch, Source, SourceError, SourceOptions
from vae_core.data.sources.digits import load_digits_u8

BUILTINS = ("digits",)


def open_builtin(url: str, options: SourceOptions = SourceOptions()) -> Source:
    """'builtin:NAME' -> Source (it reads no storage, so `options` do not apply)."""
    name = url.split(":", 1)[1] if ":" in url else url
    if name != "digits":
        raise SourceError(f"unknown built-in source {url!r}; built-ins are: {', '.join('builtin:' + b for b in BUILTINS)}")
    images, labels = load_digits_u8()

    def batches() -> Iterator[RawBatch]:
        n = len(images)
        yield RawBatch(ids=[f"digits/{i}" for i in range(n)], labels=labels.astype(np.int32), pixels=images,
                       sources=[f"sklearn.datasets.load_digits#{i}" for i in range(n)])

    return Source(kind="builtin", url=url, batches=batches, size=len(images), label_names=[str(i) for i in range(10)],
                  details={"name": "digits"})


FORMAT = Format("builtin", open_builtin, prefix="builtin:")
