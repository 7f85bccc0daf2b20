"""ingest-dataset on Ray Data against a bare decode-and-write baseline, measured in one run.

    .venv/bin/python bench/ingest.py [--png 200000] [--jpeg 50000] [--small N] [--lists 100000,1000000,10000000]
    .venv/bin/python bench/ingest.py --png 20000 --jpeg 5000 --lists 100000,1000000   # a quick check

Corpora, written by the bench under --scratch (removed after): a PNG folder of --png 28x28 grey MNIST digits,
each shifted by up to 3 pixels at random, in 10 class folders; a JPEG folder of --jpeg 64x64 colour images
(MNIST digits upscaled and tinted, random colours); a PNG folder of --small files (default --png / 10); a
CSV file list of each size in --lists.

1. Throughput, per folder: bare = a pool of 2 processes decoding the files with PIL and writing Parquet
   (listing included; no validation, no dedup, no splits); ingest-dataset = `run_ingest` on Ray Data
   (`ray_session` + `ray_runner`, 2 workers) into a fresh data root. Images/s are files/s on both sides;
   ingest/bare is the figure to hold against 0.8. Ray's start and the first tasks (worker processes starting,
   a 64-file warm-up ingest) are apart; the ingest's seconds are split by step (list, decode, shards, rest).
2. Driver memory: each ingest runs in a fresh process whose peak RSS (VmHWM; Ray's workers and daemons
   are other processes) is read at the end: --small files against --png files (target < 1.5x for 10x the
   files), and file lists of the --lists sizes listed only (`open_source` + `list_source` in the process
   itself, nothing decoded).
3. One node against two on this machine: `ray start --head` with 2 CPUs, then a head and a second
   `ray start --address` node with 1 CPU each (same CPUs in all), RAY_ADDRESS set, on the --small folder;
   twice each, alternated, the faster run of each kept.

The report (a Markdown table, the raw lines) is printed and written to --out with the date, command and machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import io
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
MNIST = REPO.parent / "shared" / "data" / "mnist"
RAY = str(Path(sys.executable).parent / "ray")
CHUNK = 4096  # files per bare task: the ingest's files per part
WORKERS = 2
STEPS = {"_list_unit": "list", "map_part": "decode", "_reduce": "shards"}  # ingest's step functions, named
sys.path.insert(0, str(REPO))


def mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 MNIST digits (uint8 (n, 28, 28)) and their labels."""
    def idx(name: str) -> np.ndarray:
        data = gzip.decompress((MNIST / name).read_bytes())
        dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(data[3])]
        return np.frombuffer(data, np.uint8, offset=4 + 4 * data[3]).reshape(dims)

    return (np.concatenate([idx(f"{p}-images-idx3-ubyte.gz") for p in ("train", "t10k")]),
            np.concatenate([idx(f"{p}-labels-idx1-ubyte.gz") for p in ("train", "t10k")]))


