"""How the cost of the whole chain grows with the corpus: ingest, train, evaluate and encode at 10^4 to 10^6 images.

    .venv/bin/python bench/scale.py [--sizes 1e4,1e5,1e6] [--seed 0] [--work /tmp/vae-scale]
    .venv/bin/python bench/scale.py --sizes 1e4            # a quick check

Corpus (bench/scale_corpus.py, cached under --work by N and seed): 28x28 MNIST digits, each shifted by up to 3
pixels and rotated by up to 15 degrees, as a folder of Parquet files (PNG bytes and labels); for 10^5 also as a
PNG folder in class folders, ingested as a second ingest row.

Per N, in a fresh VAE_HOME (and PREFECT_HOME) under --work, each stage is one `vae ... --json` command:
ingest; train one epoch with --memory-budget-mb 1 (every split streams through Ray Data, as a corpus larger than
memory does); evaluate the test split (about 10% of N) with K = 10; encode every split. Each command's wall time
and the peak memory (VmHWM) of its processes by role (the command itself, Ray workers, Ray's daemons, others)
are measured (bench/scale_measure.py). The same chain on N = 1,000 in the same run gives each stage's fixed
start-up; steady = wall - start-up, and images/s = images / steady (images: N; evaluate's test split).

Per stage, the report states the exponent of steady time against images (least squares in log-log), the time
per image at the largest N over that at the one 10x below (target <= 1.25) and the peak memory per role at
those two sizes (target <= 1.3). It prepends a dated section to bench/results/scale.md (earlier runs kept),
writes the raw numbers to scale.json and plots scale_time.png and scale_memory.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scale_corpus import parquet_corpus, png_corpus  # noqa: E402
from bench.scale_measure import ROLES, Measured, measure  # noqa: E402
from bench.scale_nightly import run_nightly  # noqa: E402
from bench.scale_report import write_results  # noqa: E402
from bench.workdir import fresh_folder, remove_made  # noqa: E402

VAE = str(Path(sys.executable).parent / "vae")
STARTUP_N = 1_000
PNG_N = 100_000  # the size also ingested from a PNG folder
STAGE_TIMEOUT_S = 3 * 3600
# Variables that would point a command at servers or state outside its VAE_HOME.
OUTSIDE = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS", "VAE_DATA_ROOT")


def stage_env(home: Path) -> dict[str, str]:
    """The environment of every command of one N: its own VAE_HOME and PREFECT_HOME, nothing shared."""
    env = {k: v for k, v in os.environ.items() if k not in OUTSIDE}
    return env | {"VAE_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "MLFLOW_DISABLE_TELEMETRY": "true"}


def commands(n: int, parquet: Path, png: Path | None) -> list[tuple[str, list[str]]]:
    """(stage, argv) of the chain on the n-image corpus, in order."""
    name, model = f"scale-{n}", f"models:/vae-scale-{n}/1"
    chain = [("ingest", ["ingest", str(parquet), "--name", name])]
    if png is not None:
        chain.append(("ingest png", ["ingest", str(png), "--name", f"{name}-png"]))
    chain += [("train", ["train", "--dataset", name, "--preset", "mnist", "--epochs", "1", "--memory-budget-mb", "1"]),
              ("evaluate", ["evaluate", "--model", model, "--split", "test", "--iw-samples", "10"]),
              ("encode", ["encode", "--model", model, "--dataset", name])]
    return [(stage, [VAE, *argv, "--json"]) for stage, argv in chain]


def run_chain(n: int, work: Path, seed: int, with_png: bool, say, out: dict[str, dict]) -> None:
    """Every stage of the chain on n images, each one's record (wall, peaks, the command's JSON or error) put in
    `out` by stage as soon as it ends, then `say` a line about it."""
    parquet = parquet_corpus(work, n, seed)
    png = png_corpus(work, n, seed) if with_png else None
    home = fresh_folder(work / f"home-{n}", "bench/scale.py")
    env = stage_env(home)
    for stage, argv in commands(n, parquet, png):
        got = measure(argv, env, STAGE_TIMEOUT_S)
        out[stage] = record(n, stage, got)
        peaks = " / ".join(f"{got.peaks_mib[r]:.0f}" for r in ROLES)
        say(f"N={n:,} {stage}: {got.wall_s:.1f} s, peak MiB {peaks} ({'/'.join(ROLES)})"
            + (f"; FAILED: {out[stage]['error']}" if "error" in out[stage] else ""))
    remove_made(home)  # 10^6 images' datasets and embeddings: gigabytes


def record(n: int, stage: str, got: Measured) -> dict:
    """One command's figures: wall, peaks, images, and its JSON (or the last lines of its error output)."""
    rec = {k: v for k, v in asdict(got).items() if k not in ("stdout", "stderr")}
    try:
        result = json.loads(got.stdout.strip().splitlines()[-1]) if got.returncode == 0 else None
    except (ValueError, IndexError):
        result = None
    if result is None:
        return rec | {"images": n, "error": error_line(got)}
    return rec | {"images": result.get("images", n) if stage == "evaluate" else n, "own": own_timings(result),
                  "result": result}


