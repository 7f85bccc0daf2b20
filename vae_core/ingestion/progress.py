"""What a user sees while ingestion runs: a progress bar (files listed, items decoded, shards written,
images/s) on the terminal, and the same figures as log lines every `every_s` seconds for a flow run's
logger (Prefect shows those, not the terminal's bar)."""

from __future__ import annotations

import logging
import time
from typing import Any

from tqdm.auto import tqdm


class Progress:
    """Counts of one ingestion run, shown as they change."""

    def __init__(self, name: str, enabled: bool = False, log: logging.Logger | logging.LoggerAdapter | None = None,
                 every_s: float = 10.0) -> None:
        self.name, self.log, self.every_s = name, log, every_s
        self.enabled = enabled
        self.files = self.done = self.fresh = self.shard_count = 0
        self.total: int | None = None
        self.bar: Any = None
        self.started = self.last_log = time.monotonic()

    def listed(self, files: int) -> None:
        self.files += files
        self._log(f"listed {self.files:,} files")

    def start_decoding(self, total: int | None) -> None:
        self.total = total
        self.started = time.monotonic()
        self.bar = tqdm(total=total, desc=f"ingest {self.name}", unit="img", smoothing=0.1, disable=not self.enabled)

    def decoded(self, items: int, fresh: bool) -> None:
        """`items` more items done; `fresh` when decoded now rather than found committed by an earlier run."""
        self.done += items
        self.fresh += items if fresh else 0
        if self.bar is not None:
            self.bar.update(items)
            self.bar.set_postfix_str(f"{self.files:,} listed")
        self._log(self._line())

    def shards(self, count: int) -> None:
        self.shard_count += count
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.files:,} listed, {self.shard_count} shards")
        self._log(f"{self.shard_count} shards written")

    def _line(self) -> str:
        rate = self.fresh / max(time.monotonic() - self.started, 1e-9)
        of = f" of {self.total:,}" if self.total else ""
        return f"decoded {self.done:,}{of} items ({rate:,.0f} images/s)"

    def _log(self, line: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.log is not None and (force or now - self.last_log >= self.every_s):
            self.last_log = now
            self.log.info("ingest %s: %s", self.name, line)

    def close(self, elapsed: float) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.done:
            self._log(f"{self._line()}, {self.shard_count} shards, {elapsed:.1f} s", force=True)
