"""bench/scale.py's report: the tables and targets (scale.md, newest run first), the raw numbers (scale.json)
and the two plots (scale_time.png, scale_memory.png)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.scale_measure import ROLES, exponent

TIME_TARGET = 1.25  # time per image at the largest N over the N 10x below
MEMORY_TARGET = 1.3  # peak memory of each role, same sizes
SHOWN_ROLES = ROLES[:3]  # `other` (Prefect's temporary server) is in scale.json
TITLE = "# bench/scale.py: cost of the chain from 10^4 to 10^6 images"


def steady_rows(raw: dict) -> list[dict]:
    """One row per (N, stage) of the sizes run: wall, start-up, steady, images/s, peaks, error."""
    startup = raw["runs"][str(raw["startup_n"])]
    rows = []
    for n in raw["sizes"]:
        for stage, rec in raw["runs"][str(n)].items():
            fixed = startup.get(stage, {}).get("wall_s") if "error" not in startup.get(stage, {"error": 1}) else None
            steady = rec["wall_s"] - fixed if fixed is not None and "error" not in rec else None
            rows.append({"n": n, "stage": stage, "wall_s": rec["wall_s"], "startup_s": fixed, "steady_s": steady,
                         "own_steady_s": own_steady(rec.get("own", {})),
                         "images": rec["images"], "images_per_s": rec["images"] / steady if steady and steady > 0
                         else None, "peaks_mib": rec["peaks_mib"], "private_mib": rec.get("private_mib") or {},
                         "error": rec.get("error")})
    return rows


def own_steady(own: dict[str, float]) -> float | None:
    """The steady seconds a command reports itself, where it does: train's epoch loop, encode's encoding."""
    return own.get("elapsed_s", own.get("seconds/encode"))


def targets(rows: list[dict]) -> list[dict]:
    """Per stage: the exponent of steady time against images over every size, and the time-per-image and
    peak-memory ratios of the largest size to the size 10x below it (None where either is missing)."""
    out = []
    for stage in dict.fromkeys(r["stage"] for r in rows):
        # a steady time of 0 or less: the stage's work was within the start-up's noise, no rate to compare
        mine = [r for r in rows if r["stage"] == stage and (r["steady_s"] or 0) > 0]
        by_n = {r["n"]: r for r in mine}
        top = max(by_n, default=None)
        low = by_n.get(top // 10) if top else None
        t = {"stage": stage, "exponent": exponent([r["images"] for r in mine], [r["steady_s"] for r in mine]),
             "sizes": [low["n"], top] if low else None, "time_ratio": None, "memory_ratio": {}, "private_ratio": {}}
        owned = [r for r in rows if r["stage"] == stage and (r["own_steady_s"] or 0) > 0]
        t["own_exponent"] = exponent([r["images"] for r in owned], [r["own_steady_s"] for r in owned])
        t["own_time_ratio"] = None
        if low:
            hi = by_n[top]
            t["time_ratio"] = (hi["steady_s"] / hi["images"]) / (low["steady_s"] / low["images"])
            if hi["own_steady_s"] and low["own_steady_s"]:
                t["own_time_ratio"] = (hi["own_steady_s"] / hi["images"]) / (low["own_steady_s"] / low["images"])
            t["memory_ratio"] = {r: hi["peaks_mib"][r] / low["peaks_mib"][r] for r in SHOWN_ROLES
                                 if low["peaks_mib"][r] > 0}
            t["private_ratio"] = {r: hi["private_mib"][r] / low["private_mib"][r] for r in SHOWN_ROLES[:2]
                                  if low["private_mib"].get(r, 0) > 0 and r in hi["private_mib"]}
        out.append(t)
    return out


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _verdict(v: float | None, target: float) -> str:
    return "" if v is None else ("PASS" if v <= target else "MISS")


def section(raw: dict, lines: list[str]) -> str:
    """This run's section of scale.md: what ran where, the table per N and stage, the targets per stage."""
    rows, m = steady_rows(raw), raw["machine"]
    startup = raw["runs"][str(raw["startup_n"])]
    md = [f"## {raw['started'].replace('T', ' ')}, commit {m['commit']}", "",
          f"Command: `.venv/bin/python {raw['command']}`", "",
          f"Machine: {m['cpus']} CPUs, {m['ram_gib']:.0f} GiB, {m['platform']}; shared with other jobs while it ran.",
          "", f"Start-up (the same chain on {raw['startup_n']:,} images, wall s): "
          + ", ".join(f"{s} {r['wall_s']:.1f}" + (" (failed)" if "error" in r else "") for s, r in startup.items()),
          "", "Own steady s: the stage's steady seconds as the command reports them itself (train: the epoch loop, "
          "`elapsed_s`; encode: `seconds.encode`), free of the start-up's noise.", "",
          "Peak MiB: resident (VmHWM), the largest process of each role; private: the largest RssAnon, what a "
          "process holds without the object store's shared pages it touched (bench/scale_measure.py).", "",
          "| N | stage | wall s | steady s | own steady s | images | images/s | peak MiB driver | ray worker | "
          "ray system | private MiB driver | ray worker |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [f"{r['n']:,}", r["stage"], f"{r['wall_s']:.1f}", _num(r["steady_s"], ".1f"),
                 _num(r["own_steady_s"], ".1f"), f"{r['images']:,}", _num(r["images_per_s"], ",.0f"),
                 *(f"{r['peaks_mib'][x]:.0f}" for x in SHOWN_ROLES),
                 *(_num(r["private_mib"].get(x), ".0f") for x in SHOWN_ROLES[:2])]
        if r["error"]:
            cells[3:7] = ["FAILED: " + r["error"].replace("|", "/")[:300], "", "", ""]
        md.append("| " + " | ".join(cells) + " |")
    md += ["", f"Per stage: exponent of steady time against images (1 = linear); time per image and peak memory per "
               f"role at the largest N over the N 10x below (targets <= {TIME_TARGET} and <= {MEMORY_TARGET}).", "",
           "| stage | exponent (own) | sizes | time/image ratio (own) | | peak ratio driver / ray worker / ray system "
           "| | private ratio driver / ray worker | |", "|---|---:|---|---:|---|---|---|---|---|"]
    for t in targets(rows):
        mem = t["memory_ratio"]
        worst = max(mem.values(), default=None)
        sizes = " / ".join(f"{n:,}" for n in reversed(t["sizes"])) if t["sizes"] else "-"
        own_x, own_r = (f" ({t[k]:.2f})" if t[k] is not None else "" for k in ("own_exponent", "own_time_ratio"))
        md.append(f"| {t['stage']} | {_num(t['exponent'], '.2f')}{own_x} | {sizes} | "
                  f"{_num(t['time_ratio'], '.2f')}{own_r} | "
                  f"{_verdict(t['time_ratio'], TIME_TARGET)} | "
                  f"{' / '.join(_num(mem.get(x), '.2f') for x in SHOWN_ROLES) if mem else '-'} | "
                  f"{_verdict(worst, MEMORY_TARGET)} | "
                  f"{' / '.join(_num(t['private_ratio'].get(x), '.2f') for x in SHOWN_ROLES[:2]) or '-'} | "
                  f"{_verdict(max(t['private_ratio'].values(), default=None), MEMORY_TARGET)} |")
    md += nightly_table(raw)
    return "\n".join(md + ["", "Raw output:", "", "```", *lines, "```", ""])