def error_line(got: Measured) -> str:
    """The command's one-line error (`error: ...`, as the CLI prints it), else its last output lines."""
    lines = [ln.strip() for ln in (got.stderr + "\n" + got.stdout).splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith("error:")]
    return said[-1] if said else " / ".join(lines[-3:]) or f"exit {got.returncode}"


def own_timings(result: dict) -> dict[str, float]:
    """The timings a command's JSON carries itself: train's `startup/...` metrics, encode's `seconds` and
    steady images/s."""
    own = {k: v for k, v in result.get("metrics", {}).items() if k.startswith("startup/") or k.endswith("_s")}
    own |= {f"seconds/{k}": v for k, v in (result.get("seconds") or {}).items()}
    if result.get("steady_images_per_s"):
        own["steady_images_per_s"] = result["steady_images_per_s"]
    return own


def machine() -> dict:
    """What ran the bench: CPUs, memory, platform, the code's commit."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "vae_core", "flows"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return {"cpus": len(os.sched_getaffinity(0)), "ram_gib": round(mem, 1), "platform": platform.platform(),
            "commit": commit.stdout.strip() + (" (with uncommitted changes in vae_core/flows)" if dirty else "")}


def parse_sizes(text: str) -> list[int]:
    """'1e4,1e5' -> [10000, 100000], sorted."""
    return sorted({int(float(s)) for s in text.split(",") if s.strip()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e4,1e5,1e6", help="corpus sizes, comma-separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/vae-scale", help="corpora (kept) and each N's VAE_HOME (removed)")
    ap.add_argument("--nightly", action="store_true", help="also run each size through the nightly deployment "
                    "on the local stack (bench/scale_nightly.py)")
    ap.add_argument("--from-partial", metavar="JSON", help="only write the report of a run that stopped, from its "
                    "--work/partial.json")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder of scale.md/json/png")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so that the running command is stopped
    work = Path(args.work)
    sizes = parse_sizes(args.sizes)
    if args.from_partial:  # a run that stopped (or ran older report code): report what it measured
        raw, lines = json.loads(Path(args.from_partial).read_text())
        raw["sizes"] = [n for n in raw["sizes"] if raw["runs"].get(str(n))]
        raw["command"] += f" (reported from its partial.json: {len(lines)} commands measured)"
        return write_results(raw, lines, Path(args.out))
    raw = {"command": "bench/scale.py " + " ".join(sys.argv[1:]),
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "startup_n": STARTUP_N, "sizes": sizes, "runs": {}, "nightly": {}}
    lines: list[str] = []
    partial = work / "partial.json"

    def say(line: str) -> None:
        """Print a line as it comes; keep it, and everything measured so far, in --work/partial.json."""
        print(line, flush=True)
        lines.append(line)
        partial.write_text(json.dumps([raw, lines]))

    for n in [STARTUP_N, *sizes]:
        raw["runs"][str(n)] = {}
        run_chain(n, work, args.seed, n == PNG_N or (n == STARTUP_N and PNG_N in sizes), say, raw["runs"][str(n)])
    for n in sizes if args.nightly else []:
        raw["nightly"][str(n)] = got = run_nightly(n, parquet_corpus(work, n, args.seed), work / f"nightly-{n}",
                                                   stage_env(work), Path(VAE).parent, STAGE_TIMEOUT_S)
        say(f"N={n:,} nightly deployment: " + (f"FAILED: {got['error']}" if "error" in got else ", ".join(
            f"{stage} {s:.1f} s" for stage, s in got["seconds"].items()) + f"; watched {got['watch_s']:.1f} s"))
    write_results(raw, lines, Path(args.out))

if __name__ == "__main__":
    main()
