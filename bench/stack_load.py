"""The local stack under load: 10 concurrent `vae` runs against `vae stack up` on SQLite and on Postgres, then
`mlflow models serve` of the champion under a bounded HTTP load.

    .venv/bin/python bench/stack_load.py [--db sqlite,postgres] [--work /tmp/vae-stack-load]

Per store, in a fresh VAE_HOME under --work (free ports, `vae stack down` at the end whatever happened):
1. setup: `vae ingest` of --limit MNIST images; two tiny trains (version 1 with a low learning rate, version 2
   with the usual one, so that version 2 can beat it); `vae evaluate` of version 1 (champion, and the dataset's
   feature classifier cached before the load).
2. the load, all started at once: 8 `vae evaluate` (4 of version 1, 4 of @challenger, i.e. version 2) and 2
   `vae train`, all through the stack's exports. Per run: exit code, wall time, database errors in its output;
   database errors in the stack's service logs written meanwhile (mlflow.log, and the database's own log).
3. checks on the registry: every train run recorded and FINISHED, one version per train, versions 1..N, the
   gate's tags on each evaluated version from one of its decisions, the promotions one chain ending at @champion
   (bench/stack_load_checks.py).
4. `mlflow models serve -m models:/vae-mnist@champion` with the stack's tracking URI: requests/s, images/s,
   p50/p99 latency and errors at batch 1 and 256 (bench/stack_load_serve.py).

Prints the tables, prepends a dated section to bench/results/stack_load.md and writes stack_load.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.scale import OUTSIDE, error_line, machine  # noqa: E402
from bench.scale_measure import Measured  # noqa: E402
from bench.stack_load_checks import (champion_tag_problems, db_errors, gate_tag_problems,  # noqa: E402
                                     promotion_problems, run_problems, versions_problem)
from bench.stack_load_report import write_results  # noqa: E402
from bench.stack_load_serve import in_process_ms, load_figures, mnist_images, served  # noqa: E402
from bench.workdir import fresh_folder  # noqa: E402
from tests.ports import free_ports  # noqa: E402

BIN = Path(sys.executable).parent
NAME = "mnist"
MODEL = f"vae-{NAME}"
RUN_TIMEOUT_S = 1800
TINY = ["--epochs", "1", "--cpus-per-worker", "0.5", "--max-failures", "0", "--set", "model.hidden_channels=[16,32]",
        "--set", "model.hidden_dim=64", "--set", "model.latent_dim=8", "--set", "train.batch_size=64",
        "--set", "train.kl_warmup_steps=50"]
QUICK_EVAL = ["--limit", "200", "--iw-samples", "5", "--map-points", "50", "--sample-rows", "500"]


def train(lr: float) -> list[str]:
    return ["train", "--dataset", NAME, *TINY, "--set", f"train.lr={lr}", "--json"]


def evaluate(model: str) -> list[str]:
    return ["evaluate", "--model", model, *QUICK_EVAL, "--json"]


# Version 1 is the champion when the load starts and @challenger is version 2 (the setup's second train).
LOAD = [("evaluate", evaluate(f"models:/{MODEL}/1"))] * 4 \
    + [("evaluate", evaluate(f"models:/{MODEL}@challenger"))] * 4 + [("train", train(3e-3))] * 2


@contextlib.contextmanager
def stack(home: Path, db: str, say) -> Iterator[dict[str, str]]:
    """`vae stack up --db DB` in `home` on free ports; yields its exports; `vae stack down`
    at the end, whatever happened."""
    env = {k: v for k, v in os.environ.items() if k not in OUTSIDE} | {"VAE_HOME": str(home),
                                                                         "MLFLOW_DISABLE_TELEMETRY": "true"}
    flags = ["--prefect-port", "--mlflow-port", "--ray-port", "--ray-dashboard-port"]
    flags += ["--postgres-port"] if db == "postgres" else []
    argv = [str(BIN / "vae"), "stack", "up", "--json", "--ray-cpus", "2", "--db", db,
            *[a for flag, port in zip(flags, free_ports(len(flags))) for a in (flag, str(port))]]
    t = time.monotonic()
    try:
        up = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            raise RuntimeError(f"vae stack up --db {db}: {_error(up.returncode, up.stdout, up.stderr)}")
        say(f"{db}: stack up in {time.monotonic() - t:.1f} s")
        yield env | json.loads(up.stdout)["env"] | {"PREFECT_HOME": str(home / "cli-prefect")}
    finally:
        down = subprocess.run([str(BIN / "vae"), "stack", "down"], env=env, capture_output=True, text=True, timeout=300)
        say(f"{db}: vae stack down: {(down.stdout + down.stderr).strip()[-200:]}")


def _error(rc: int, out: str, err: str) -> str:
    """A command's one-line error, as bench/scale.py reads it."""
    return error_line(Measured(rc, 0.0, out, err, {}, []))


