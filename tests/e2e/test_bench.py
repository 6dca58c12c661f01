"""The benchmark suite runs end to end on a tiny load and reports every measurement.

Only that it runs and what it reports are checked here: its figures depend on the
machine, so no speed is asserted (that is what the full run is for).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support import paths

ROOT = paths.ROOT

# The quick run gets 300 s in the fixture; the first test pays for it.
pytestmark = pytest.mark.timeout(480)

#: Every measurement the run must report, by section and the start of its name.
EXPECTED_ROWS = [
    ("limit", "redis-benchmark EVALSHA minimal check-and-increment, new keys"),
    ("limit", "redis-benchmark EVALSHA this service's reserve.lua, a coach's first call"),
    ("limit", "redis-benchmark EVALSHA minimal check-and-increment, existing keys"),
    ("limit", "redis-benchmark EVALSHA this service's reserve.lua, a coach's later calls"),
    ("limit", "redis-benchmark EVALSHA reserve.lua's four commands alone"),
    ("limit", "reserve.lua vs minimal script, first call of a coach-month"),
    ("limit", "reserve.lua's four commands alone vs minimal script"),
    ("peer", "redis-py EVALSHA"),
    ("peer", "limits FixedWindowRateLimiter"),
    ("peer", "redis-py EVALSHA reserve.lua + commit.lua"),
    ("service", "store reserve->commit cycles"),
    ("service", "store script calls"),
    ("service", "store script calls, each on its own round trip"),
    ("service", "store calls one by one vs bare EVALSHA of the same scripts"),
    ("floor", "minimal FastAPI + 1 EVALSHA, 1 worker (before 1w)"),
    ("floor", "minimal FastAPI + 1 EVALSHA, 1 worker (before 2w)"),
    ("floor", "minimal FastAPI + 1 EVALSHA, 1 worker (after)"),
    ("floor", "floor around the 1-worker runs"),
    ("cpu", "HTTP reserve req/s per busy worker core, 2 workers vs 1"),
    ("cpu", "cores busy during HTTP reserve, 1 worker"),
    ("service", "HTTP reserve, 1 worker"),
    ("service", "HTTP commit, 1 worker"),
    ("service", "HTTP usage, 1 worker"),
    ("cpu", "cores busy during HTTP reserve, 2 worker"),
    ("service", "HTTP reserve, 2 worker"),
    ("service", "HTTP commit, 2 worker"),
    ("service", "HTTP usage, 2 worker"),
    ("batch", "HTTP batch reserve"),
    ("batch", "Redis time per batch reserve item"),
    ("batch", "HTTP batch settle"),
    ("batch", "Redis time per batch settle item"),
    ("webhook", "delivery lag under HTTP reserve load, p50"),
    ("webhook", "delivery lag under HTTP reserve load, p99"),
    ("scale", "reserve.lua, random coaches, empty Redis"),
    ("scale", "reserve.lua, one coach, no lapsed holds"),
    ("scale", "coaches populated"),
    ("scale", "reserve.lua, random coaches, 5,000 coaches in Redis"),
    ("scale", "reserve.lua, one coach with 1,000 lapsed holds"),
    ("scale", "lapsed holds left after that run"),
    ("scale", "one reserve that sweeps 100 lapsed holds"),
    ("quota", "HTTP reserve, 1 worker, with quota headers"),
    ("quota", "HTTP reserve, 1 worker, without quota headers"),
    ("cluster", "HTTP reserve, 1 worker, one Redis"),
    ("cluster", "HTTP reserve, 1 worker, cluster of 3 primaries"),
    ("cluster", "HTTP reserve, 1 worker, cluster of 3 primaries + 3 replicas"),
    ("streams", "Redis round trips/s, 200 idle streams"),
    ("streams", "script calls/s, 200 idle streams on one worker over"),
    ("streams", "script calls/s, 200 idle streams on one worker on one coach"),
    ("memory", "one active coach-month"),
    ("memory", "an idle coach"),
    ("memory", "a coach-month of ordinary use (50 actions)"),
    ("memory", "a coach-month of ordinary use (50 actions, each with an Idempotency-Key)"),
    ("memory", "one coach after 2,000 reserve+refund cycles"),
    ("memory", "one coach after 2,000 reserve+refund cycles, each with an Idempotency-Key"),
    ("check", "coach-months checked"),
    ("check", "coach-months above their allowance"),
    ("check", "coach-months that reached their allowance"),
]

EXPECTED_TARGETS = [
    "reserve script vs minimal script (redis-benchmark, existing keys)",
    "store calls vs bare EVALSHA of the same scripts",
    "store calls vs bare EVALSHA of the minimal script",
    "store calls vs limits hits",
    "batch credit ops/s (mean of reserve and settle)",
    "HTTP reserve 1 worker vs floor req/s",
    "HTTP reserve 1 worker p99 vs floor p99",
    "HTTP reserve 2 workers vs 1 worker",
    "HTTP commit 1 worker vs floor req/s",
    "HTTP commit 1 worker p99 vs floor p99",
    "HTTP commit 2 workers vs 1 worker",
    "HTTP reserve with quota headers vs without",
    "HTTP reserve on a cluster of 3 primaries vs one Redis",
    "stream round trips/s vs one read per stream (200 coaches)",
    "script calls per poll, 200 streams on one coach",
    "per-call cost with 5,000 coaches vs empty",
    "per-call cost with 1,000 lapsed holds vs none",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("bench")
    proc = paths.run_module("bench.run", "--quick", "--out", str(out), timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result: dict[str, Any] = json.loads((out / "quick.json").read_text())
    return result, (out / "quick.md").read_text()


@pytest.mark.real_redis
def test_quick_run_reports_every_row_and_target(quick_run: tuple[dict[str, Any], str]) -> None:
    result, markdown = quick_run
    rows = [(r["section"], r["name"]) for r in result["rows"]]
    for section, prefix in EXPECTED_ROWS:
        matches = [name for s, name in rows if s == section and name.startswith(prefix)]
        assert matches, (section, prefix, rows)
    assert len(rows) == len(EXPECTED_ROWS)
    for row in result["rows"]:
        assert row["value"] >= 0, row
    rates = [r for r in result["rows"] if r["unit"] in ("calls/s", "req/s", "credit ops/s")]
    assert rates
    assert all(r["value"] > 0 for r in rates), rates
    redis_times = [r for r in result["rows"] if r["section"] == "batch" and r["unit"] == "us"]
    assert len(redis_times) == 2
    assert all(r["value"] > 0 for r in redis_times), redis_times

    assert [t["name"] for t in result["targets"]] == EXPECTED_TARGETS
    for target in result["targets"]:
        assert target["measured"] > 0, target
        wanted = target["measured"] >= target["threshold"]
        if not target["higher_is_better"]:
            wanted = target["measured"] <= target["threshold"]
        assert target["passed"] is wanted
    assert "| target | measured | wanted | result |" in markdown


@pytest.mark.real_redis
def test_quick_run_ends_correct(quick_run: tuple[dict[str, Any], str]) -> None:
    result, markdown = quick_run
    values = {r["name"]: r["value"] for r in result["rows"]}
    assert values["coach-months checked after all loads"] > 0
    assert values["coach-months that reached their allowance"] >= 100
    assert values["coach-months above their allowance (used + held)"] == 0
    assert values["an idle coach (usage read, nothing else)"] == 0
    assert values["lapsed holds left after that run"] == 0
    assert values["one active coach-month (20 actions, 10 idempotency keys)"] > 0
    assert result["correct"] is True
    assert "Correctness (no coach above its allowance): pass" in markdown
