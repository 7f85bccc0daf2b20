"""Where the seconds between a deployment run's submission and its `Running` state go, on the local stack.

    eval "$(vae stack up)"
    prefect deploy --all --prefect-file deploy/prefect.yaml
    .venv/bin/python bench/submit_latency.py [--runs 3]

Runs `ingest-dataset/default` on the built-in digits `--runs` times (after the first, a re-run finds the same
version and does little), and reads each flow run's state history from the Prefect server:

- wait: created (Scheduled) -> Pending: the worker's poll (`PREFECT_WORKER_QUERY_SECONDS`, 2 s on the stack);
- start: Pending -> Running: the flow-run process starts, imports Prefect's engine and the flow's entrypoint
  module, and reports to the server;
- run: Running -> a final state.

Then, in fresh processes on this machine, how long the imports of the start take: Python alone, Prefect's
engine, torch and mlflow alone, and each deployment's entrypoint module.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

ENTRYPOINTS = ("torch", "mlflow", "flows.ingest", "flows.train", "flows.evaluate", "flows.encode", "flows.nightly")
REQUEST = {"source": "builtin:digits", "name": "digits"}


def run_once() -> dict[str, float]:
    """One deployment run through the worker: its state gaps in seconds."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    flow_run = run_deployment("ingest-dataset/default", parameters={"request": REQUEST}, timeout=600)
    with get_client(sync_client=True) as client:
        states = sorted(client.read_flow_run_states(flow_run.id), key=lambda s: s.timestamp)
    first = {}
    for state in states:
        first.setdefault(state.type.value, state.timestamp)
    if "RUNNING" not in first or "PENDING" not in first:
        raise SystemExit(f"flow run {flow_run.id} ended {flow_run.state_name} without running: {list(first)}")
    end = states[-1].timestamp
    return {"wait": (first["PENDING"] - states[0].timestamp).total_seconds(),
            "start": (first["RUNNING"] - first["PENDING"]).total_seconds(),
            "run": (end - first["RUNNING"]).total_seconds()}


def import_seconds(module: str | None, tries: int = 3) -> float:
    """Wall time of a fresh `python -c "import MODULE"` (None: Python alone), the best of `tries`: the other
    processes of a busy machine only ever add to it."""
    def once() -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}" if module else "pass"], check=True)
        return time.perf_counter() - t0
    return min(once() for _ in range(tries))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    gaps = [run_once() for _ in range(args.runs)]
    for key in ("wait", "start", "run"):
        values = [g[key] for g in gaps]
        print(f"{key:<6} median {statistics.median(values):5.1f} s  ({', '.join(f'{v:.1f}' for v in values)})")
    for module in (None, "prefect.engine", *ENTRYPOINTS):
        print(f"import {module or '(python alone)':<16} {import_seconds(module):5.1f} s")


if __name__ == "__main__":
    main()
