"""A plain-Python reference model of the credit ledger.

It knows nothing of Redis: it keeps, per coach and period, the reservations with their
state and expiry and the grants, and per coach its own monthly allowance, and derives
``used``, ``held`` and the effective allowance from them, so the store's counters can be
checked against a ledger that is correct by construction. Idempotency records (a
reserve's and a grant's alike) are keyed by (principal, coach, key) and live as the
service promises: 24 hours, or until 1,000 newer ones exist for the coach. A coach holds
at most 1,000 live reservations a period. (The service keeps at least the 1,000 newest
settled records of a period; the model keeps them all, so tests that drop records do not
use it.)

Reservation and grant ids are minted by the store (they hold random bits), so a new hold
is a two-step affair: :meth:`Ledger.reserve` decides what must happen, and when that is
a new hold the caller hands the store's id to :meth:`Ledger.bind` (grants likewise,
:meth:`Ledger.grant` and :meth:`Ledger.bind_grant`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from app.domain import (
    IDEMPOTENCY_TTL_SECONDS,
    MAX_GRANTS_PER_PERIOD,
    Period,
    ReservationId,
    Status,
    effective_allowance,
    remaining,
)

DEFAULT_COSTS = {"checkin_draft": 1, "trend_analysis": 3}
#: Live holds a coach may have in a period, and idempotency records kept per coach.
MAX_LIVE_HOLDS = 1000
IDEMPOTENCY_KEPT = 1000


class Kind(StrEnum):
    """What a reserve request must come to."""

    HELD = "held"  # a new hold
    REPLAY = "replay"  # the key was seen: the earlier reservation, nothing held
    REUSED = "reused"  # the key was seen with another feature
    EXHAUSTED = "exhausted"  # it does not fit
    TOO_MANY = "too_many"  # MAX_LIVE_HOLDS are live


class Settle(StrEnum):
    """What a commit, refund or extend must come to."""

    OK = "ok"
    NOT_FOUND = "not_found"
    REFUNDED = "refunded"
    EXPIRED = "expired"
    COMMITTED = "committed"
    LIMIT = "limit"  # extend only: past an hour after the period's end


class GrantKind(StrEnum):
    """What a grant request must come to."""

    GRANTED = "granted"
    REPLAY = "replay"
    REUSED = "reused"
    EXCEEDS = "exceeds"
    LIMIT = "limit"


@dataclass(frozen=True)
class RefGrant:
    grant_id: str
    coach_id: str
    period: Period
    credits: int
    reason: str
    granted_at: datetime


@dataclass
class GrantDecision:
    kind: GrantKind
    coach_id: str
    period: Period
    credits: int
    reason: str
    granted_at: datetime
    #: For REPLAY: the grant the key made. For EXCEEDS: what remained.
    earlier: RefGrant | None = None
    remaining: int = 0
    idem: tuple[str, str, str] | None = None


@dataclass
class RefReservation:
    rid: str
    coach_id: str
    period: Period
    feature: str
    cost: int
    expires_at: datetime
    #: Stored state; a HELD one past ``expires_at`` reads as EXPIRED (see :meth:`state_at`).
    state: Status = Status.HELD
    #: How many times it left HELD; the ledger is wrong if this ever exceeds 1.
    settlements: int = 0

    def state_at(self, now: datetime) -> Status:
        if self.state is Status.HELD and self.expires_at <= now:
            return Status.EXPIRED
        return self.state

    def live_at(self, now: datetime) -> bool:
        return self.state_at(now) is Status.HELD


@dataclass(frozen=True)
class Counters:
    used: int
    held: int
    #: The effective allowance, and what it is made of.
    allowance: int
    base_allowance: int = 0
    granted: int = 0

    @property
    def remaining(self) -> int:
        return remaining(self.allowance, self.used, self.held)


@dataclass
class Decision:
    """The model's verdict on one reserve request."""

    kind: Kind
    coach_id: str
    feature: str
    cost: int
    period: Period
    expires_at: datetime
    #: When the request was made (an idempotency record is dated so).
    made_at: datetime
    #: For REPLAY and REUSED: the reservation the key points at.
    earlier: RefReservation | None = None
    #: For EXHAUSTED: the counters the refusal was based on.
    counters: Counters | None = None
    idem: tuple[str, str, str] | None = None


