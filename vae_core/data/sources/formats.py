"""The source formats ingestion reads, in one registry: the request's `format` choices and detection both
come from it. Each source module declares its `Format` (name, how it is recognised, how it opens); a new
format is one more declaration, listed here.
"""

from __future__ import annotations

from typing import Literal

from vae_core.data.sources import builtin, filelist, folder, idx, npz, parquet
from vae_core.data.sources.base import Format

# In the order the command line's help and the error messages list them. Detection (`detect.detect_format`)
# tries a URL prefix first, then a file's suffix, then its name; a folder is the first format here whose
# `folder` rule accepts it (IDX before Parquet), else the `any_folder` one.
REGISTRY: tuple[Format, ...] = (folder.FORMAT, idx.FORMAT, npz.FORMAT, parquet.FORMAT, filelist.FORMAT,
                                builtin.FORMAT)
BY_NAME: dict[str, Format] = {f.name: f for f in REGISTRY}
FORMATS: tuple[str, ...] = ("auto", *BY_NAME)
SourceFormat = Literal[FORMATS]  # type: ignore[valid-type]  # a format's name, or "auto" to detect it
