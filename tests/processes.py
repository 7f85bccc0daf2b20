"""Waiting on conditions and finding a command's leftover processes, for the tests that signal commands."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def eventually(condition: Callable[[], object], timeout: float, every: float = 0.05) -> bool:
    """Whether `condition()` became true within `timeout` seconds (polled every `every` s)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def survivors(pgid: int) -> list[str]:
    """Command lines of the live processes of process group `pgid` (Linux /proc), zombies aside: an orphan's
    exit status waits for PID 1, which in a container may never collect it."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # it ended while we looked
            continue
    return found