def _write_chunk(job: tuple[str, str, np.ndarray, np.ndarray, int, int]) -> None:
    """Write one chunk of a corpus (runs in a generation pool)."""
    from PIL import Image

    kind, root, x, y, first, seed = job
    rng = np.random.default_rng(seed)
    for k in range(len(x)):
        # moved by up to 3 pixels each way, so that 200,000 images of 70,000 digits are mostly distinct
        digit = np.roll(x[k], tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
        if kind == "png":
            im = Image.fromarray(digit)
        else:  # a 64x64 colour image: the digit upscaled, one random colour on another
            a = np.asarray(Image.fromarray(digit).resize((64, 64), Image.BILINEAR), np.float32)[..., None] / 255
            fg, bg = rng.integers(0, 256, (2, 3))
            im = Image.fromarray((bg * (1 - a) + fg * a).astype(np.uint8), "RGB")
        buf = io.BytesIO()
        im.save(buf, "PNG" if kind == "png" else "JPEG", quality=90)
        Path(root, str(int(y[k])), f"{first + k:07d}.{kind}").write_bytes(buf.getvalue())


def make_folder(root: Path, n: int, kind: str, digits: tuple[np.ndarray, np.ndarray], pool, seed: int) -> float:
    """n images of `kind` (png, jpeg) in class folders 0..9 under root; -> seconds."""
    t = time.perf_counter()
    x, y = digits
    pick = np.random.default_rng(seed).integers(0, len(x), n)
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    jobs = [(kind, str(root), x[pick[i:i + CHUNK]], y[pick[i:i + CHUNK]], i, seed + i) for i in range(0, n, CHUNK)]
    pool.map(_write_chunk, jobs)
    return time.perf_counter() - t


def make_filelist(path: Path, n: int) -> None:
    """A CSV list of n files with text labels (files that need not exist: it is only listed)."""
    with path.open("w") as f:
        f.write("url,label\n")
        for start in range(0, n, 100_000):
            f.writelines(f"{i % 10}/{i:08d}.png,class{i % 10}\n" for i in range(start, min(n, start + 100_000)))


def _bare_chunk(job: tuple[str, list[tuple[str, int]]]) -> int:
    """Decode the files with PIL and write them as one Parquet file; -> rows."""
    from PIL import Image

    out, files = job
    images = [np.asarray(Image.open(p)) for p, _ in files]
    row = images[0].size
    table = pa.table({
        "id": [p for p, _ in files],
        "label": pa.array([c for _, c in files], pa.int32()),
        "image": pa.FixedSizeBinaryArray.from_buffers(pa.binary(row), len(images),
                                                      [None, pa.py_buffer(np.stack(images).tobytes())]),
    })
    pq.write_table(table, out, compression="zstd")
    return len(files)


def bare(folder: Path, out: Path, pool) -> tuple[float, int]:
    """List the class folders and decode and write every file in the pool; -> (seconds, images)."""
    t = time.perf_counter()
    files = [(e.path, int(c.name)) for c in sorted(os.scandir(folder), key=lambda e: e.name)
             for e in sorted(os.scandir(c.path), key=lambda e: e.name)]
    out.mkdir(parents=True)
    jobs = [(str(out / f"{i:06d}.parquet"), files[i:i + CHUNK]) for i in range(0, len(files), CHUNK)]
    n = sum(pool.imap_unordered(_bare_chunk, jobs))
    return time.perf_counter() - t, n


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory now (VmRSS) or at its peak (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(spec: dict) -> dict:
    """What `in_child` runs: one ingest (or a listing), timed, with this process's memory."""
    from vae_core.ingestion.ingest import list_source, open_source_for, remove_work, serial
    from vae_core.requests import IngestRequest

    req = IngestRequest(name="bench", source=spec["source"], data_root=spec["root"], format=spec["format"],
                        workers=WORKERS)
    if spec.get("list_only"):
        t = time.perf_counter()
        listed = list_source(open_source_for(req), req, serial)
        out = {"seconds": time.perf_counter() - t, "files": listed.total, "parts": len(listed.parts)}
        remove_work(req, listed.base)
    else:
        out = ingest_on_ray(req, spec)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the memory of the process that started
    # this one (the bench, with its corpora's digits), so every child would report at least that.
    return out | {"peak_mib": rss_mib("VmHWM")}


def ingest_on_ray(req, spec: dict) -> dict:
    """`run_ingest` on Ray Data as the flow runs it, after Ray's start and a warm-up ingest (timed apart)."""
    import ray

    from flows.distributed.cluster import ray_session
    from flows.distributed.ingest_tasks import ray_runner, scaling
    from vae_core.ingestion.ingest import run_ingest

    t = time.perf_counter()
    with ray_session() as resources:
        out = {"ray_start_s": time.perf_counter() - t}
        deadline = time.monotonic() + 60
        while sum(n["Alive"] for n in ray.nodes()) < spec.get("nodes", 1) and time.monotonic() < deadline:
            time.sleep(0.2)  # a second node that is still joining
        steps: dict[str, float] = {}
        peaks: dict[str, float] = {}
        runner = timed(ray_runner(*scaling(req, resources)), steps, peaks)
        t = time.perf_counter()
        run_ingest(req.model_copy(update={"source": spec["warm"], "data_root": spec["root"] + "-warm"}), runner=runner)
        out |= {"warm_s": time.perf_counter() - t, "start_mib": rss_mib("VmHWM")}
        steps.clear()
        t = time.perf_counter()
        r = run_ingest(req, runner=runner)
        items = r.manifest.items
        out |= {"seconds": time.perf_counter() - t, "steps": steps, "step_peaks": peaks, "files": items.seen,
                "ok": items.ok, "duplicates": items.duplicates, "quarantined": items.quarantined,
                "nodes": [[n.address, n.node_id[:8], n.rows] for n in r.nodes]}
    return out


def timed(runner, steps: dict[str, float], peaks: dict[str, float]):
    """`runner`, adding the seconds of each step it runs (until its last result is taken) to `steps`, and the
    process's peak memory at its end to `peaks` (MiB)."""
    def run(fn, items):
        t = time.perf_counter()
        yield from runner(fn, items)
        name = STEPS.get(getattr(fn, "func", fn).__name__, "other")
        steps[name] = steps.get(name, 0.0) + time.perf_counter() - t
        peaks[name] = rss_mib("VmHWM")
    return run


def in_child(spec: dict, env: dict | None = None) -> dict:
    """Run `child(spec)` in a fresh Python process; -> its figures."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"ingest of {spec['source']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def ray_nodes(cpus: list[int]) -> Iterator[dict[str, str]]:
    """A head node with cpus[0] CPUs and one more node per further entry, on 127.0.0.1, each `ray start
    --block` in its own process group (stopped by its id after: `ray stop` would stop every Ray of the
    machine); -> the environment that joins them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block"]
    temp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short: Ray's socket paths live in it
    procs = [subprocess.Popen([RAY, "start", "--head", f"--port={port}", f"--num-cpus={cpus[0]}",
                               "--include-dashboard=false", f"--temp-dir={temp}", *common], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        _wait_port(port, procs[0])
        for n in cpus[1:]:
            procs.append(subprocess.Popen([RAY, "start", f"--address=127.0.0.1:{port}", f"--num-cpus={n}", *common],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
        yield {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "disabled"}
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        time.sleep(0.5)
    raise SystemExit(f"the Ray head on port {port} did not start")


def say(rep: list[str], line: str) -> None:
    """Print a line as it comes, and keep it in `rep` for the results file."""
    print(line, flush=True)
    rep.append(line)


def throughput(rep: list[str], name: str, folder: Path, warm: Path, scratch: Path, pool) -> dict:
    """Bare, then ingest-dataset, on one folder; -> the ingest's figures plus `bare_s`."""
    bare_s, n = bare(folder, scratch / f"bare-{name}", pool)
    say(rep, f"{name}: bare {n:,} files in {bare_s:.1f} s = {n / bare_s:,.0f} images/s")
    got = in_child({"source": str(folder), "root": str(scratch / f"data-{name}"), "format": "auto", "warm": str(warm)})
    say(rep, f"{name}: ingest {got['files']:,} files in {got['seconds']:.1f} s = {got['files'] / got['seconds']:,.0f} "
            f"images/s (ok {got['ok']:,}, duplicates {got['duplicates']:,}, quarantined {got['quarantined']}); "
            f"Ray start {got['ray_start_s']:.1f} s, warm-up {got['warm_s']:.1f} s; driver peak "
            f"{got['peak_mib']:.0f} MiB (after the warm-up {got['start_mib']:.0f}, then after each step "
            f"{' / '.join(f'{v:.0f}' for v in got['step_peaks'].values())}); steps {split_s(got)}")
    return got | {"bare_s": bare_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--png", type=int, default=200_000, help="files in the PNG folder")
    ap.add_argument("--jpeg", type=int, default=50_000, help="files in the JPEG folder")
    ap.add_argument("--small", type=int, help="files in the small PNG folder (default --png / 10)")
    ap.add_argument("--lists", default="100000,1000000,10000000", help="entries of the file lists, comma-separated")
    ap.add_argument("--scratch", help="folder for the corpora and datasets (default: a temp folder, removed)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ingest.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    scratch = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.scratch))
    rep: list[str] = []
    try:
        rows = run(rep, args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    write_results(rep, rows, args.out)


def run(rep: list[str], args: argparse.Namespace, scratch: Path) -> list[tuple[str, str]]:
    """Every measurement; -> the table's rows (what, result)."""
    digits = mnist()
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        folders = {"png": args.png, "jpeg": args.jpeg, "small": args.small or args.png // 10, "warm": 64}
        for name, n in folders.items():
            s = make_folder(scratch / name, n, "jpeg" if name == "jpeg" else "png", digits, pool, len(name))
            say(rep, f"corpus {name}: {n:,} files written in {s:.1f} s")
        png = throughput(rep, "png", scratch / "png", scratch / "warm", scratch, pool)
        jpeg = throughput(rep, "jpeg", scratch / "jpeg", scratch / "warm", scratch, pool)
    spec = {"root": str(scratch / "data-small"), "format": "auto", "warm": str(scratch / "warm")}
    lone = in_child({**spec, "source": str(scratch / "small")})
    say(rep, f"small: {lone['files']:,} files in {lone['seconds']:.1f} s; driver peak {lone['peak_mib']:.0f} MiB")
    lists = list_only(rep, sorted(int(x) for x in args.lists.split(",")), scratch)
    return table(png, jpeg, lone, lists, one_against_two(rep, spec, scratch))


def list_only(rep: list[str], sizes: list[int], scratch: Path) -> dict[int, dict]:
    """File lists of each size, listed only, each in a fresh process; -> their figures by size."""
    lists = {}
    for n in sizes:
        make_filelist(scratch / f"list-{n}.csv", n)
        lists[n] = in_child({"source": str(scratch / f"list-{n}.csv"), "root": str(scratch / "data-list"),
                             "format": "filelist", "list_only": True})
        (scratch / f"list-{n}.csv").unlink()
        say(rep, f"file list of {n:,}: listed in {lists[n]['seconds']:.1f} s ({lists[n]['parts']} parts); "
                f"driver peak {lists[n]['peak_mib']:.0f} MiB")
    return lists


def one_against_two(rep: list[str], spec: dict, scratch: Path) -> dict[int, dict]:
    """The small folder on one node of 2 CPUs and on two of 1 CPU; -> the faster run of each by node count."""
    nodes: dict[int, dict] = {}
    for run_no, cpus in enumerate(([2], [1, 1]) * 2):  # alternated, the faster of two kept: the machine is shared
        with ray_nodes(cpus) as env:
            got = in_child({**spec, "source": str(scratch / "small"), "nodes": len(cpus),
                            "root": str(scratch / f"data-nodes-{run_no}")}, env)
        if len(cpus) not in nodes or rate(got) > rate(nodes[len(cpus)]):
            nodes[len(cpus)] = got
        say(rep, f"{len(cpus)} node(s) of {'+'.join(map(str, cpus))} CPUs: {got['files']:,} files in "
                f"{got['seconds']:.1f} s; join {got['ray_start_s']:.1f} s, warm-up {got['warm_s']:.1f} s; "
                f"rows per node {[n[2] for n in got['nodes']]}")
    return nodes


def split_s(got: dict) -> str:
    """The ingest's seconds by step: list / decode / shards / the rest."""
    steps = got["steps"]
    rest = got["seconds"] - sum(steps.values())
    return " / ".join(f"{name} {steps.get(name, 0):.1f}" for name in STEPS.values()) + f" / rest {rest:.1f} s"


def rate(got: dict) -> float:  # images/s of an ingest
    return got["files"] / got["seconds"]


def table(png: dict, jpeg: dict, lone: dict, lists: dict, nodes: dict) -> list[tuple[str, str]]:
    """The README's rows: (what was measured, result)."""
    rows = []
    for name, got, what in (("PNG", png, "28x28 grey"), ("JPEG", jpeg, "64x64 colour")):
        b = got["files"] / got["bare_s"]
        rows.append((f"{name} folder, {got['files']:,} {what} files, {WORKERS} workers",
                     f"ingest {rate(got):,.0f} images/s, bare {b:,.0f}: **ingest/bare {rate(got) / b:.2f}** "
                     f"(target >= 0.8); {split_s(got)}; Ray start {got['ray_start_s']:.1f} s and first tasks "
                     f"{got['warm_s']:.1f} s apart"))
    rows.append((f"driver peak RSS, PNG folder of {lone['files']:,} and {png['files']:,} files",
                 f"{lone['peak_mib']:.0f} / {png['peak_mib']:.0f} MiB: **{png['peak_mib'] / lone['peak_mib']:.2f}x** "
                 f"for {png['files'] / lone['files']:.0f}x the files (target < 1.5x); after Ray's start and the "
                 f"warm-up {lone['start_mib']:.0f} / {png['start_mib']:.0f} MiB"))
    sizes = sorted(lists)
    growth = [f"{lists[b]['peak_mib'] / lists[a]['peak_mib']:.2f}x" for a, b in zip(sizes, sizes[1:])]
    seconds, peaks = (" / ".join(format(lists[n][k], ".1f" if k == "seconds" else ".0f") for n in sizes)
                      for k in ("seconds", "peak_mib"))
    rows.append((f"file list (CSV) of {' / '.join(f'{n:,}' for n in sizes)} entries, listing only",
                 f"{seconds} s; driver peak {peaks} MiB: **{', '.join(growth)}** from one size to the next"))
    one, two = nodes[1], nodes[2]
    rows.append((f"one node (2 CPUs) against two nodes (1 CPU each), {one['files']:,} PNG files",
                 f"{rate(one):,.0f} / {rate(two):,.0f} images/s: **two/one {rate(two) / rate(one):.2f}**; rows per "
                 f"node {' + '.join(f'{n[2]:,}' for n in two['nodes'])}; joining {one['ray_start_s']:.1f} / "
                 f"{two['ray_start_s']:.1f} s, first tasks {one['warm_s']:.1f} / {two['warm_s']:.1f} s"))
    return rows


def write_results(rep: list[str], rows: list[tuple[str, str]], out: str) -> None:
    """Print the table; write it, the raw lines, the date, the command and the machine to `out`."""
    md = ["| benchmark | result |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
    print("", *md, sep="\n")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    head = [f"# bench/ingest.py, {datetime.date.today().isoformat()}", "",
            f"Command: `.venv/bin/python bench/ingest.py {' '.join(sys.argv[1:])}`", "",
            f"Machine: {len(os.sched_getaffinity(0))} CPUs ({cpu}), {mem:.0f} GiB, {platform.platform()}; "
            "shared with other jobs while it ran.", ""]
    Path(out).write_text("\n".join(head + md + ["", "Raw output:", "", "```", *rep, "```", ""]))


if __name__ == "__main__":
    main()
