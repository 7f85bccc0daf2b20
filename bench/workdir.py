"""Folders a benchmark makes under its --work and may remove on its next run: only those it marked, since
--work may name a folder that holds anything else."""

from __future__ import annotations

import shutil
from pathlib import Path

MARK = ".made-by-bench"  # what a bench removes on its next run: only folders carrying it


def fresh_folder(folder: Path, bench: str) -> Path:
    """An empty `folder`, marked as made by `bench` (its script's name, for the error). A folder already there is
    removed only if an earlier bench run made it (it carries MARK); otherwise SystemExit names it."""
    if folder.exists():
        if not (folder / MARK).exists():
            raise SystemExit(f"{folder} exists and was not made by {bench}: remove it, or pick another --work")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / MARK).touch()
    return folder


def remove_made(folder: Path) -> None:
    """Remove `folder` if a bench made it (it carries MARK)."""
    if (folder / MARK).exists():
        shutil.rmtree(folder, ignore_errors=True)
