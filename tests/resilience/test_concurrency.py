"""The invariants under real concurrency, on a real Redis.

Hundreds of calls are in flight at once through one connection pool, so the scripts'
atomicity is what keeps the ledger right, not the order the test happens to issue
them in. Every test uses fresh coach ids, so tests sharing the session server cannot
disturb each other.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime
from typing import Any

import pytest
from redis.asyncio import BlockingConnectionPool, Redis

from app.domain import Period, Reservation, Status
from app.errors import (
    CreditsExhausted,
    IdempotencyKeyReused,
    ReservationCommitted,
    ReservationRefunded,
)
from app.store import CreditStore, SettleAction, period_keys
from tests.support.clock import FrozenClock
from tests.support.ledger_view import logged_events
from tests.support.redis import RedisProcess

pytestmark = pytest.mark.real_redis

ALLOWANCE = 50
NOW = datetime(2427, 3, 14, 12, 0, tzinfo=UTC)


def coach() -> str:
    return f"coach-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis(redis_server: RedisProcess) -> AsyncIterator[Redis]:
    # A pool wide enough that hundreds of calls really overlap inside Redis' queue.
    pool = BlockingConnectionPool.from_url(
        redis_server.url, decode_responses=True, max_connections=200, timeout=30
    )
    client = Redis(connection_pool=pool)
    yield client
    await client.aclose()
    await pool.aclose()


@pytest.fixture
def store(redis: Redis) -> CreditStore:
    # A generous bound: these tests are about outcomes, and the machine is shared.
    return CreditStore(redis, allowance=ALLOWANCE, clock=FrozenClock(NOW), op_timeout_seconds=30)


async def raw_counters(redis: Redis, coach_id: str) -> tuple[int, int]:
    keys = period_keys(coach_id, Period.containing(NOW))
    used, held = await redis.hmget(keys.account, ["used", "held"])
    return int(used or 0), int(held or 0)


async def settle_events(redis: Redis, coach_id: str) -> Counter[str]:
    """How many times each token was settled (committed, refunded or expired)."""
    reader = CreditStore(redis, clock=FrozenClock(NOW))
    counts: Counter[str] = Counter()
    for event in await logged_events(reader, coach_id, Period.containing(NOW)):
        if event.kind in ("committed", "refunded", "expired") and event.reservation_id:
            counts[event.reservation_id.token] += 1
    return counts


class Sampler:
    """Reads a coach's counters over and over while other calls run, and remembers
    every reading that broke used + held <= allowance."""

    def __init__(self, store: CreditStore, redis: Redis, coach_ids: list[str]) -> None:
        self.store, self.redis, self.coach_ids = store, redis, coach_ids
        self.readings = 0
        self.violations: list[tuple[str, int, int]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            for c in self.coach_ids:
                # Both the raw counters and what callers read: either could be wrong.
                used, held = await raw_counters(self.redis, c)
                usage = await self.store.usage(c)
                self.readings += 1
                for u, h in ((used, held), (usage.used, usage.held)):
                    if u + h > ALLOWANCE or u < 0 or h < 0:
                        self.violations.append((c, u, h))
            await asyncio.sleep(0)

    async def __aenter__(self) -> Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task
        assert self.readings > 0, "the sampler never read anything"
        assert not self.violations, self.violations[:5]


async def test_500_concurrent_reserves_never_grant_more_than_the_allowance(
    store: CreditStore, redis: Redis
) -> None:
    coach_id = coach()
    rng = random.Random(500)
    features = [rng.choice(["checkin_draft", "trend_analysis"]) for _ in range(500)]

    async with Sampler(store, redis, [coach_id]):
        results = await asyncio.gather(
            *(store.reserve(coach_id, f) for f in features), return_exceptions=True
        )

    granted = [r for r, _ in (x for x in results if isinstance(x, tuple))]
    refused = [x for x in results if isinstance(x, CreditsExhausted)]
    others = [x for x in results if not isinstance(x, tuple | CreditsExhausted)]
    assert not others, others[:3]
    assert len(granted) + len(refused) == 500
    total = sum(r.cost for r in granted)
    assert 0 < total <= ALLOWANCE
    assert len({str(r.reservation_id) for r in granted}) == len(granted)
    # Every refusal was real: what was left at that moment did not cover the cost.
    for exc in refused:
        assert exc.remaining < exc.cost, (exc.remaining, exc.cost)
    if any(exc.cost == 1 for exc in refused):
        # Nothing is ever given back here, so a cost-1 refusal means all 50 were held.
        assert total == ALLOWANCE
    used, held = await raw_counters(redis, coach_id)
    assert (used, held) == (0, total)
    usage = await store.usage(coach_id)
    assert (usage.used, usage.held, usage.remaining) == (0, total, ALLOWANCE - total)


async def test_racing_commits_and_refunds_settle_each_reservation_exactly_once(
    store: CreditStore, redis: Redis
) -> None:
    rng = random.Random(7)
    coaches = [coach() for _ in range(4)]
    reservations: list[Reservation] = []
    for c in coaches:
        for _ in range(12):
            feature = rng.choice(["checkin_draft", "trend_analysis"])
            reservations.append((await store.reserve(c, feature))[0])

    async def race(res: Reservation) -> list[Any]:
        rid = str(res.reservation_id)
        calls: list[Awaitable[Reservation]] = []
        for _ in range(rng.randint(4, 10)):
            calls.append(store.commit(rid) if rng.random() < 0.5 else store.refund(rid))
        return list(await asyncio.gather(*calls, return_exceptions=True))

    async with Sampler(store, redis, coaches):
        outcomes = await asyncio.gather(*(race(r) for r in reservations))

    expected_used: Counter[str] = Counter()
    for res, results in zip(reservations, outcomes, strict=True):
        ok = [r for r in results if isinstance(r, Reservation)]
        errors = [r for r in results if not isinstance(r, Reservation)]
        # Whoever won, every successful answer tells the same story ...
        states = {r.status for r in ok}
        assert len(states) == 1, (res.reservation_id, states)
        (state,) = states
        assert state in (Status.COMMITTED, Status.REFUNDED)
        # ... and every loser was told why, consistently with the winner.
        losing = ReservationRefunded if state is Status.REFUNDED else ReservationCommitted
        assert all(isinstance(e, losing) for e in errors), errors
        if state is Status.COMMITTED:
            expected_used[res.reservation_id.coach_id] += res.cost

    for c in coaches:
        assert await raw_counters(redis, c) == (expected_used[c], 0)
        settled = await settle_events(redis, c)
        mine = [r for r in reservations if r.reservation_id.coach_id == c]
        assert {r.reservation_id.token for r in mine} == set(settled)
        assert set(settled.values()) == {1}, settled


async def test_concurrent_reserves_with_one_idempotency_key_hold_once(
    store: CreditStore, redis: Redis
) -> None:
    coach_id = coach()
    for n in range(5):
        key = f"draft-{n}"
        # Same key, mostly the same feature, a few with another one.
        features = ["trend_analysis"] * 30 + ["checkin_draft"] * 5
        random.Random(n).shuffle(features)
        results = await asyncio.gather(
            *(store.reserve(coach_id, f, idempotency_key=key) for f in features),
            return_exceptions=True,
        )
        made = [x for x in results if isinstance(x, tuple)]
        reused = [x for x in results if isinstance(x, IdempotencyKeyReused)]
        assert len(made) + len(reused) == len(features), results
        created = [r for r, new in made if new]
        ids = {str(r.reservation_id) for r, _ in made}
        assert len(ids) == 1, ids
        winner = made[0][0]
        # The first request to land decides the feature; everyone else matches it or
        # is told the key is taken.
        assert len(created) == 1
        assert created[0].feature == winner.feature
        assert all(r.feature == winner.feature for r, _ in made)
        assert len(made) == features.count(winner.feature)

    usage = await store.usage(coach_id)
    # Five keys, five holds, whichever feature won each.
    used, held = await raw_counters(redis, coach_id)
    assert used == 0
    assert usage.held == held
    holds = await redis.zcard(period_keys(coach_id, Period.containing(NOW)).holds)
    assert holds == 5


async def test_script_flush_storm_loses_no_call_and_no_credit(
    store: CreditStore, redis: Redis, redis_server: RedisProcess
) -> None:
    rng = random.Random(99)
    coaches = [coach() for _ in range(6)]
    flusher_client = Redis.from_url(redis_server.url, decode_responses=True)
    done = asyncio.Event()
    flushes = 0

    async def flusher() -> None:
        nonlocal flushes
        while not done.is_set():
            await flusher_client.script_flush()
            flushes += 1
            await asyncio.sleep(0)

    async def lifecycle(coach_id: str, i: int) -> tuple[str, int, Status | None]:
        feature = rng.choice(["checkin_draft", "trend_analysis"])
        try:
            res, _ = await store.reserve(coach_id, feature, idempotency_key=f"k{i}")
        except CreditsExhausted:
            return coach_id, 0, None
        rid = str(res.reservation_id)
        await store.usage_many(coaches)
        settled = await (store.commit(rid) if rng.random() < 0.6 else store.refund(rid))
        again = await store.get_reservation(rid)
        assert again.status is settled.status
        return coach_id, res.cost, settled.status

    flushing = asyncio.create_task(flusher())
    try:
        async with Sampler(store, redis, coaches):
            results = await asyncio.gather(
                *(lifecycle(coaches[i % len(coaches)], i) for i in range(300)),
                return_exceptions=True,
            )
    finally:
        done.set()
        await flushing
        await flusher_client.aclose()

    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert flushes > 10, "the storm was too short to overlap the calls"
    # Calls really met NOSCRIPT, so the recovery path is what this test exercised.
    reloads = store.metrics.registry.get_sample_value("credits_scripts_reloaded_total")
    assert reloads is not None
    assert reloads > 0
    committed: Counter[str] = Counter()
    for r in results:
        assert isinstance(r, tuple)
        coach_id, cost, status = r
        if status is Status.COMMITTED:
            committed[coach_id] += cost
    for c in coaches:
        assert await raw_counters(redis, c) == (committed[c], 0)
        usage = await store.usage(c)
        assert (usage.used, usage.held) == (committed[c], 0)


@pytest.mark.timeout(240)  # about 50 s on a slow machine
async def test_batch_settlements_keep_request_order_through_a_script_flush_storm(
    store: CreditStore, redis: Redis, redis_server: RedisProcess
) -> None:
    """[commit X, refund X] in one batch must commit X: the refund comes second. While
    other clients flush and reload scripts, a call that met NOSCRIPT must not end up
    running after a later call on the same coach."""
    admin = Redis.from_url(redis_server.url, decode_responses=True)
    done = asyncio.Event()

    async def flusher() -> None:
        while not done.is_set():
            await admin.script_flush()
            await asyncio.sleep(0)

    async def reloader() -> None:
        # Single calls reload whatever scripts they find missing, between the flushes.
        while not done.is_set():
            await store.usage(coach())
            await asyncio.sleep(0)

    out_of_order = 0
    tasks = [asyncio.create_task(flusher()), asyncio.create_task(reloader())]
    try:
        for _ in range(15):
            coaches = [coach() for _ in range(20)]
            held = await asyncio.gather(
                *(store.reserve(c, "checkin_draft") for c in coaches for _ in range(8))
            )
            batches: dict[str, list[tuple[str, SettleAction]]] = {c: [] for c in coaches}
            for res, _ in held:
                rid = str(res.reservation_id)
                batches[res.reservation_id.coach_id] += [(rid, "commit"), (rid, "refund")]
            outcomes = await asyncio.gather(*(store.settle_many(b) for b in batches.values()))
            for out in outcomes:
                for first, second in zip(out[::2], out[1::2], strict=True):
                    committed = isinstance(first, Reservation) and first.status is Status.COMMITTED
                    if not (committed and isinstance(second, ReservationCommitted)):
                        out_of_order += 1
    finally:
        done.set()
        await asyncio.gather(*tasks)
        await admin.aclose()
    assert out_of_order == 0
