"""The ledger in Redis, through CreditStore, on fakeredis and on a real redis-server.

Every test runs on both backends (the ``backend`` fixture); time only moves when a test
moves the frozen clock, so expiry and month boundaries are exact.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from app import domain
from app.domain import MAX_TTL_SECONDS, Level, Period, ReservationId, Status
from app.errors import (
    CreditsExhausted,
    IdempotencyKeyReused,
    InvalidCoachId,
    ReservationCommitted,
    ReservationExpired,
    ReservationNotFound,
    ReservationRefunded,
    UnknownFeature,
)
from app.store import AnyRedis, CreditStore
from tests.support.clock import FrozenClock

#: The tests run in a November far ahead of the real date. Key expiries are absolute
#: instants taken from the frozen clock, and a real Redis deletes at once any key whose
#: expiry is already past in real time: a November that has gone by would empty the
#: ledger under the tests' feet.
YEAR = 2099
NOV = Period(YEAR, 11)
DEC = Period(YEAR, 12)
START = datetime(YEAR, 11, 14, 12, 0, 0, tzinfo=UTC)
COACH = "coach-1"


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(START)


# --- helpers -----------------------------------------------------------------------


Snapshot = dict[str, tuple[str, object, int]]


async def all_keys(backend: AnyRedis, pattern: str = "*") -> list[str]:
    """Key names on every primary (a cluster client asks one node unless told)."""
    r: Any = backend
    if isinstance(backend, RedisCluster):
        names: list[str] = await r.keys(pattern, target_nodes=RedisCluster.PRIMARIES)
    else:
        names = await r.keys(pattern)
    return sorted(names)


async def db_size(backend: AnyRedis) -> int:
    r: Any = backend
    if isinstance(backend, RedisCluster):
        return int(await r.dbsize(target_nodes=RedisCluster.PRIMARIES))
    return int(await r.dbsize())


async def snapshot(backend: AnyRedis) -> Snapshot:
    """Every key with its type, full value and absolute expiry."""
    r: Any = backend
    out: Snapshot = {}
    for key in await all_keys(backend):
        kind = await r.type(key)
        value: object
        if kind == "hash":
            value = await r.hgetall(key)
        elif kind == "zset":
            value = await r.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = await r.lrange(key, 0, -1)
        elif kind == "string":
            value = await r.get(key)
        else:
            value = kind
        out[key] = (kind, value, await r.pexpiretime(key))
    return out


async def warm(store: CreditStore) -> None:
    """Load the scripts (and whatever bookkeeping that writes) before a snapshot, so a
    snapshot compares only what the operation under test does."""
    await store.ensure_scripts()
    await store.usage("warm-up")


async def coach_keys(backend: AnyRedis, coach_id: str) -> list[str]:
    return await all_keys(backend, f"credits:{{{coach_id}}}:*")


async def fill_used(store: CreditStore, coach_id: str, trend: int, checkin: int = 0) -> None:
    for feature, times in (("trend_analysis", trend), ("checkin_draft", checkin)):
        for _ in range(times):
            held, _new = await store.reserve(coach_id, feature)
            await store.commit(str(held.reservation_id))


def seconds(later: datetime, now: datetime) -> int:
    return int((later - now).total_seconds())


# --- reserve, commit, refund -----------------------------------------------------------


async def test_reserve_holds_the_cost(store: CreditStore, clock: FrozenClock) -> None:
    reservation, created = await store.reserve(COACH, "trend_analysis")
    assert created
    assert reservation.status is Status.HELD
    assert reservation.feature == "trend_analysis"
    assert reservation.cost == 3
    assert reservation.reservation_id.coach_id == COACH
    assert reservation.reservation_id.period == NOV
    assert reservation.expires_at == START + timedelta(seconds=domain.DEFAULT_TTL_SECONDS)
    assert reservation.note is None
    assert (reservation.usage.used, reservation.usage.held, reservation.usage.remaining) == (
        0,
        3,
        47,
    )
    usage = await store.usage(COACH)
    assert (usage.used, usage.held, usage.remaining) == (0, 3, 47)
    assert usage.period == NOV
    fetched = await store.get_reservation(str(reservation.reservation_id))
    assert fetched == reservation


async def test_commit_charges_the_hold(store: CreditStore) -> None:
    held, _ = await store.reserve(COACH, "trend_analysis")
    committed = await store.commit(str(held.reservation_id))
    assert committed.status is Status.COMMITTED
    assert committed.reservation_id == held.reservation_id
    assert (committed.usage.used, committed.usage.held, committed.usage.remaining) == (3, 0, 47)
    assert committed.note == "Used 3 credits · 47 of 50 left this month"
    usage = await store.usage(COACH)
    assert (usage.used, usage.held, usage.remaining, usage.percent_used) == (3, 0, 47, 6)


async def test_refund_returns_the_hold(store: CreditStore) -> None:
    held, _ = await store.reserve(COACH, "checkin_draft")
    refunded = await store.refund(str(held.reservation_id))
    assert refunded.status is Status.REFUNDED
    assert refunded.note is None
    assert (refunded.usage.used, refunded.usage.held, refunded.usage.remaining) == (0, 0, 50)
    usage = await store.usage(COACH)
    assert (usage.used, usage.held, usage.remaining) == (0, 0, 50)


async def test_commit_repeated_returns_the_same_outcome_and_charges_once(
    store: CreditStore, clock: FrozenClock
) -> None:
    held, _ = await store.reserve(COACH, "trend_analysis")
    rid = str(held.reservation_id)
    first = await store.commit(rid)
    clock.advance(10)
    second = await store.commit(rid)
    # Even past the hold's expiry a committed reservation stays committed.
    clock.advance(3600)
    third = await store.commit(rid)
    assert first == second == third
    assert third.note == "Used 3 credits · 47 of 50 left this month"
    usage = await store.usage(COACH)
    assert (usage.used, usage.held) == (3, 0)


async def test_refund_repeated_refunds_once(store: CreditStore) -> None:
    keep, _ = await store.reserve(COACH, "checkin_draft")
    held, _ = await store.reserve(COACH, "trend_analysis")
    rid = str(held.reservation_id)
    outcomes = [await store.refund(rid) for _ in range(3)]
    assert all(o.status is Status.REFUNDED for o in outcomes)
    assert outcomes[0] == outcomes[1] == outcomes[2]
    # A second refund must not give back credits it never held: held stays at 1, not -2.
    usage = await store.usage(COACH)
    assert (usage.used, usage.held, usage.remaining) == (0, 1, 49)
    assert (await store.get_reservation(str(keep.reservation_id))).status is Status.HELD


async def test_commit_after_refund_is_refused(store: CreditStore) -> None:
    held, _ = await store.reserve(COACH, "trend_analysis")
    rid = str(held.reservation_id)
    await store.refund(rid)
    with pytest.raises(ReservationRefunded) as caught:
        await store.commit(rid)
    assert caught.value.code == "reservation_refunded"
    assert caught.value.reservation_id == rid
    usage = await store.usage(COACH)
    assert (usage.used, usage.held) == (0, 0)
    assert (await store.get_reservation(rid)).status is Status.REFUNDED


async def test_refund_after_commit_is_refused(store: CreditStore) -> None:
    held, _ = await store.reserve(COACH, "trend_analysis")
    rid = str(held.reservation_id)
    await store.commit(rid)
    with pytest.raises(ReservationCommitted) as caught:
        await store.refund(rid)
    assert caught.value.code == "reservation_committed"
    usage = await store.usage(COACH)
    assert (usage.used, usage.held) == (3, 0)
    assert (await store.get_reservation(rid)).status is Status.COMMITTED


# --- expiry ------------------------------------------------------------------------------


async def test_a_hold_is_live_until_its_expiry_instant(
    store: CreditStore, clock: FrozenClock
) -> None:
    held, _ = await store.reserve(COACH, "trend_analysis", ttl_seconds=60)
    rid = str(held.reservation_id)
    clock.set(held.expires_at - timedelta(milliseconds=1))
    assert (await store.get_reservation(rid)).status is Status.HELD
    assert (await store.usage(COACH)).held == 3
    clock.set(held.expires_at)
    assert (await store.get_reservation(rid)).status is Status.EXPIRED
    assert (await store.usage(COACH)).held == 0


async def test_an_expired_hold_returns_its_credits_by_itself(
    store: CreditStore, clock: FrozenClock
) -> None:
    held, _ = await store.reserve(COACH, "trend_analysis", ttl_seconds=60)
    rid = str(held.reservation_id)
    clock.advance(61)
    # No refund, commit or other write in between: reading alone shows them back.
    usage = await store.usage(COACH)
    assert (usage.used, usage.held, usage.remaining) == (0, 0, 50)
    expired = await store.get_reservation(rid)
    assert expired.status is Status.EXPIRED
    assert expired.usage.held == 0

    with pytest.raises(ReservationExpired) as caught:
        await store.commit(rid)
    assert caught.value.code == "reservation_expired"
    refunded = await store.refund(rid)
    assert refunded.status is Status.EXPIRED
    again = await store.refund(rid)
    assert again.status is Status.EXPIRED
    with pytest.raises(ReservationExpired):
        await store.commit(rid)
    usage = await store.usage(COACH)
    assert (usage.used, usage.held, usage.remaining) == (0, 0, 50)


async def test_lapsed_holds_can_be_reserved_again(store: CreditStore, clock: FrozenClock) -> None:
    for _ in range(16):
        await store.reserve(COACH, "trend_analysis", ttl_seconds=30)
    await store.reserve(COACH, "checkin_draft", ttl_seconds=30)
    await store.reserve(COACH, "checkin_draft", ttl_seconds=30)
    with pytest.raises(CreditsExhausted):
        await store.reserve(COACH, "checkin_draft")
    clock.advance(30)
    for _ in range(16):
        await store.reserve(COACH, "trend_analysis")
    usage = await store.usage(COACH)
    assert (usage.used, usage.held, usage.remaining) == (0, 48, 2)
    with pytest.raises(CreditsExhausted):
        await store.reserve(COACH, "trend_analysis")


@pytest.mark.parametrize("ttl", [1, 300, MAX_TTL_SECONDS])
async def test_ttl_seconds_sets_the_expiry(store: CreditStore, ttl: int) -> None:
    held, _ = await store.reserve(COACH, "checkin_draft", ttl_seconds=ttl)
    assert held.expires_at == START + timedelta(seconds=ttl)
    fetched = await store.get_reservation(str(held.reservation_id))
    assert fetched.expires_at == START + timedelta(seconds=ttl)


async def test_the_default_ttl_is_configurable(backend: AnyRedis, clock: FrozenClock) -> None:
    store = CreditStore(backend, default_ttl_seconds=42, clock=clock)
    held, _ = await store.reserve(COACH, "checkin_draft")
    assert held.expires_at == START + timedelta(seconds=42)


# --- month boundary ----------------------------------------------------------------------


async def test_a_hold_made_in_november_is_charged_to_november(
    store: CreditStore, clock: FrozenClock
) -> None:
    clock.set(datetime(YEAR, 11, 30, 23, 59, 30, tzinfo=UTC))
    held, _ = await store.reserve(COACH, "trend_analysis")
    assert held.reservation_id.period == NOV
    clock.set(datetime(YEAR, 12, 1, 0, 1, 0, tzinfo=UTC))

    december = await store.usage(COACH)
    assert december.period == DEC
    assert (december.used, december.held, december.remaining) == (0, 0, 50)

    committed = await store.commit(str(held.reservation_id))
    assert committed.status is Status.COMMITTED
    assert committed.reservation_id.period == NOV
    assert committed.usage.period == NOV
    assert (committed.usage.used, committed.usage.held) == (3, 0)
    # Committed in December: the note names the month its figures are for.
    assert committed.note == "Used 3 credits · 47 of 50 left for November"

    december = await store.usage(COACH)
    assert (december.used, december.held, december.remaining) == (0, 0, 50)
    clock.set(datetime(YEAR, 11, 30, 23, 59, 59, tzinfo=UTC))
    november = await store.usage(COACH)
    assert (november.period, november.used, november.held) == (NOV, 3, 0)


async def test_a_full_november_does_not_limit_december(
    store: CreditStore, clock: FrozenClock
) -> None:
    await fill_used(store, COACH, trend=16, checkin=2)
    with pytest.raises(CreditsExhausted):
        await store.reserve(COACH, "checkin_draft")
    clock.set(DEC.starts_at)
    held, _ = await store.reserve(COACH, "trend_analysis")
    assert held.reservation_id.period == DEC
    assert (held.usage.used, held.usage.held, held.usage.remaining) == (0, 3, 47)


async def test_a_november_hold_still_expires_by_itself_in_december(
    store: CreditStore, clock: FrozenClock
) -> None:
    clock.set(datetime(YEAR, 11, 30, 23, 59, 30, tzinfo=UTC))
    held, _ = await store.reserve(COACH, "trend_analysis", ttl_seconds=60)
    clock.set(datetime(YEAR, 12, 1, 0, 0, 31, tzinfo=UTC))
    with pytest.raises(ReservationExpired):
        await store.commit(str(held.reservation_id))
    refunded = await store.refund(str(held.reservation_id))
    assert refunded.status is Status.EXPIRED
    assert (refunded.usage.period, refunded.usage.used, refunded.usage.held) == (NOV, 0, 0)


# --- key expiry ----------------------------------------------------------------------------


async def test_period_keys_expire_after_the_longest_hold_and_within_40_days(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    r: Any = backend
    # A hold made in the last second of the month, with the longest TTL.
    clock.set(datetime(YEAR, 11, 30, 23, 59, 59, tzinfo=UTC))
    late, _ = await store.reserve(COACH, "trend_analysis", ttl_seconds=MAX_TTL_SECONDS)
    held, _ = await store.reserve(COACH, "checkin_draft", idempotency_key="k-1")
    await store.commit(str(held.reservation_id))
    keys = await coach_keys(backend, COACH)
    period_keys = [k for k in keys if f":{NOV}:" in k]
    assert {k.rsplit(":", 1)[1] for k in period_keys} == {"account", "holds", "events"}
    low = domain.to_ms(NOV.resets_at) + MAX_TTL_SECONDS * 1000
    high = domain.to_ms(NOV.resets_at + timedelta(days=40))
    for key in period_keys:
        expire_at = await r.pexpiretime(key)
        assert low <= expire_at <= high, key
    # The last hold of the month can still be settled an hour into the next one.
    clock.set(late.expires_at - timedelta(seconds=1))
    assert (await store.commit(str(late.reservation_id))).status is Status.COMMITTED
    # The idempotency record is kept at least a day, whatever the period.
    idem = [k for k in keys if ":idem:" in k]
    assert len(idem) == 1
    assert await r.pttl(idem[0]) > 24 * 3600 * 1000


async def test_every_key_written_expires(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    r: Any = backend
    await warm(store)
    before = set(await all_keys(backend))
    held, _ = await store.reserve(COACH, "trend_analysis", idempotency_key="a", ttl_seconds=5)
    await store.reserve(COACH, "checkin_draft", idempotency_key="b")
    clock.advance(10)
    await store.reserve(COACH, "checkin_draft")
    await store.refund(str(held.reservation_id))
    created = set(await all_keys(backend)) - before
    assert created
    for key in created:
        assert await r.pexpiretime(key) > 0, key


async def test_keys_emptied_and_made_again_expire_too(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    """A key gets its expiry from the call that creates it: the holds set is deleted when
    its last hold goes and made again by the next reserve, and the event log can start
    mid-month when the log is switched on."""
    r: Any = backend
    quiet = CreditStore(backend, events_max=0, clock=clock)
    first, _ = await quiet.reserve(COACH, "checkin_draft", ttl_seconds=5)
    assert {k.rsplit(":", 1)[1] for k in await coach_keys(backend, COACH)} == {"account", "holds"}
    await store.commit(str(first.reservation_id))  # the log starts here; the holds go
    assert {k.rsplit(":", 1)[1] for k in await coach_keys(backend, COACH)} == {"account", "events"}
    clock.advance(10)  # past the committed hold's expiry: `next` is now stale
    second, _ = await store.reserve(COACH, "trend_analysis", ttl_seconds=5)
    clock.advance(10)
    await store.reserve(COACH, "checkin_draft")  # sweeps the lapsed one, keeps the set
    keys = await coach_keys(backend, COACH)
    assert {k.rsplit(":", 1)[1] for k in keys} == {"account", "holds", "events"}
    want = domain.to_ms(NOV.keys_expire_at)
    for key in keys:
        assert await r.pexpiretime(key) == want, key
    assert (await store.get_reservation(str(second.reservation_id))).status is Status.EXPIRED
    usage = await store.usage(COACH)
    assert (usage.used, usage.held) == (1, 1)


async def test_an_account_without_next_still_releases_its_lapsed_holds(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    """Accounts written before the earliest-expiry field existed lack it: their holds are
    looked at on the next call, which releases what lapsed and sets the field."""
    r: Any = backend
    for _ in range(16):
        await store.reserve(COACH, "trend_analysis", ttl_seconds=30)
    account = f"credits:{{{COACH}}}:{NOV}:account"
    assert await r.hdel(account, "next") == 1
    clock.advance(31)
    await store.reserve(COACH, "trend_analysis")  # would not fit if nothing were released
    usage = await store.usage(COACH)
    assert (usage.used, usage.held) == (0, 3)
    assert int(await r.hget(account, "next")) == domain.to_ms(clock() + timedelta(minutes=5))


async def test_usage_reads_see_lapsed_holds_whatever_next_says(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    """Reads skip the holds only while no hold can have lapsed."""
    r: Any = backend
    soon, _ = await store.reserve(COACH, "trend_analysis", ttl_seconds=10)
    late, _ = await store.reserve(COACH, "checkin_draft", ttl_seconds=600)
    assert (await store.usage(COACH)).held == 4
    clock.advance(11)
    assert (await store.usage(COACH)).held == 1
    await store.refund(str(late.reservation_id))  # sweeps `soon`, then refunds `late`
    assert (await store.usage(COACH)).held == 0
    account = f"credits:{{{COACH}}}:{NOV}:account"
    assert await r.hget(account, "held") == "0"
    assert (await store.get_reservation(str(soon.reservation_id))).status is Status.EXPIRED


# --- reading ---------------------------------------------------------------------------------


async def test_usage_of_a_never_seen_coach_is_untouched_and_writes_nothing(
    store: CreditStore, backend: AnyRedis
) -> None:
    await warm(store)
    await store.reserve("someone-else", "checkin_draft")
    before = await snapshot(backend)
    size = await db_size(backend)
    usage = await store.usage("never-seen")
    assert usage.coach_id == "never-seen"
    assert (usage.used, usage.held, usage.remaining, usage.allowance) == (0, 0, 50, 50)
    assert usage.percent_used == 0
    assert usage.level is Level.GREEN
    assert usage.period == NOV
    assert usage.resets_at == datetime(YEAR, 12, 1, tzinfo=UTC)
    assert all(f.available for f in usage.features)
    many = await store.usage_many(["never-seen", "never-seen-2"])
    assert [u.remaining for u in many] == [50, 50]
    assert await db_size(backend) == size
    assert await snapshot(backend) == before


async def test_usage_features_say_what_still_fits(store: CreditStore) -> None:
    await fill_used(store, COACH, trend=16)
    usage = await store.usage(COACH)
    assert usage.remaining == 2
    assert {f.feature: (f.cost, f.available) for f in usage.features} == {
        "checkin_draft": (1, True),
        "trend_analysis": (3, False),
    }
    assert usage.level is Level.RED
    assert usage.percent_used == 96


async def test_usage_many_keeps_request_order_with_duplicates_and_unknowns(
    store: CreditStore,
) -> None:
    a, _ = await store.reserve("a", "trend_analysis")
    await store.commit(str(a.reservation_id))
    await store.reserve("b", "checkin_draft")
    ids = ["b", "a", "never", "b", "a"]
    items = await store.usage_many(ids)
    assert [u.coach_id for u in items] == ids
    assert [(u.used, u.held) for u in items] == [(0, 1), (3, 0), (0, 0), (0, 1), (3, 0)]
    assert await store.usage_many([]) == []


async def test_invalid_coach_ids_are_refused_everywhere_and_write_nothing(
    store: CreditStore, backend: AnyRedis
) -> None:
    await warm(store)
    before = await snapshot(backend)
    for bad in ["", "{c}", "a b", "a/b", "-a", "x" * 129, "caf\u00e9", "a\n"]:
        with pytest.raises(InvalidCoachId) as caught:
            await store.reserve(bad, "checkin_draft")
        assert caught.value.code == "invalid_coach_id"
        with pytest.raises(InvalidCoachId):
            await store.usage(bad)
        with pytest.raises(InvalidCoachId):
            await store.usage_many(["ok", bad])
    assert await snapshot(backend) == before


async def test_unknown_feature_is_refused_and_writes_nothing(
    store: CreditStore, backend: AnyRedis
) -> None:
    await warm(store)
    before = await snapshot(backend)
    with pytest.raises(UnknownFeature) as caught:
        await store.reserve(COACH, "meal_plan")
    assert caught.value.code == "unknown_feature"
    assert "checkin_draft" in caught.value.detail
    with pytest.raises(UnknownFeature):
        await store.reserve(COACH, "meal_plan", idempotency_key="k")
    assert await snapshot(backend) == before


# --- unknown and made-up reservation ids ----------------------------------------------------------


def _flip(text: str, index: int) -> str:
    char = "B" if text[index] == "A" else "A"
    return text[:index] + char + text[index + 1 :]


async def test_unknown_altered_and_made_up_ids_are_not_found_and_change_nothing(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    real, _ = await store.reserve(COACH, "trend_analysis", ttl_seconds=30)
    committed, _ = await store.reserve(COACH, "checkin_draft")
    await store.commit(str(committed.reservation_id))
    # A lapsed hold is waiting to be swept: a miss must not sweep it either.
    clock.advance(60)
    await warm(store)
    before = await snapshot(backend)
    text = str(real.reservation_id)
    coach_part, _period, token = text.split(".")
    made_up = [
        str(ReservationId.new(COACH, NOV)),
        str(ReservationId.new(COACH, DEC)),
        str(ReservationId.new("never-seen", NOV)),
        str(ReservationId.of(COACH, DEC, real.reservation_id.token)),
        str(ReservationId.of(COACH, Period(YEAR - 1, 11), real.reservation_id.token)),
        str(ReservationId.of("coach-2", NOV, real.reservation_id.token)),
        _flip(text, len(text) - 5),
        _flip(text, len(coach_part) + 8 + 3),
        text[:-1],
        text + "A",
        f"{coach_part}.{YEAR}13.{token}",
        f"{coach_part}.{YEAR}11.{token}=",
        "",
        "nope",
        "../../etc/passwd",
        "credits:{coach-1}:2099-11:account",
        "a.b.c",
    ]
    for rid in made_up:
        assert rid != text
        with pytest.raises(ReservationNotFound) as caught:
            await store.get_reservation(rid)
        assert caught.value.code == "reservation_not_found"
        with pytest.raises(ReservationNotFound):
            await store.commit(rid)
        with pytest.raises(ReservationNotFound):
            await store.refund(rid)
    assert await snapshot(backend) == before
    # The real ones are still there.
    assert (await store.get_reservation(text)).status is Status.EXPIRED
    committed_now = await store.get_reservation(str(committed.reservation_id))
    assert committed_now.status is Status.COMMITTED


async def test_a_hold_settles_alike_where_it_was_made_and_elsewhere(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    """The store that made a hold knows its id already; another process reads it from
    its text. Both must come to the same reservation."""
    other = CreditStore(backend, clock=clock)
    here, _ = await store.reserve(COACH, "trend_analysis")
    there, _ = await store.reserve(COACH, "checkin_draft")
    committed_here = await store.commit(str(here.reservation_id))
    committed_there = await other.commit(str(there.reservation_id))
    assert committed_here.reservation_id == here.reservation_id
    assert committed_there.reservation_id == there.reservation_id
    assert str(committed_there.reservation_id) == str(there.reservation_id)
    assert (committed_here.status, committed_there.status) == (Status.COMMITTED,) * 2
    with pytest.raises(ReservationCommitted):
        await other.refund(str(here.reservation_id))
    with pytest.raises(ReservationCommitted):
        await store.refund(str(there.reservation_id))


# --- idempotency ------------------------------------------------------------------------


async def test_the_same_key_replays_the_same_reservation(store: CreditStore) -> None:
    first, first_new = await store.reserve(COACH, "trend_analysis", idempotency_key="k-1")
    second, second_new = await store.reserve(COACH, "trend_analysis", idempotency_key="k-1")
    assert (first_new, second_new) == (True, False)
    assert second.reservation_id == first.reservation_id
    assert second.status is Status.HELD
    assert second.expires_at == first.expires_at
    usage = await store.usage(COACH)
    assert (usage.used, usage.held) == (0, 3)


async def test_the_same_key_with_another_feature_is_refused(store: CreditStore) -> None:
    await store.reserve(COACH, "trend_analysis", idempotency_key="k-1")
    with pytest.raises(IdempotencyKeyReused) as caught:
        await store.reserve(COACH, "checkin_draft", idempotency_key="k-1")
    assert caught.value.code == "idempotency_key_reused"
    usage = await store.usage(COACH)
    assert (usage.used, usage.held) == (0, 3)


async def test_keys_are_scoped_to_the_principal_and_the_coach(store: CreditStore) -> None:
    a, _ = await store.reserve(COACH, "trend_analysis", idempotency_key="k", principal="p1")
    b, b_new = await store.reserve(COACH, "trend_analysis", idempotency_key="k", principal="p2")
    c, c_new = await store.reserve("coach-2", "trend_analysis", idempotency_key="k", principal="p1")
    # Another principal may even use the same key for another feature.
    d, d_new = await store.reserve(COACH, "checkin_draft", idempotency_key="k", principal="p3")
    assert (b_new, c_new, d_new) == (True, True, True)
    assert len({a.reservation_id, b.reservation_id, c.reservation_id, d.reservation_id}) == 4
    assert (await store.usage(COACH)).held == 7
    assert (await store.usage("coach-2")).held == 3


async def test_a_replay_reports_the_current_state(store: CreditStore, clock: FrozenClock) -> None:
    committed, _ = await store.reserve(COACH, "trend_analysis", idempotency_key="c")
    await store.commit(str(committed.reservation_id))
    refunded, _ = await store.reserve(COACH, "trend_analysis", idempotency_key="r")
    await store.refund(str(refunded.reservation_id))
    lapsing, _ = await store.reserve(COACH, "trend_analysis", idempotency_key="e", ttl_seconds=5)
    clock.advance(6)

    expected = {"c": (committed, Status.COMMITTED), "r": (refunded, Status.REFUNDED)}
    expected["e"] = (lapsing, Status.EXPIRED)
    for key, (original, status) in expected.items():
        replay, new = await store.reserve(COACH, "trend_analysis", idempotency_key=key)
        assert not new
        assert replay.reservation_id == original.reservation_id
        assert replay.status is status, key
    # Replays never hold again, not even for the refunded or expired ones.
    usage = await store.usage(COACH)
    assert (usage.used, usage.held) == (3, 0)


async def test_a_replay_after_the_month_turned_returns_the_earlier_reservation(
    store: CreditStore, clock: FrozenClock
) -> None:
    clock.set(datetime(YEAR, 11, 30, 23, 59, 30, tzinfo=UTC))
    first, _ = await store.reserve(COACH, "trend_analysis", idempotency_key="k")
    clock.set(datetime(YEAR, 12, 1, 0, 0, 10, tzinfo=UTC))
    replay, new = await store.reserve(COACH, "trend_analysis", idempotency_key="k")
    assert not new
    assert replay.reservation_id == first.reservation_id
    assert replay.reservation_id.period == NOV
    assert replay.status is Status.HELD
    december = await store.usage(COACH)
    assert (december.used, december.held) == (0, 0)


async def test_raw_idempotency_keys_never_appear_in_key_names(
    store: CreditStore, backend: AnyRedis
) -> None:
    raw = "{evil}:key with spaces*"
    held, _ = await store.reserve(COACH, "checkin_draft", idempotency_key=raw, principal="p")
    await store.commit(str(held.reservation_id))
    replay, _ = await store.reserve(COACH, "checkin_draft", idempotency_key=raw, principal="p")
    assert replay.reservation_id == held.reservation_id
    names = await all_keys(backend)
    assert names
    for name in names:
        assert "evil" not in name
        assert "spaces" not in name
    assert await coach_keys(backend, "evil") == []


# --- exhaustion ---------------------------------------------------------------------------


async def test_exhausted_by_a_partial_shortfall(store: CreditStore, clock: FrozenClock) -> None:
    await fill_used(store, COACH, trend=16)
    with pytest.raises(CreditsExhausted) as caught:
        await store.reserve(COACH, "trend_analysis")
    error = caught.value
    assert error.code == "credits_exhausted"
    assert (error.feature, error.cost, error.remaining) == ("trend_analysis", 3, 2)
    assert error.resets_at == datetime(YEAR, 12, 1, tzinfo=UTC)
    assert error.retry_after == seconds(error.resets_at, clock.now) == 16 * 86400 + 12 * 3600
    assert error.detail == (
        "Client trend analysis needs 3 credits and you have 2 left this month. "
        "Credits refresh on December 1 at 00:00 UTC."
    )
    # What still fits still works.
    held, _ = await store.reserve(COACH, "checkin_draft")
    assert held.usage.remaining == 1


async def test_exhausted_when_everything_is_used(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    await fill_used(store, COACH, trend=16, checkin=2)
    clock.advance(hours=36)
    await warm(store)
    before = await snapshot(backend)
    for feature, cost in (("checkin_draft", 1), ("trend_analysis", 3)):
        with pytest.raises(CreditsExhausted) as caught:
            await store.reserve(COACH, feature, idempotency_key=f"k-{feature}")
        error = caught.value
        assert (error.feature, error.cost, error.remaining) == (feature, cost, 0)
        assert error.retry_after == seconds(NOV.resets_at, clock.now) == 15 * 86400
        assert error.detail == (
            "You've used all 50 AI credits for November. They refresh on December 1 at 00:00 UTC."
        )
    # Nothing else about the coach changes, and the refused key is not remembered.
    assert await snapshot(backend) == before


async def test_exhausted_only_because_of_holds_waits_for_the_first_hold(
    store: CreditStore, clock: FrozenClock
) -> None:
    await fill_used(store, COACH, trend=10)
    await store.reserve(COACH, "trend_analysis", ttl_seconds=600)
    await store.reserve(COACH, "trend_analysis", ttl_seconds=120)
    for _ in range(4):
        await store.reserve(COACH, "trend_analysis", ttl_seconds=900)
    clock.advance(30)
    usage = await store.usage(COACH)
    assert (usage.used, usage.held, usage.remaining) == (30, 18, 2)

    with pytest.raises(CreditsExhausted) as caught:
        await store.reserve(COACH, "trend_analysis")
    error = caught.value
    assert (error.feature, error.cost, error.remaining) == ("trend_analysis", 3, 2)
    assert error.resets_at == NOV.resets_at
    assert error.retry_after == 90
    assert error.detail == domain.exhausted_detail(
        feature="trend_analysis",
        cost=3,
        allowance=50,
        used=30,
        held=18,
        period=NOV,
        hold_wait_seconds=90,
    )
    assert "tied up in AI actions still in progress" in error.detail
    # And once that hold lapses, the reservation fits.
    clock.advance(90)
    held, _ = await store.reserve(COACH, "trend_analysis")
    assert held.usage.held == 18


async def test_holds_do_not_shorten_the_wait_when_used_alone_leaves_no_room(
    store: CreditStore, clock: FrozenClock
) -> None:
    await fill_used(store, COACH, trend=16)
    await store.reserve(COACH, "checkin_draft", ttl_seconds=60)
    with pytest.raises(CreditsExhausted) as caught:
        await store.reserve(COACH, "trend_analysis")
    error = caught.value
    assert error.remaining == 1
    assert error.retry_after == seconds(NOV.resets_at, clock.now)
    assert error.detail == (
        "Client trend analysis needs 3 credits and you have 1 left this month. "
        "Credits refresh on December 1 at 00:00 UTC."
    )


# --- layout and robustness ------------------------------------------------------------------


async def test_all_keys_of_a_coach_share_one_cluster_slot(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    await warm(store)
    before = set(await all_keys(backend))
    for coach in ("coach-1", "org:team@example.com", "Z.9_x-y"):
        held, _ = await store.reserve(coach, "trend_analysis", idempotency_key="{k}")
        await store.commit(str(held.reservation_id))
        other, _ = await store.reserve(coach, "checkin_draft", idempotency_key="k2")
        await store.refund(str(other.reservation_id))
        await store.reserve(coach, "checkin_draft", ttl_seconds=1)
        clock.advance(2)
        await store.reserve(coach, "checkin_draft")
        created = set(await all_keys(backend)) - before
        assert created
        slot = key_slot(coach.encode())
        for name in created:
            assert f"{{{coach}}}" in name, name
            assert key_slot(name.encode()) == slot, name
        before |= created


async def test_scripts_are_reloaded_after_script_flush(
    store: CreditStore, backend: AnyRedis
) -> None:
    r: Any = backend
    held, _ = await store.reserve(COACH, "trend_analysis")
    await r.script_flush()
    committed = await store.commit(str(held.reservation_id))
    assert committed.status is Status.COMMITTED
    await r.script_flush()
    assert (await store.usage(COACH)).used == 3
    await r.script_flush()
    again, _ = await store.reserve(COACH, "checkin_draft")
    await r.script_flush()
    assert (await store.get_reservation(str(again.reservation_id))).status is Status.HELD
    await r.script_flush()
    assert (await store.refund(str(again.reservation_id))).status is Status.REFUNDED
    await r.script_flush()
    usage = (await store.usage_many([COACH, "other"]))[0]
    assert (usage.used, usage.held) == (3, 0)


async def test_a_configured_allowance_and_cost_table_are_honoured(
    backend: AnyRedis, clock: FrozenClock
) -> None:
    store = CreditStore(backend, allowance=5, feature_costs={"a": 2}, clock=clock)
    first, _ = await store.reserve(COACH, "a")
    assert first.cost == 2
    await store.commit(str(first.reservation_id))
    second, _ = await store.reserve(COACH, "a")
    assert (second.usage.used, second.usage.held, second.usage.remaining) == (2, 2, 1)
    assert second.usage.allowance == 5
    with pytest.raises(CreditsExhausted) as caught:
        await store.reserve(COACH, "a")
    assert (caught.value.cost, caught.value.remaining) == (2, 1)
    with pytest.raises(UnknownFeature):
        await store.reserve(COACH, "checkin_draft")
    committed = await store.commit(str(second.reservation_id))
    assert committed.note == "Used 2 credits · 1 of 5 left this month"
    usage = await store.usage(COACH)
    assert (usage.used, usage.remaining, usage.percent_used) == (4, 1, 80)
    assert usage.level is Level.AMBER
    assert [(f.feature, f.cost, f.available) for f in usage.features] == [("a", 2, False)]
    with pytest.raises(CreditsExhausted) as exhausted:
        await store.reserve(COACH, "a")
    assert exhausted.value.detail == (
        "A needs 2 credits and you have 1 left this month. "
        "Credits refresh on December 1 at 00:00 UTC."
    )
