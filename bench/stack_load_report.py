"""bench/stack_load.py's report: the tables (stack_load.md, newest run first) and the raw numbers (stack_load.json)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.stack_load_checks import quantile

TITLE = "# bench/stack_load.py: the local stack under 10 concurrent runs, and `mlflow models serve`"


def _walls(records: list[dict], kind: str, ok_only: bool = True) -> list[float]:
    return [r["wall_s"] for r in records if r["kind"] == kind and (r["rc"] == 0 or not ok_only)]


def _p50_max(values: list[float]) -> str:
    return "-" if not values else f"{quantile(values, 0.5):.1f} / {max(values):.1f}"


def load_rows(store: dict) -> dict[str, str]:
    """One store's row of the load table."""
    load, setup = store.get("load", []), store.get("setup", [])
    ok = sum(r["rc"] == 0 for r in load)
    in_runs = sum(len(r["db_errors"]) for r in load)
    in_logs = sum(len(v) for v in store.get("service_db_errors", {}).values())
    checks = store.get("checks", {})
    failed = [name for name, problems in checks.items() if problems]
    return {"store": store["db"], "runs ok / total": f"{ok} / {len(load)}" if load else "-",
            "train p50 / max s": _p50_max(_walls(load, "train")),
            "evaluate p50 / max s": _p50_max(_walls(load, "evaluate")),
            "alone: train / evaluate s": " / ".join(f"{w[-1]:.1f}" if w else "-" for w in
                                                    (_walls(setup, "train"), _walls(setup, "evaluate"))),
            "load wall s": f"{store['load_wall_s']:.1f}" if "load_wall_s" in store else "-",
            "DB errors: runs / server logs": f"{in_runs} / {in_logs}" if load else "-",
            "consistency": "-" if not checks else (f"{len(checks)}/{len(checks)} hold" if not failed else
                                                   "FAILED: " + ", ".join(failed))}


def serve_rows(store: dict) -> list[dict[str, str]]:
    """One row per batch size of the serving load."""
    return [{"store": store["db"], "batch": str(s["batch"]), "clients": str(s["concurrency"]),
             "seconds": f"{s['seconds']:.1f}", "requests/s": f"{s['requests_per_s']:.1f}",
             "images/s": f"{s['images_per_s']:.0f}", "p50 ms": f"{s['p50_ms']}", "p99 ms": f"{s['p99_ms']}",
             "in process: predict / JSON parse ms": f"{s.get('predict_ms', '-')} / {s.get('parse_ms', '-')}",
             "errors": str(s["errors"])} for s in store.get("serve", [])]


def table(rows: list[dict[str, str]]) -> str:
    """A markdown table of rows that share their keys (an empty string for no rows)."""
    if not rows:
        return ""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row[k] for k in head) + " |" for row in rows])


def findings(raw: dict) -> list[str]:
    """What went wrong, one line each: a store that stopped, failed runs, database errors, failed checks."""
    out = []
    for store in raw["stores"]:
        db = store["db"]
        if "error" in store:
            out.append(f"{db}: stopped: {store['error']}")
        out += [f"{db}: {r['kind']} exit {r['rc']}: {r.get('error', '')}" for r in store.get("load", []) if r["rc"]]
        out += [f"{db}: {r['kind']} output: {line}" for r in store.get("load", []) for line in r["db_errors"][:2]]
        out += [f"{db}: {log}: {line}" for log, lines in store.get("service_db_errors", {}).items()
                for line in lines[:3]]
        out += [f"{db}: {name}: {'; '.join(p)}" for name, p in store.get("checks", {}).items() if p]
    return out


def section(raw: dict) -> str:
    """The dated markdown section of one run: machine, command, tables, findings."""
    m = raw["machine"]
    checks = [{"check": name} | {s["db"]: ("holds" if not s["checks"][name] else "; ".join(s["checks"][name]))
                                 for s in raw["stores"] if "checks" in s}
              for name in next((s["checks"] for s in raw["stores"] if "checks" in s), {})]
    serve = [row for s in raw["stores"] for row in serve_rows(s)]
    found = findings(raw)
    parts = [f"## {raw['started']}", "",
             f"Machine: {m['cpus']} CPUs, {m['ram_gib']} GiB, {m['platform']}, commit {m['commit']}. "
             f"Command: `.venv/bin/python {raw['command'].strip()}` ({raw['wall_s']:.0f} s in all).", "",
             "Load: 8 `vae evaluate` and 2 `vae train` started at once (wall times in seconds; \"alone\": the same "
             "commands in the setup, one at a time).", "", table([load_rows(s) for s in raw["stores"]]), ""]
    if checks:
        parts += ["Consistency of the registry after the load:", "", table(checks), ""]
        parts += [f"- {s['db']}: versions {s['registry']['versions']}, @champion {s['registry']['champion']}, each "
                  f"version's gate.decision tag {s['registry']['gate_decisions']}" for s in raw["stores"]
                  if "registry" in s] + [""]
    if serve:
        parts += ["`mlflow models serve -m models:/vae-mnist@champion` (one uvicorn worker), clients posting "
                  "MNIST test digits after a warm-up:", "", table(serve), ""]
    parts += ["Findings: " + ("none." if not found else ""), *[f"- {line}" for line in found], ""]
    return "\n".join(parts)


def write_results(raw: dict, out: Path) -> str:
    """Prepend this run's section to stack_load.md (earlier runs kept), write stack_load.json (this run's raw
    figures); returns the section."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / "stack_load.md"
    earlier = md.read_text().split("\n", 1)[1].lstrip("\n") if md.exists() else ""
    text = section(raw)
    md.write_text(f"{TITLE}\n\n{text}\n{earlier}".rstrip("\n") + "\n")
    (out / "stack_load.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    return text