def nightly_table(raw: dict) -> list[str]:
    """The nightly deployment's sub-flow seconds beside the CLI chain's wall seconds, per N and stage."""
    if not raw.get("nightly"):
        return []
    md = ["", "Through the nightly deployment on the local stack (sub-flow run start to end, from the Prefect API) "
              "against the CLI commands' wall time (which includes each command's own Prefect, Ray and MLflow start):",
          "", "| N | stage | nightly s | CLI wall s | nightly/CLI |", "|---:|---|---:|---:|---:|"]
    for n, got in raw["nightly"].items():
        if "error" in got:
            md.append(f"| {int(n):,} | all | FAILED: {got['error'][:300]} | | |")
            continue
        for stage, secs in got["seconds"].items():
            cli = raw["runs"][n].get(stage, {}).get("wall_s")
            md.append(f"| {int(n):,} | {stage} | {secs:.1f} | {_num(cli, '.1f')} | "
                      f"{_num(secs / cli if cli else None, '.2f')} |")
    return md


def write_results(raw: dict, lines: list[str], out: Path) -> None:
    """scale.md and scale.json (a list of runs' raw numbers) with this run first, and this run's two plots when it
    ran several sizes."""
    out.mkdir(parents=True, exist_ok=True)
    rows = steady_rows(raw)
    raw = raw | {"rows": rows, "targets": targets(rows)}
    history = out / "scale.json"
    earlier_raw = json.loads(history.read_text()) if history.exists() else []
    history.write_text(json.dumps([raw, *earlier_raw], indent=1) + "\n")
    md = out / "scale.md"
    earlier = md.read_text().removeprefix(TITLE).lstrip("\n") if md.exists() else ""
    text = section(raw, lines)
    md.write_text(f"{TITLE}\n\n{text}\n{earlier}".rstrip("\n") + "\n")
    print("\n" + text)
    if len(raw["sizes"]) > 1:  # a one-size run has no curve: the plots of the last run with several stay
        plot(rows, out)


def plot(rows: list[dict], out: Path) -> None:
    """scale_time.png: steady seconds per stage against images, log-log, with a slope-1 guide;
    scale_memory.png: peak MiB per role (one panel each) and stage against images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, stage in enumerate(stages):  # one colour per stage in both plots
        pts = [(r["images"], r["steady_s"]) for r in rows if r["stage"] == stage and (r["steady_s"] or 0) > 0]
        if pts:
            ax.plot(*zip(*pts), "o-", color=f"C{i}", label=stage)
    pts = [(r["images"], r["steady_s"]) for r in rows if (r["steady_s"] or 0) > 0]
    if pts:  # through the points' geometric centre
        lo, hi = min(x for x, _ in pts), max(x for x, _ in pts)
        cx, cy = (math.exp(sum(math.log(v[i]) for v in pts) / len(pts)) for i in (0, 1))
        ax.plot([lo, hi], [cy * lo / cx, cy * hi / cx], "k--", lw=1, label="slope 1 (linear)")
    ax.set(xscale="log", yscale="log", xlabel="images", ylabel="steady seconds (wall - start-up)",
           title="Time per stage against images")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "scale_time.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(SHOWN_ROLES), figsize=(13, 4.5), sharey=True)
    for ax, role in zip(axes, SHOWN_ROLES):
        for i, stage in enumerate(stages):
            pts = [(r["n"], r["peaks_mib"][role]) for r in rows if r["stage"] == stage and r["peaks_mib"][role] > 0]
            if pts:
                ax.plot(*zip(*pts), "o-", color=f"C{i}", label=stage)
        ax.set(xscale="log", xlabel="images (N)", title=f"peak memory: {role}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("peak MiB (VmHWM, largest process of the role)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "scale_memory.png", dpi=110)
    plt.close(fig)
