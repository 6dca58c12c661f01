"""This checkout's service against another checkout's, run by run on the same machine.

``python -m bench.compare OTHER`` (``make compare AGAINST=OTHER``): OTHER is a checkout of
any earlier version with its own ``.venv`` (``uvicorn`` in ``OTHER/.venv/bin``);
``--this DIR`` measures another checkout in place of this one. Each
round starts a fresh redis-server for each checkout in turn, the order alternating, and
drives its 2-worker service over HTTP only (so any version's data format will do):
single reserve and commit, batch reserve and batch settle. Speed on this machine moves
by a third between consecutive runs, so the figure to read is the median of the
per-round ratios (this / other), not the ratio of two single runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
from redis.asyncio import Redis

from bench.procs import CpuMeter
from bench.run import API_KEY, DB_SERVICE, production_argv, script_usec, service_env, wrk
from tests.support import paths
from tests.support.redis import RedisProcess, free_port
from tests.support.service import Uvicorn

#: What each round measures, in the order it runs; each is bench/wrk/<name with _>.lua.
OPS: Final = ("reserve", "commit", "batch reserve", "batch settle")
PER_BATCH: Final = 100


@dataclass(frozen=True)
class Run:
    """One load on one checkout: credit operations a second, the Redis time per script
    call (INFO commandstats), the CPU time per operation of the workers and Redis, and
    the requests that failed or were answered other than 2xx (an overloaded service
    may answer 503 when a call outlives its deadline)."""

    ops: float
    redis_us: float
    workers_cpu_us: float
    redis_cpu_us: float
    errors: int = 0


@contextmanager
def service(checkout: Path, workdir: Path) -> Iterator[tuple[RedisProcess, Uvicorn]]:
    with RedisProcess(workdir) as redis:
        port = free_port()
        argv = [str(checkout / ".venv" / "bin" / "uvicorn"), *production_argv(port, 2)[1:]]
        with Uvicorn(argv, service_env(redis), port, cwd=checkout) as srv:
            wrk(srv.base, "reserve", 1, key=API_KEY)  # warm-up
            yield redis, srv


async def held_ids(base: str, count: int, prefix: str) -> str:
    """``count`` reservations held an hour on distinct coaches, made through the batch
    route; the file of their ids, for the commit and settle loads."""
    ids: list[str] = []
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    ) as client:
        for start in range(0, count, 500):
            items = [
                {"coach_id": f"{prefix}-{i}", "feature": "checkin_draft", "ttl_seconds": 3600}
                for i in range(start, min(count, start + 500))
            ]
            answer = await client.post("/v1/reservations/batch", json={"reservations": items})
            answer.raise_for_status()
            ids += [r["reservation"]["reservation_id"] for r in answer.json()["results"]]
    with tempfile.NamedTemporaryFile("w", suffix=".ids", delete=False) as f:
        f.write("\n".join(ids) + "\n")
    return f.name


async def measure(checkout: Path, seconds: int) -> dict[str, Run]:
    """Every load of ``OPS`` on a fresh Redis and service of ``checkout``."""
    runs: dict[str, Run] = {}
    with tempfile.TemporaryDirectory() as tmp, service(checkout, Path(tmp)) as (redis, srv):
        admin = Redis.from_url(redis.db_url(DB_SERVICE))
        assert srv.proc is not None
        assert redis.proc is not None
        for op in OPS:
            script = op.replace(" ", "_")  # its wrk script in bench/wrk/
            per = PER_BATCH if op.startswith("batch") else 1
            ids = "-"
            if op in ("commit", "batch settle"):
                # Enough for the load at the pace its reserve twin just ran.
                twin = runs["reserve" if op == "commit" else "batch reserve"].ops
                wanted = int(twin * seconds * 1.5) + 1000
                ids = await held_ids(srv.base, wanted, op.replace(" ", "-"))  # a coach id prefix
            calls, usec = await script_usec(admin)
            meter = CpuMeter(srv.proc.pid, redis.proc.pid)
            r = wrk(srv.base, script, seconds, key=API_KEY, ids_file=ids, per_batch=per)
            workers, stored, _ = meter.shares()
            calls_after, usec_after = await script_usec(admin)
            if ids != "-":
                os.unlink(ids)
            ops = r.rps * per
            runs[op] = Run(
                ops,
                (usec_after - usec) / max(1, calls_after - calls),
                workers / ops * 1e6,
                stored / ops * 1e6,
                r.errors,
            )
        await admin.aclose()
    return runs


async def compare(
    this: Path, other: Path, rounds: int, seconds: int
) -> dict[str, list[tuple[Run, Run]]]:
    """(this, other) for each load and round."""
    pairs: dict[str, list[tuple[Run, Run]]] = {op: [] for op in OPS}
    for i in range(rounds):
        order = [this, other] if i % 2 == 0 else [other, this]
        got = {checkout: await measure(checkout, seconds) for checkout in order}
        for op in OPS:
            pairs[op].append((got[this][op], got[other][op]))
        print(
            f"round {i + 1}/{rounds}: "
            + ", ".join(f"{op} {got[this][op].ops / got[other][op].ops:.2f}" for op in OPS),
            flush=True,
        )
    return pairs


def table(this: Path, other: Path, pairs: dict[str, list[tuple[Run, Run]]]) -> str:
    def median(runs: list[Run], value: Callable[[Run], float]) -> float:
        return statistics.median(value(r) for r in runs)

    lines = [
        f"{this} against {other}, {len(pairs[OPS[0]])} rounds,"
        " medians; ratios are this / other, per round",
        "",
        "| load | ops/s ratio | ops/s this | ops/s other | Redis us/call this | other"
        " | CPU us/op this (workers + Redis) | other | failed requests this | other |",
        "|---|---:|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for op, runs in pairs.items():
        ratio = statistics.median(a.ops / b.ops for a, b in runs)
        sides = ([a for a, _ in runs], [b for _, b in runs])
        cells = [op, f"{ratio:.2f}"]
        cells += [f"{median(side, lambda r: r.ops):,.0f}" for side in sides]
        cells += [f"{median(side, lambda r: r.redis_us):.1f}" for side in sides]
        cells += [
            f"{median(side, lambda r: r.workers_cpu_us):.1f}"
            f" + {median(side, lambda r: r.redis_cpu_us):.1f}"
            for side in sides
        ]
        cells += [str(sum(r.errors for r in side)) for side in sides]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("other", type=Path, help="the other checkout (with its .venv)")
    parser.add_argument(
        "--this", type=Path, default=paths.ROOT, help="the checkout to measure (this one)"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=int, default=5, help="of each load")
    parser.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    this, other = args.this.resolve(), args.other.resolve()
    for checkout in (this, other):
        if not (checkout / ".venv" / "bin" / "uvicorn").exists():
            parser.error(f"{checkout}/.venv/bin/uvicorn is missing: install that checkout first")
    text = table(this, other, asyncio.run(compare(this, other, args.rounds, args.seconds)))
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
