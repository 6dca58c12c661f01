"""Threshold webhooks in the store: the decision in the commit's own script call (once
per coach, period and threshold, also under concurrent commits), the outbox's bounds,
and claiming an attempt."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from app.domain import Period, to_ms
from app.store import AnyRedis, CreditStore, period_keys
from app.store.keys import coach_slot, key_slot_of, outbox_keys
from app.store.replies import text
from app.webhooks.outbox import Delivery, Outbox
from tests.support.clock import FrozenClock
from tests.support.webhooks import spend

URL_A = "http://127.0.0.1:9/a"
URL_B = "https://10.1.2.3:8443/b"


class Handed:
    """Stands in for the dispatcher: what commits handed over, by slot."""

    def __init__(self) -> None:
        self.got: list[tuple[int, list[str]]] = []

    def __call__(self, slot: int, ids: list[str]) -> None:
        self.got.append((slot, ids))

    @property
    def ids(self) -> list[str]:
        return [i for _, some in self.got for i in some]


def with_outbox(store: CreditStore, urls: list[str], keep: int = 1000) -> tuple[Outbox, Handed]:
    outbox = Outbox(store, urls, keep=keep)
    handed = Handed()
    outbox.on_recorded = handed
    store.outbox = outbox
    return outbox, handed


async def records(redis: AnyRedis, coach: str) -> list[Delivery]:
    slot = coach_slot(coach)
    raw = await redis.hgetall(outbox_keys(slot).deliveries)
    return sorted(
        (Delivery.parse(slot, text(k), v) for k, v in raw.items()),
        key=lambda d: (d.threshold, d.url),
    )


async def test_a_commit_that_passes_70_percent_records_one_delivery_per_endpoint(
    store: CreditStore, backend: AnyRedis
) -> None:
    _, handed = with_outbox(store, [URL_A, URL_B])
    await spend(store, "coach-1", 35)  # 70 % exactly: not past it
    assert handed.got == []
    await spend(store, "coach-1", 1)
    [(slot, ids)] = handed.got
    assert slot == coach_slot("coach-1")
    assert key_slot_of(outbox_keys(slot).deliveries) == slot
    found = await records(backend, "coach-1")
    assert sorted(ids) == sorted(d.id for d in found)
    assert [(d.url, d.threshold, d.status, d.attempts) for d in found] == [
        (URL_A, 70, "pending", 0),
        (URL_B, 70, "pending", 0),
    ]
    first = found[0]
    assert first.webhook_id == found[1].webhook_id  # one event, one id on every endpoint
    assert (first.coach_id, first.period, first.used, first.allowance) == (
        "coach-1",
        str(Period.containing(store.clock())),
        36,
        50,
    )
    assert first.next_attempt_at == first.recorded_at  # due at once


async def test_a_commit_passing_several_thresholds_records_one_delivery_per_threshold(
    store: CreditStore, backend: AnyRedis
) -> None:
    _, handed = with_outbox(store, [URL_A])
    reservation, _ = await store.reserve("coach-2", "trend_analysis")
    store.allowance = 3  # lowered while the hold lives: its commit uses all of it
    await store.commit(str(reservation.reservation_id))
    assert [d.threshold for d in await records(backend, "coach-2")] == [70, 90, 100]
    assert len(handed.ids) == 3


async def test_thresholds_are_notified_once_per_period_and_never_rearmed(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    _, handed = with_outbox(store, [URL_A])
    await spend(store, "coach-3", 36)
    assert len(handed.ids) == 1
    store.allowance = 100  # 36 % now: 70 % is passed again later, and not sent again
    await spend(store, "coach-3", 90 - 36)
    assert len(handed.ids) == 1
    await spend(store, "coach-3", 1)
    assert [d.threshold for d in await records(backend, "coach-3")] == [70, 90]
    clock.set(Period.containing(clock()).resets_at + timedelta(hours=1))
    store.allowance = 50
    await spend(store, "coach-3", 36)  # a new period notifies afresh
    assert len(handed.ids) == 3


async def test_refunds_and_repeated_commits_record_nothing(
    store: CreditStore, backend: AnyRedis
) -> None:
    _, handed = with_outbox(store, [URL_A])
    await spend(store, "coach-4", 33)
    last, _ = await store.reserve("coach-4", "trend_analysis")
    await store.commit(str(last.reservation_id))
    assert len(handed.ids) == 1
    await store.commit(str(last.reservation_id))
    refunded, _ = await store.reserve("coach-4", "trend_analysis")
    await store.refund(str(refunded.reservation_id))
    assert len(handed.ids) == 1
    assert len(await records(backend, "coach-4")) == 1


async def test_without_endpoints_a_commit_leaves_no_outbox_and_no_mark(
    store: CreditStore, backend: AnyRedis
) -> None:
    await spend(store, "coach-5", 50)
    assert await records(backend, "coach-5") == []
    account = period_keys("coach-5", Period.containing(store.clock())).account
    assert await backend.hget(account, "wh") is None


async def test_a_batch_settlement_hands_over_what_its_commits_recorded(
    store: CreditStore, backend: AnyRedis
) -> None:
    _, handed = with_outbox(store, [URL_A])
    held = [(await store.reserve("coach-6", "trend_analysis"))[0] for _ in range(16)]
    await store.settle_many([(str(r.reservation_id), "commit") for r in held])
    assert sorted(d.threshold for d in await records(backend, "coach-6")) == [70, 90]
    assert len(handed.ids) == 2


async def test_concurrent_commits_crossing_thresholds_record_exactly_one_delivery_each(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    # Two stores on one Redis stand for two service processes.
    other = CreditStore(backend, clock=clock)
    _, handed = with_outbox(store, [URL_A, URL_B])
    _, handed_other = with_outbox(other, [URL_A, URL_B])
    coaches = [f"busy-{i}" for i in range(4)]
    holds = [
        (await store.reserve(c, "checkin_draft"))[0].reservation_id
        for c in coaches
        for _ in range(50)
    ]
    await asyncio.gather(
        *((store if i % 2 else other).commit(str(rid)) for i, rid in enumerate(holds))
    )
    for coach in coaches:
        found = await records(backend, coach)
        assert [(d.threshold, d.url) for d in found] == [
            (t, u) for t in (70, 90, 100) for u in (URL_A, URL_B)
        ]
    handed_ids = handed.ids + handed_other.ids
    assert len(handed_ids) == len(set(handed_ids)) == len(coaches) * 6


def coaches_in_one_slot(count: int) -> list[str]:
    slot = coach_slot("slot-mate-0")
    found, n = ["slot-mate-0"], 1
    while len(found) < count:
        candidate = f"slot-mate-{n}"
        if coach_slot(candidate) == slot:
            found.append(candidate)
        n += 1
    return found


async def test_an_outbox_keeps_at_most_its_bound_and_nothing_older_than_seven_days(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    with_outbox(store, [URL_A], keep=4)
    first, second, third = coaches_in_one_slot(3)
    keys = outbox_keys(coach_slot(first))
    await spend(store, first, 50)
    clock.advance(seconds=1)
    await spend(store, second, 50)
    # Six recorded, four kept: the newest.
    assert await backend.zcard(keys.log) == 4
    assert await backend.hlen(keys.deliveries) == 4
    kept = [d.coach_id for d in await records(backend, first)]
    assert kept.count(second) == 3
    assert kept.count(first) == 1
    # The outbox goes seven days after its newest delivery.
    for key in (keys.deliveries, keys.due, keys.log):
        assert await backend.pexpiretime(key) == to_ms(clock()) + 7 * 86_400_000
    clock.advance(days=8)  # same month: the old ones age out when the outbox is next written
    await spend(store, third, 36)
    assert [d.coach_id for d in await records(backend, first)] == [third]
    assert await backend.zcard(keys.log) == 1
    assert await backend.zcard(keys.due) == 1


async def test_a_claim_admits_one_attempt_at_a_time(store: CreditStore, backend: AnyRedis) -> None:
    outbox, handed = with_outbox(store, [URL_A])
    await spend(store, "coach-7", 36)
    [(slot, [delivery_id])] = handed.got
    now = outbox.now_ms()
    first = await outbox.claim(slot, delivery_id, now, now + 1000)
    assert first is not None
    assert first.attempts == 1
    assert await outbox.claim(slot, delivery_id, now + 999, now + 2000) is None
    # The claim lapses (its process died): another attempt takes over.
    second = await outbox.claim(slot, delivery_id, now + 1000, now + 3000)
    assert second is not None
    assert second.attempts == 2
    assert (
        await outbox.finish(first, "retry", now_ms=now, next_attempt_ms=now, error="x") == "STALE"
    )
    # A delivery counts whichever attempt made it.
    assert await outbox.finish(first, "delivered", now_ms=now + 1500) == "OK"
    assert await outbox.finish(second, "retry", now_ms=now, next_attempt_ms=now) == "DONE"
    assert await outbox.claim(slot, delivery_id, now + 10_000, now + 20_000) is None
    [done] = await records(backend, "coach-7")
    assert (done.status, done.attempts, done.next_attempt_at) == ("delivered", 2, None)
