"""``CreditStore``: reserve, commit, refund, extend, grant and read credits, one script
call each.

Python picks the period, the clock reading, the expiries and the key names and passes
them in, so month boundaries are testable with a frozen clock; the scripts check and
change one coach's keys atomically.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple, Protocol

from redis import exceptions as redis_errors

from app import domain
from app.domain import (
    IDEMPOTENCY_TTL_SECONDS,
    MAX_GRANTS_PER_PERIOD,
    FeatureAvailability,
    Grant,
    Period,
    Reservation,
    ReservationId,
    Status,
    Usage,
)
from app.errors import (
    CreditsError,
    CreditsExhausted,
    ExtensionLimit,
    GrantExceedsRemaining,
    GrantLimit,
    IdempotencyKeyReused,
    InvalidCoachId,
    ReservationCommitted,
    ReservationExpired,
    ReservationNotFound,
    ReservationRefunded,
    TooManyHolds,
    UnknownFeature,
    WriteRefused,
)
from app.metrics import Metrics
from app.store import batch
from app.store.batch import ReserveItem, SettleAction
from app.store.keys import (
    WRITE_PROBE_KEY,
    allowance_key,
    grant_idempotency_digest,
    grants_key,
    idempotency_digest,
    idempotency_keys,
    period_keys,
)
from app.store.replies import (
    REPLY_LENGTH,
    STATES,
    Baseline,
    EventRow,
    Reply,
    decode_baseline,
    decode_event,
    decode_grant,
    decode_reply,
    ms_after,
)
from app.store.scripts import Scripts
from app.store.transport import AnyRedis, Command, transport_for

Clock = Callable[[], datetime]

#: What a reserve's reply says in ``extra`` when the period's settled records are due to
#: move out of its account (move.lua, run right after).
_MOVE_DUE: Final = "move"

#: Each state's outcome label, read once (an enum's ``.value`` is a descriptor call).
_OUTCOMES: Final = {state: status.value for state, status in STATES.items()}


def utc_now() -> datetime:
    return datetime.now(UTC)


def _key_reused(feature: str) -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        f"This Idempotency-Key was already used to reserve {feature!r}; "
        "use a new key for a different request."
    )


class _PeriodInfo(NamedTuple):
    """What every call in one month passes along, worked out once per month."""

    period: Period
    text: str
    keys_expire_ms: int
    start_ms: int


class _ReserveCall(NamedTuple):
    """One prepared reserve: what to send, and what reading its reply needs."""

    rid: ReservationId
    feature: str
    cost: int
    now: datetime
    command: Command


class _SettleCall(NamedTuple):
    action: SettleAction
    rid: ReservationId
    command: Command


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a coach's event log. ``kind`` says which fields it has:

    - ``held``, ``committed``, ``refunded``, ``expired``: reservation_id, feature, cost;
    - ``extended``: reservation_id, feature, expires_at;
    - ``granted``: grant_id, credits, reason;
    - ``allowance_changed``: monthly_allowance (None: the coach's own was deleted).
    """

    seq: int
    at: datetime
    kind: str
    reservation_id: ReservationId | None = None
    feature: str = ""
    cost: int = 0
    expires_at: datetime | None = None
    grant_id: str = ""
    credits: int = 0
    reason: str = ""
    monthly_allowance: int | None = None

    @classmethod
    def of(cls, coach_id: str, period: Period, row: EventRow) -> Event:
        at = domain.from_ms(row.ms)
        if row.kind == "granted":
            return cls(
                row.seq, at, row.kind, grant_id=row.grant_id, credits=row.credits, reason=row.reason
            )
        if row.kind == "allowance_changed":
            return cls(row.seq, at, row.kind, monthly_allowance=row.monthly_allowance)
        rid = ReservationId.of(coach_id, period, row.token)
        if row.kind == "extended":
            return cls(
                row.seq, at, row.kind, rid, row.feature, expires_at=domain.from_ms(row.expires_ms)
            )
        return cls(row.seq, at, row.kind, rid, row.feature, row.cost)


