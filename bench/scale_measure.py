"""What bench/scale.py measures of one command: wall time, and the peak memory of its processes by role.

While the command runs, a thread reads `/proc` every SAMPLE_S seconds: the command's process and all its
descendants (by the parent links in `/proc/<pid>/stat`: Ray's workers are children of the raylet the driver
starts), each one's peak resident memory (VmHWM) and role from its command line. A process's VmHWM only grows,
so the last value read before it exits is its peak, up to one sampling interval.

Resident memory counts the pages of Ray's object store a process has touched (shared memory, `RssShmem`):
a worker that reads many blocks over an epoch keeps touching new pages of the store's arena, so its resident
size grows with the data read even where its own memory is flat. The largest private resident memory
(`RssAnon`, sampled) is recorded beside it: what the process itself holds.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SAMPLE_S = 0.2
ROLES = ("driver", "ray worker", "ray system", "other")
# Command-line words of Ray's own daemons (GCS, raylet, dashboard and its agents, log monitor, autoscaler monitor).
RAY_SYSTEM = ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env", "ray/_private",
              "ray/autoscaler")


def role(cmdline: str, is_root: bool) -> str:
    """The role of a process from its command line (NUL-separated words joined by spaces): `driver` for the
    command itself; `ray worker` for Ray's worker processes (`ray::...`, or `default_worker.py` before the
    worker renames itself); `ray system` for Ray's daemons; `other` for anything else (Prefect's server...)."""
    if is_root:
        return "driver"
    if cmdline.startswith("ray::") or "default_worker.py" in cmdline:
        return "ray worker"
    if any(word in cmdline for word in RAY_SYSTEM):
        return "ray system"
    return "other"


def peaks_by_role(processes: Iterable[tuple[str, float]]) -> dict[str, float]:
    """(role, peak MiB) per process -> the largest peak of each role, every role of ROLES present (0: none ran)."""
    out = dict.fromkeys(ROLES, 0.0)
    for r, mib in processes:
        out[r] = max(out[r], mib)
    return out


def exponent(sizes: list[float], seconds: list[float]) -> float | None:
    """Least-squares slope of log(seconds) against log(sizes): 1 is linear. None with fewer than two sizes or
    a time that is not positive (a start-up larger than the wall time leaves nothing to fit)."""
    pairs = [(math.log(n), math.log(s)) for n, s in zip(sizes, seconds) if s is not None and s > 0]
    if len(pairs) < 2 or len(pairs) < len(sizes):
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    den = sum((x - mx) ** 2 for x, _ in pairs)
    return sum((x - mx) * (y - my) for x, y in pairs) / den if den else None


def _status_kib(pid: int, key: str) -> int:
    """A `/proc/<pid>/status` field in KiB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process now (field 4 of `/proc/<pid>/stat`, after the parenthesised name)."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            out[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return out


def descendants(root: int, parents: dict[int, int]) -> set[int]:
    """`root` and every process below it in the parent links."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {root}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


@dataclass
class Sampler:
    """Peak VmHWM and VmRSS per process of a tree, read every SAMPLE_S seconds until `stop`."""

    root: int
    hwm: dict[int, float] = field(default_factory=dict)  # pid -> MiB
    rss: dict[int, float] = field(default_factory=dict)
    private: dict[int, float] = field(default_factory=dict)  # pid -> largest RssAnon seen, MiB
    roles: dict[int, str] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # pid -> the start of its latest command line
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        """One reading of every process of the tree."""
        for pid in descendants(self.root, _parents()):
            hwm, rss = _status_kib(pid, "VmHWM") / 1024, _status_kib(pid, "VmRSS") / 1024
            if hwm == 0:
                continue  # gone, or a kernel thread
            cmdline = _cmdline(pid)
            if cmdline:  # the latest: a Ray worker renames itself to the task or actor it runs
                self.names[pid] = cmdline[:80]
            if pid not in self.roles or self.roles[pid] == "other":  # a worker may not be renamed yet
                self.roles[pid] = role(cmdline, pid == self.root)
            self.hwm[pid] = max(self.hwm.get(pid, 0.0), hwm)
            self.rss[pid] = max(self.rss.get(pid, 0.0), rss)
            self.private[pid] = max(self.private.get(pid, 0.0), _status_kib(pid, "RssAnon") / 1024)

    def run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def stop(self) -> None:
        self._stop.set()

    def peaks(self) -> dict[str, float]:
        """Role -> the largest VmHWM of its processes, MiB."""
        return peaks_by_role((self.roles[pid], mib) for pid, mib in self.hwm.items())

    def private_peaks(self) -> dict[str, float]:
        """Role -> the largest private resident memory (RssAnon) of its processes, MiB."""
        return peaks_by_role((self.roles[pid], mib) for pid, mib in self.private.items())

    def processes(self) -> list[tuple[str, str, float]]:
        """(role, start of the command line, peak MiB) of every process seen, largest first."""
        return sorted(((self.roles[p], self.names.get(p, ""), round(m, 1)) for p, m in self.hwm.items()),
                      key=lambda t: -t[2])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class Measured:
    """One command's run: exit status, wall seconds, output and the peak memory of its processes by role."""

    returncode: int
    wall_s: float
    stdout: str
    stderr: str
    peaks_mib: dict[str, float]
    processes: list[tuple[str, str, float]]
    private_mib: dict[str, float] = field(default_factory=dict)


def measure(argv: list[str], env: dict[str, str], timeout: float) -> Measured:
    """Run `argv` in its own session (so that what it leaves behind can be stopped), sampling its process tree."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    sampler = Sampler(proc.pid)
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(killed after {timeout:.0f} s)"
    except BaseException:  # the bench itself stopped (Ctrl-C, SIGTERM): the command must not outlive it
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    wall = time.perf_counter() - t
    with contextlib.suppress(ProcessLookupError):  # whatever the command left behind in its session
        os.killpg(proc.pid, signal.SIGKILL)
    sampler.stop()
    thread.join()
    return Measured(proc.returncode, wall, out, err, sampler.peaks(), sampler.processes(), sampler.private_peaks())
