"""bench/stack_load.py's pure parts: quantiles, database errors in a log, and the consistency checks of the registry
after concurrent runs (versions without gaps, one promotion per champion, gate tags from one decision).

A decision is the `decision` object of an `evaluate --json` result: `promote`, `challenger_version`,
`champion_version` (the champion it was compared with, None when there was none) and the rest of
`vae_core.evaluation.gate.Decision`'s fields.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from vae_core.evaluation.gate import Decision

# What a store under concurrent writers says when it refuses or loses a write: SQLite's lock and busy errors,
# Postgres' serialization failures and deadlocks, a duplicate key from two writers taking the same number.
DB_ERROR = re.compile(r"database is locked|database table is locked|SQLITE_BUSY|OperationalError|deadlock detected|"
                      r"could not serialize|UniqueViolation|UNIQUE constraint failed|IntegrityError|"
                      r"duplicate key value", re.IGNORECASE)


def quantile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of `values` by linear interpolation between order statistics (numpy's default);
    None for no values."""
    if not 0 <= q <= 1:
        raise ValueError(f"q must be within 0..1, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def db_errors(text: str) -> list[str]:
    """The lines of `text` that report a database error (DB_ERROR), stripped, in order."""
    return [line.strip()[:300] for line in text.splitlines() if DB_ERROR.search(line)]


def versions_problem(versions: list[int]) -> str | None:
    """None when `versions` are 1..N, each once; else what is wrong (a duplicate, a gap)."""
    counts = Counter(versions)
    if dup := sorted(v for v, n in counts.items() if n > 1):
        return f"version(s) {dup} registered more than once"
    if missing := sorted(set(range(1, max(versions, default=0) + 1)) - set(versions)):
        return f"versions not sequential: {sorted(versions)} lacks {missing}"
    return None


def promotion_problems(decisions: list[dict], champion: int | None, first: int | None = None) -> list[str]:
    """What breaks the alias history: the promoted decisions must chain from `first` (the champion before them),
    each over the champion the previous one installed, with no champion promoted over twice (two promotions
    over one champion: one of them was lost), and `champion` must be the version of the chain's last link."""
    promoted = [d for d in decisions if d["promote"]]
    over = Counter(d["champion_version"] for d in promoted)
    problems = [f"{n} promotions over champion {base}: versions "
                f"{sorted(d['challenger_version'] for d in promoted if d['champion_version'] == base)}"
                for base, n in over.items() if n > 1]
    step = {d["champion_version"]: d["challenger_version"] for d in promoted}
    now, seen = first, []
    while now in step and now not in seen:
        seen.append(now)
        now = step[now]
    if stray := sorted({d["challenger_version"] for d in promoted} - set(seen[1:]) - {now}, key=str):
        problems.append(f"promotion(s) to {stray} over a version that was never champion from {first}")
    if now != champion:
        problems.append(f"champion is {champion}, the last promotion installed {now}")
    return problems


def gate_tag_problems(tags: dict[int, dict[str, str]], decisions: list[dict]) -> list[str]:
    """Every evaluated version carries the gate's tags (`gate.*`) of exactly one of its decisions: all of them,
    none missing, none from another decision (concurrent gates write their tags one by one)."""
    problems = []
    by_version: dict[int, list[dict[str, str]]] = {}
    for d in decisions:
        by_version.setdefault(d["challenger_version"], []).append(Decision(**d).tags())
    for version, expected in sorted(by_version.items()):
        got = {k: v for k, v in tags.get(version, {}).items() if k.startswith("gate.")}
        if not got:
            problems.append(f"version {version}: no gate tags after {len(expected)} decision(s)")
        elif got not in expected:
            problems.append(f"version {version}: gate tags match none of its {len(expected)} decision(s): "
                            f"{got.get('gate.decision')!r} ({got.get('gate.reason', '')[:80]!r})")
    return problems


def champion_tag_problems(tags: dict[int, dict[str, str]], champion: int | None) -> list[str]:
    """The champion's own gate tags record a promotion: the registry still says why it is served."""
    mine = tags.get(champion, {}) if champion is not None else {}
    if champion is None or mine.get("gate.decision") == "promoted":
        return []
    return [f"champion version {champion}'s gate tags say {mine.get('gate.decision')!r} "
            f"({mine.get('gate.reason', '')[:90]!r}): the decision that promoted it was overwritten"]


def run_problems(statuses: list[str], expected: int) -> list[str]:
    """Train runs recorded: `expected` of them, every one FINISHED."""
    problems = [] if len(statuses) == expected else [f"{len(statuses)} runs recorded, {expected} expected"]
    if bad := Counter(s for s in statuses if s != "FINISHED"):
        problems.append(f"runs not FINISHED: {dict(bad)}")
    return problems