def record(kind: str, argv: list[str], rc: int, wall: float, out: str, err: str) -> dict:
    """One run: its kind, exit code, wall, database errors in its output, and its JSON result or error line."""
    rec = {"kind": kind, "argv": " ".join(argv), "rc": rc, "wall_s": round(wall, 2), "db_errors": db_errors(out + err)}
    try:
        rec["result"] = json.loads(out.strip().splitlines()[-1]) if rc == 0 else None
    except (ValueError, IndexError):
        rec["result"] = None
    if rec["result"] is None:
        rec["error"] = _error(rc, out, err)
    return rec


def run_one(kind: str, argv: list[str], env: dict[str, str], say) -> dict:
    """One `vae` command to its end; raises RuntimeError naming it when it fails (setup cannot go on)."""
    t = time.monotonic()
    proc = subprocess.run([str(BIN / "vae"), *argv], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    rec = record(kind, argv, proc.returncode, time.monotonic() - t, proc.stdout, proc.stderr)
    say(f"  setup {kind}: {rec['wall_s']:.1f} s" + (f"; FAILED: {rec['error']}" if proc.returncode else ""))
    if proc.returncode:
        raise RuntimeError(f"setup `vae {' '.join(argv[:3])}` failed: {rec['error']}")
    return rec


def run_all(runs: list[tuple[str, list[str]]], env: dict[str, str], logs: Path) -> list[dict]:
    """Start every run at once (outputs to files under `logs`), wait for all (each one's end seen within 0.2 s);
    their records in start order. Whatever still runs when this stops (the bench interrupted, a run past
    RUN_TIMEOUT_S) is killed with its session."""
    logs.mkdir(parents=True, exist_ok=True)
    procs, ended = [], {}
    t = time.monotonic()
    try:
        for i, (kind, argv) in enumerate(runs):
            with open(logs / f"{i:02d}-{kind}.out", "w") as out, open(logs / f"{i:02d}-{kind}.err", "w") as err:
                procs.append(subprocess.Popen([str(BIN / "vae"), *argv], env=env, stdout=out, stderr=err,
                                              start_new_session=True))
        while len(ended) < len(procs) and time.monotonic() - t < RUN_TIMEOUT_S:
            ended |= {i: time.monotonic() - t for i, p in enumerate(procs) if i not in ended and p.poll() is not None}
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [record(kind, argv, procs[i].returncode, ended.get(i, RUN_TIMEOUT_S),
                   (logs / f"{i:02d}-{kind}.out").read_text(), (logs / f"{i:02d}-{kind}.err").read_text())
            for i, (kind, argv) in enumerate(runs)]


def log_offsets(home: Path) -> dict[str, int]:
    """Size of each service log of the stack now: where the part written by the load begins."""
    return {p.name: p.stat().st_size for p in (home / "stack" / "logs").glob("*.log")}


def service_db_errors(home: Path, since: dict[str, int]) -> dict[str, list[str]]:
    """Database errors each service log (mlflow.log, the database's own...) got after `since`."""
    found = {}
    for log in sorted((home / "stack" / "logs").glob("*.log")):
        with open(log, "rb") as f:
            f.seek(since.get(log.name, 0))
            found[log.name] = db_errors(f.read().decode(errors="replace"))
    return found


def registry_state(uri: str) -> dict:
    """What the tracking server holds now: the model's versions with their tags, @champion, the train runs'
    statuses."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{MODEL}'")
    experiment = client.get_experiment_by_name("train-vae")
    runs = client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []
    champion = client.get_registered_model(MODEL).aliases.get("champion")
    return {"versions": sorted(int(v.version) for v in versions),
            "champion": None if champion is None else int(champion),
            "tags": {int(v.version): dict(v.tags) for v in versions}, "run_statuses": [r.info.status for r in runs]}


def consistency(setup: list[dict], load: list[dict], state: dict) -> dict[str, list[str]]:
    """Each check's problems (an empty list: it holds) over the setup's and the load's runs and the registry."""
    trains = [r for r in setup + load if r["kind"] == "train"]
    decisions = [r["result"]["decision"] for r in setup + load
                 if r["kind"] == "evaluate" and r["result"] and r["result"].get("decision")]
    registered = sorted(r["result"]["model_version"] for r in trains if r["result"])
    return {
        "runs recorded, FINISHED": run_problems(state["run_statuses"], len(trains)),
        "one version per train": [] if registered == state["versions"] else
        [f"trains registered {registered}, the registry holds {state['versions']}"],
        "versions 1..N": [p for p in [versions_problem(state["versions"])] if p],
        "gate tags from one decision": gate_tag_problems(state["tags"], decisions),
        "promotions chain to @champion": promotion_problems(decisions, state["champion"]),
        "@champion's tags say promoted": champion_tag_problems(state["tags"], state["champion"]),
    }


def fresh_home(home: Path) -> Path:
    """An empty VAE_HOME at `home` (bench.workdir.fresh_folder: a folder this bench did not make stays)."""
    fresh_folder(home, "bench/stack_load.py").chmod(0o755)  # Postgres runs as its own user and must reach inside
    return home


def one_store(db: str, work: Path, args: argparse.Namespace, say) -> dict:
    """Setup, load, checks and serving on one store's stack; the figures (or the error that stopped it)."""
    home = fresh_home(work / f"home-{db}")
    out: dict = {"db": db}
    try:
        with stack(home, db, say) as env:
            out["setup"] = [run_one("ingest", ["ingest", str(args.mnist), "--name", NAME, "--limit", str(args.limit),
                                               "--json"], env, say),
                            run_one("train", train(3e-4), env, say), run_one("train", train(3e-3), env, say),
                            run_one("evaluate", evaluate(f"models:/{MODEL}/1"), env, say)]
            since = log_offsets(home)
            t = time.monotonic()
            out["load"] = run_all(LOAD, env, work / f"logs-{db}")
            out["load_wall_s"] = round(time.monotonic() - t, 1)
            out["service_db_errors"] = service_db_errors(home, since)
            say(f"{db}: load of {len(LOAD)} runs in {out['load_wall_s']} s, exit codes "
                f"{[r['rc'] for r in out['load']]}")
            state = registry_state(env["MLFLOW_TRACKING_URI"])
            out["registry"] = {k: v for k, v in state.items() if k != "tags"} | {"gate_decisions": {
                v: t.get("gate.decision") for v, t in state["tags"].items()}}
            out["checks"] = consistency(out["setup"], out["load"], state)
            out["serve"] = serve(env, work / f"serve-{db}.log", args)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        out["error"] = str(e)
        say(f"{db}: STOPPED: {e}")
    return out


def serve(env: dict[str, str], log: Path, args: argparse.Namespace) -> list[dict]:
    """The champion behind `mlflow models serve`, loaded at batch 1 and 256, each beside the bare baseline
    (`predict` in this process) and the cost of parsing its JSON request."""
    model = f"models:/{MODEL}@champion"
    batches = [mnist_images(n) for n in (1, 256)]
    bare = in_process_ms(model, env["MLFLOW_TRACKING_URI"], batches)
    with served(model, free_ports(1)[0], env, log) as url:
        return [load_figures(url, images, args.concurrency, args.seconds, args.warmup) | ms
                for images, ms in zip(batches, bare)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="sqlite,postgres", help="stores to run, comma-separated: sqlite, postgres")
    ap.add_argument("--work", default="/tmp/vae-stack-load", help="each store's VAE_HOME and the runs' logs")
    ap.add_argument("--mnist", default="/work/shared/data/mnist", type=Path, help="MNIST IDX folder")
    ap.add_argument("--limit", type=int, default=1000, help="images ingested")
    ap.add_argument("--concurrency", type=int, default=4, help="clients posting at once to the model server")
    ap.add_argument("--seconds", type=float, default=12.0, help="measured seconds per batch size")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of requests before measuring")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder of stack_load.md/json")
    args = ap.parse_args()
    dbs = [d.strip() for d in args.db.split(",") if d.strip()]
    if bad := [d for d in dbs if d not in ("sqlite", "postgres")]:
        ap.error(f"--db: unknown store(s) {bad}; choose from sqlite, postgres")
    if not (args.mnist / "t10k-images-idx3-ubyte.gz").exists():
        ap.error(f"--mnist: no MNIST IDX files in {args.mnist}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the runs and the stack are stopped
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    t = time.monotonic()
    raw = {"command": "bench/stack_load.py " + " ".join(sys.argv[1:]), "machine": machine(),
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "stores": []}
    for db in dbs:
        raw["stores"].append(one_store(db, work, args, lambda line: print(line, flush=True)))
    raw["wall_s"] = round(time.monotonic() - t, 1)
    print(write_results(raw, Path(args.out)))


if __name__ == "__main__":
    main()
