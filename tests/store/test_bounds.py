"""What the service keeps for a coach is bounded, against a real redis-server: the bytes
(``MEMORY USAGE`` over every key of the coach), the records kept (the newest win), the
live holds, and the event log, which still reconciles with the counters once trimmed."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from app import domain
from app.config import Settings
from app.domain import Period, Reservation, Status
from app.errors import CreditsError, ReservationNotFound, TooManyHolds
from app.main import create_app
from app.store import CreditStore, ReserveItem, idempotency_keys, period_keys
from bench import memory
from tests.support.clock import FrozenClock
from tests.support.ledger_view import logged_events
from tests.support.redis import RedisProcess

KIB = 1024
#: A coach id as long as most callers' (a UUID).
COACH = "5b0c7a4e-9d1f-4c43-8a57-2f6e0d9b1c21"
NOV = Period(2099, 11)

pytestmark = pytest.mark.real_redis


@pytest.fixture
async def redis(redis_server: RedisProcess) -> AsyncIterator[Redis]:
    # A database of its own, flushed around each test.
    client = Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/5", decode_responses=True)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


def store_on(redis: Redis, clock: FrozenClock, **options: Any) -> CreditStore:
    return CreditStore(redis, clock=clock, **options)


async def total_bytes(redis: Redis, coach_id: str) -> int:
    return sum((await memory.coach_bytes(redis, coach_id)).values())


async def snapshot(redis: Redis, coach_id: str) -> dict[str, Any]:
    """Every key of the coach, serialized: equal snapshots mean nothing was written."""
    names = sorted([k async for k in redis.scan_iter(match=f"credits:{{{coach_id}}}:*")])
    return {name: await redis.dump(name) for name in names}


async def reserve_all(store: CreditStore, items: list[ReserveItem]) -> list[Reservation]:
    outcomes = await store.reserve_many(items)
    errors = [o for o in outcomes if isinstance(o, CreditsError)]
    assert not errors, errors[:1]
    return [o[0] for o in outcomes if not isinstance(o, CreditsError)]


async def settle_all(store: CreditStore, rids: list[str], action: str = "refund") -> None:
    outcomes = await store.settle_many([(rid, action) for rid in rids])  # type: ignore[misc]
    errors = [o for o in outcomes if isinstance(o, CreditsError)]
    assert not errors, errors[:1]


# --- bytes -------------------------------------------------------------------------------


@pytest.mark.parametrize("with_keys", [False, True], ids=["no-keys", "idempotency-keys"])
async def test_twenty_thousand_reserve_refund_cycles_keep_a_coach_within_512_kib(
    redis: Redis, clock: FrozenClock, with_keys: bool
) -> None:
    store = store_on(redis, clock, allowance=10**6)
    largest = 0
    for _ in range(10):
        await memory.abusive_loop(store, COACH, cycles=2000, with_keys=with_keys)
        largest = max(largest, await total_bytes(redis, COACH))
    assert largest <= 512 * KIB, largest
    usage = await store.usage(COACH)
    assert (usage.used, usage.held) == (0, 0)
    # The newest reservations are all still there.
    page = await store.events(COACH, limit=1)
    assert page.events[0].seq == 40_000
    assert (await store.get_reservation(str(page.events[0].reservation_id))).status is (
        Status.REFUNDED
    )


async def test_everything_at_its_largest_stays_within_512_kib(
    redis: Redis, clock: FrozenClock
) -> None:
    """The largest configuration and the most a coach can keep at once: 1,000 live holds,
    every settled and idempotency generation full, a full event log, the period's 100
    grants with the longest reasons (200 four-byte characters), the longest coach id,
    feature names and Idempotency-Keys, costs of six digits."""
    long_a, long_b = "a" * 63 + "1", "b" * 63 + "2"
    coach = "c" * 128
    store = store_on(
        redis,
        clock,
        allowance=10**9,
        feature_costs={long_a: 100_000, long_b: 199_999},
        default_ttl_seconds=3600,
    )
    made = 0
    largest = 0
    await store.set_allowance(coach, 10**6)
    await store.set_allowance(coach, None)
    for i in range(100):
        key = f"grant-{i}-".ljust(255, "g")
        await store.grant(coach, 10**6, f"{i}|".ljust(200, "\U0001f600"), idempotency_key=key)
    largest = await total_bytes(redis, coach)

    async def batch(n: int, settle: bool) -> list[Reservation]:
        nonlocal made, largest
        items = [
            ReserveItem(coach, long_a if i % 2 else long_b, None, f"{made + i}-".ljust(255, "k"))
            for i in range(n)
        ]
        made += n
        held = await reserve_all(store, items)
        largest = max(largest, await total_bytes(redis, coach))
        if settle:
            await settle_all(store, [str(r.reservation_id) for r in held], "commit")
            largest = max(largest, await total_bytes(redis, coach))
        return held

    for _ in range(4):
        await batch(500, settle=True)
    await batch(400, settle=False)
    last = await batch(600, settle=False)
    assert (await store.usage(coach)).held == 500 * (100_000 + 199_999)
    with pytest.raises(TooManyHolds):
        await store.reserve(coach, long_a)
    # Settle a hundred: they stay in the account beside 900 live holds.
    await settle_all(store, [str(r.reservation_id) for r in last[:100]], "refund")
    largest = max(largest, await total_bytes(redis, coach))
    assert largest <= 512 * KIB, largest


@pytest.mark.parametrize(
    ("with_keys", "bound"), [(False, 8 * KIB), (True, 12 * KIB)], ids=["no-keys", "keys"]
)
async def test_a_month_of_ordinary_use_fits_its_bound(
    redis: Redis, with_keys: bool, bound: int
) -> None:
    clock = FrozenClock(datetime(2099, 11, 1, 6, tzinfo=UTC))
    store = store_on(redis, clock)
    await memory.ordinary_month(store, COACH, clock.advance, with_keys=with_keys)
    usage = await store.usage(COACH)
    assert (usage.period, usage.used, usage.held) == (NOV, 50, 0)
    assert len(await logged_events(store, COACH, NOV)) == 100
    assert await total_bytes(redis, COACH) <= bound


# --- records kept ------------------------------------------------------------------------


async def test_the_newest_thousand_settled_stay_and_older_ones_are_gone_for_good(
    redis: Redis, clock: FrozenClock
) -> None:
    store = store_on(redis, clock, allowance=10**6)
    committed: list[str] = []
    for _ in range(6):
        held = await reserve_all(store, [ReserveItem(COACH, "checkin_draft")] * 500)
        rids = [str(r.reservation_id) for r in held]
        await settle_all(store, rids, "commit")
        committed += rids
    for rid in committed[-1000:]:
        assert (await store.get_reservation(rid)).status is Status.COMMITTED
    # A late settlement of a dropped record: 404, and nothing changes anywhere.
    oldest = committed[0]
    before = await snapshot(redis, COACH)
    usage = await store.usage(COACH)
    for call in (store.get_reservation, store.commit, store.refund):
        with pytest.raises(ReservationNotFound):
            await call(oldest)
    outcomes = await store.settle_many([(oldest, "refund"), (committed[-1], "refund")])
    assert isinstance(outcomes[0], ReservationNotFound)
    assert not isinstance(outcomes[1], Reservation)  # committed: a 409, nothing changed
    assert await snapshot(redis, COACH) == before
    assert (await store.usage(COACH)).used == usage.used == 3000


async def test_an_idempotency_record_replays_until_a_thousand_newer_exist(
    redis: Redis, clock: FrozenClock
) -> None:
    store = store_on(redis, clock, allowance=10**6)
    first: dict[str, str] = {}
    for start in range(0, 1001, 500):
        keys = [f"job-{i}" for i in range(start, min(start + 500, 1001))]
        held = await reserve_all(
            store, [ReserveItem(COACH, "checkin_draft", None, k) for k in keys]
        )
        await settle_all(store, [str(r.reservation_id) for r in held])
        first.update(zip(keys, (str(r.reservation_id) for r in held), strict=True))
    # job-1 has 999 newer records: replayed, in its current state, nothing held.
    again, created = await store.reserve(COACH, "checkin_draft", idempotency_key="job-1")
    assert (str(again.reservation_id), created, again.status) == (
        first["job-1"],
        False,
        Status.REFUNDED,
    )
    assert again.usage.held == 0
    # job-0 has 1,000 newer: its record is gone, so the key holds afresh (record 1,002)...
    fresh, created = await store.reserve(COACH, "checkin_draft", idempotency_key="job-0")
    assert created
    assert str(fresh.reservation_id) != first["job-0"]
    # ...which makes job-1's the 1,000th newer one: gone too.
    fresh, created = await store.reserve(COACH, "checkin_draft", idempotency_key="job-1")
    assert created
    assert str(fresh.reservation_id) != first["job-1"]
    # And the new records replay.
    again, created = await store.reserve(COACH, "checkin_draft", idempotency_key="job-1")
    assert not created
    assert again.reservation_id == fresh.reservation_id


async def test_an_expired_idempotency_record_makes_a_new_hold_not_a_replay(
    redis: Redis, clock: FrozenClock
) -> None:
    store = store_on(redis, clock)
    made, _ = await store.reserve(COACH, "trend_analysis", idempotency_key="nightly")
    # Redis drops the idempotency hash 24 h after its last write at the latest.
    (idem, *_) = idempotency_keys(COACH)
    assert 23 * 3600 * 1000 < await redis.pttl(idem) <= 24 * 3600 * 1000
    clock.advance(24 * 3600 - 0.001)
    again, created = await store.reserve(COACH, "trend_analysis", idempotency_key="nightly")
    assert (again.reservation_id, created) == (made.reservation_id, False)
    clock.advance(0.001)  # 24 hours after it was made: gone
    fresh, created = await store.reserve(COACH, "trend_analysis", idempotency_key="nightly")
    assert created
    assert fresh.reservation_id != made.reservation_id
    # The first hold lapsed long ago; only the new one is held.
    assert fresh.usage.held == 3


async def test_a_replay_finds_its_reservation_after_its_record_was_dropped(
    redis: Redis, clock: FrozenClock
) -> None:
    """The reservation's own record goes with 1,000 newer settlements, while its
    idempotency record lives on: the replay still answers with it, never holds again."""
    store = store_on(redis, clock, allowance=10**6)
    made, _ = await store.reserve(COACH, "trend_analysis", idempotency_key="once")
    await store.commit(str(made.reservation_id))
    for _ in range(5):
        held = await reserve_all(store, [ReserveItem(COACH, "checkin_draft")] * 500)
        await settle_all(store, [str(r.reservation_id) for r in held])
    with pytest.raises(ReservationNotFound):
        await store.get_reservation(str(made.reservation_id))
    again, created = await store.reserve(COACH, "trend_analysis", idempotency_key="once")
    assert (again.reservation_id, created, again.status) == (
        made.reservation_id,
        False,
        Status.COMMITTED,
    )
    assert (again.cost, again.feature, again.expires_at) == (3, "trend_analysis", made.expires_at)
    assert (await store.usage(COACH)).used == 3


# --- live holds ----------------------------------------------------------------------------


async def test_the_thousand_and_first_live_hold_is_too_many_holds(
    redis: Redis, clock: FrozenClock
) -> None:
    store = store_on(redis, clock, allowance=10**6)
    earliest = await store.reserve(COACH, "checkin_draft", ttl_seconds=90)
    await reserve_all(store, [ReserveItem(COACH, "checkin_draft", 3600)] * 999)
    clock.advance(10)
    with pytest.raises(TooManyHolds) as refused:
        await store.reserve(COACH, "trend_analysis")
    assert refused.value.retry_after == 80  # until the earliest hold lapses
    (outcome,) = await store.reserve_many([ReserveItem(COACH, "checkin_draft")])
    assert isinstance(outcome, TooManyHolds)
    assert (await store.usage(COACH)).held == 1000
    # The earliest lapses: its place is free again, and the next is refused again.
    clock.advance(80)
    made, _ = await store.reserve(COACH, "checkin_draft")
    assert made.status is Status.HELD
    assert (await store.get_reservation(str(earliest[0].reservation_id))).status is (Status.EXPIRED)
    with pytest.raises(TooManyHolds):
        await store.reserve(COACH, "checkin_draft")
    await store.refund(str(made.reservation_id))
    await store.reserve(COACH, "checkin_draft")


async def test_too_many_holds_over_http(redis: Redis, clock: FrozenClock) -> None:
    app = create_app(Settings(monthly_allowance=10**6), redis=redis, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as api:
            path = f"/v1/coaches/{COACH}/reservations"
            first = await api.post(path, json={"feature": "checkin_draft", "ttl_seconds": 120})
            assert first.status_code == 201
            for n in (500, 499):
                body = {"reservations": [{"coach_id": COACH, "feature": "checkin_draft"}] * n}
                batch = await api.post("/v1/reservations/batch", json=body)
                assert {i["status"] for i in batch.json()["results"]} == {201}
            clock.advance(20)
            r = await api.post(path, json={"feature": "checkin_draft"})
            assert r.status_code == 429
            assert r.headers["content-type"] == "application/problem+json"
            assert r.headers["Retry-After"] == "100"
            # Holds alone block: the quota fields' `t` is Retry-After.
            assert r.headers["RateLimit"] == f'"monthly";r={10**6 - 1000};t=100'
            problem = r.json()
            assert problem["code"] == "too_many_holds"
            assert problem["status"] == 429
            assert problem["detail"].strip()
            body = {"reservations": [{"coach_id": COACH, "feature": "trend_analysis"}]}
            (item,) = (await api.post("/v1/reservations/batch", json=body)).json()["results"]
            assert item["status"] == 429
            assert item["problem"]["code"] == "too_many_holds"
            assert item["problem"]["retry_after"] == 100
            usage = (await api.get(f"/v1/coaches/{COACH}/usage")).json()
            assert usage["held"] == 1000


# --- the event log ---------------------------------------------------------------------------


actions = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "commit", "refund", "wait", "extend", "grant", "allowance"]),
        st.integers(0, 10**6),
    ),
    min_size=1,
    max_size=60,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events_max=st.integers(1, 6), steps=actions)
async def test_trimmed_events_replayed_on_the_baseline_give_the_counters(
    redis: Redis, events_max: int, steps: list[tuple[str, int]]
) -> None:
    await redis.flushdb()
    clock = FrozenClock(datetime(2099, 11, 14, 12, tzinfo=UTC))
    store = store_on(redis, clock, allowance=20, events_max=events_max)
    issued: list[str] = []
    for action, pick in steps:
        if action == "reserve" or not issued:
            feature = "trend_analysis" if pick % 3 == 0 else "checkin_draft"
            try:
                made, _ = await store.reserve(COACH, feature, ttl_seconds=1 + pick % 120)
            except CreditsError:
                continue
            issued.append(str(made.reservation_id))
        elif action == "wait":
            clock.advance(pick % 150)
        elif action == "extend":
            with contextlib.suppress(CreditsError):
                await store.extend(issued[pick % len(issued)], 1 + pick % 120)
        elif action == "grant":
            with contextlib.suppress(CreditsError):
                await store.grant(COACH, pick % 7 - 3 or 1, f"r|{pick}")
        elif action == "allowance":
            await store.set_allowance(COACH, None if pick % 2 else pick % 30)
        else:
            with contextlib.suppress(CreditsError):
                await (store.commit if action == "commit" else store.refund)(
                    issued[pick % len(issued)]
                )
        page = await store.events(COACH, limit=500)
        assert len(page.events) <= events_max
        assert [e.seq for e in page.events] == list(
            range(page.events[0].seq, page.events[0].seq - len(page.events), -1)
        )
        used, held, granted = page.baseline
        for event in reversed(page.events):
            if event.kind == "held":
                held += event.cost
            elif event.kind == "granted":
                granted += event.credits
            elif event.kind in ("committed", "refunded", "expired"):
                held -= event.cost
                used += event.cost if event.kind == "committed" else 0
        raw = await redis.hmget(period_keys(COACH, NOV).account, ["used", "held", "granted"])
        assert (used, held, granted) == tuple(int(v or 0) for v in raw)


# --- month ends ------------------------------------------------------------------------------


async def test_a_hold_made_the_last_second_of_the_year_is_charged_to_december(
    redis: Redis,
) -> None:
    clock = FrozenClock(datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC))
    store = store_on(redis, clock)
    made, _ = await store.reserve(COACH, "trend_analysis", ttl_seconds=600)
    clock.set(datetime(2100, 1, 1, 0, 0, 30, tzinfo=UTC))
    committed = await store.commit(str(made.reservation_id))
    assert committed.status is Status.COMMITTED
    assert (committed.usage.period, committed.usage.used) == (Period(2099, 12), 3)
    january = await store.usage(COACH)
    assert (january.period, january.used, january.held) == (Period(2100, 1), 0, 0)
    assert [k async for k in redis.scan_iter(match=f"credits:{{{COACH}}}:2100-01:*")] == []
    (event, *_) = (await store.events(COACH, period=Period(2099, 12))).events
    assert (event.kind, event.at) == ("committed", clock())


async def test_a_hold_made_the_last_second_of_the_year_is_charged_to_december_over_http(
    redis: Redis,
) -> None:
    clock = FrozenClock(datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC))
    app = create_app(Settings(), redis=redis, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as api:
            made = await api.post(
                f"/v1/coaches/{COACH}/reservations",
                json={"feature": "trend_analysis", "ttl_seconds": 600},
            )
            assert made.status_code == 201
            assert made.json()["period"] == "2099-12"
            clock.set(datetime(2100, 1, 1, 0, 0, 30, tzinfo=UTC))
            rid = made.json()["reservation_id"]
            committed = await api.post(f"/v1/reservations/{rid}/commit")
            assert committed.status_code == 200, committed.text
            body = committed.json()
            assert (body["status"], body["period"], body["usage"]["used"]) == (
                "committed",
                "2099-12",
                3,
            )
            assert body["usage"]["resets_at"] == "2100-01-01T00:00:00Z"
            january = (await api.get(f"/v1/coaches/{COACH}/usage")).json()
            assert (january["period"], january["used"], january["held"]) == ("2100-01", 0, 0)
            december = (
                await api.get(f"/v1/coaches/{COACH}/events", params={"period": "2099-12"})
            ).json()
            assert [e["kind"] for e in december["events"]] == ["committed", "held"]


def test_the_idempotency_window_is_a_day() -> None:
    assert domain.IDEMPOTENCY_TTL_SECONDS == 24 * 3600
    assert timedelta(seconds=domain.KEY_GRACE_SECONDS) > timedelta(
        seconds=domain.IDEMPOTENCY_TTL_SECONDS + domain.MAX_TTL_SECONDS
    )
