"""Redis refusing writes, against real redis-servers: out of memory (``maxmemory`` with
``noeviction``) and a read-only replica. Every write is a 503 that says Redis refused
it, reads keep answering, and writes work again once Redis takes them."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from app.config import Settings
from app.errors import WriteRefused
from app.main import create_app
from app.store import CreditStore, ReserveItem
from tests.support.clock import FrozenClock
from tests.support.redis import RedisProcess

COACH = "coach-refused"

pytestmark = pytest.mark.real_redis


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path, args=["--save", "", "--maxmemory-policy", "noeviction"]) as s:
        yield s


@pytest.fixture
async def redis(server: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def api(redis: Redis, clock: FrozenClock) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(), redis=redis, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:
            yield client


def assert_refused(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert int(r.headers["Retry-After"]) >= 1
    problem = r.json()
    assert problem["code"] == "backend_unavailable"
    assert "Redis refused the write" in problem["detail"], problem


async def test_out_of_memory_refuses_every_write_and_heals(
    api: httpx.AsyncClient, redis: Redis
) -> None:
    reserve = f"/v1/coaches/{COACH}/reservations"
    held = [(await api.post(reserve, json={"feature": "checkin_draft"})).json() for _ in range(2)]
    before = (await api.get(f"/v1/coaches/{COACH}/usage")).json()
    await redis.config_set("maxmemory", 1)

    assert_refused(await api.post(reserve, json={"feature": "checkin_draft"}))
    assert_refused(
        await api.post(reserve, json={"feature": "checkin_draft"}, headers={"Idempotency-Key": "k"})
    )
    one = {"coach_id": COACH, "feature": "checkin_draft"}
    assert_refused(await api.post("/v1/reservations/batch", json={"reservations": [one, one]}))
    first, second = (h["reservation_id"] for h in held)
    assert_refused(await api.post(f"/v1/reservations/{first}/commit"))
    assert_refused(await api.post(f"/v1/reservations/{first}/refund"))
    settle = {"settlements": [{"reservation_id": second, "action": "commit"}]}
    assert_refused(await api.post("/v1/reservations/settle", json=settle))

    # Reads keep answering, and nothing changed.
    usage = await api.get(f"/v1/coaches/{COACH}/usage")
    assert usage.status_code == 200
    assert usage.json() == before
    got = await api.get(f"/v1/reservations/{first}")
    assert (got.status_code, got.json()["status"]) == (200, "held")
    batch = await api.post("/v1/usage/batch", json={"coach_ids": [COACH, "someone-else"]})
    assert batch.status_code == 200
    events = await api.get(f"/v1/coaches/{COACH}/events")
    assert [e["kind"] for e in events.json()["events"]] == ["held", "held"]

    # Redis takes writes again: so does the service, with no restart.
    await redis.config_set("maxmemory", 0)
    assert (await api.post(reserve, json={"feature": "checkin_draft"})).status_code == 201
    assert (await api.post(f"/v1/reservations/{first}/commit")).status_code == 200
    settled = await api.post("/v1/reservations/settle", json=settle)
    assert settled.json()["results"][0]["status"] == 200
    assert (await api.get(f"/v1/coaches/{COACH}/usage")).json()["used"] == 2


async def test_the_store_remembers_a_refusal_until_a_write_succeeds(
    redis: Redis, clock: FrozenClock
) -> None:
    store = CreditStore(redis, clock=clock)
    await store.ensure_scripts()
    made, _ = await store.reserve(COACH, "trend_analysis")
    await store.ping()
    assert store.write_refusal is None
    await redis.config_set("maxmemory", 1)
    with pytest.raises(WriteRefused) as refused:
        await store.commit(str(made.reservation_id))
    assert "maxmemory" in refused.value.detail
    assert store.write_refusal is not None
    assert "maxmemory" in store.write_refusal
    # Reads answer; the probe /readyz runs keeps the refusal while it lasts.
    assert (await store.usage(COACH)).held == 3
    await store.ping()
    assert store.write_refusal is not None
    with pytest.raises(WriteRefused):
        await store.reserve_many([ReserveItem(COACH, "checkin_draft")])
    await redis.config_set("maxmemory", 0)
    await store.ping()
    assert store.write_refusal is None
    assert (await store.commit(str(made.reservation_id))).usage.used == 3


@pytest.fixture
def replica(server: RedisProcess, tmp_path: Path) -> Iterator[RedisProcess]:
    args = ["--save", "", "--replicaof", "127.0.0.1", str(server.port)]
    with RedisProcess(tmp_path / "replica", args=args) as r:
        deadline = time.monotonic() + 20
        while "master_link_status:up" not in replication_info(r):
            assert time.monotonic() < deadline, "the replica never synced"
            time.sleep(0.05)
        yield r


def replication_info(process: RedisProcess) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(process.port), "info", "replication"],
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    ).stdout


async def test_a_read_only_replica_refuses_writes_and_still_answers_reads(
    redis: Redis, replica: RedisProcess, clock: FrozenClock
) -> None:
    primary = CreditStore(redis, clock=clock)
    made, _ = await primary.reserve(COACH, "trend_analysis")
    client = Redis.from_url(replica.url, decode_responses=True)
    try:
        deadline = time.monotonic() + 20
        while not await client.exists(f"credits:{{{COACH}}}:{made.usage.period}:account"):
            assert time.monotonic() < deadline, "the hold never reached the replica"
            await asyncio.sleep(0.05)
        app = create_app(Settings(), redis=client, clock=clock)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://c") as api:
                rid = str(made.reservation_id)
                r = await api.post(f"/v1/coaches/{COACH}/reservations", json=reserve_body())
                assert_refused(r)
                assert "read only replica" in r.json()["detail"]
                assert_refused(await api.post(f"/v1/reservations/{rid}/commit"))
                body: dict[str, Any] = {"reservations": [{"coach_id": COACH, **reserve_body()}]}
                assert_refused(await api.post("/v1/reservations/batch", json=body))
                usage = await api.get(f"/v1/coaches/{COACH}/usage")
                assert (usage.status_code, usage.json()["held"]) == (200, 3)
                assert (await api.get(f"/v1/reservations/{rid}")).json()["status"] == "held"
    finally:
        await client.aclose()


def reserve_body() -> dict[str, str]:
    return {"feature": "checkin_draft"}


async def test_failed_persistence_refuses_writes_until_redis_takes_them_again(
    redis: Redis, server: RedisProcess, clock: FrozenClock
) -> None:
    store = CreditStore(redis, clock=clock)
    made, _ = await store.reserve(COACH, "checkin_draft")
    await redis.config_set("save", "3600 1")  # snapshots on: a failed one stops writes
    shutil.rmtree(server.dir)  # the next snapshot cannot be written
    await redis.bgsave()
    await wait_for_save(redis, "err")
    with pytest.raises(WriteRefused) as refused:
        await store.commit(str(made.reservation_id))
    assert "MISCONF" in refused.value.detail
    assert (await store.get_reservation(str(made.reservation_id))).status.value == "held"
    # Redis works in the directory it started in, now gone: an operator turns snapshots
    # off (as fixing the disk would), and writes are taken again.
    await redis.config_set("save", "")
    await store.ping()
    assert store.write_refusal is None
    assert (await store.commit(str(made.reservation_id))).usage.used == 1


async def wait_for_save(redis: Redis, status: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        info = await redis.info("persistence")
        if not info["rdb_bgsave_in_progress"] and info["rdb_last_bgsave_status"] == status:
            return
        assert time.monotonic() < deadline, f"the snapshot never ended {status}"
        await asyncio.sleep(0.05)
