"""Model-based test: random call sequences against the real store and the reference
model side by side, on fakeredis (many examples) and on a real Redis (fewer).

After every step the store's counters, each reservation's state and the allowance
invariant are compared with ``tests.support.reference.Ledger``. Coaches' own allowances
are set and deleted, grants (positive and negative, some with an Idempotency-Key) made
and holds extended along the way. The clock moves in small steps,
past expiries and across month ends (December to January included), so periods,
lapsed holds and replays across periods are all exercised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TypeVar

import fakeredis
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from app.domain import Grant, Period, Reservation, ReservationId, Status, Usage, from_ms
from app.errors import (
    CreditsError,
    CreditsExhausted,
    ExtensionLimit,
    GrantExceedsRemaining,
    GrantLimit,
    IdempotencyKeyReused,
    ReservationCommitted,
    ReservationExpired,
    ReservationNotFound,
    ReservationRefunded,
    TooManyHolds,
)
from app.store import AnyRedis, CreditStore, ReserveItem, SettleAction, period_keys
from tests.support.clock import FrozenClock
from tests.support.ledger_view import stored_records
from tests.support.redis import RedisProcess
from tests.support.reference import (
    Counters,
    Decision,
    GrantKind,
    Kind,
    Ledger,
    RefGrant,
    RefReservation,
    Settle,
)

T = TypeVar("T")

ALLOWANCE = 50
COACHES = ("ada", "bob", "cy.d", "dee@x")
FEATURES = ("checkin_draft", "trend_analysis")
KEYS = ("k1", "k2", "k3")
PRINCIPALS = ("", "svc-b")
#: Late in the year, so a few month jumps reach December to January; in the future, so
#: the period keys' real expiry (derived from this clock) never removes them mid-test.
START = datetime(2427, 10, 30, 9, 0, tzinfo=UTC)

_STATES = {"h": Status.HELD, "c": Status.COMMITTED, "r": Status.REFUNDED, "e": Status.EXPIRED}


class LedgerMachine(RuleBasedStateMachine):
    reservations = Bundle("reservations")
    #: How each example gets a fresh, empty Redis; set by the test that runs the machine.
    connect: ClassVar[Callable[[], AnyRedis]]

    def __init__(self) -> None:
        super().__init__()
        # The machine is synchronous; one private loop drives every async call.
        self.loop = asyncio.new_event_loop()
        self.redis = type(self).connect()
        self.run(self.redis.flushdb())
        self.clock = FrozenClock(START)
        self.store = CreditStore(self.redis, allowance=ALLOWANCE, clock=self.clock)
        self.model = Ledger(allowance=ALLOWANCE)
        self.last_reserve: tuple[str, str, int, str | None, str] | None = None
        self.last_grant: tuple[str, int, str, str | None, str] | None = None
        #: What the invariant must look at again: the coaches named since it last ran,
        #: and every coach once the clock has moved.
        self.touched: set[str] = set()
        self.checked_at: datetime | None = None

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def touch(self, *coaches: str) -> None:
        """Note the coaches a step asks the store about."""
        self.touched.update(coaches)

    def teardown(self) -> None:
        self.run(self.redis.aclose())
        self.loop.close()

    # --- helpers ------------------------------------------------------------------------

    def check_usage(self, res: Reservation, period: Period) -> None:
        want = self.model.counters(res.reservation_id.coach_id, period, self.clock())
        assert res.reservation_id.period == period
        assert (res.usage.used, res.usage.held) == (want.used, want.held), (res, want)
        same_allowance(res.usage, want)

    def check_same(self, res: Reservation, ref: RefReservation) -> None:
        assert str(res.reservation_id) == ref.rid
        assert res.status is ref.state_at(self.clock()), (res.status, ref)
        assert (res.feature, res.cost, res.expires_at) == (ref.feature, ref.cost, ref.expires_at)
        self.check_usage(res, ref.period)

    async def attempt(
        self, coach: str, feature: str, ttl: int, key: str | None, principal: str
    ) -> tuple[Reservation, bool] | CreditsExhausted | IdempotencyKeyReused | TooManyHolds:
        try:
            return await self.store.reserve(
                coach, feature, ttl_seconds=ttl, idempotency_key=key, principal=principal
            )
        except (CreditsExhausted, IdempotencyKeyReused, TooManyHolds) as exc:
            return exc

    def do_reserve(
        self, coach: str, feature: str, ttl: int, key: str | None, principal: str
    ) -> list[str]:
        self.last_reserve = (coach, feature, ttl, key, principal)
        self.touch(coach)
        now = self.clock()
        decision = self.model.reserve(
            coach, feature, now, ttl_seconds=ttl, idempotency_key=key, principal=principal
        )
        outcome = self.run(self.attempt(coach, feature, ttl, key, principal))
        return self.compare_reserve(decision, outcome)

    def compare_reserve(self, decision: Decision, outcome: object) -> list[str]:
        """Check one reserve outcome against the model's decision, and record a new hold."""
        if isinstance(outcome, CreditsExhausted):
            assert decision.kind is Kind.EXHAUSTED, decision
            assert decision.counters is not None
            assert outcome.remaining == decision.counters.remaining
            assert outcome.allowance == decision.counters.allowance
            assert outcome.remaining < outcome.cost == decision.cost
            return []
        if isinstance(outcome, IdempotencyKeyReused):
            assert decision.kind is Kind.REUSED, decision
            return []
        if isinstance(outcome, TooManyHolds):
            assert decision.kind is Kind.TOO_MANY, decision
            return []
        assert isinstance(outcome, tuple), outcome
        res, created = outcome
        assert isinstance(res, Reservation)
        if decision.kind is Kind.HELD:
            assert created, res
            ref = self.model.bind(decision, str(res.reservation_id))
            self.check_same(res, ref)
            return [ref.rid]
        assert decision.kind is Kind.REPLAY, (decision, res)
        assert decision.earlier is not None
        assert not created
        self.check_same(res, decision.earlier)
        return []

    def compare_settle(self, action: str, rid: str, outcome: object) -> None:
        step = self.model.commit if action == "commit" else self.model.refund
        expected, ref = step(rid, self.clock())
        assert ref is not None
        errors = {
            Settle.REFUNDED: ReservationRefunded,
            Settle.EXPIRED: ReservationExpired,
            Settle.COMMITTED: ReservationCommitted,
        }
        if expected in errors:
            assert isinstance(outcome, errors[expected]), (action, expected, outcome)
            return
        assert expected is Settle.OK, (expected, ref)
        assert isinstance(outcome, Reservation), (action, outcome)
        if action == "commit":
            assert outcome.status is Status.COMMITTED
        else:
            assert outcome.status in (Status.REFUNDED, Status.EXPIRED)
        self.check_same(outcome, ref)

    # --- rules --------------------------------------------------------------------------

    @rule(
        target=reservations,
        coach=st.sampled_from(COACHES),
        feature=st.sampled_from(FEATURES),
        ttl=st.one_of(st.integers(1, 120), st.integers(1, 3600)),
        key=st.none() | st.sampled_from(KEYS),
        principal=st.sampled_from(PRINCIPALS),
    )
    def reserve(self, coach: str, feature: str, ttl: int, key: str | None, principal: str) -> Any:
        return multiple(*self.do_reserve(coach, feature, ttl, key, principal))

    @rule(target=reservations)
    def retry_reserve(self) -> Any:
        """The same request again: with a key it must replay, without one it is a new
        action (and may hold again, which is what regenerating costs)."""
        if self.last_reserve is None:
            return multiple()
        return multiple(*self.do_reserve(*self.last_reserve))

    async def settle(self, action: str, rid: str) -> Reservation | CreditsError:
        self.touch(coach_of(rid))
        try:
            return await (self.store.commit(rid) if action == "commit" else self.store.refund(rid))
        except CreditsError as exc:
            return exc

    @rule(rid=reservations, twice=st.booleans())
    def commit(self, rid: str, twice: bool) -> None:
        for _ in range(2 if twice else 1):
            self.compare_settle("commit", rid, self.run(self.settle("commit", rid)))

    @rule(rid=reservations, twice=st.booleans())
    def refund(self, rid: str, twice: bool) -> None:
        for _ in range(2 if twice else 1):
            self.compare_settle("refund", rid, self.run(self.settle("refund", rid)))

    @rule(
        target=reservations,
        items=st.lists(
            st.tuples(
                st.sampled_from(COACHES),
                st.sampled_from(FEATURES),
                st.integers(1, 3600),
                st.none() | st.sampled_from(KEYS),
            ),
            min_size=1,
            max_size=5,
        ),
        principal=st.sampled_from(PRINCIPALS),
    )
    def reserve_many(self, items: list[tuple[str, str, int, str | None]], principal: str) -> Any:
        """The batch route: items run in order, each on its own, as if sent one by one."""
        batch = [ReserveItem(c, f, ttl, key) for c, f, ttl, key in items]
        self.touch(*(item.coach_id for item in batch))
        outcomes = self.run(self.store.reserve_many(batch, principal=principal))
        assert len(outcomes) == len(items)
        made: list[str] = []
        for (coach, feature, ttl, key), outcome in zip(items, outcomes, strict=True):
            decision = self.model.reserve(
                coach,
                feature,
                self.clock(),
                ttl_seconds=ttl,
                idempotency_key=key,
                principal=principal,
            )
            made += self.compare_reserve(decision, outcome)
        return multiple(*made)

    @rule(
        items=st.lists(
            st.tuples(reservations, st.sampled_from(["commit", "refund"])), min_size=1, max_size=5
        )
    )
    def settle_many(self, items: list[tuple[str, SettleAction]]) -> None:
        self.touch(*(coach_of(rid) for rid, _ in items))
        outcomes = self.run(self.store.settle_many(items))
        assert len(outcomes) == len(items)
        for (rid, action), outcome in zip(items, outcomes, strict=True):
            self.compare_settle(action, rid, outcome)

    @rule(rid=reservations)
    def get_reservation(self, rid: str) -> None:
        ref = self.model.get(rid)
        assert ref is not None
        self.touch(coach_of(rid))
        self.check_same(self.run(self.store.get_reservation(rid)), ref)

    @rule(coach=st.sampled_from(COACHES), action=st.sampled_from(["commit", "refund", "get"]))
    def unknown_reservation(self, coach: str, action: str) -> None:
        made_up = str(ReservationId.new(coach, Period.containing(self.clock())))
        self.touch(coach)
        call = {
            "commit": self.store.commit,
            "refund": self.store.refund,
            "get": self.store.get_reservation,
        }[action]
        with pytest.raises(ReservationNotFound):
            self.run(call(made_up))
        assert self.model.get(made_up) is None

    @rule(coach=st.sampled_from(COACHES))
    def usage(self, coach: str) -> None:
        self.touch(coach)
        got = self.run(self.store.usage(coach))
        want = self.model.usage(coach, self.clock())
        assert (got.used, got.held, got.remaining) == (want.used, want.held, want.remaining)
        assert got.period == Period.containing(self.clock())

    @rule(coaches=st.lists(st.sampled_from(COACHES), min_size=1, max_size=6))
    def usage_many(self, coaches: list[str]) -> None:
        self.touch(*coaches)
        got = self.run(self.store.usage_many(coaches))
        assert [u.coach_id for u in got] == coaches
        for u in got:
            want = self.model.usage(u.coach_id, self.clock())
            assert (u.used, u.held) == (want.used, want.held)

    @rule(pick=st.integers(0, 1000), ttl=st.one_of(st.integers(1, 120), st.integers(1, 3600)))
    def extend_live(self, pick: int, ttl: int) -> None:
        """A hold still live, most of the time: a random one has often lapsed."""
        now = self.clock()
        live = [r.rid for r in self.model.reservations.values() if r.live_at(now)]
        if live:
            self.extend(live[pick % len(live)], ttl)

    @rule(
        target=reservations,
        coach=st.sampled_from(COACHES),
        before=st.integers(1, 300),
        after=st.integers(0, 3700),
        ttl=st.integers(1, 3600),
    )
    def extend_into_next_month(self, coach: str, before: int, after: int, ttl: int) -> Any:
        """A hold made just before a month ends, extended after it: near the limit of an
        hour past the end of its month."""
        end = Period.containing(self.clock()).resets_at
        # Never back in time: a hold swept as lapsed would be live again in the model.
        self.clock.set(max(self.clock(), end - timedelta(seconds=before)))
        made = self.do_reserve(coach, "checkin_draft", 3600, None, "")
        self.clock.set(end + timedelta(seconds=after))
        if made:
            self.extend(made[0], ttl)
        return multiple(*made)

    @rule(rid=reservations, ttl=st.one_of(st.integers(1, 120), st.integers(1, 3600)))
    def extend(self, rid: str, ttl: int) -> None:
        self.touch(coach_of(rid))
        try:
            outcome: Reservation | CreditsError = self.run(self.store.extend(rid, ttl))
        except CreditsError as exc:
            outcome = exc
        expected = self.model.extend(rid, self.clock(), ttl)
        ref = self.model.get(rid)
        assert ref is not None
        errors = {
            Settle.COMMITTED: ReservationCommitted,
            Settle.REFUNDED: ReservationRefunded,
            Settle.EXPIRED: ReservationExpired,
            Settle.LIMIT: ExtensionLimit,
        }
        if expected in errors:
            assert isinstance(outcome, errors[expected]), (expected, outcome)
            return
        assert isinstance(outcome, Reservation), (expected, outcome)
        assert outcome.status is Status.HELD
        self.check_same(outcome, ref)

    @rule(
        coach=st.sampled_from(COACHES),
        value=st.none() | st.sampled_from([0, 3, 10, 50, 80]),
    )
    def set_allowance(self, coach: str, value: int | None) -> None:
        self.touch(coach)
        got = self.run(self.store.set_allowance(coach, value))
        self.model.set_allowance(coach, value)
        want = self.model.usage(coach, self.clock())
        assert (got.used, got.held) == (want.used, want.held)
        same_allowance(got, want)

    @rule(
        coach=st.sampled_from(COACHES),
        credits=st.sampled_from([-60, -20, -3, -1, 1, 2, 5, 30]),
        reason=st.sampled_from(["goodwill", "a | b"]),
        key=st.none() | st.sampled_from(KEYS),
        principal=st.sampled_from(PRINCIPALS),
    )
    def grant(self, coach: str, credits: int, reason: str, key: str | None, principal: str) -> None:
        self.last_grant = (coach, credits, reason, key, principal)
        self.touch(coach)
        now = self.clock()
        decision = self.model.grant(
            coach, credits, reason, now, idempotency_key=key, principal=principal
        )
        try:
            outcome: tuple[Grant, bool] | CreditsError = self.run(
                self.store.grant(coach, credits, reason, idempotency_key=key, principal=principal)
            )
        except CreditsError as exc:
            outcome = exc
        errors = {
            GrantKind.REUSED: IdempotencyKeyReused,
            GrantKind.EXCEEDS: GrantExceedsRemaining,
            GrantKind.LIMIT: GrantLimit,
        }
        if decision.kind in errors:
            assert isinstance(outcome, errors[decision.kind]), (decision, outcome)
            if decision.kind is GrantKind.EXCEEDS:
                assert isinstance(outcome, GrantExceedsRemaining)
                assert outcome.remaining == decision.remaining
            return
        assert isinstance(outcome, tuple), (decision, outcome)
        made, created = outcome
        if decision.kind is GrantKind.GRANTED:
            assert created
            ref = self.model.bind_grant(decision, made.grant_id)
        else:
            assert not created
            assert decision.earlier is not None
            ref = decision.earlier
        self.check_grant(made, ref)

    @rule(other_reason=st.booleans())
    def retry_grant(self, other_reason: bool) -> None:
        """The same grant again (a retry: with a key it must replay), or with its key
        and another reason."""
        if self.last_grant is not None:
            coach, credits, reason, key, principal = self.last_grant
            self.grant(coach, credits, "other" if other_reason else reason, key, principal)

    def check_grant(self, got: Grant, ref: RefGrant) -> None:
        assert (got.grant_id, got.coach_id, got.period) == (ref.grant_id, ref.coach_id, ref.period)
        assert (got.credits, got.reason, got.granted_at) == (
            ref.credits,
            ref.reason,
            ref.granted_at,
        )
        want = self.model.counters(ref.coach_id, ref.period, self.clock())
        assert (got.usage.used, got.usage.held) == (want.used, want.held)
        same_allowance(got.usage, want)

    @rule(coach=st.sampled_from(COACHES), earlier=st.booleans())
    def list_grants(self, coach: str, earlier: bool) -> None:
        self.touch(coach)
        period = Period.containing(self.clock())
        if earlier:
            period = (
                Period(period.year - 1, 12)
                if period.month == 1
                else Period(period.year, period.month - 1)
            )
        got = self.run(self.store.grants(coach, period=period))
        want = self.model.grants.get((coach, period), [])
        assert [g.grant_id for g in got] == [g.grant_id for g in want]
        for g, ref in zip(got, want, strict=True):
            self.check_grant(g, ref)

    @rule(seconds=st.integers(0, 90))
    def tick(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @rule(seconds=st.integers(3600, 3 * 3600))
    def jump_past_expiries(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @rule(before=st.integers(0, 300), december=st.booleans())
    def to_month_end(self, before: int, december: bool) -> None:
        """Just before a month ends (or the year): the next ticks cross it."""
        now = self.clock()
        period = Period.containing(now)
        end = Period(period.year, 12).resets_at if december else period.resets_at
        target = end - timedelta(seconds=before)
        if target > now:
            self.clock.set(target)

    @rule(rid=reservations, offset=st.integers(-1, 1))
    def to_expiry(self, rid: str, offset: int) -> None:
        """Exactly on a hold's expiry (or a second either side): at it, it has lapsed."""
        ref = self.model.get(rid)
        assert ref is not None
        target = ref.expires_at + timedelta(seconds=offset)
        if target > self.clock():
            self.clock.set(target)

    @rule(days=st.integers(1, 40))
    def jump_days(self, days: int) -> None:
        self.clock.advance(days=days)

    # --- invariants ---------------------------------------------------------------------

    @invariant()
    def store_agrees_with_model(self) -> None:
        """Everything a step can have changed: the answers and stored state of the
        coaches it named, and every coach's usage once the clock has moved. A script
        reaches only the keys it is handed (one coach's), so a step leaves the others'
        state as the last check found it."""
        now = self.clock()
        self.model.check(now)
        moved, self.checked_at = now != self.checked_at, now
        touched, self.touched = self.touched, set()
        coaches = list(COACHES) if moved else sorted(touched)
        got = self.run(self.store.usage_many(coaches)) if coaches else []
        for u in got:
            want = self.model.usage(u.coach_id, now)
            assert (u.used, u.held, u.remaining) == (want.used, want.held, want.remaining), (
                u,
                want,
            )
            same_allowance(u, want)
        for coach, period in self.model.periods():
            if coach in touched:
                self.check_period(coach, period, now)

    def check_period(self, coach: str, period: Period, now: datetime) -> None:
        """Raw counters and every reservation record of one coach and period."""
        keys = period_keys(coach, period)
        raw = {_text(k): _text(v) for k, v in self.run(self.redis.hgetall(keys.account)).items()}
        used, held = int(raw.get("used", 0)), int(raw.get("held", 0))
        # Stored held may still include lapsed holds nobody swept yet: never less than
        # the live ones, and even so within the allowance.
        want = self.model.counters(coach, period, now)
        assert used == want.used
        assert held >= want.held
        assert int(raw.get("granted", 0)) == want.granted
        # Within the highest allowance any of its holds was made under: a lowered one
        # takes nothing back.
        assert used + held <= self.model.high.get((coach, period), 0)
        records = self.run(stored_records(self.redis, coach, period))
        mine = self.model.by_period[(coach, period)]
        assert len(records) == len(mine)
        names = {k[3:]: v for k, v in raw.items() if k.startswith("fn:")}
        for rid in mine:
            ref = self.model.reservations[rid]
            record = records[ReservationId.parse(rid).token]  # type: ignore[union-attr]
            status = _STATES[record.state]
            if status is Status.HELD and record.expires_ms <= int(now.timestamp() * 1000):
                status = Status.EXPIRED
            assert status is ref.state_at(now), (rid, record, ref)
            assert (record.cost, names[record.code], from_ms(record.expires_ms)) == (
                ref.cost,
                ref.feature,
                ref.expires_at,
            )


def same_allowance(got: Usage, want: Counters) -> None:
    assert (got.allowance, got.base_allowance, got.granted) == (
        want.allowance,
        want.base_allowance,
        want.granted,
    ), (got, want)


def coach_of(rid: str) -> str:
    parsed = ReservationId.parse(rid)
    assert parsed is not None, rid
    return parsed.coach_id


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def machine(connect: Callable[[], AnyRedis]) -> type[LedgerMachine]:
    return type("Machine", (LedgerMachine,), {"connect": staticmethod(connect)})


def fake() -> AnyRedis:
    client: AnyRedis = fakeredis.FakeAsyncRedis(
        server=fakeredis.FakeServer(), decode_responses=True
    )
    return client


# State machines run by hand: marked as Hypothesis' own tests are (see tests.support.timeouts).
@pytest.mark.hypothesis
@pytest.mark.timeout(360)  # about 100 s alone on a slow machine
def test_store_matches_model_on_fakeredis() -> None:
    run_state_machine_as_test(
        machine(fake),
        settings=settings(
            # Enough that rarer interleavings (a key reused by another principal, a
            # clock landing exactly on an expiry) show up in most runs.
            max_examples=200,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


@pytest.mark.hypothesis
@pytest.mark.timeout(360)  # about 80 s alone on a slow machine
@pytest.mark.real_redis
def test_store_matches_model_on_real_redis(redis_server: RedisProcess) -> None:
    # Its own database number, so flushing it between examples touches no other test.
    url = redis_server.url.rsplit("/", 1)[0] + "/7"
    run_state_machine_as_test(
        machine(lambda: Redis.from_url(url, decode_responses=True)),
        settings=settings(
            max_examples=80,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
