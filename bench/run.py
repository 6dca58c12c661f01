"""One command for every benchmark: ``python -m bench.run`` (``--quick`` for a tiny load).

Everything runs in one go on one machine against one private redis-server, so the
figures are comparable with each other: the limit (Redis itself, redis-benchmark), the
peer (the limits library), the floor (a minimal FastAPI app doing one EVALSHA), and
this service (its store and its HTTP API), then scaling, memory, batches and a final
correctness check. Results print as a table and land in bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import httpx
import uvloop
from redis.asyncio import BlockingConnectionPool, Redis

from app import domain
from app.config import Settings
from app.domain import Period
from app.errors import CreditsExhausted
from app.main import connect
from app.store import (
    CreditStore,
    ReserveItem,
    load_script_source,
    period_keys,
)
from bench import memory
from bench.floor_app import MINIMAL_SCRIPT
from bench.procs import VENV_BIN, CpuMeter, ensure_tool
from tests.support.cluster import LocalCluster
from tests.support.redis import RedisProcess, free_port
from tests.support.service import Uvicorn
from tests.support.webhooks import Receiver

ROOT: Final = Path(__file__).resolve().parent.parent
WRK_DIR: Final = Path(__file__).resolve().parent / "wrk"
RESULTS_DIR: Final = Path(__file__).resolve().parent / "results"
API_KEY: Final = "bench-worker-key-0123456789"
CONCURRENCY: Final = 64
ALLOWANCE: Final = 50

# Databases of the one private Redis: the service's data (checked at the end), scratch
# for raw Redis and peer runs, the floor's keys, and the scaling runs.
DB_SERVICE, DB_SCRATCH, DB_FLOOR, DB_SCALE, DB_CLUSTER_PEER = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Load:
    """How hard to push: the full run, or a tiny one that only proves everything runs."""

    wrk_seconds: int
    redis_requests: int
    python_ops: int
    coaches_populated: int
    lapsed_holds: int
    batch_items: int
    webhook_coaches: int
    #: Reserve+refund cycles of the abusive coach-month (the memory section).
    abusive_cycles: int
    #: Idle usage streams held open on one worker (the service's default cap is 1,000).
    streams: int
    #: A wrk run before each server's measured runs (none when figures mean nothing).
    warm_up_seconds: int

    @classmethod
    def of(cls, quick: bool) -> Load:
        if quick:
            return cls(1, 3_000, 1_000, 5_000, 1_000, 20, 10, 2_000, 200, 0)
        # A coach holds at most 1,000 reservations, lapsed or not.
        return cls(10, 200_000, 40_000, 1_000_000, 1_000, 100, 300, 20_000, 1_000, 1)


@dataclass
class Row:
    section: str
    name: str
    value: float
    unit: str
    note: str = ""


@dataclass
class Target:
    name: str
    measured: float
    threshold: float
    higher_is_better: bool = True

    @property
    def passed(self) -> bool:
        if self.higher_is_better:
            return self.measured >= self.threshold
        return self.measured <= self.threshold


@dataclass
class Report:
    quick: bool
    started: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    correct: bool = False

    def add(self, section: str, name: str, value: float, unit: str, note: str = "") -> float:
        self.rows.append(Row(section, name, value, unit, note))
        print(f"  {section:<8} {name:<58} {_fmt(value):>12} {unit:<10} {note}", flush=True)
        return value

    def target(self, name: str, measured: float, threshold: float, higher: bool = True) -> None:
        t = Target(name, measured, threshold, higher)
        self.targets.append(t)
        sign = ">=" if higher else "<="
        verdict = "PASS" if t.passed else "MISS"
        print(
            f"  target   {name:<58} {measured:>12.2f} {sign} {threshold:<6} {verdict}", flush=True
        )

    def markdown(self, command: str) -> str:
        lines = [
            f"Run {self.started} with `{command}`"
            + (" (quick: a tiny load, figures mean nothing)" if self.quick else ""),
            "",
            "| section | measurement | value | unit | note |",
            "|---|---|---:|---|---|",
        ]
        lines += [
            f"| {r.section} | {r.name} | {_fmt(r.value)} | {r.unit} | {r.note} |" for r in self.rows
        ]
        lines += ["", "| target | measured | wanted | result |", "|---|---:|---|---|"]
        for t in self.targets:
            sign = ">=" if t.higher_is_better else "<="
            verdict = "pass" if t.passed else "**miss**"
            lines.append(f"| {t.name} | {t.measured:.2f} | {sign} {t.threshold} | {verdict} |")
        lines += [
            "",
            f"Correctness (no coach above its allowance): {'pass' if self.correct else 'FAIL'}",
        ]
        return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.2f}"


# --- the limit: Redis itself ------------------------------------------------------------


def redis_benchmark(
    port: int, db: int, requests: int, *command: str, keyspace: int = 1_000_000
) -> tuple[float, float]:
    """requests/s and p99 (ms) of one command whose ``__rand_int__`` placeholders are
    drawn from ``keyspace`` values."""
    out = subprocess.run(
        [
            ensure_tool("redis-benchmark", "redis-tools"),
            "-p",
            str(port),
            "--dbnum",
            str(db),
            "-n",
            str(requests),
            "-c",
            str(CONCURRENCY),
            "-r",
            str(keyspace),
            "--csv",
            *command,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    return float(rows[-1]["rps"]), float(rows[-1]["p99_latency_ms"])


def reserve_command(sha: str, *, coach: str, allowance: int, now: datetime) -> list[str]:
    """The reserve command exactly as the store builds it (its KEYS and ARGV), for the
    script ``sha``, with a random token per call (redis-benchmark's placeholder)."""
    builder = CreditStore(Redis(), allowance=allowance, clock=lambda: now)
    made = builder._reserve_call(coach, "checkin_draft", 300, None, "")
    token = made.rid.token
    return ["evalsha", sha, *(str(a).replace(token, "tok__rand_int__") for a in made.command[2:])]


#: The Redis commands of reserve.lua's common path with nothing around them (no checks,
#: no sweep, no idempotency): with reserve.lua's KEYS/ARGV, what its data alone costs.
RESERVE_COMMANDS_ONLY: Final = """
local account, holds, events = KEYS[1], KEYS[2], KEYS[3]
redis.call('HMGET', account, 'used', 'held', 'seq', 'next', 'live', 'recent', 'fc:' .. ARGV[3])
redis.call('HSET', account, 'r:' .. ARGV[2], 'h' .. ARGV[4] .. '|' .. ARGV[15] .. '|1',
  'held', 1, 'seq', 2, 'live', 1)
redis.call('ZADD', holds, ARGV[5], ARGV[2])
redis.call('LPUSH', events, 'h' .. ARGV[4] .. '|' .. ARGV[14] .. '|1|' .. ARGV[2])
return {'OK', 0, 1, ARGV[2], 'h', 1, ARGV[5], ARGV[3], '', 0}
"""


async def bench_limit(report: Report, redis: RedisProcess, load: Load) -> None:
    client = Redis.from_url(redis.db_url(DB_SCRATCH), decode_responses=True)
    minimal_sha = await client.script_load(MINIMAL_SCRIPT)
    reserve_sha = await client.script_load(load_script_source("reserve"))
    commands_sha = await client.script_load(RESERVE_COMMANDS_ONLY)
    now = datetime.now(UTC)

    def minimal(allowance: int, keyspace: int) -> tuple[float, float]:
        cmd = ["evalsha", minimal_sha, "1", "limit:{c__rand_int__}", "1", str(allowance)]
        return redis_benchmark(redis.port, DB_SCRATCH, load.redis_requests, *cmd, keyspace=keyspace)

    def reserve(allowance: int, keyspace: int, sha: str = reserve_sha) -> tuple[float, float]:
        # Each __rand_int__ is drawn on its own, so the three keys name different
        # coaches: the work per call is the script's, only the coach it lands on is random.
        cmd = reserve_command(sha, coach="c__rand_int__", allowance=allowance, now=now)
        return redis_benchmark(redis.port, DB_SCRATCH, load.redis_requests, *cmd, keyspace=keyspace)

    # A coach's first call of a month creates its keys (and gives them their expiry);
    # every later call finds them. Both scripts run both ways, on fresh keys drawn from a
    # million, then on 10,000 keys that already exist, with an allowance nothing reaches
    # so every call takes the path that holds.
    # Interleaved rounds, best of each (as for the Python rows): a neighbour's burst
    # during one run then costs that run, not the comparison.
    rounds = 1 if report.quick else 2
    best: dict[str, tuple[float, float]] = {}

    def keep(name: str, result: tuple[float, float]) -> None:
        best[name] = max(best.get(name, (0.0, 0.0)), result)

    for _ in range(rounds):
        await client.flushdb()
        keep("fresh_min", minimal(ALLOWANCE, 1_000_000))
        await client.flushdb()
        keep("fresh_res", reserve(ALLOWANCE, 1_000_000))
    await client.flushdb()
    minimal(10**9, 10_000)  # creates the keys the timed runs find
    reserve(10**9, 10_000)
    for _ in range(rounds):
        keep("later_min", minimal(10**9, 10_000))
        keep("later_res", reserve(10**9, 10_000))
    (fresh_min, fresh_min_p99), (fresh_res, fresh_res_p99) = best["fresh_min"], best["fresh_res"]
    (later_min, later_min_p99), (later_res, later_res_p99) = best["later_min"], best["later_res"]
    await client.flushdb()
    reserve(10**9, 10_000, commands_sha)
    bare_res, bare_res_p99 = reserve(10**9, 10_000, commands_sha)
    rows = [
        ("minimal check-and-increment, new keys", fresh_min, fresh_min_p99),
        ("this service's reserve.lua, a coach's first call of the month", fresh_res, fresh_res_p99),
        ("minimal check-and-increment, existing keys", later_min, later_min_p99),
        ("this service's reserve.lua, a coach's later calls", later_res, later_res_p99),
        ("reserve.lua's four commands alone, existing keys", bare_res, bare_res_p99),
    ]
    for name, rate, p99 in rows:
        note = f"p99 {p99} ms" + (f"; best of {rounds}" if rounds > 1 else "")
        report.add("limit", f"redis-benchmark EVALSHA {name}", rate, "calls/s", note)
    report.add(
        "limit",
        "reserve.lua vs minimal script, first call of a coach-month",
        fresh_res / fresh_min,
        "x",
        "creates 3 keys and sets their expiry",
    )
    report.add(
        "limit",
        "reserve.lua's four commands alone vs minimal script, existing keys",
        bare_res / later_min,
        "x",
        "what the data each reserve keeps costs, before any check",
    )
    report.target(
        "reserve script vs minimal script (redis-benchmark, existing keys)",
        later_res / later_min,
        0.5,
    )
    await client.flushdb()
    await client.aclose()


# --- the peer and this service's store, in Python --------------------------------------


async def run_tasks(total: int, op: Callable[[int], Awaitable[object]]) -> float:
    """``total`` calls of ``op`` spread over 64 tasks; calls per second."""
    per_task = total // CONCURRENCY

    async def worker(w: int) -> None:
        for i in range(per_task):
            await op(w * per_task + i)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
    return per_task * CONCURRENCY / (time.perf_counter() - started)


def pooled(url: str) -> Redis:
    """A client like the service's: one blocking pool of 64 connections."""
    return Redis(
        connection_pool=BlockingConnectionPool.from_url(
            url, decode_responses=True, max_connections=CONCURRENCY
        )
    )


async def bench_python(report: Report, redis: RedisProcess, load: Load) -> None:
    from limits import RateLimitItemPerMonth
    from limits.aio.strategies import FixedWindowRateLimiter
    from limits.storage import storage_from_string

    n = load.python_ops
    space = 1_000_000
    bare = pooled(redis.db_url(DB_SCRATCH))
    sha = await bare.script_load(MINIMAL_SCRIPT)
    storage: Any = storage_from_string(f"async+redis://127.0.0.1:{redis.port}/{DB_SCRATCH}")
    limiter = FixedWindowRateLimiter(storage)
    item = RateLimitItemPerMonth(ALLOWANCE)
    client = connect(Settings(redis_url=redis.db_url(DB_SERVICE), allow_open=True))
    store = CreditStore(client)
    await store.ensure_scripts()
    # The same store sending each call on its own round trip: what its own Python costs
    # beside a bare call, with nothing shared between callers.
    one_by_one = CreditStore(client, coalesce=False)

    async def bare_call(i: int) -> object:
        return await bare.evalsha(sha, 1, f"bare:{{c{random.randrange(space)}}}", 1, ALLOWANCE)

    async def limits_hit(i: int) -> object:
        return await limiter.hit(item, f"c{random.randrange(space)}", cost=1)

    async def cycle(i: int) -> object:
        reservation, _ = await store.reserve(f"store-{random.randrange(space)}", "checkin_draft")
        return await store.commit(str(reservation.reservation_id))

    async def cycle_one_by_one(i: int) -> object:
        coach = f"store-{random.randrange(space)}"
        reservation, _ = await one_by_one.reserve(coach, "checkin_draft")
        return await one_by_one.commit(str(reservation.reservation_id))

    # Like for like: the same client settings, the same scripts and the very commands the
    # store would send (built by the store beforehand, not while timed), called straight
    # through redis-py: what the store adds is its own work.
    pairs = []
    for _ in range(n // 2 * (1 if report.quick else 2)):
        coach = f"bare-{random.randrange(space)}"
        made = store._reserve_call(coach, "checkin_draft", None, None, "")
        pairs.append((made.command, store._settle_call(made.rid.text, "commit").command))
    commands = iter(pairs)

    async def bare_cycle(i: int) -> object:
        reserve, settle = next(commands)
        await client.execute_command(*reserve)
        return await client.execute_command(*settle)

    # Interleaved rounds, best of each: a neighbour's burst during one run then costs
    # that run, not the comparison. Rates are script calls per second.
    runs: list[tuple[str, Callable[[int], Awaitable[object]], int, int]] = [
        ("bare", bare_call, n, 1),
        ("limits", limits_hit, n, 1),
        ("store", cycle, n // 2, 2),
        ("same", bare_cycle, n // 2, 2),
        ("one_by_one", cycle_one_by_one, n // 2, 2),
    ]
    best: dict[str, float] = {}
    for _ in range(1 if report.quick else 2):
        for name, op, count, calls in runs:
            best[name] = max(best.get(name, 0.0), await run_tasks(count, op) * calls)
    await bare.flushdb()
    await bare.aclose()
    await storage.reset()
    await client.aclose()

    rounds = "best of 2 interleaved rounds" if not report.quick else "1 round"
    bare_rate = report.add(
        "peer",
        "redis-py EVALSHA minimal script (bare client)",
        best["bare"],
        "calls/s",
        f"64 tasks, uvloop; {rounds}",
    )
    peer_rate = report.add(
        "peer",
        "limits FixedWindowRateLimiter.hit (async+redis)",
        best["limits"],
        "calls/s",
        "64 tasks, uvloop",
    )
    report.add(
        "service",
        "store reserve->commit cycles (CreditStore, Python)",
        best["store"] / 2,
        "cycles/s",
        "64 tasks, uvloop; 2 script calls each",
    )
    store_rate = report.add(
        "service",
        "store script calls",
        best["store"],
        "calls/s",
        "calls made in one loop turn share one write to Redis",
    )
    one_rate = report.add(
        "service",
        "store script calls, each on its own round trip (coalesce=False)",
        best["one_by_one"],
        "calls/s",
        "the store's own Python beside a bare call",
    )
    same_rate = report.add(
        "peer",
        "redis-py EVALSHA reserve.lua + commit.lua (service's client)",
        best["same"],
        "calls/s",
        "same KEYS/ARGV as the store, no store code",
    )
    report.target("store calls vs bare EVALSHA of the same scripts", store_rate / same_rate, 0.9)
    report.target("store calls vs bare EVALSHA of the minimal script", store_rate / bare_rate, 0.9)
    report.target("store calls vs limits hits", store_rate / peer_rate, 1.0)
    report.add(
        "service",
        "store calls one by one vs bare EVALSHA of the same scripts",
        one_rate / same_rate,
        "x",
        "without sharing writes",
    )


# --- HTTP: the floor and this service under wrk ----------------------------------------


def production_argv(port: int, workers: int) -> list[str]:
    """The command README.md's Deploying section gives, on loopback, with N workers."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploying", 1)[1]
    line = next(x for x in section.splitlines() if x.strip().startswith("uvicorn "))
    argv = shlex.split(line)
    out: list[str] = [str(VENV_BIN / "uvicorn")]
    rest = iter(argv[1:])
    for arg in rest:
        if arg in ("--host", "--port", "--workers"):
            next(rest)  # replaced below: loopback only, a free port, N workers
            continue
        out.append(arg)
    return [*out, "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]


def floor_argv(port: int) -> list[str]:
    return [
        str(VENV_BIN / "uvicorn"),
        "bench.floor_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
    ]


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def wrk(
    base: str,
    script: str,
    seconds: int,
    *,
    key: str = "-",
    ids_file: str = "-",
    per_batch: int = 100,
) -> WrkResult:
    source = (WRK_DIR / "_common.lua").read_text() + (WRK_DIR / f"{script}.lua").read_text()
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as f:
        f.write(source)
        f.flush()
        out = subprocess.run(
            [
                ensure_tool("wrk", "wrk"),
                "-t2",
                f"-c{CONCURRENCY}",
                f"-d{seconds}s",
                "--timeout",
                "10s",
                "-s",
                f.name,
                base,
                "--",
                key,
                "1000000",
                ids_file,
                str(per_batch),
                "2",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    match = re.search(r"WRK_JSON (\{.*\})", out)
    if match is None:
        raise RuntimeError(f"bench: wrk printed no summary:\n{out}")
    s = json.loads(match[1])
    errors = s["connect"] + s["read"] + s["write"] + s["status"] + s["timeout"]
    return WrkResult(
        s["requests"] / (s["duration_us"] / 1e6), s["p50_us"] / 1000, s["p99_us"] / 1000, errors
    )


def service_env(redis: RedisProcess) -> dict[str, str]:
    return {
        "CREDITS_REDIS_URL": redis.db_url(DB_SERVICE),
        "CREDITS_API_KEYS": json.dumps({API_KEY: ["worker"]}),
    }


async def make_reservations(redis: RedisProcess, count: int, prefix: str) -> str:
    """``count`` held reservations on distinct coaches; the file of their ids."""
    client = connect(Settings(redis_url=redis.db_url(DB_SERVICE), allow_open=True))
    store = CreditStore(client)
    ids: list[str] = []
    for start in range(0, count, 500):
        items = [
            ReserveItem(f"{prefix}-{i}", "checkin_draft", ttl_seconds=3600)
            for i in range(start, min(count, start + 500))
        ]
        for outcome in await store.reserve_many(items):
            assert not isinstance(outcome, Exception), outcome
            ids.append(str(outcome[0].reservation_id))
    await client.aclose()
    f = tempfile.NamedTemporaryFile("w", suffix=".ids", delete=False)  # noqa: SIM115
    with f:
        f.write("\n".join(ids) + "\n")
    return f.name


def warm_up(load: Load, base: str, key: str = "-") -> None:
    if load.warm_up_seconds:
        wrk(base, "reserve", load.warm_up_seconds, key=key)


def wrk_row(report: Report, section: str, name: str, r: WrkResult, unit: str = "req/s") -> None:
    note = f"p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms"
    if r.errors:
        note += f", {r.errors} non-2xx/errors"
    report.add(section, name, r.rps, unit, note)


async def bench_http(report: Report, redis: RedisProcess, load: Load) -> None:
    secs = load.wrk_seconds
    floor_env = {"BENCH_REDIS_URL": redis.db_url(DB_FLOOR)}
    floors: list[WrkResult] = []

    def floor_run(when: str) -> None:
        port = free_port()
        with Uvicorn(floor_argv(port), floor_env, port, ready_path=None) as srv:
            warm_up(load, srv.base)
            r = wrk(srv.base, "reserve", secs)
        floors.append(r)
        wrk_row(report, "floor", f"minimal FastAPI + 1 EVALSHA, 1 worker ({when})", r)

    service: dict[int, dict[str, WrkResult]] = {}
    worker_cores: dict[int, float] = {}
    for workers in (1, 2):
        floor_run(f"before {workers}w")
        port = free_port()
        argv = production_argv(port, workers)
        with Uvicorn(argv, service_env(redis), port) as srv:
            warm_up(load, srv.base, API_KEY)
            runs: dict[str, WrkResult] = {}
            assert srv.proc is not None
            assert redis.proc is not None
            meter = CpuMeter(srv.proc.pid, redis.proc.pid)
            runs["reserve"] = wrk(srv.base, "reserve", secs, key=API_KEY)
            served, stored, loaded = meter.shares()
            cores = os.cpu_count() or 1
            report.add(
                "cpu",
                f"cores busy during HTTP reserve, {workers} worker(s)",
                served + stored + loaded,
                f"of {cores} cores",
                f"workers {served:.2f}, redis-server {stored:.2f}, wrk {loaded:.2f}",
            )
            worker_cores[workers] = served
            wanted = int(runs["reserve"].rps * secs * 1.5) + 1000
            ids = await make_reservations(redis, wanted, f"commit{workers}")
            runs["commit"] = wrk(srv.base, "commit", secs, key=API_KEY, ids_file=ids)
            os.unlink(ids)
            runs["usage"] = wrk(srv.base, "usage", secs, key=API_KEY)
            for op, r in runs.items():
                wrk_row(report, "service", f"HTTP {op}, {workers} worker(s)", r)
            service[workers] = runs
            if workers == 2:
                await bench_batches(report, redis, load, srv.base)
    floor_run("after")

    floor_rps = (floors[0].rps + floors[1].rps) / 2
    floor_p99 = (floors[0].p99_ms + floors[1].p99_ms) / 2
    report.add(
        "floor",
        "floor around the 1-worker runs (mean of before/after)",
        floor_rps,
        "req/s",
        f"p99 {floor_p99:.2f} ms",
    )
    for op in ("reserve", "commit"):
        one = service[1][op]
        report.target(f"HTTP {op} 1 worker vs floor req/s", one.rps / floor_rps, 0.95)
        report.target(f"HTTP {op} 1 worker p99 vs floor p99", one.p99_ms / floor_p99, 1.1, False)
        report.target(f"HTTP {op} 2 workers vs 1 worker", service[2][op].rps / one.rps, 1.8)
    # What each worker core serves, so a ratio capped by the cores left to the workers
    # (the cpu rows) is not read as workers getting in each other's way.
    per_core = [service[w]["reserve"].rps / max(worker_cores[w], 1e-9) for w in (1, 2)]
    report.add(
        "cpu",
        "HTTP reserve req/s per busy worker core, 2 workers vs 1",
        per_core[1] / per_core[0],
        "x",
        f"{per_core[1]:,.0f} (2 workers) vs {per_core[0]:,.0f} (1 worker) req/s per core",
    )


def median_reserve(servers: dict[str, Uvicorn], rounds: int, load: Load) -> dict[str, WrkResult]:
    """HTTP reserve on each server in interleaved rounds (a neighbour's burst then costs
    one round of each, not the comparison): each server's median run."""
    results: dict[str, list[WrkResult]] = {name: [] for name in servers}
    for srv in servers.values():
        warm_up(load, srv.base, API_KEY)
    for _ in range(rounds):
        for name, srv in servers.items():
            results[name].append(wrk(srv.base, "reserve", load.wrk_seconds, key=API_KEY))
    return {n: sorted(rs, key=lambda r: r.rps)[len(rs) // 2] for n, rs in results.items()}


async def bench_quota(report: Report, redis: RedisProcess, load: Load) -> None:
    """HTTP reserve with one worker, with the quota headers and without them
    (``bench.quota_off``), in interleaved rounds (median of 3): what the headers cost."""
    rounds = 1 if report.quick else 3

    def service(module: str) -> Uvicorn:
        port = free_port()
        argv = [module if a == "app.main:app" else a for a in production_argv(port, 1)]
        return Uvicorn(argv, service_env(redis), port)

    with service("app.main:app") as on, service("bench.quota_off:app") as off:
        servers = {"on": on, "off": off}
        for name, srv in servers.items():
            # The control must really differ by the headers alone.
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with httpx.AsyncClient(base_url=srv.base, headers=headers) as http:
                r = await http.post(
                    "/v1/coaches/quota-check/reservations", json={"feature": "checkin_draft"}
                )
            if r.status_code != 201 or ("ratelimit" in r.headers) != (name == "on"):
                raise RuntimeError(f"bench: quota control {name!r} answered {r} {r.headers}")
        got = median_reserve(servers, rounds, load)
    note = f"median of {rounds} interleaved round(s)"
    wrk_row(report, "quota", f"HTTP reserve, 1 worker, with quota headers ({note})", got["on"])
    wrk_row(report, "quota", "HTTP reserve, 1 worker, without quota headers", got["off"])
    report.target(
        "HTTP reserve with quota headers vs without", got["on"].rps / got["off"].rps, 0.95
    )


async def bench_cluster(report: Report, redis: RedisProcess, load: Load) -> None:
    """HTTP reserve with one worker on one Redis and on a local cluster of three primaries,
    in interleaved rounds (median of 3); three primaries with a replica each beside it.
    On two cores the replicas only compete for CPU (in production they run elsewhere),
    so that row has no target."""
    rounds = 1 if report.quick else 3

    def env(url: str, cluster: bool) -> dict[str, str]:
        return {
            "CREDITS_REDIS_URL": url,
            "CREDITS_REDIS_CLUSTER": "true" if cluster else "false",
            "CREDITS_API_KEYS": json.dumps({API_KEY: ["worker"]}),
        }

    def service(url: str, cluster: bool) -> Uvicorn:
        port = free_port()
        return Uvicorn(production_argv(port, 1), env(url, cluster), port)

    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    with (
        LocalCluster(workdir / "three", replicas=0) as three,
        service(redis.db_url(DB_CLUSTER_PEER), False) as single,
        service(three.live_seed_url(), True) as clustered,
    ):
        got = median_reserve({"single": single, "three": clustered}, rounds, load)
    with (
        LocalCluster(workdir / "six", replicas=1) as six,
        service(six.live_seed_url(), True) as srv,
    ):
        got |= median_reserve({"six": srv}, rounds, load)
    note = f"median of {rounds} interleaved round(s)"
    wrk_row(report, "cluster", f"HTTP reserve, 1 worker, one Redis ({note})", got["single"])
    wrk_row(report, "cluster", "HTTP reserve, 1 worker, cluster of 3 primaries", got["three"])
    wrk_row(
        report, "cluster", "HTTP reserve, 1 worker, cluster of 3 primaries + 3 replicas", got["six"]
    )
    report.target(
        "HTTP reserve on a cluster of 3 primaries vs one Redis",
        got["three"].rps / got["single"].rps,
        0.85,
    )


async def script_usec(admin: Redis) -> tuple[int, int]:
    """Script calls Redis has run and the microseconds they took, its ``INFO
    commandstats`` (the commands a script runs are inside its time)."""
    stats = (await admin.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


async def bench_streams(report: Report, redis: RedisProcess, load: Load) -> None:
    """Idle usage streams on one worker: Redis round trips and script calls per second
    with 1,000 streams (the default cap; fewer in the quick run) over as many coaches,
    and as many on one coach. Read one by one, each stream would cost one round trip per
    poll interval (1 s)."""
    seconds = 2.0 if report.quick else 6.0
    streams = load.streams
    port = free_port()
    env = {**service_env(redis), "CREDITS_STREAMS_MAX": str(streams)}
    admin = Redis.from_url(redis.db_url(DB_SERVICE), decode_responses=True)

    def writes(metrics: str) -> float:
        match = re.search(r"^credits_redis_commands_per_write_count (\S+)$", metrics, re.M)
        return float(match[1]) if match else 0.0

    async def idle(srv: Uvicorn, coaches: list[str]) -> tuple[float, float]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=srv.base, headers=headers, limits=limits, timeout=30
        ) as http:
            opened = asyncio.Event()
            ready = 0

            async def stream(coach: str) -> None:
                nonlocal ready
                path = f"/v1/coaches/{coach}/usage/stream"
                async with http.stream("GET", path) as resp:
                    assert resp.status_code == 200, resp.status_code
                    async for line in resp.aiter_lines():
                        if line.startswith("data:"):
                            ready += 1
                            if ready == len(coaches):
                                opened.set()
                            await asyncio.sleep(3600)  # held open, idle

            tasks = [asyncio.create_task(stream(c)) for c in coaches]
            await asyncio.wait_for(opened.wait(), 120)
            await asyncio.sleep(1.5)  # past the first polls
            calls0, _ = await script_usec(admin)
            writes0 = writes((await http.get("/metrics")).text)
            started = time.monotonic()
            await asyncio.sleep(seconds)
            calls1, _ = await script_usec(admin)
            writes1 = writes((await http.get("/metrics")).text)
            span = time.monotonic() - started
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return (writes1 - writes0) / span, (calls1 - calls0) / span

    with Uvicorn(production_argv(port, 1), env, port) as srv:
        spread_trips, spread_calls = await idle(srv, [f"stream-{i}" for i in range(streams)])
        one_trips, one_calls = await idle(srv, ["stream-one"] * streams)
    await admin.aclose()
    each = f"{streams:,} idle streams on one worker"
    report.add(
        "streams",
        f"Redis round trips/s, {each} over {streams:,} coaches",
        spread_trips,
        "/s",
        f"one by one: {streams:,}/s",
    )
    report.add(
        "streams",
        f"script calls/s, {each} over {streams:,} coaches",
        spread_calls,
        "/s",
        "one read per coach per poll",
    )
    report.add(
        "streams",
        f"script calls/s, {each} on one coach",
        one_calls,
        "/s",
        f"round trips {one_trips:.1f}/s",
    )
    report.target(
        f"stream round trips/s vs one read per stream ({streams:,} coaches)",
        spread_trips / streams,
        1 / 20,
        False,
    )
    report.target(f"script calls per poll, {streams:,} streams on one coach", one_calls, 1.5, False)


async def bench_batches(report: Report, redis: RedisProcess, load: Load, base: str) -> None:
    """Batch reserve and settle over HTTP, and the time Redis spends on each item: with
    100 items a request Redis, not the workers, sets the pace."""
    secs, per = load.wrk_seconds, load.batch_items
    admin = Redis.from_url(redis.db_url(DB_SERVICE))

    async def run(script: str, seconds: int, name: str, **options: Any) -> float:
        calls, usec = await script_usec(admin)
        r = wrk(base, script, seconds, key=API_KEY, per_batch=per, **options)
        calls_after, usec_after = await script_usec(admin)
        ops = report.add(
            "batch",
            f"HTTP batch {name}, {per} items/request, 2 workers",
            r.rps * per,
            "credit ops/s",
            f"{r.rps:.0f} req/s, p99 {r.p99_ms:.1f} ms",
        )
        report.add(
            "batch",
            f"Redis time per batch {name.split()[0]} item",
            (usec_after - usec) / max(1, calls_after - calls),
            "us",
            "its script call, INFO commandstats",
        )
        return ops

    reserve_ops = await run("batch_reserve", secs, "reserve")
    # Half as long, so that making enough fresh reservations to settle stays quick.
    settle_secs = max(1, secs // 2)
    wanted = min(300_000, int(reserve_ops * settle_secs * 1.3) + per * 100)
    ids = await make_reservations(redis, wanted, "settle")
    settle_ops = await run("batch_settle", settle_secs, "settle (commit)", ids_file=ids)
    os.unlink(ids)
    await admin.aclose()
    report.target(
        "batch credit ops/s (mean of reserve and settle)", (reserve_ops + settle_ops) / 2, 30_000
    )


# --- scaling and memory ------------------------------------------------------------------

POPULATE: Final = """
local prefix, first, last, period = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
for i = first, last do
  local account = 'credits:{' .. prefix .. string.format('%012d', i) .. '}:' .. period .. ':account'
  redis.call('HSET', account, 'used', 7, 'held', 0, 'seq', 3, 'recent', 2, 'codes', 2,
    'fc:trend_analysis', 1, 'fn:1', 'trend_analysis', 'fc:checkin_draft', 2, 'fn:2',
    'checkin_draft', 'r:a' .. i, 'c3|1|1|1', 'r:b' .. i, 'c1|1|2|2')
end
return last - first + 1
"""

#: Reserves a one-coach run makes: under the 1,000 live holds a coach may have.
ONE_COACH_CALLS: Final = 900

LAPSED: Final = """
local account, holds, n, expires, offset = KEYS[1], KEYS[2], tonumber(ARGV[1]), ARGV[2], ARGV[3]
for i = 1, n do
  redis.call('HSET', account, 'r:lapsed' .. i, 'h1|' .. offset .. '|1')
  redis.call('ZADD', holds, expires, 'lapsed' .. i)
end
redis.call('HINCRBY', account, 'held', n)
redis.call('HINCRBY', account, 'live', n)
redis.call('HSET', account, 'next', expires, 'codes', 1, 'fc:checkin_draft', 1,
  'fn:1', 'checkin_draft')
return n
"""


def lapsed_args(load: Load, now: datetime) -> tuple[int, int, str]:
    """LAPSED's ARGV: that many holds, lapsed a minute ago."""
    lapsed_at = domain.to_ms(now - timedelta(seconds=60))
    start = domain.to_ms(Period.containing(now).starts_at)
    return load.lapsed_holds, lapsed_at, f"{lapsed_at - start:x}"


async def bench_scaling(report: Report, redis: RedisProcess, load: Load) -> None:
    client = Redis.from_url(redis.db_url(DB_SCALE), decode_responses=True)
    await client.flushdb()
    sha = await client.script_load(load_script_source("reserve"))
    now = datetime.now(UTC)
    period = str(Period.containing(now))
    n = load.redis_requests // 2

    # Best of two back-to-back runs: on a shared machine one run can catch a neighbour's
    # burst, and the ratios below compare a cost, not the noise.
    def random_coaches() -> float:
        cmd = reserve_command(sha, coach="c__rand_int__", allowance=ALLOWANCE, now=now)
        return redis_benchmark(redis.port, DB_SCALE, n, *cmd)[0]

    def one_coach(coach: str, allowance: int) -> float:
        # A coach holds at most 1,000 reservations at once: past that every call is a
        # refusal, so one coach takes fewer calls than the random runs.
        cmd = reserve_command(sha, coach=coach, allowance=allowance, now=now)
        return redis_benchmark(redis.port, DB_SCALE, min(n, ONE_COACH_CALLS), *cmd)[0]

    first_run = random_coaches()
    await client.flushdb()
    empty = report.add(
        "scale",
        "reserve.lua, random coaches, empty Redis",
        max(first_run, random_coaches()),
        "calls/s",
        "redis-benchmark, best of 2",
    )
    await client.flushdb()
    fresh = report.add(
        "scale",
        "reserve.lua, one coach, no lapsed holds",
        one_coach("hot", 10**9),
        "calls/s",
        "allowance 10^9",
    )

    # Populate the coaches the random run lands on: redis-benchmark pads __rand_int__ to
    # twelve digits, so coach c000000000042 is the 42nd.
    await client.flushdb()
    started = time.perf_counter()
    total, chunk = load.coaches_populated, 50_000
    for first in range(0, total, chunk):
        last = min(total, first + chunk) - 1
        await client.eval(POPULATE, 0, "c", first, last, period)
    populated_in = time.perf_counter() - started
    report.add(
        "scale",
        "coaches populated",
        total,
        "coaches",
        f"{await client.dbsize():,} keys in {populated_in:.1f} s",
    )
    full = report.add(
        "scale",
        f"reserve.lua, random coaches, {total:,} coaches in Redis",
        max(random_coaches(), random_coaches()),
        "calls/s",
        "best of 2",
    )
    report.target(f"per-call cost with {total:,} coaches vs empty", empty / full, 1.2, False)

    await client.flushdb()
    keys = period_keys("hot", Period.containing(now))
    lapsed_at = domain.to_ms(now - timedelta(seconds=60))
    await client.eval(LAPSED, 2, keys.account, keys.holds, *lapsed_args(load, now))
    lapsed = report.add(
        "scale",
        f"reserve.lua, one coach with {load.lapsed_holds:,} lapsed holds",
        one_coach("hot", 10**9),
        "calls/s",
        "sweeps 100 per call until none is left",
    )
    left = await client.zcount(keys.holds, "-inf", lapsed_at)
    report.add("scale", "lapsed holds left after that run", left, "holds")
    report.target(
        f"per-call cost with {load.lapsed_holds:,} lapsed holds vs none", fresh / lapsed, 1.2, False
    )

    # The worst single call: one that sweeps a full batch of lapsed holds.
    await client.flushdb()
    await client.eval(LAPSED, 2, keys.account, keys.holds, *lapsed_args(load, now))
    command = reserve_command(sha, coach="hot", allowance=10**9, now=now)
    argv = command[3:]  # keys, args
    timings = []
    for i in range(5):
        args = [a.replace("__rand_int__", f"w{i}") for a in argv]
        started = time.perf_counter()
        await client.evalsha(sha, int(command[2]), *args)
        timings.append(time.perf_counter() - started)
    report.add(
        "scale",
        "one reserve that sweeps 100 lapsed holds (round trip)",
        sorted(timings)[2] * 1e6,
        "us",
        "median of 5",
    )
    await client.flushdb()
    await client.aclose()


async def bench_memory(report: Report, redis: RedisProcess, load: Load) -> None:
    client = Redis.from_url(redis.db_url(DB_SCALE), decode_responses=True)
    await client.flushdb()
    store = CreditStore(client, allowance=ALLOWANCE)
    await store.ensure_scripts()
    # A busy month: 20 actions, 16 committed, 2 refunded, 2 still held, half with keys.
    for i in range(20):
        feature = "trend_analysis" if i % 4 == 0 else "checkin_draft"
        key = f"job-{i}" if i % 2 else None
        reservation, _ = await store.reserve("active", feature, idempotency_key=key)
        if i < 16:
            await store.commit(str(reservation.reservation_id))
        elif i < 18:
            await store.refund(str(reservation.reservation_id))
    names = [k async for k in client.scan_iter(match="credits:{active}:*")]
    total = 0
    for name in names:
        total += int(await client.memory_usage(name) or 0)
    report.add(
        "memory",
        "one active coach-month (20 actions, 10 idempotency keys)",
        total,
        "bytes",
        f"{len(names)} keys, MEMORY USAGE",
    )
    await store.usage("idle")
    idle = [k async for k in client.scan_iter(match="credits:{idle}:*")]
    report.add("memory", "an idle coach (usage read, nothing else)", len(idle), "keys", "0 bytes")

    # Bytes per coach-month: a month of ordinary use, and one coach driven as hard as the
    # batch calls go (what it keeps is bounded, whatever the volume).
    when = [Period.containing(datetime.now(UTC)).resets_at + timedelta(hours=1)]

    def advance(seconds: float) -> None:
        when[0] += timedelta(seconds=seconds)

    for with_keys in (False, True):
        coach = f"{uuid.uuid4()}"
        clocked = CreditStore(client, allowance=ALLOWANCE, clock=lambda: when[0])
        await memory.ordinary_month(clocked, coach, advance, with_keys=with_keys)
        report.add(
            "memory",
            "a coach-month of ordinary use (50 actions"
            + (", each with an Idempotency-Key)" if with_keys else ")"),
            sum((await memory.coach_bytes(client, coach)).values()),
            "bytes",
            "MEMORY USAGE over the coach's keys; bound " + ("12 KiB" if with_keys else "8 KiB"),
        )
        coach = f"{uuid.uuid4()}"
        busy = CreditStore(client, allowance=10**6)
        await memory.abusive_loop(busy, coach, cycles=load.abusive_cycles, with_keys=with_keys)
        report.add(
            "memory",
            f"one coach after {load.abusive_cycles:,} reserve+refund cycles"
            + (", each with an Idempotency-Key" if with_keys else ""),
            sum((await memory.coach_bytes(client, coach)).values()),
            "bytes",
            "batch calls, 500 a batch; bound 512 KiB",
        )
    await client.flushdb()
    await client.aclose()


# --- correctness ---------------------------------------------------------------------------


#: Coaches the correctness check drives past their allowance with racing reserves.
EXHAUSTED_COACHES = 100


async def exhaust_coaches(redis: RedisProcess) -> None:
    """Racing reserves (more than the allowance) on a set of coaches, then commits: the
    correctness check then covers coaches that really reached their allowance."""
    client = connect(Settings(redis_url=redis.db_url(DB_SERVICE), allow_open=True))
    store = CreditStore(client, allowance=ALLOWANCE)
    features = ["checkin_draft", "trend_analysis"]

    async def one(coach: str, i: int) -> str | None:
        try:
            reservation, _ = await store.reserve(coach, features[i % 2])
        except CreditsExhausted:
            return None
        return str(reservation.reservation_id)

    for n in range(EXHAUSTED_COACHES):
        coach = f"exhaust-{n}"
        ids = await asyncio.gather(*(one(coach, i) for i in range(2 * ALLOWANCE)))
        await asyncio.gather(*(store.commit(rid) for rid in ids if rid is not None))
    await store.aclose()
    await client.aclose()


async def check_correctness(report: Report, redis: RedisProcess) -> None:
    await exhaust_coaches(redis)
    client = Redis.from_url(redis.db_url(DB_SERVICE), decode_responses=True)
    checked = over = full = 0
    batch: list[str] = []

    async def flush() -> None:
        nonlocal checked, over, full
        async with client.pipeline(transaction=False) as pipe:
            for name in batch:
                pipe.hmget(name, "used", "held")
            for used, held in await pipe.execute():
                checked += 1
                spent = int(used or 0) + int(held or 0)
                over += spent > ALLOWANCE
                full += spent == ALLOWANCE
        batch.clear()

    async for name in client.scan_iter(match="credits:{*}:*:account", count=1000):
        batch.append(name)
        if len(batch) >= 1000:
            await flush()
    await flush()
    await client.aclose()
    report.add("check", "coach-months checked after all loads", checked, "coaches")
    report.add("check", "coach-months above their allowance (used + held)", over, "coaches")
    report.add("check", "coach-months that reached their allowance", full, "coaches")
    report.correct = checked > 0 and over == 0 and full >= EXHAUSTED_COACHES


# --- threshold webhooks ---------------------------------------------------------------


async def bench_webhooks(report: Report, redis: RedisProcess, load: Load) -> None:
    """Delivery lag (commit to the receiver's arrival) while wrk drives HTTP reserves:
    coaches prepared at 70 % each get one more commit, paced over the run, and each
    such commit sends one webhook to a local receiver."""
    secs, count = load.wrk_seconds, load.webhook_coaches
    coaches = [f"hook-{i}" for i in range(count)]
    client = connect(Settings(redis_url=redis.db_url(DB_SERVICE), allow_open=True))
    store = CreditStore(client)
    features = ["trend_analysis"] * 11 + ["checkin_draft"] * 2  # 35 of 50: not past 70 %
    held = await store.reserve_many([ReserveItem(c, f) for c in coaches for f in features])
    await store.settle_many(
        [(str(h[0].reservation_id), "commit") for h in held if isinstance(h, tuple)]
    )
    await client.aclose()

    receiver = Receiver().start()
    port = free_port()
    env = {**service_env(redis), "CREDITS_WEBHOOKS": json.dumps([receiver.endpoint()])}
    try:
        with Uvicorn(production_argv(port, 1), env, port) as srv:
            headers = {"authorization": f"Bearer {API_KEY}"}

            async def cross() -> None:
                async with httpx.AsyncClient(base_url=srv.base, headers=headers) as http:
                    for coach in coaches:
                        r = await http.post(
                            f"/v1/coaches/{coach}/reservations", json={"feature": "checkin_draft"}
                        )
                        await http.post(f"/v1/reservations/{r.json()['reservation_id']}/commit")
                        await asyncio.sleep(secs / count)

            crossing = asyncio.create_task(cross())
            r = await asyncio.to_thread(wrk, srv.base, "reserve", secs, key=API_KEY)
            await crossing
            # What has not arrived 30 s after the load is reported missing.
            with contextlib.suppress(TimeoutError):
                await receiver.arrival(lambda got: len(got) >= count, within=30)
    finally:
        receiver.stop()
    got = receiver.snapshot()
    lags = sorted(
        (g.at - datetime.fromisoformat(g.body["timestamp"]).timestamp()) * 1000 for g in got
    )
    p50, p99 = (
        (lags[len(lags) // 2], lags[min(len(lags) - 1, int(len(lags) * 0.99))])
        if lags
        else (0.0, 0.0)
    )
    note = (
        f"{len(got)} of {count} delivered; reserve load {r.rps:,.0f} req/s, p99 {r.p99_ms:.2f} ms"
    )
    report.add("webhook", "delivery lag under HTTP reserve load, p50", p50, "ms", note)
    report.add("webhook", "delivery lag under HTTP reserve load, p99", p99, "ms", note)


# --- main -----------------------------------------------------------------------------------


async def run(load: Load, quick: bool) -> Report:
    report = Report(quick=quick)
    ensure_tool("wrk", "wrk")
    with RedisProcess(Path(tempfile.mkdtemp(prefix="bench-redis-"))) as redis:
        print(f"bench: private redis-server on port {redis.port}", flush=True)
        await bench_limit(report, redis, load)
        await bench_python(report, redis, load)
        await bench_http(report, redis, load)
        await bench_quota(report, redis, load)
        await bench_cluster(report, redis, load)
        await bench_streams(report, redis, load)
        await bench_webhooks(report, redis, load)
        await bench_scaling(report, redis, load)
        await bench_memory(report, redis, load)
        await check_correctness(report, redis)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a tiny load: seconds, not minutes")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where results go")
    args = parser.parse_args(argv)
    command = "python -m bench.run" + (" --quick" if args.quick else "")
    report = uvloop.run(run(Load.of(args.quick), args.quick))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "full"
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {
                **asdict(report),
                "targets": [{**asdict(t), "passed": t.passed} for t in report.targets],
            },
            indent=2,
        )
    )
    markdown = report.markdown(command)
    (args.out / f"{stem}.md").write_text(markdown)
    print("\n" + markdown)
    print(f"bench: results in {args.out}/{stem}.json and {stem}.md")
    return 0 if report.correct else 1


if __name__ == "__main__":
    sys.exit(main())
