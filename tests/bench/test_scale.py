"""bench/scale.py's pure helpers: the exponent of a time curve, roles from command lines and peak memory per role
(also read from a real process tree)."""

from __future__ import annotations

import math
import sys

import pytest

from bench.scale_measure import ROLES, exponent, measure, peaks_by_role, role


@pytest.mark.parametrize("power", [0.5, 1.0, 1.3, 2.0])
def test_exponent_is_the_log_log_slope(power):
    sizes = [1e3, 1e4, 1e5, 1e6]
    assert exponent(sizes, [3.0 * n ** power for n in sizes]) == pytest.approx(power)


def test_exponent_is_the_least_squares_slope_of_noisy_points():
    sizes, seconds = [1e4, 1e5, 1e6], [1.0, 12.0, 100.0]
    x, y = [math.log(n) for n in sizes], [math.log(s) for s in seconds]
    mx, my = sum(x) / 3, sum(y) / 3
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    assert exponent(sizes, seconds) == pytest.approx(slope)


@pytest.mark.parametrize("seconds", [[5.0], [5.0, -1.0], [5.0, 0.0], [5.0, None]])
def test_exponent_needs_two_positive_times(seconds):
    assert exponent([1e4, 1e5][: len(seconds)], seconds) is None


@pytest.mark.parametrize("cmdline, is_root, expected", [
    ("/repo/.venv/bin/python /repo/.venv/bin/vae train --json", True, "driver"),
    ("ray::TrainTrainable.train", False, "ray worker"),
    ("ray::IDLE", False, "ray worker"),
    ("/repo/.venv/bin/python -u /site-packages/ray/_private/workers/default_worker.py --node-ip-address=1", False,
     "ray worker"),
    ("/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray", False, "ray system"),
    ("/site-packages/ray/core/src/ray/raylet/raylet --raylet_socket_name=x", False, "ray system"),
    ("/repo/.venv/bin/python /site-packages/ray/dashboard/dashboard.py --host=127.0.0.1", False, "ray system"),
    ("/repo/.venv/bin/python -u /site-packages/ray/_private/log_monitor.py --session-dir=x", False, "ray system"),
    ("/repo/.venv/bin/python -m uvicorn --factory prefect.server.api.server:create_app", False, "other"),
])
def test_role_from_the_command_line(cmdline, is_root, expected):
    assert role(cmdline, is_root) == expected


def test_peaks_by_role_keeps_each_roles_largest_process():
    got = peaks_by_role([("ray worker", 300.0), ("driver", 500.0), ("ray worker", 700.0), ("ray system", 90.0),
                         ("ray worker", 650.0)])
    assert got == {"driver": 500.0, "ray worker": 700.0, "ray system": 90.0, "other": 0.0}
    assert list(got) == list(ROLES)


def test_measure_finds_the_peak_of_a_grandchild_that_has_exited():
    """The command starts a child that starts a grandchild holding 300 MiB for a second; the grandchild exits
    before the others. Its peak is still reported (under `other`), and the command's (`driver`) stays its own."""
    grandchild = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.0)"
    child = f"import subprocess, sys, time; subprocess.run([sys.executable, '-c', {grandchild!r}]); time.sleep(0.6)"
    command = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True); print('done')"
    got = measure([sys.executable, "-c", command], {}, timeout=60)
    assert got.returncode == 0 and got.stdout.strip() == "done", got.stderr
    assert got.peaks_mib["other"] >= 300, got.processes
    assert got.peaks_mib["driver"] < 200, got.processes
    assert [p[0] for p in got.processes].count("other") == 2, got.processes


def test_a_work_folder_is_removed_only_when_a_bench_made_it(tmp_path):
    """`--work` may name any folder: a home there is replaced, or removed after its chain, only if it carries the
    benches' mark."""
    from bench.workdir import fresh_folder, remove_made

    home = fresh_folder(tmp_path / "home-1000", "bench/scale.py")
    (home / "data").write_text("an earlier run's")
    assert not (fresh_folder(home, "bench/scale.py") / "data").exists()
    remove_made(home)
    assert not home.exists()
    theirs = tmp_path / "home-2000"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="was not made by bench/scale.py"):
        fresh_folder(theirs, "bench/scale.py")
    remove_made(theirs)
    assert (theirs / "notes.txt").read_text() == "keep"
