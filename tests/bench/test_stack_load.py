"""bench/stack_load.py's pure parts: quantiles, database errors in a log, the registry's consistency checks on
hand-built histories (they must fail on a duplicated promotion, a gap, a mixed set of gate tags) and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.stack_load_checks import (champion_tag_problems, db_errors, gate_tag_problems, promotion_problems,
                                     quantile, run_problems, versions_problem)
from bench.stack_load_report import TITLE, load_rows, write_results
from vae_core.evaluation.gate import Decision


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.9, 0.99, 1.0])
def test_quantile_is_numpys_linear_quantile(q):
    values = [3.0, 1.0, 7.5, 2.0, 10.0, 4.0, 4.0]
    assert quantile(values, q) == pytest.approx(float(np.quantile(values, q)))


def test_quantile_of_nothing_is_none_and_q_is_checked():
    assert quantile([], 0.5) is None
    with pytest.raises(ValueError, match="within 0..1"):
        quantile([1.0], 1.5)


def test_db_errors_finds_lock_and_integrity_errors_only():
    log = "\n".join(["INFO 127.0.0.1 POST /api/2.0/mlflow/runs/create 200",
                     "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) database is locked",
                     "psycopg2.errors.UniqueViolation: duplicate key value violates unique constraint",
                     "WARNING something else"])
    assert db_errors(log) == log.splitlines()[1:3]


def _decision(version: int, champion: int | None, promote: bool, reason: str = "r") -> dict:
    return {"promote": promote, "reason": reason, "metric": "test/nll_k5", "challenger": 100.0 - version,
            "challenger_version": version, "champion": None if champion is None else 100.0 - champion,
            "champion_version": champion, "margin": 0.0}


HISTORY = [_decision(1, None, True), _decision(1, 1, False), _decision(2, 1, True), _decision(2, 1, False),
           _decision(3, 2, True), _decision(1, 3, False)]


def test_a_promotion_chain_ending_at_the_champion_holds():
    assert promotion_problems(HISTORY, champion=3) == []
    assert promotion_problems([], champion=None) == []


def test_two_promotions_over_one_champion_fail():
    """Two gates both saw version 1 as champion and both promoted: one promotion was lost."""
    problems = promotion_problems(HISTORY + [_decision(4, 1, True)], champion=3)
    assert any("2 promotions over champion 1: versions [2, 4]" in p for p in problems), problems


def test_a_promotion_over_a_version_never_champion_fails():
    problems = promotion_problems([_decision(1, None, True), _decision(3, 2, True)], champion=3)
    assert problems and "never champion" in problems[0], problems


def test_a_champion_that_is_not_the_last_promotion_fails():
    assert promotion_problems(HISTORY, champion=2) == ["champion is 2, the last promotion installed 3"]


@pytest.mark.parametrize("versions, problem", [
    ([1, 2, 3], None), ([], None), ([1, 3], "lacks [2]"), ([2, 3], "lacks [1]"), ([1, 2, 2], "more than once")])
def test_versions_must_be_one_to_n_each_once(versions, problem):
    got = versions_problem(versions)
    assert got is None if problem is None else problem in got


def _tags(decision: dict) -> dict[str, str]:
    return {"run_id": "abc"} | Decision(**decision).tags()


def test_gate_tags_from_one_of_the_versions_decisions_hold():
    tags = {1: _tags(HISTORY[5]), 2: _tags(HISTORY[2]), 3: _tags(HISTORY[4])}
    assert gate_tag_problems(tags, HISTORY) == []


def test_gate_tags_missing_or_mixed_from_two_decisions_fail():
    mixed = _tags(HISTORY[2]) | {"gate.reason": HISTORY[3]["reason"] + " (from the other gate)"}
    problems = gate_tag_problems({1: _tags(HISTORY[0]), 2: mixed}, HISTORY)
    assert [p.split(":")[0] for p in problems] == ["version 2", "version 3"], problems
    assert "match none" in problems[0] and "no gate tags" in problems[1]


def test_the_champions_tags_must_record_its_promotion():
    """Version 2 was promoted, then a later gate on version 2 (which saw champion 1 at its start) wrote `kept`."""
    assert champion_tag_problems({2: _tags(HISTORY[2])}, champion=2) == []
    assert champion_tag_problems({}, champion=None) == []
    (problem,) = champion_tag_problems({2: _tags(HISTORY[3])}, champion=2)
    assert problem.startswith("champion version 2's gate tags say 'kept'"), problem


def test_runs_must_all_be_recorded_and_finished():
    assert run_problems(["FINISHED"] * 4, 4) == []
    assert run_problems(["FINISHED"] * 3, 4) == ["3 runs recorded, 4 expected"]
    assert run_problems(["FINISHED", "FAILED", "RUNNING"], 3) == ["runs not FINISHED: {'FAILED': 1, 'RUNNING': 1}"]


def _run(kind: str, rc: int, wall: float, db_errors: list[str] = ()) -> dict:
    return {"kind": kind, "rc": rc, "wall_s": wall, "db_errors": list(db_errors), "argv": kind}


RAW = {"started": "2026-12-07T10:00:00+00:00", "command": "bench/stack_load.py --db sqlite", "wall_s": 600.0,
       "machine": {"cpus": 2, "ram_gib": 24.0, "platform": "Linux", "commit": "abc1234"},
       "stores": [{"db": "sqlite", "setup": [_run("train", 0, 40.0), _run("evaluate", 0, 30.0)],
                   "load": [_run("evaluate", 0, w) for w in (50.0, 70.0, 60.0)]
                   + [_run("evaluate", 1, 5.0, ["database is locked"]), _run("train", 0, 90.0)],
                   "load_wall_s": 95.0, "service_db_errors": {"mlflow.log": ["database is locked"] * 2},
                   "checks": {"versions 1..N": [], "promotions chain to @champion": ["champion is 2, ..."]},
                   "registry": {"versions": [1, 2], "champion": 2, "gate_decisions": {1: "promoted", 2: "kept"}},
                   "serve": [{"batch": 256, "concurrency": 4, "seconds": 12.0, "requests_per_s": 1.0,
                              "images_per_s": 256.0, "p50_ms": 3000.0, "p99_ms": 4000.0, "errors": 0,
                              "predict_ms": 95.0, "parse_ms": 1500.0}]},
                  {"db": "postgres", "error": "vae stack up --db postgres: error: no such option"}]}


def test_load_row_counts_runs_errors_and_failed_checks():
    row = load_rows(RAW["stores"][0])
    assert row["runs ok / total"] == "4 / 5"
    assert row["evaluate p50 / max s"] == "60.0 / 70.0"  # the failed run's 5 s is not a wall of a run that ran
    assert row["alone: train / evaluate s"] == "40.0 / 30.0"
    assert row["DB errors: runs / server logs"] == "1 / 2"
    assert row["consistency"] == "FAILED: promotions chain to @champion"
    assert load_rows(RAW["stores"][1])["runs ok / total"] == "-"


def test_report_prepends_a_dated_section_and_writes_the_raw_json(tmp_path):
    (tmp_path / "stack_load.md").write_text(f"{TITLE}\n\n## 2026-12-01T00:00:00+00:00\n\nolder run\n")
    write_results(RAW, tmp_path)
    text = (tmp_path / "stack_load.md").read_text()
    assert text.startswith(TITLE) and text.count(TITLE) == 1
    assert text.index("## 2026-12-07T10:00") < text.index("## 2026-12-01") and "older run" in text
    assert "| sqlite | 4 / 5 |" in text and "| sqlite | 256 | 4 |" in text and "| 95.0 / 1500.0 |" in text
    assert "- postgres: stopped: vae stack up --db postgres: error: no such option" in text
    assert "- sqlite: mlflow.log: database is locked" in text
    assert "- sqlite: versions [1, 2], @champion 2, each version's gate.decision tag {1: 'promoted', 2: 'kept'}" in text
    assert json.loads((tmp_path / "stack_load.json").read_text())["stores"][0]["load_wall_s"] == 95.0


def test_a_home_is_removed_only_when_this_bench_made_it(tmp_path):
    """`--work` may name any folder: a VAE_HOME there is replaced only if it carries the bench's mark."""
    from bench.stack_load import fresh_home

    home = fresh_home(tmp_path / "home-sqlite")
    (home / "mlflow.db").write_text("an earlier run's")
    assert not (fresh_home(home) / "mlflow.db").exists()
    theirs = tmp_path / "home-postgres"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit, match="was not made by bench/stack_load.py"):
        fresh_home(theirs)
    assert (theirs / "notes.txt").read_text() == "keep"
