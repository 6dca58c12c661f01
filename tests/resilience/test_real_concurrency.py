"""The invariants when the concurrency is real: several store instances, each on its
own connections and sending each call on its own round trip, two uvicorn worker
processes behind one port, and a Redis Cluster. Each test ends with used + held within
the allowance and the event log reconciling with the counters."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from app.domain import Period, Status
from app.errors import CreditsExhausted
from app.store import AnyRedis, CreditStore
from tests.support.clock import FrozenClock
from tests.support.cluster import LocalCluster
from tests.support.redis import RedisProcess
from tests.support.service import WORKER_KEY, ServiceProcess

pytestmark = pytest.mark.real_redis

ALLOWANCE = 50
NOW = datetime(2427, 5, 20, 9, 30, tzinfo=UTC)
STORES = 4
ACTIONS = 240


def coach() -> str:
    return f"real-{uuid.uuid4().hex[:12]}"


async def reconcile(store: CreditStore, coach_id: str, period: Period) -> tuple[int, int]:
    """used and held as the whole event log tells them."""
    held = used = 0
    before: int | None = None
    while True:
        page = await store.events(coach_id, period=period, before=before, limit=500)
        for event in page.events:
            if event.kind == "held":
                held += event.cost
            elif event.kind in ("committed", "refunded", "expired"):
                held -= event.cost
                used += event.cost if event.kind == "committed" else 0
        if page.next_before is None:
            return used, held
        before = page.next_before


async def act(store: CreditStore, coach_id: str, rng: random.Random) -> str:
    """One AI action: reserve, then commit or refund at random."""
    feature = rng.choice(["checkin_draft", "trend_analysis"])
    try:
        reservation, _ = await store.reserve(coach_id, feature)
    except CreditsExhausted:
        return "refused"
    await asyncio.sleep(rng.random() / 100)
    if rng.random() < 0.6:
        return (await store.commit(str(reservation.reservation_id))).status.value
    return (await store.refund(str(reservation.reservation_id))).status.value


async def race(stores: list[CreditStore], coach_ids: list[str]) -> list[str | BaseException]:
    rng = random.Random(7)
    jobs = [
        act(stores[i % len(stores)], coach_ids[i % len(coach_ids)], random.Random(rng.random()))
        for i in range(ACTIONS)
    ]
    return list(await asyncio.gather(*jobs, return_exceptions=True))


async def assert_ledger_holds(store: CreditStore, coach_ids: list[str]) -> None:
    period = Period.containing(NOW)
    for coach_id in coach_ids:
        usage = await store.usage(coach_id)
        assert usage.used + usage.held <= ALLOWANCE
        assert usage.held == 0  # every action settled
        assert await reconcile(store, coach_id, period) == (usage.used, usage.held)


async def several_stores(client_of: list[AnyRedis]) -> list[CreditStore]:
    stores = [
        CreditStore(
            c, allowance=ALLOWANCE, clock=FrozenClock(NOW), coalesce=False, op_timeout_seconds=30
        )
        for c in client_of
    ]
    for s in stores:
        await s.ensure_scripts()
    return stores


@pytest.fixture
async def clients(redis_server: RedisProcess) -> AsyncIterator[list[AnyRedis]]:
    made: list[AnyRedis] = []
    for _ in range(STORES):
        pool = BlockingConnectionPool.from_url(
            redis_server.url, decode_responses=True, max_connections=50, timeout=30
        )
        made.append(Redis(connection_pool=pool))
    yield made
    for c in made:
        await c.aclose()


async def test_several_stores_on_their_own_connections_never_overspend(
    clients: list[AnyRedis],
) -> None:
    stores = await several_stores(clients)
    coach_ids = [coach() for _ in range(3)]
    outcomes = await race(stores, coach_ids)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert not errors, errors[:3]
    assert "refused" in outcomes  # the allowance was really reached
    assert {"committed", "refunded"} <= set(outcomes)
    await assert_ledger_holds(stores[0], coach_ids)


@pytest.fixture
def cluster(redis_cluster: LocalCluster) -> Iterator[LocalCluster]:
    yield redis_cluster
    if not all(redis_cluster.alive(p) for p in redis_cluster.ports):
        redis_cluster.heal()


async def test_several_stores_on_a_cluster_never_overspend(cluster: LocalCluster) -> None:
    made = [
        RedisCluster.from_url(cluster.live_seed_url(), decode_responses=True) for _ in range(STORES)
    ]
    try:
        stores = await several_stores(list(made))
        coach_ids = [coach() for _ in range(6)]
        outcomes = await race(stores, coach_ids)
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert not errors, errors[:3]
        assert "refused" in outcomes
        await assert_ledger_holds(stores[0], coach_ids)
    finally:
        for c in made:
            await c.aclose()


@pytest.fixture
def two_workers(tmp_path: Path, redis_server: RedisProcess) -> Iterator[ServiceProcess]:
    service = ServiceProcess(tmp_path, redis_server, workers=2).start(timeout=60)
    try:
        yield service
    finally:
        service.stop()


async def test_two_uvicorn_workers_over_http_never_overspend(
    two_workers: ServiceProcess, redis_server: RedisProcess
) -> None:
    coach_id = coach()
    headers = {"Authorization": f"Bearer {WORKER_KEY}"}
    limits = httpx.Limits(max_connections=64)
    rng = random.Random(11)

    async def one(http: httpx.AsyncClient, feature: str, commit: bool) -> str:
        r = await http.post(f"/v1/coaches/{coach_id}/reservations", json={"feature": feature})
        if r.status_code == 429:
            return "refused"
        assert r.status_code == 201, r.text
        rid = r.json()["reservation_id"]
        action = "commit" if commit else "refund"
        s = await http.post(f"/v1/reservations/{rid}/{action}")
        assert s.status_code == 200, s.text
        return str(s.json()["status"])

    async with httpx.AsyncClient(
        base_url=two_workers.url, headers=headers, limits=limits, timeout=30
    ) as http:
        jobs = [
            one(http, rng.choice(["checkin_draft", "trend_analysis"]), rng.random() < 0.6)
            for _ in range(ACTIONS)
        ]
        outcomes = await asyncio.gather(*jobs)
        usage = (await http.get(f"/v1/coaches/{coach_id}/usage")).json()
    assert "refused" in outcomes
    assert usage["used"] + usage["held"] <= ALLOWANCE
    assert usage["held"] == 0
    assert usage["used"] == ALLOWANCE - usage["remaining"]
    # The event log, read through a store on the same Redis, tells the same.
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        store = CreditStore(client, allowance=ALLOWANCE)
        period = Period.containing(datetime.now(UTC))
        assert await reconcile(store, coach_id, period) == (usage["used"], 0)
    finally:
        await client.aclose()
    assert Status.COMMITTED.value in outcomes
    assert not [o for o in outcomes if o not in ("refused", "committed", "refunded")]
