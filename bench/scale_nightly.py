"""bench/scale.py --nightly: the same corpus through the `nightly-retrain/nightly` deployment on the local stack.

In a fresh VAE_HOME: `vae stack up` (Prefect server and worker, MLflow server, Ray head on free ports), `prefect
deploy --all` of deploy/prefect.yaml, then `prefect deployment run nightly-retrain/nightly --watch` with a
request naming the corpus (1 epoch, memory budget 1 MiB, K = 10). Each stage's sub-flow run duration (start to
end) is read from the Prefect API; the stack is stopped at the end whatever happens.
"""

from __future__ import annotations

import datetime
import json
import shlex
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

STAGES = {"ingest-dataset": "ingest", "train-vae": "train", "evaluate-vae": "evaluate", "encode-dataset": "encode",
          "nightly-retrain": "nightly"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exports(text: str) -> dict[str, str]:
    """`export KEY=value` lines (as `vae stack up --env` prints them) -> {KEY: value}."""
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


def _api(url: str, body: dict | None = None) -> object:
    """GET (or POST `body` to) a Prefect API URL; -> its JSON."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def flow_run_seconds(api: str, since: str) -> dict[str, float]:
    """Stage -> start-to-end seconds of each flow run that started after `since` (ISO time) on this private
    server: the nightly run and its stage sub-flows."""
    runs = _api(f"{api}/flow_runs/filter", {"flow_runs": {"start_time": {"after_": since}}, "limit": 200})
    out = {}
    for run in runs:
        if run.get("start_time") and run.get("end_time"):
            flow = _api(f"{api}/flows/{run['flow_id']}")["name"]
            span = (datetime.datetime.fromisoformat(run["end_time"]) -
                    datetime.datetime.fromisoformat(run["start_time"])).total_seconds()
            out[STAGES.get(flow, flow)] = out.get(STAGES.get(flow, flow), 0.0) + span
    return out


def _run(argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
    return proc.stdout


def run_nightly(n: int, parquet: Path, home: Path, env: dict[str, str], bin_dir: Path, timeout: float) -> dict:
    """The nightly deployment on the n-image corpus, `vae` and `prefect` from `bin_dir`, run from the repository
    (deploy/prefect.yaml); -> {"seconds": stage -> seconds, "watch_s": the `deployment run --watch` command's wall
    time} or {"error": ...}."""
    repo = Path(__file__).resolve().parent.parent
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = env | {"VAE_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    ports = {"--prefect-port": _free_port(), "--mlflow-port": _free_port(), "--ray-port": _free_port(),
             "--ray-dashboard-port": _free_port()}
    try:
        up = _run([str(bin_dir / "vae"), "stack", "up", "--env", *(str(x) for kv in ports.items() for x in kv)],
                  env, repo, 300)
        cli = env | _exports(up) | {"PREFECT_HOME": str(home / "cli-prefect")}
        prefect = str(bin_dir / "prefect")
        _run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"], cli, repo, 300)
        request = {"ingest": {"source": str(parquet), "name": f"scale-{n}"},
                   "train": {"preset": "mnist", "epochs": 1, "memory_budget_mb": 1},
                   "evaluate": {"split": "test", "iw_samples": 10}}
        since = datetime.datetime.now(datetime.timezone.utc).isoformat()
        t = time.perf_counter()
        _run([prefect, "deployment", "run", "nightly-retrain/nightly", "--param", f"request={json.dumps(request)}",
              "--watch"], cli, repo, timeout)
        watch = time.perf_counter() - t
        return {"seconds": flow_run_seconds(cli["PREFECT_API_URL"].rstrip("/"), since), "watch_s": watch}
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError, KeyError) as e:
        return {"error": " ".join(str(e).split())[-600:]}
    finally:
        subprocess.run([str(bin_dir / "vae"), "stack", "down"], env=env, cwd=repo, capture_output=True, timeout=300)
        shutil.rmtree(home, ignore_errors=True)