@dataclass(frozen=True, slots=True)
class EventPage:
    """Events newest first; ``next_before`` is the cursor for the page after, if any.
    ``baseline`` is what the events trimmed off the period's log added up to: every
    event kept, replayed on top of it, gives the raw counters."""

    events: list[Event]
    next_before: int | None
    usage: Usage
    baseline: Baseline


class ThresholdOutbox(Protocol):
    """Where commits record threshold webhooks (``app.webhooks``): the outbox keys and
    arguments a commit passes to settle.lua, and who takes the deliveries it recorded."""

    def commit_keys(self, coach_id: str) -> Sequence[str]: ...

    def commit_args(self) -> Sequence[Any]: ...

    def recorded(self, tail: Sequence[Any]) -> None:
        """``tail``: what a settle reply carries after its ten fields."""


class CreditStore:
    """Reserve, commit, refund and read credits for coaches."""

    def __init__(
        self,
        redis: AnyRedis,
        *,
        allowance: int = 50,
        feature_costs: dict[str, int] | None = None,
        default_ttl_seconds: int = domain.DEFAULT_TTL_SECONDS,
        release_batch: int = 100,
        events_max: int = 1000,
        op_timeout_seconds: float = 2.5,
        clock: Clock = utc_now,
        metrics: Metrics | None = None,
        coalesce: bool = True,
    ) -> None:
        self.redis = redis
        self.allowance = allowance
        self.feature_costs = dict(feature_costs or {"checkin_draft": 1, "trend_analysis": 3})
        self.default_ttl_seconds = default_ttl_seconds
        self.release_batch = release_batch
        if not 1 <= events_max <= 1000:
            raise ValueError("events_max must be between 1 and 1000")
        self.events_max = events_max
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.metrics.feature_costs = self.feature_costs
        self.transport = transport_for(redis, op_timeout_seconds, coalesce=coalesce)
        self.transport.observe_write = self.metrics.commands_per_write.observe
        self.scripts = Scripts(self.transport, self.metrics)
        self._periods: dict[tuple[int, int], _PeriodInfo] = {}
        # Ids of holds made here lately, by their text: what ReservationId.parse would
        # return for that text (it is pure), for the settlements that soon follow.
        self._issued: dict[str, ReservationId] = {}
        # A usage's feature list depends only on the credits left: one shared tuple per
        # level instead of new objects per call (they are frozen).
        self._features: dict[int, tuple[FeatureAvailability, ...]] = {}
        #: Threshold webhooks: set while endpoints are configured.
        self.outbox: ThresholdOutbox | None = None

    # --- plumbing --------------------------------------------------------------------

    @property
    def write_refusal(self) -> str | None:
        """Redis's latest refusal of a write; None once it accepts writes again."""
        return self.transport.write_refusal

    @property
    def instance_epoch(self) -> str | None:
        return self.scripts.instance_epoch

    async def ensure_scripts(self) -> None:
        """Load any script Redis has forgotten, and check whether it lost its data."""
        await self.scripts.ensure_loaded()

    async def check_instance(self) -> bool:
        return await self.scripts.check_instance()

    async def ping(self) -> None:
        """Whether Redis answers (BackendUnavailable when not); also learns whether it
        accepts writes, for /readyz, without failing when it does not."""
        transport = self.transport
        await transport.guard(self.redis.ping())
        try:
            await transport.guard(self.redis.set(WRITE_PROBE_KEY, "1", px=10_000))
        except WriteRefused:
            return
        transport.write_refusal = None

    async def drain(self) -> None:
        """Wait for this loop's script calls in flight; before closing the client."""
        await self.transport.drain()

    async def aclose(self) -> None:
        """Wait for the calls in flight and close what the store opened itself (a
        cluster's per-node clients); the client it was given stays the caller's."""
        await self.transport.aclose()

    async def _run(self, command: Command, operation: str) -> Reply:
        """One script call (``EVALSHA sha numkeys keys... args...``) and its reply;
        ``operation`` labels its latency."""
        started = time.perf_counter()
        try:
            raw = await self.transport.call(*command)
        except redis_errors.NoScriptError:
            raw = await self._run_with_source(command)
        self.metrics.observe_latency(operation, time.perf_counter() - started)
        reply = decode_reply(raw)
        if reply.swept:
            self.metrics.add_credits("expired", reply.swept)
        if len(raw) > REPLY_LENGTH and self.outbox is not None:
            self.outbox.recorded(raw[REPLY_LENGTH:])
        return reply

    async def call_script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Reply:
        """One call of the script ``name`` (of ``SCRIPT_NAMES``) and its reply."""
        return await self._run(self._command(name, keys, args), name)

    async def _run_with_source(self, command: Command) -> Any:
        # Redis forgot the scripts: restarted, flushed or failed over. That is also the
        # cheap moment to ask whether it forgot the data. NOSCRIPT means the script never
        # ran, so running it again cannot apply it twice; EVAL with the source cannot
        # meet NOSCRIPT again, even if another flush comes between.
        await self.ensure_scripts()
        return await self.transport.call("EVAL", self._source_of(command[1]), *command[2:])

    def _source_of(self, sha: str) -> str:
        return self.scripts.by_sha[sha].source

    def _command(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Command:
        return ("EVALSHA", self.scripts[name].sha, len(keys), *keys, *args)

    def _period_info(self, now: datetime) -> _PeriodInfo:
        utc = now if now.tzinfo is UTC else now.astimezone(UTC)
        return self._info_of(utc.year, utc.month)

    def _info_of(self, year: int, month: int) -> _PeriodInfo:
        info = self._periods.get((year, month))
        if info is None:
            period = Period(year, month)
            info = _PeriodInfo(
                period,
                str(period),
                domain.to_ms(period.keys_expire_at),
                domain.to_ms(period.starts_at),
            )
            if len(self._periods) > 64:  # a frozen or travelling clock in tests
                self._periods.clear()
            self._periods[(year, month)] = info
        return info

    # --- helpers ---------------------------------------------------------------------

    def cost_of(self, feature: str) -> int:
        try:
            return self.feature_costs[feature]
        except KeyError:
            known = ", ".join(sorted(self.feature_costs))
            raise UnknownFeature(
                f"There is no feature called {feature!r}. Known features: {known}."
            ) from None

    @staticmethod
    def check_coach_id(coach_id: str) -> None:
        if not domain.is_valid_coach_id(coach_id):
            raise InvalidCoachId(
                "A coach id is 1-128 characters of letters, digits and . _ : @ -, "
                "starting with a letter or digit."
            )

    def _usage(self, coach_id: str, period: Period, reply: Reply) -> Usage:
        """The usage a script's reply reports: its counters, the monthly allowance in
        force and the period's grants."""
        base, granted, used, held = reply.base_allowance, reply.granted, reply.used, reply.held
        allowance = base + granted
        if allowance < 0:  # domain.effective_allowance, written out
            allowance = 0
        left = allowance - used - held
        if left < 0:
            left = 0
        features = self._features.get(left)
        if features is None:
            features = domain.feature_availability(self.feature_costs, left)
            if len(self._features) < 4096:
                self._features[left] = features
        return Usage(coach_id, period, allowance, used, held, features, base, granted)

    def _reservation(self, rid: ReservationId, reply: Reply) -> Reservation:
        reservation = Reservation(
            rid,
            reply.feature,
            reply.cost,
            STATES[reply.state],
            domain.from_ms(reply.expires_ms),
            self._usage(rid.coach_id, rid.period, reply),
        )
        if reply.state == "c":  # its note says which month it speaks of
            reservation.as_of = self._period_info(self.clock()).period
        return reservation

    # --- operations ------------------------------------------------------------------

    async def reserve(
        self,
        coach_id: str,
        feature: str,
        *,
        ttl_seconds: int | None = None,
        idempotency_key: str | None = None,
        principal: str = "",
    ) -> tuple[Reservation, bool]:
        """Hold the feature's cost. Returns the reservation and whether it is new
        (False: an idempotent replay of an earlier request)."""
        call = self._reserve_call(coach_id, feature, ttl_seconds, idempotency_key, principal)
        reply = await self._run(call.command, "reserve")
        if reply.extra == _MOVE_DUE and reply.status == "OK":
            await self._run(self._move_command(call.rid), "move")
        return await self._reserve_outcome(call, reply)

    def _reserve_call(
        self,
        coach_id: str,
        feature: str,
        ttl_seconds: int | None,
        idempotency_key: str | None,
        principal: str,
    ) -> _ReserveCall:
        self.check_coach_id(coach_id)
        cost = self.cost_of(feature)
        ttl = self.default_ttl_seconds if ttl_seconds is None else ttl_seconds
        now = self.clock()
        info = self._period_info(now)
        rid = ReservationId.new(coach_id, info.period)
        k = period_keys(coach_id, info.text)
        keys: tuple[str, ...] = (k.account, k.holds, k.events, allowance_key(coach_id))
        digest = ""
        if idempotency_key is not None:
            keys = (*keys, *k.settled, *idempotency_keys(coach_id))
            digest = idempotency_digest(principal, idempotency_key)
        now_ms = domain.to_ms(now)
        expires_ms = now_ms + ttl * 1000
        start = info.start_ms
        args = (
            now_ms,
            rid.token,
            feature,
            cost,
            expires_ms,
            self.allowance,
            info.keys_expire_ms,
            IDEMPOTENCY_TTL_SECONDS * 1000,
            info.text,
            self.release_batch,
            self.events_max,
            digest,
            start,
            ms_after(start, now_ms),
            ms_after(start, expires_ms),
        )
        return _ReserveCall(rid, feature, cost, now, self._command("reserve", keys, args))

    def _move_command(self, rid: ReservationId) -> Command:
        """move.lua for the period of ``rid``: its settled records leave the account."""
        info = self._info_of(rid.period.year, rid.period.month)
        k = period_keys(rid.coach_id, info.text)
        keys = (k.account, *k.settled, *idempotency_keys(rid.coach_id))
        return self._command("move", keys, (info.text, info.keys_expire_ms))

    async def _reserve_outcome(self, call: _ReserveCall, reply: Reply) -> tuple[Reservation, bool]:
        rid, feature, cost = call.rid, call.feature, call.cost
        coach_id, period = rid.coach_id, rid.period
        if reply.status == "OK":
            self.metrics.count(feature, "held")
            self._remember(rid)
            return self._reservation(rid, reply), True
        if reply.status == "REPLAY":
            return self._reservation(ReservationId.of(coach_id, period, reply.token), reply), False
        if reply.status == "REPLAY_ELSEWHERE":
            # The reply names the earlier period; the record (or, once dropped, the final
            # state the idempotency record kept, in `feature`) is read there.
            # A second call, paid only by a replay that crosses a month end; the current
            # period's usage (for the quota headers) came with the first.
            earlier = ReservationId.of(coach_id, Period.parse(reply.extra), reply.token)
            reservation = await self._get(earlier, str(earlier), fallback=reply.feature)
            if reservation.feature != feature:
                raise _key_reused(reservation.feature)
            reservation.current = self._usage(coach_id, period, reply)
            return reservation, False
        if reply.status == "IDEM_REUSED":
            raise _key_reused(reply.feature)
        if reply.status == "EXHAUSTED":
            self.metrics.count(feature, "exhausted")
            self.metrics.exhausted.labels(feature).inc()
            raise self._exhausted(feature, cost, period, call.now, reply)
        if reply.status == "TOO_MANY_HOLDS":
            self.metrics.count(feature, "too_many_holds")
            earliest = domain.from_ms(int(reply.extra or 0))
            allowance = domain.effective_allowance(reply.base_allowance, reply.granted)
            raise TooManyHolds(
                domain.seconds_until(earliest, call.now),
                allowance=allowance,
                remaining=domain.remaining(allowance, reply.used, reply.held),
                period=period,
            )
        raise RuntimeError(f"unexpected reserve reply {reply.status!r}")

    def _exhausted(
        self, feature: str, cost: int, period: Period, now: datetime, reply: Reply
    ) -> CreditsExhausted:
        allowance = domain.effective_allowance(reply.base_allowance, reply.granted)
        first_expiry = int(reply.extra or 0)
        held_up = allowance - reply.used >= cost and first_expiry > 0
        hold_wait = domain.seconds_until(domain.from_ms(first_expiry), now) if held_up else None
        retry_after = (
            hold_wait if hold_wait is not None else domain.seconds_until(period.resets_at, now)
        )
        detail = domain.exhausted_detail(
            feature=feature,
            cost=cost,
            allowance=allowance,
            used=reply.used,
            held=reply.held,
            period=period,
            hold_wait_seconds=hold_wait,
        )
        return CreditsExhausted(
            detail,
            title=domain.exhausted_title(
                cost=cost, allowance=allowance, used=reply.used, hold_wait_seconds=hold_wait
            ),
            feature=feature,
            cost=cost,
            remaining=domain.remaining(allowance, reply.used, reply.held),
            resets_at=period.resets_at,
            retry_after=retry_after,
            allowance=allowance,
            period=period,
        )

    def _parse_id(self, reservation_id: str) -> ReservationId:
        rid = self._issued.get(reservation_id)
        if rid is None:
            rid = ReservationId.parse(reservation_id)
            if rid is None:
                raise ReservationNotFound(reservation_id)
        return rid

    def _remember(self, rid: ReservationId) -> None:
        """Keep a new hold's id by its text: settling it here needs no parsing."""
        issued = self._issued
        if len(issued) >= 4096:
            issued.clear()
        issued[rid.text] = rid

    async def get_reservation(self, reservation_id: str) -> Reservation:
        return await self._get(self._parse_id(reservation_id), reservation_id)

    async def _get(self, rid: ReservationId, text: str, *, fallback: str = "") -> Reservation:
        """``fallback``: the final record an idempotency record kept, read when the
        reservation's own record was dropped."""
        k = period_keys(rid.coach_id, rid.period)
        info = self._info_of(rid.period.year, rid.period.month)
        command = self._command(
            "get_reservation",
            (k.account, k.holds, allowance_key(rid.coach_id), *k.settled),
            (domain.to_ms(self.clock()), rid.token, fallback, info.start_ms, self.allowance),
        )
        reply = await self._run(command, "get_reservation")
        if reply.status == "NOT_FOUND":
            raise ReservationNotFound(text)
        return self._reservation(rid, reply)

    def _settle_call(self, reservation_id: str, action: SettleAction) -> _SettleCall:
        rid = self._parse_id(reservation_id)
        period = rid.period
        info = self._info_of(period.year, period.month)
        now_ms = domain.to_ms(self.clock())
        args: tuple[Any, ...] = (
            now_ms,
            rid.token,
            self.release_batch,
            self.events_max,
            info.keys_expire_ms,
            action,
            info.start_ms,
            ms_after(info.start_ms, now_ms),
            self.allowance,
        )
        k = period_keys(rid.coach_id, info.text)
        keys: tuple[str, ...] = (
            k.account,
            k.holds,
            k.events,
            allowance_key(rid.coach_id),
            *k.settled,
        )
        outbox = self.outbox
        if outbox is not None and action == "commit":
            keys = (*keys, *outbox.commit_keys(rid.coach_id))
            args = (*args, *outbox.commit_args())
        return _SettleCall(action, rid, self._command("settle", keys, args))

    def _settle_outcome(self, call: _SettleCall, reply: Reply) -> Reservation:
        rid = call.rid
        match reply.status:
            case "OK":
                reservation = self._reservation(rid, reply)
                if reply.extra != "again":
                    outcome = _OUTCOMES[reply.state]
                    self.metrics.count(reply.feature, outcome)
                    if reservation.status is not Status.EXPIRED:  # counted when swept
                        self.metrics.add_credits(outcome, reply.cost)
                return reservation
            case "NOT_FOUND":
                raise ReservationNotFound(str(rid))
            case "REFUNDED":
                raise ReservationRefunded(str(rid))
            case "EXPIRED":
                raise ReservationExpired(str(rid))
            case "COMMITTED":
                raise ReservationCommitted(str(rid))
        raise RuntimeError(f"unexpected {call.action} reply {reply.status!r}")

    async def commit(self, reservation_id: str) -> Reservation:
        call = self._settle_call(reservation_id, "commit")
        return self._settle_outcome(call, await self._run(call.command, "commit"))

    async def refund(self, reservation_id: str) -> Reservation:
        call = self._settle_call(reservation_id, "refund")
        return self._settle_outcome(call, await self._run(call.command, "refund"))

    async def extend(self, reservation_id: str, ttl_seconds: int) -> Reservation:
        """Move a live hold's expiry to now + ``ttl_seconds`` (never past an hour after
        its period ends)."""
        rid = self._parse_id(reservation_id)
        period = rid.period
        info = self._info_of(period.year, period.month)
        now_ms = domain.to_ms(self.clock())
        expires_ms = now_ms + ttl_seconds * 1000
        latest = period.holds_end_at
        args = (
            now_ms,
            rid.token,
            expires_ms,
            domain.to_ms(latest),
            self.release_batch,
            self.events_max,
            info.keys_expire_ms,
            self.allowance,
            info.start_ms,
            ms_after(info.start_ms, now_ms),
            ms_after(info.start_ms, expires_ms),
        )
        k = period_keys(rid.coach_id, info.text)
        keys = (k.account, k.holds, k.events, allowance_key(rid.coach_id), *k.settled)
        reply = await self._run(self._command("extend", keys, args), "extend")
        match reply.status:
            case "OK":
                self.metrics.count(reply.feature, "extended")
                return self._reservation(rid, reply)
            case "NOT_FOUND":
                raise ReservationNotFound(reservation_id)
            case "COMMITTED":
                raise ReservationCommitted(reservation_id, extending=True)
            case "REFUNDED":
                raise ReservationRefunded(reservation_id, extending=True)
            case "EXPIRED":
                raise ReservationExpired(reservation_id, extending=True)
            case "LIMIT":
                raise ExtensionLimit(latest)
        raise RuntimeError(f"unexpected extend reply {reply.status!r}")

    async def set_allowance(self, coach_id: str, monthly_allowance: int | None) -> Usage:
        """Give the coach its own monthly allowance, from the current period on, or with
        None go back to the configured one. Returns the current period's usage."""
        self.check_coach_id(coach_id)
        now = self.clock()
        info = self._period_info(now)
        now_ms = domain.to_ms(now)
        value = "" if monthly_allowance is None else str(int(monthly_allowance))
        args = (
            now_ms,
            value,
            self.allowance,
            info.keys_expire_ms,
            self.events_max,
            ms_after(info.start_ms, now_ms),
        )
        k = period_keys(coach_id, info.text)
        keys = (k.account, k.holds, k.events, allowance_key(coach_id))
        reply = await self._run(self._command("set_allowance", keys, args), "set_allowance")
        return self._usage(coach_id, info.period, reply)

    async def grant(
        self,
        coach_id: str,
        credits: int,
        reason: str,
        *,
        idempotency_key: str | None = None,
        principal: str = "",
    ) -> tuple[Grant, bool]:
        """Add ``credits`` (or remove them, when negative) to the current period's
        allowance. Returns the grant and whether it is new (False: an idempotent replay)."""
        self.check_coach_id(coach_id)
        now = self.clock()
        info = self._period_info(now)
        now_ms = domain.to_ms(now)
        grant_id = domain.new_grant_id()
        # What a replay of the key must match: the same credits and reason.
        fingerprint = hashlib.sha256(f"{credits}\n{reason}".encode()).hexdigest()[:16]
        k = period_keys(coach_id, info.text)
        keys: tuple[str, ...] = (
            k.account,
            k.holds,
            k.events,
            allowance_key(coach_id),
            grants_key(coach_id, info.text),
        )
        digest = ""
        if idempotency_key is not None:
            keys = (*keys, *idempotency_keys(coach_id))
            digest = grant_idempotency_digest(principal, idempotency_key)
        args = (
            now_ms,
            grant_id,
            credits,
            reason,
            fingerprint,
            self.allowance,
            info.keys_expire_ms,
            IDEMPOTENCY_TTL_SECONDS * 1000,
            info.text,
            self.release_batch,
            self.events_max,
            MAX_GRANTS_PER_PERIOD,
            digest,
            ms_after(info.start_ms, now_ms),
        )
        reply = await self._run(self._command("grant", keys, args), "grant")
        match reply.status:
            case "OK" | "REPLAY":
                return self._grant(coach_id, info.period, reply.extra, reply), reply.status == "OK"
            case "REPLAY_ELSEWHERE":
                # A second call, for the earlier period's grants: only a replay that
                # crosses a month end pays it.
                for grant in await self.grants(coach_id, period=Period.parse(reply.extra)):
                    if grant.grant_id == reply.token:
                        return grant, False
                raise RuntimeError("an idempotency record names a grant that is gone")
            case "IDEM_REUSED":
                raise IdempotencyKeyReused(
                    "This Idempotency-Key was already used for a grant with other credits "
                    "or another reason; use a new key for a different grant."
                )
            case "EXCEEDS":
                raise GrantExceedsRemaining(credits, reply.cost)
            case "LIMIT":
                raise GrantLimit(MAX_GRANTS_PER_PERIOD)
        raise RuntimeError(f"unexpected grant reply {reply.status!r}")

    def _grant(self, coach_id: str, period: Period, row: str, reply: Reply) -> Grant:
        info = self._info_of(period.year, period.month)
        grant = decode_grant(row, info.start_ms)
        return Grant(
            grant.grant_id,
            coach_id,
            period,
            grant.credits,
            grant.reason,
            domain.from_ms(grant.ms),
            self._usage(coach_id, period, reply),
        )

    async def grants(self, coach_id: str, *, period: Period | None = None) -> list[Grant]:
        """The period's grants (the current one's by default), oldest first, each with
        the period's usage. Reads only."""
        self.check_coach_id(coach_id)
        now = self.clock()
        period = period or Period.containing(now)
        keys = period_keys(coach_id, period)
        command = self._command(
            "get_grants",
            (keys.account, keys.holds, grants_key(coach_id, period), allowance_key(coach_id)),
            (domain.to_ms(now), self.allowance),
        )
        reply, rows = await self._run_with_rows(command, "get_grants")
        return [self._grant(coach_id, period, row, reply) for row in rows]

    async def usage(self, coach_id: str) -> Usage:
        self.check_coach_id(coach_id)
        now = self.clock()
        info = self._period_info(now)
        command = self._usage_command(coach_id, info.text, domain.to_ms(now))
        return self._usage(coach_id, info.period, await self._run(command, "get_usage"))

    def _usage_command(self, coach_id: str, period: str, now_ms: int) -> Command:
        keys = period_keys(coach_id, period)
        return self._command(
            "get_usage",
            (keys.account, keys.holds, allowance_key(coach_id)),
            (now_ms, self.allowance),
        )

    async def usage_many(self, coach_ids: Sequence[str]) -> list[Usage]:
        """Counters for many coaches, read side by side (on one server, in one write)."""
        for coach_id in coach_ids:
            self.check_coach_id(coach_id)
        now = self.clock()
        info = self._period_info(now)
        now_ms = domain.to_ms(now)
        commands = [self._usage_command(c, info.text, now_ms) for c in coach_ids]
        started = time.perf_counter()
        raw = await self.transport.call_all(commands)
        if any(isinstance(r, redis_errors.NoScriptError) for r in raw):
            # Reading writes nothing, so the reads simply run again, with the source.
            await self.ensure_scripts()
            raw = await self.transport.call_all(
                [("EVAL", self._source_of(c[1]), *c[2:]) for c in commands]
            )
        for r in raw:
            if isinstance(r, Exception):
                raise r
        self.metrics.observe_latency("usage_many", time.perf_counter() - started)
        return [
            self._usage(c, info.period, r)
            for c, r in zip(coach_ids, map(decode_reply, raw), strict=True)
        ]

    async def events(
        self,
        coach_id: str,
        *,
        period: Period | None = None,
        before: int | None = None,
        limit: int = 100,
    ) -> EventPage:
        """A page of the coach's event log, newest first, with the counters read in the
        same call. Reads only: a coach or period never seen reads as an empty page."""
        self.check_coach_id(coach_id)
        now = self.clock()
        period = period or Period.containing(now)
        k = period_keys(coach_id, period)
        command = self._command(
            "get_events",
            (k.account, k.holds, k.events, allowance_key(coach_id), grants_key(coach_id, period)),
            (domain.to_ms(now), before or 0, limit, self.allowance),
        )
        reply, rows = await self._run_with_rows(command, "get_events")
        triples = rows[1:]
        start = domain.to_ms(period.starts_at)
        events = [
            Event.of(
                coach_id, period, decode_event(triples[i], triples[i + 1], triples[i + 2], start)
            )
            for i in range(0, len(triples), 3)
        ]
        return EventPage(
            events,
            int(reply.extra) if reply.extra else None,
            self._usage(coach_id, period, reply),
            decode_baseline(rows[0]),
        )

    async def _run_with_rows(self, command: Command, operation: str) -> tuple[Reply, list[Any]]:
        """A read script that appends rows to its reply: the reply and the rows."""
        started = time.perf_counter()
        try:
            raw = await self.transport.call(*command)
        except redis_errors.NoScriptError:
            raw = await self._run_with_source(command)
        self.metrics.observe_latency(operation, time.perf_counter() - started)
        return decode_reply(raw[:REPLY_LENGTH]), list(raw[REPLY_LENGTH:])

    # --- batches -----------------------------------------------------------------------

    async def reserve_many(
        self, items: Sequence[ReserveItem], *, principal: str = ""
    ) -> list[tuple[Reservation, bool] | CreditsError]:
        """Reserve for many items in one round trip, each still one atomic script call,
        run in request order. Each item succeeds or fails on its own (its error is
        returned in its place); only an unreachable Redis fails them all."""

        def make(item: ReserveItem) -> _ReserveCall:
            batch.check_item(item)
            return self._reserve_call(
                item.coach_id, item.feature, item.ttl_seconds, item.idempotency_key, principal
            )

        prepared = batch.prepare(items, make)
        calls = batch.sent(prepared)
        replies = await self._run_in_order([c.command for c in calls])
        due = {
            (c.rid.coach_id, c.rid.period): c.rid
            for c, r in zip(calls, replies, strict=True)
            if r.extra == _MOVE_DUE and r.status == "OK"
        }
        if due:
            await self._run_in_order([self._move_command(rid) for rid in due.values()])
        return await batch.outcomes(prepared, iter(replies), self._reserve_outcome)

    async def settle_many(
        self, items: Sequence[tuple[str, SettleAction]]
    ) -> list[Reservation | CreditsError]:
        """Commit or refund many reservations in one round trip, in request order; each
        succeeds or fails on its own."""
        prepared = batch.prepare(items, lambda item: self._settle_call(*item))
        replies = await self._run_in_order([c.command for c in batch.sent(prepared)])

        async def read(call: _SettleCall, reply: Reply) -> Reservation:
            return self._settle_outcome(call, reply)

        return await batch.outcomes(prepared, iter(replies), read)

    async def _run_in_order(self, commands: Sequence[Command]) -> list[Reply]:
        if not commands:
            return []
        started = time.perf_counter()
        shas = dict.fromkeys(c[1] for c in commands)
        raw = await self.transport.call_in_order(commands, [self._source_of(s) for s in shas])
        self.metrics.observe_latency("batch", time.perf_counter() - started)
        replies = [decode_reply(r) for r in raw]
        swept = sum(r.swept for r in replies)
        if swept:
            self.metrics.add_credits("expired", swept)
        outbox = self.outbox
        if outbox is not None:
            for r in raw:
                if len(r) > REPLY_LENGTH:
                    outbox.recorded(r[REPLY_LENGTH:])
        return replies