@dataclass
class Ledger:
    allowance: int = 50
    costs: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_COSTS))
    reservations: dict[str, RefReservation] = field(default_factory=dict)
    #: (principal, coach, key) -> (feature, reservation id, made at, its number)
    idempotency: dict[tuple[str, str, str], tuple[str, str, datetime, int]] = field(
        default_factory=dict
    )
    #: coach -> the number of its newest idempotency record
    idempotency_made: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: (coach, period) -> reservation ids, so counters need no scan of everything.
    by_period: dict[tuple[str, Period], list[str]] = field(
        default_factory=lambda: defaultdict(list)
    )
    #: Coaches' own monthly allowances; a coach without one has the configured one.
    overrides: dict[str, int] = field(default_factory=dict)
    grants: dict[tuple[str, Period], list[RefGrant]] = field(
        default_factory=lambda: defaultdict(list)
    )
    #: (principal, coach, key) -> ((credits, reason), the grant, made at, its number in
    #: the coach's idempotency records, which a reserve's and a grant's share)
    grant_keys: dict[tuple[str, str, str], tuple[tuple[int, str], RefGrant, datetime, int]] = field(
        default_factory=dict
    )
    #: (coach, period) -> the highest effective allowance any hold was made under: what
    #: used + held may reach (a lowered allowance takes nothing back).
    high: dict[tuple[str, Period], int] = field(default_factory=dict)

    # --- reading ----------------------------------------------------------------------

    def base(self, coach_id: str) -> int:
        return self.overrides.get(coach_id, self.allowance)

    def granted(self, coach_id: str, period: Period) -> int:
        return sum(g.credits for g in self.grants.get((coach_id, period), ()))

    def counters(self, coach_id: str, period: Period, now: datetime) -> Counters:
        used = held = 0
        for rid in self.by_period.get((coach_id, period), ()):
            res = self.reservations[rid]
            state = res.state_at(now)
            if state is Status.COMMITTED:
                used += res.cost
            elif state is Status.HELD:
                held += res.cost
        base, granted = self.base(coach_id), self.granted(coach_id, period)
        return Counters(used, held, effective_allowance(base, granted), base, granted)

    def usage(self, coach_id: str, now: datetime) -> Counters:
        return self.counters(coach_id, Period.containing(now), now)

    def get(self, rid: str) -> RefReservation | None:
        return self.reservations.get(rid)

    def coaches(self) -> set[str]:
        return {coach for coach, _ in self.by_period}

    def periods(self) -> set[tuple[str, Period]]:
        return set(self.by_period)

    # --- reserving --------------------------------------------------------------------

    def reserve(
        self,
        coach_id: str,
        feature: str,
        now: datetime,
        *,
        ttl_seconds: int,
        idempotency_key: str | None = None,
        principal: str = "",
    ) -> Decision:
        cost = self.costs[feature]
        period = Period.containing(now)
        decision = Decision(
            Kind.HELD,
            coach_id,
            feature,
            cost,
            period,
            now + timedelta(seconds=ttl_seconds),
            now,
        )
        if idempotency_key is not None:
            decision.idem = (principal, coach_id, idempotency_key)
            seen = self.idempotency.get(decision.idem)
            if seen is not None and self._idempotency_live(coach_id, seen, now):
                seen_feature, seen_rid, _, _ = seen
                decision.earlier = self.reservations[seen_rid]
                # A replay answers from wherever the first hold lives, even another period.
                decision.kind = Kind.REUSED if seen_feature != feature else Kind.REPLAY
                return decision
        counters = self.counters(coach_id, period, now)
        decision.counters = counters
        if counters.used + counters.held + cost > counters.allowance:
            decision.kind = Kind.EXHAUSTED
        elif self.live_holds(coach_id, period, now) >= MAX_LIVE_HOLDS:
            decision.kind = Kind.TOO_MANY
        return decision

    def _idempotency_live(
        self, coach_id: str, seen: tuple[str, str, datetime, int], now: datetime
    ) -> bool:
        _, _, made_at, number = seen
        newer = self.idempotency_made[coach_id] - number
        age = (now - made_at).total_seconds()
        return newer < IDEMPOTENCY_KEPT and age < IDEMPOTENCY_TTL_SECONDS

    def live_holds(self, coach_id: str, period: Period, now: datetime) -> int:
        rids = self.by_period.get((coach_id, period), ())
        return sum(self.reservations[rid].live_at(now) for rid in rids)

    def bind(self, decision: Decision, rid: str) -> RefReservation:
        """Record the new hold a HELD decision made, under the id the store minted."""
        assert decision.kind is Kind.HELD, decision
        assert rid not in self.reservations, f"reservation id {rid} minted twice"
        parsed = ReservationId.parse(rid)
        assert parsed is not None, f"store minted an unparsable id {rid!r}"
        assert parsed.coach_id == decision.coach_id
        assert parsed.period == decision.period, "a hold belongs to the period it was made in"
        res = RefReservation(
            rid,
            decision.coach_id,
            decision.period,
            decision.feature,
            decision.cost,
            decision.expires_at,
        )
        self.reservations[rid] = res
        self.by_period[(res.coach_id, res.period)].append(rid)
        assert decision.counters is not None
        where = (res.coach_id, res.period)
        self.high[where] = max(self.high.get(where, 0), decision.counters.allowance)
        if decision.idem is not None:
            coach = decision.coach_id
            self.idempotency_made[coach] += 1
            number = self.idempotency_made[coach]
            self.idempotency[decision.idem] = (decision.feature, rid, decision.made_at, number)
        return res

    # --- settling ---------------------------------------------------------------------

    def _leave_held(self, res: RefReservation, state: Status) -> None:
        res.state = state
        res.settlements += 1
        assert res.settlements == 1, f"{res.rid} settled twice"

    def expire_lapsed(self, now: datetime) -> None:
        """Mark lapsed holds expired; reads already treat them so, this only makes the
        stored state (and the settlement count) say it too."""
        for res in self.reservations.values():
            if res.state is Status.HELD and res.expires_at <= now:
                self._leave_held(res, Status.EXPIRED)

    def commit(self, rid: str, now: datetime) -> tuple[Settle, RefReservation | None]:
        res = self.reservations.get(rid)
        if res is None:
            return Settle.NOT_FOUND, None
        self.expire_lapsed(now)
        match res.state:
            case Status.HELD:
                self._leave_held(res, Status.COMMITTED)
                return Settle.OK, res
            case Status.COMMITTED:
                return Settle.OK, res
            case Status.REFUNDED:
                return Settle.REFUNDED, res
            case _:
                return Settle.EXPIRED, res

    def refund(self, rid: str, now: datetime) -> tuple[Settle, RefReservation | None]:
        res = self.reservations.get(rid)
        if res is None:
            return Settle.NOT_FOUND, None
        self.expire_lapsed(now)
        match res.state:
            case Status.HELD:
                self._leave_held(res, Status.REFUNDED)
                return Settle.OK, res
            case Status.COMMITTED:
                return Settle.COMMITTED, res
            case _:
                # Refunded before, or lapsed: either way its credits are back.
                return Settle.OK, res

    def extend(self, rid: str, now: datetime, ttl_seconds: int) -> Settle:
        res = self.reservations.get(rid)
        if res is None:
            return Settle.NOT_FOUND
        self.expire_lapsed(now)
        match res.state:
            case Status.HELD:
                expires_at = now + timedelta(seconds=ttl_seconds)
                if expires_at > res.period.holds_end_at:
                    return Settle.LIMIT
                res.expires_at = expires_at
                return Settle.OK
            case Status.COMMITTED:
                return Settle.COMMITTED
            case Status.REFUNDED:
                return Settle.REFUNDED
            case _:
                return Settle.EXPIRED

    # --- allowances and grants ------------------------------------------------------------

    def set_allowance(self, coach_id: str, monthly_allowance: int | None) -> None:
        if monthly_allowance is None:
            self.overrides.pop(coach_id, None)
        else:
            self.overrides[coach_id] = monthly_allowance

    def grant(
        self,
        coach_id: str,
        credits: int,
        reason: str,
        now: datetime,
        *,
        idempotency_key: str | None = None,
        principal: str = "",
    ) -> GrantDecision:
        period = Period.containing(now)
        decision = GrantDecision(GrantKind.GRANTED, coach_id, period, credits, reason, now)
        if idempotency_key is not None:
            decision.idem = (principal, coach_id, idempotency_key)
            seen = self.grant_keys.get(decision.idem)
            if seen is not None and self._idempotency_live(
                coach_id, ("", "", seen[2], seen[3]), now
            ):
                request, earlier, _, _ = seen
                decision.earlier = earlier
                decision.kind = (
                    GrantKind.REPLAY if request == (credits, reason) else GrantKind.REUSED
                )
                return decision
        if len(self.grants[(coach_id, period)]) >= MAX_GRANTS_PER_PERIOD:
            decision.kind = GrantKind.LIMIT
            return decision
        c = self.counters(coach_id, period, now)
        if credits < 0 and c.base_allowance + c.granted + credits < c.used + c.held:
            decision.kind = GrantKind.EXCEEDS
            decision.remaining = c.remaining
        return decision

    def bind_grant(self, decision: GrantDecision, grant_id: str) -> RefGrant:
        assert decision.kind is GrantKind.GRANTED, decision
        made = RefGrant(
            grant_id,
            decision.coach_id,
            decision.period,
            decision.credits,
            decision.reason,
            decision.granted_at,
        )
        self.grants[(made.coach_id, made.period)].append(made)
        if decision.idem is not None:
            coach = decision.coach_id
            self.idempotency_made[coach] += 1
            number = self.idempotency_made[coach]
            request = (decision.credits, decision.reason)
            self.grant_keys[decision.idem] = (request, made, decision.granted_at, number)
        return made

    # --- self-checks --------------------------------------------------------------------

    def check(self, now: datetime) -> None:
        """The model's own invariants, so a bug in the model cannot hide one in the store."""
        for (coach_id, period), rids in self.by_period.items():
            c = self.counters(coach_id, period, now)
            assert c.used + c.held <= self.high.get((coach_id, period), 0), (coach_id, period, c)
            for rid in rids:
                res = self.reservations[rid]
                assert res.settlements <= 1
                assert res.period == period
                assert res.coach_id == coach_id
