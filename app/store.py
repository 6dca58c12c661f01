"""The ledger in Redis: key names, script calls, and decoding their replies.

This is the only module that knows the keys and the scripts (``app.coalesce`` only
carries commands). Every change is one Lua script call on one coach's keys; Python
picks the period, the clock reading, the expiries and the key names and passes them
in, so month boundaries are testable with a frozen clock.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final, Literal, NamedTuple, TypeVar, cast

from prometheus_client import Counter, Histogram
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from app import domain
from app.coalesce import Coalescer
from app.domain import (
    IDEMPOTENCY_TTL_SECONDS,
    Period,
    Reservation,
    ReservationId,
    Status,
    Usage,
)
from app.errors import (
    BackendUnavailable,
    CreditsError,
    CreditsExhausted,
    IdempotencyKeyReused,
    InvalidCoachId,
    InvalidRequest,
    ReservationCommitted,
    ReservationExpired,
    ReservationNotFound,
    ReservationRefunded,
    UnknownFeature,
)
from app.metrics import Metrics

log = logging.getLogger("credits.store")

AnyRedis = Redis | RedisCluster
Clock = Callable[[], datetime]
T = TypeVar("T")

LUA_DIR: Final = resources.files("app.lua")
SCRIPT_NAMES: Final = (
    "reserve",
    "commit",
    "refund",
    "get_reservation",
    "get_usage",
    "get_events",
)
KEY_PREFIX: Final = "credits"
#: Written once per data set with a random epoch and never expires: if it vanishes or
#: changes, Redis came back without the data it held. Not a coach key, so on a Redis
#: Cluster it lives on one primary only and watches only that node's data.
INSTANCE_KEY: Final = f"{KEY_PREFIX}:instance"

#: Redis failures that mean "not reachable right now", as opposed to a bug.
UNAVAILABLE_ERRORS: Final = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.MasterDownError,
    redis_errors.ReadOnlyError,
    redis_errors.SlotNotCoveredError,
    redis_errors.MaxConnectionsError,
    TimeoutError,
    OSError,
)

_STATES: Final = {
    "h": Status.HELD,
    "c": Status.COMMITTED,
    "r": Status.REFUNDED,
    "e": Status.EXPIRED,
}
#: Each state's outcome label, read once (an enum's ``.value`` is a descriptor call).
_OUTCOMES: Final = {state: status.value for state, status in _STATES.items()}


def utc_now() -> datetime:
    return datetime.now(UTC)


def load_script_source(name: str) -> str:
    """An operation's Lua source with the shared helpers in front of it."""
    common = LUA_DIR.joinpath("_common.lua").read_text()
    return f"{common}\n{LUA_DIR.joinpath(f'{name}.lua').read_text()}"


# --- key names -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeriodKeys:
    account: str
    holds: str
    events: str


def period_keys(coach_id: str, period: Period) -> PeriodKeys:
    # The {coach_id} hash tag puts every key of a coach in one cluster slot. Valid coach
    # ids hold no braces, so the tag is exactly the id.
    base = f"{KEY_PREFIX}:{{{coach_id}}}:{period}"
    return PeriodKeys(f"{base}:account", f"{base}:holds", f"{base}:events")


def idempotency_key_name(coach_id: str, principal: str, idempotency_key: str) -> str:
    # Hashed: a caller's key never appears raw in a key name (no braces, no size games).
    digest = hashlib.sha256(f"{principal}\n{idempotency_key}".encode()).hexdigest()[:40]
    return f"{KEY_PREFIX}:{{{coach_id}}}:idem:{digest}"


# --- script replies ------------------------------------------------------------------


class Reply(NamedTuple):
    status: str
    used: int
    held: int
    token: str
    state: str
    cost: int
    expires_ms: int
    feature: str
    extra: str
    swept: int


_tuple_new: Final = tuple.__new__


def decode_reply(raw: Sequence[Any]) -> Reply:
    """Every script answers ``{status, used, held, token, state, cost, expires_ms,
    feature, extra, swept}``; this is the one place that reads that shape."""
    # The service's clients decode replies already: then every field has its type and
    # the reply is taken as it is.
    if len(raw) == 10:
        status, used, held, token, state, cost, expires_ms, feature, extra, swept = raw
        if (
            type(status) is str
            and type(used) is int
            and type(held) is int
            and type(token) is str
            and type(state) is str
            and type(cost) is int
            and type(expires_ms) is int
            and type(feature) is str
            and type(extra) is str
            and type(swept) is int
        ):
            return _tuple_new(Reply, raw)
    text = _text
    return Reply(
        text(raw[0]),
        int(raw[1]),
        int(raw[2]),
        text(raw[3]),
        text(raw[4]),
        int(raw[5]),
        int(raw[6]),
        text(raw[7]),
        text(raw[8]),
        int(raw[9]),
    )


class _PeriodInfo(NamedTuple):
    """What every call in one month passes along, worked out once per month."""

    period: Period
    text: str
    keys_expire_ms: int


class _ReserveCall(NamedTuple):
    """One prepared reserve: what to send, and what reading its reply needs."""

    rid: ReservationId
    feature: str
    cost: int
    now: datetime
    keys: list[str]
    args: list[Any]


@dataclass(frozen=True, slots=True)
class ReserveItem:
    """One reservation of a batch."""

    coach_id: str
    feature: str
    ttl_seconds: int | None = None
    idempotency_key: str | None = None


SettleAction = Literal["commit", "refund"]

#: One script call of a pipeline: script name, keys, args.
ScriptCall = tuple[str, list[str], list[Any]]


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a coach's event log: a hold, commit, refund or expiry."""

    seq: int
    at: datetime
    kind: str
    reservation_id: ReservationId
    feature: str
    cost: int


@dataclass(frozen=True, slots=True)
class EventPage:
    """Events newest first; ``next_before`` is the cursor for the page after, if any."""

    events: list[Event]
    next_before: int | None
    usage: Usage


#: A watched call's states: running, cancelled by the watchdog, cancellation answered.
_WATCHING: Final = 0
_EXPIRED: Final = 1
_SETTLED: Final = 2
#: A deadline this close counts as reached: loop timers round to the millisecond, so one
#: set for a deadline may fire a hair before it.
_DEADLINE_SLACK: Final = 0.001


class _Watch:
    """One call under a watchdog: the task to cancel, when, and what became of it.

    Used as ``asyncio.timeout`` is: ``timed_out()`` on a CancelledError (True: raise
    TimeoutError instead), and ``end()`` however the call ends."""

    __slots__ = ("calls", "cancelling", "deadline", "state", "task")

    def __init__(self, calls: dict[_Watch, None], task: asyncio.Task[Any], deadline: float) -> None:
        self.calls = calls
        self.task = task
        self.deadline = deadline
        # Cancellations already asked of the task: only the watchdog's own one becomes a
        # timeout, as with asyncio.timeout.
        self.cancelling = task.cancelling()
        self.state = _WATCHING

    def timed_out(self) -> bool:
        """Whether the call's CancelledError is the watchdog's alone: a timeout."""
        if self.state != _EXPIRED:
            return False
        self.state = _SETTLED
        return self.task.uncancel() <= self.cancelling

    def end(self) -> None:
        if self.state == _WATCHING:
            del self.calls[self]
        elif self.state == _EXPIRED:  # cancelled, but the call ended some other way
            self.task.uncancel()


class _Watchdog:
    """The deadlines of one event loop's Redis calls, served by one timer.

    ``asyncio.timeout`` starts and cancels a loop timer for every call; here a call costs
    a dict entry. The one timer fires at the earliest deadline in flight, cancels the
    tasks whose calls are past theirs (exactly as ``asyncio.timeout`` does) and is set
    again for the next. A call that ends leaves its entry and nothing else behind.

    It also keeps the loop's coalescer (on one Redis server): both are per loop, and a
    call that has found its loop's watchdog has found its coalescer too."""

    __slots__ = ("calls", "coalescer", "loop", "timer", "wake_at")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: Calls in flight, oldest first.
        self.calls: dict[_Watch, None] = {}
        self.coalescer: Coalescer | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.wake_at = math.inf

    def watch(self, task: asyncio.Task[Any], deadline: float) -> _Watch:
        calls = self.calls
        watch = _Watch(calls, task, deadline)
        calls[watch] = None
        # Deadlines of one store mostly arrive in order: the timer already set for an
        # earlier one serves this one too.
        if deadline < self.wake_at:
            self._set(deadline)
        return watch

    def _set(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.wake_at = when
        self.timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.timer = None
        self.wake_at = math.inf
        reached = self.loop.time() + _DEADLINE_SLACK
        due = [w for w in self.calls if w.deadline <= reached]
        for watch in due:
            del self.calls[watch]
            watch.state = _EXPIRED
            watch.task.cancel()
        if self.calls:
            self._set(min(w.deadline for w in self.calls))


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
        events_max: int = 10_000,
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
        self.events_max = events_max
        self.op_timeout_seconds = op_timeout_seconds
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.metrics.feature_costs = self.feature_costs
        self.scripts: dict[str, AsyncScript] = {
            name: redis.register_script(load_script_source(name)) for name in SCRIPT_NAMES
        }
        # Serialises reloads, so a burst of NOSCRIPT replies loads (and counts) each once.
        self._reload_lock = asyncio.Lock()
        # How to add to each metric series, looked up once each: ``.labels(...)``
        # validates the labels and takes a lock, several times per call otherwise. Bound
        # on first use, so /metrics still lists a series only once it has happened.
        self._children: dict[tuple[str, ...], Callable[[float], None]] = {}
        self._latency: dict[str, Callable[[float], None]] = {}
        self._counts: dict[tuple[str, str], Callable[[float], None]] = {}
        self._credits: dict[str, Callable[[float], None]] = {}
        self._periods: dict[tuple[int, int], _PeriodInfo] = {}
        # Ids of holds made here lately, by their text: what ReservationId.parse would
        # return for that text (it is pure), for the settlements that soon follow.
        self._issued: dict[str, ReservationId] = {}
        # A usage's feature list depends only on the credits left: one shared tuple per
        # level instead of new objects per call (they are frozen).
        self._features: dict[int, tuple[domain.FeatureAvailability, ...]] = {}
        #: The data-set epoch last seen in INSTANCE_KEY; None until the first check.
        self.instance_epoch: str | None = None
        # The deadline watchdog of each event loop the store is used on (tests and some
        # hosts run more than one), and the one used last.
        self._watchdogs: dict[asyncio.AbstractEventLoop, _Watchdog] = {}
        self._watchdog: _Watchdog | None = None
        # On one Redis server, script calls made in the same loop turn share one write
        # (app.coalesce); a cluster routes each call by its key, one by one.
        self.coalesce = coalesce and isinstance(redis, Redis)

    # --- plumbing --------------------------------------------------------------------

    async def _guard(self, call: Awaitable[T]) -> T:
        """Bound every Redis conversation and turn "not reachable" into one error."""
        watch = self._watch()
        try:
            try:
                return await call
            except asyncio.CancelledError as exc:
                if watch.timed_out():
                    raise TimeoutError from exc
                raise
            finally:
                watch.end()
        except UNAVAILABLE_ERRORS as exc:
            raise _unavailable(exc) from exc
        except (AttributeError, TypeError) as exc:
            if not _raised_by_redis_transport(exc):
                raise
            raise _torn_down(exc) from exc

    def _watch(self) -> _Watch:
        """Put the current task's next Redis call under its loop's watchdog."""
        loop = asyncio.get_running_loop()
        dog = self._watchdog
        if dog is None or dog.loop is not loop:
            dog = self._watchdog_for(loop)
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("Timeout should be used inside a task")
        return dog.watch(task, loop.time() + self.op_timeout_seconds)

    def _watchdog_for(self, loop: asyncio.AbstractEventLoop) -> _Watchdog:
        dog = self._watchdogs.get(loop)
        if dog is None:
            for gone in [old for old in list(self._watchdogs) if old.is_closed()]:
                self._watchdogs.pop(gone, None)
            dog = self._watchdogs[loop] = _Watchdog(loop)
        self._watchdog = dog
        return dog

    def _coalescer_of(self, dog: _Watchdog) -> Coalescer:
        """The coalescer of the watchdog's loop, made on first use."""
        coalescer = dog.coalescer
        if coalescer is None:
            assert isinstance(self.redis, Redis)  # coalescing is for one server only
            coalescer = dog.coalescer = Coalescer(
                self.redis,
                dog.loop,
                self.op_timeout_seconds,
                _adder(self.metrics.commands_per_write),
            )
        return coalescer

    def _coalescer_here(self) -> Coalescer:
        loop = asyncio.get_running_loop()
        dog = self._watchdog
        return self._coalescer_of(
            dog if dog is not None and dog.loop is loop else self._watchdog_for(loop)
        )

    async def drain(self) -> None:
        """Wait for this loop's script calls in flight; before closing the client."""
        dog = self._watchdogs.get(asyncio.get_running_loop())
        if dog is not None and dog.coalescer is not None:
            await dog.coalescer.drain()

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Reply:
        started = time.perf_counter()
        script = self.scripts[name]
        # What _guard does, written out: this is every reserve's and settlement's call,
        # and a coroutine less in the chain is a layer less on every resume.
        watch = self._watch()
        try:
            try:
                if self.coalesce:
                    # _watch() has just made the watchdog of this loop the current one.
                    dog = self._watchdog
                    assert dog is not None
                    raw = await (dog.coalescer or self._coalescer_of(dog)).call(
                        "EVALSHA", script.sha, len(keys), *keys, *args
                    )
                else:
                    raw = await self.redis.evalsha(script.sha, len(keys), *keys, *args)
            except asyncio.CancelledError as exc:
                if watch.timed_out():
                    raise TimeoutError from exc
                raise
            finally:
                watch.end()
        except UNAVAILABLE_ERRORS as exc:
            raise _unavailable(exc) from exc
        except (AttributeError, TypeError) as exc:
            if not _raised_by_redis_transport(exc):
                raise
            raise _torn_down(exc) from exc
        except redis_errors.NoScriptError:
            # Redis forgot the scripts: restarted, flushed or failed over. That is also
            # the cheap moment to ask whether it forgot the data. NOSCRIPT means the
            # script never ran, so running it again cannot apply it twice; EVAL with the
            # source cannot meet NOSCRIPT again, even if another flush comes between.
            await self.ensure_scripts()
            raw = await self._guard(self.redis.eval(_source(script), len(keys), *keys, *args))
        self._observe_latency(name, time.perf_counter() - started)
        reply = decode_reply(raw)
        if reply.swept:
            self._add("credits", "expired")(reply.swept)
        return reply

    def _add(self, metric: str, *labels: str) -> Callable[[float], None]:
        """What adds to one series: its counter's ``inc`` or histogram's ``observe``."""
        key = (metric, *labels)
        add = self._children.get(key)
        if add is None:
            add = _adder(getattr(self.metrics, metric).labels(*labels))
            if len(self._children) < 1024:  # features come from Redis replies too
                self._children[key] = add
        return add

    def _observe_latency(self, operation: str, seconds: float) -> None:
        observe = self._latency.get(operation)
        if observe is None:
            observe = self._add("redis_latency", operation)
            if len(self._latency) < 64:
                self._latency[operation] = observe
        observe(seconds)

    def _count(self, feature: str, outcome: str) -> None:
        add = self._counts.get((feature, outcome))
        if add is None:
            add = self._add("reservations", feature, outcome)
            if len(self._counts) < 1024:
                self._counts[(feature, outcome)] = add
        add(1)

    def _add_credits(self, kind: str, amount: int) -> None:
        add = self._credits.get(kind)
        if add is None:
            add = self._credits[kind] = self._add("credits", kind)  # a handful of kinds
        add(amount)

    def _period_info(self, now: datetime) -> _PeriodInfo:
        utc = now if now.tzinfo is UTC else now.astimezone(UTC)
        return self._info_of(utc.year, utc.month)

    def _info_of(self, year: int, month: int) -> _PeriodInfo:
        info = self._periods.get((year, month))
        if info is None:
            period = Period(year, month)
            info = _PeriodInfo(period, str(period), domain.to_ms(period.keys_expire_at))
            if len(self._periods) > 64:  # a frozen or travelling clock in tests
                self._periods.clear()
            self._periods[(year, month)] = info
        return info

    async def ensure_scripts(self) -> None:
        """Load any script Redis has forgotten (a restart, a flush, a new primary)."""

        async def load() -> None:
            async with self._reload_lock:
                shas = [s.sha for s in self.scripts.values()]
                exists = await self.redis.script_exists(*shas)
                present = _all_nodes_agree(exists, len(shas))
                for script, ok in zip(self.scripts.values(), present, strict=True):
                    if not ok:
                        script.sha = await self.redis.script_load(script.script)
                        self.metrics.scripts_reloaded.inc()

        await self._guard(load())
        await self.check_instance()

    async def check_instance(self) -> bool:
        """Compare the data-set epoch in Redis with the one seen last; False (with a
        metric and a warning) when Redis came back without its data.

        Runs at start-up, on /readyz and after NOSCRIPT, never per request. The first
        check of a process only learns the epoch: an empty Redis then is a new one.
        """

        async def read_or_create() -> str | None:
            seen = await self.redis.get(INSTANCE_KEY)
            if seen is None:
                # NX: when processes race, the first epoch written wins for all of them.
                await self.redis.set(INSTANCE_KEY, secrets.token_hex(16), nx=True)
                seen = await self.redis.get(INSTANCE_KEY)
            return seen.decode() if isinstance(seen, bytes) else seen

        try:
            seen = await self._guard(read_or_create())
        except redis_errors.ResponseError as exc:
            # E.g. OOM refusing the SET: the watch is best effort, serving is not.
            log.warning("could not check the redis data-set epoch: %s", exc)
            return True
        lost = self.instance_epoch is not None and seen != self.instance_epoch
        if lost:
            self.metrics.state_lost.inc()
            log.warning(
                "REDIS STATE LOST: the data-set epoch changed from %s to %s (restart "
                "without persistence, FLUSHALL or failover to an empty node); credits "
                "used and held before now are forgotten and coaches start fresh",
                self.instance_epoch,
                seen,
            )
        self.instance_epoch = seen
        return not lost

    async def ping(self) -> None:
        await self._guard(self.redis.ping())

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

    def _usage(self, coach_id: str, period: Period, used: int, held: int) -> Usage:
        left = max(0, self.allowance - used - held)  # domain.remaining, inline
        features = self._features.get(left)
        if features is None:
            features = Usage.of(
                coach_id,
                period,
                allowance=self.allowance,
                used=used,
                held=held,
                costs=self.feature_costs,
            ).features
            if len(self._features) < 4096:
                self._features[left] = features
        return domain.new_usage(coach_id, period, self.allowance, used, held, features)

    def _reservation(self, rid: ReservationId, reply: Reply) -> Reservation:
        return domain.new_reservation(
            rid,
            reply.feature,
            reply.cost,
            _STATES[reply.state],
            domain.from_ms(reply.expires_ms),
            self._usage(rid.coach_id, rid.period, reply.used, reply.held),
        )

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
        reply = await self._run("reserve", call.keys, call.args)
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
        base = f"{KEY_PREFIX}:{{{coach_id}}}:{info.text}"  # as period_keys names them
        key_list = [f"{base}:account", f"{base}:holds", f"{base}:events"]
        if idempotency_key is not None:
            key_list.append(idempotency_key_name(coach_id, principal, idempotency_key))
        now_ms = domain.to_ms(now)
        args: list[Any] = [
            now_ms,
            rid.token,
            feature,
            cost,
            now_ms + ttl * 1000,
            self.allowance,
            info.keys_expire_ms,
            IDEMPOTENCY_TTL_SECONDS * 1000,
            info.text,
            self.release_batch,
            self.events_max,
        ]
        return _ReserveCall(rid, feature, cost, now, key_list, args)

    async def _reserve_outcome(self, call: _ReserveCall, reply: Reply) -> tuple[Reservation, bool]:
        rid, feature, cost = call.rid, call.feature, call.cost
        coach_id, period = rid.coach_id, rid.period
        if reply.status == "OK":
            self._count(feature, "held")
            self._remember(rid)
            return self._reservation(rid, reply), True
        if reply.status == "REPLAY":
            return self._reservation(ReservationId(coach_id, period, reply.token), reply), False
        if reply.status == "REPLAY_ELSEWHERE":
            earlier = ReservationId(coach_id, Period.parse(reply.extra), reply.token)
            return await self.get_reservation(str(earlier)), False
        if reply.status == "IDEM_REUSED":
            raise IdempotencyKeyReused(
                f"This Idempotency-Key was already used to reserve {reply.feature!r}; "
                "use a new key for a different request."
            )
        if reply.status == "EXHAUSTED":
            self._count(feature, "exhausted")
            self._add("exhausted", feature)(1)
            raise self._exhausted(feature, cost, period, call.now, reply)
        raise RuntimeError(f"unexpected reserve reply {reply.status!r}")

    def _exhausted(
        self, feature: str, cost: int, period: Period, now: datetime, reply: Reply
    ) -> CreditsExhausted:
        first_expiry = int(reply.extra or 0)
        held_up = self.allowance - reply.used >= cost and first_expiry > 0
        hold_wait = domain.seconds_until(domain.from_ms(first_expiry), now) if held_up else None
        retry_after = (
            hold_wait if hold_wait is not None else domain.seconds_until(period.resets_at, now)
        )
        detail = domain.exhausted_detail(
            feature=feature,
            cost=cost,
            allowance=self.allowance,
            used=reply.used,
            held=reply.held,
            period=period,
            hold_wait_seconds=hold_wait,
        )
        return CreditsExhausted(
            detail,
            title=domain.exhausted_title(
                cost=cost, allowance=self.allowance, used=reply.used, hold_wait_seconds=hold_wait
            ),
            feature=feature,
            cost=cost,
            remaining=domain.remaining(self.allowance, reply.used, reply.held),
            resets_at=period.resets_at,
            retry_after=retry_after,
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
        # Only ids that parse back to themselves: a valid coach (checked before the
        # reserve), canonical parts by construction, and a four-digit year from 1970.
        if 1970 <= rid.period.year <= 9999:
            issued = self._issued
            if len(issued) >= 4096:
                issued.clear()
            issued[str(rid)] = rid

    async def get_reservation(self, reservation_id: str) -> Reservation:
        rid = self._parse_id(reservation_id)
        keys = period_keys(rid.coach_id, rid.period)
        reply = await self._run(
            "get_reservation",
            [keys.account, keys.holds],
            [domain.to_ms(self.clock()), rid.token],
        )
        if reply.status == "NOT_FOUND":
            raise ReservationNotFound(reservation_id)
        return self._reservation(rid, reply)

    def _settle_call(self, reservation_id: str) -> tuple[ReservationId, list[str], list[Any]]:
        rid = self._parse_id(reservation_id)
        period = rid.period
        base = f"{KEY_PREFIX}:{{{rid.coach_id}}}:{period.year:04d}-{period.month:02d}"
        return (
            rid,
            [f"{base}:account", f"{base}:holds", f"{base}:events"],  # as period_keys does
            [
                domain.to_ms(self.clock()),
                rid.token,
                self.release_batch,
                self.events_max,
                self._info_of(period.year, period.month).keys_expire_ms,
            ],
        )

    def _settle_outcome(self, script: str, rid: ReservationId, reply: Reply) -> Reservation:
        match reply.status:
            case "OK":
                reservation = self._reservation(rid, reply)
                if reply.extra != "again":
                    outcome = _OUTCOMES[reply.state]
                    self._count(reply.feature, outcome)
                    if reservation.status is not Status.EXPIRED:  # counted when swept
                        self._add_credits(outcome, reply.cost)
                return reservation
            case "NOT_FOUND":
                raise ReservationNotFound(str(rid))
            case "REFUNDED":
                raise ReservationRefunded(str(rid))
            case "EXPIRED":
                raise ReservationExpired(str(rid))
            case "COMMITTED":
                raise ReservationCommitted(str(rid))
        raise RuntimeError(f"unexpected {script} reply {reply.status!r}")

    async def commit(self, reservation_id: str) -> Reservation:
        rid, keys, args = self._settle_call(reservation_id)
        return self._settle_outcome("commit", rid, await self._run("commit", keys, args))

    async def refund(self, reservation_id: str) -> Reservation:
        rid, keys, args = self._settle_call(reservation_id)
        return self._settle_outcome("refund", rid, await self._run("refund", keys, args))

    async def usage(self, coach_id: str) -> Usage:
        self.check_coach_id(coach_id)
        now = self.clock()
        info = self._period_info(now)
        keys = period_keys(coach_id, info.period)
        reply = await self._run("get_usage", [keys.account, keys.holds], [domain.to_ms(now)])
        return self._usage(coach_id, info.period, reply.used, reply.held)

    async def usage_many(self, coach_ids: Sequence[str]) -> list[Usage]:
        """Counters for many coaches in one pipelined round trip (per node)."""
        for coach_id in coach_ids:
            self.check_coach_id(coach_id)
        now = self.clock()
        period = Period.containing(now)
        now_ms = domain.to_ms(now)
        script = self.scripts["get_usage"]
        pairs = [period_keys(c, period) for c in coach_ids]

        async def run(send_source: bool = False) -> list[Any]:
            if self.coalesce and not send_source:
                # One command per coach on the shared write: no pipeline object, and no
                # SCRIPT EXISTS round trip before it (a NOSCRIPT comes back instead).
                send = self._coalescer_here().call
                sha = script.sha
                return list(
                    await asyncio.gather(
                        *(send("EVALSHA", sha, 2, k.account, k.holds, now_ms) for k in pairs)
                    )
                )
            if isinstance(self.redis, RedisCluster):
                # Cluster pipelines cannot load scripts; bounded fan-out instead.
                sem = asyncio.Semaphore(64)

                async def one(k: PeriodKeys) -> Any:
                    async with sem:
                        return await script(keys=[k.account, k.holds], args=[now_ms])

                return list(await asyncio.gather(*(one(k) for k in pairs)))
            async with self.redis.pipeline(transaction=False) as pipe:
                for k in pairs:
                    if send_source:
                        pipe.eval(_source(script), 2, k.account, k.holds, now_ms)
                    else:
                        await script(keys=[k.account, k.holds], args=[now_ms], client=pipe)
                return list(await pipe.execute())

        try:
            replies = await self._guard(run())
        except redis_errors.NoScriptError:
            # A script flush landed between the pipeline loading the script and running
            # it. Reading writes nothing, so the batch simply runs again, with the source.
            await self.ensure_scripts()
            replies = await self._guard(run(send_source=True))
        return [
            self._usage(c, period, r.used, r.held)
            for c, r in zip(coach_ids, map(decode_reply, replies), strict=True)
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
        keys = period_keys(coach_id, period)
        raw = await self._guard_run_raw(
            "get_events",
            [keys.account, keys.holds, keys.events],
            [domain.to_ms(now), before or 0, limit],
        )
        reply = decode_reply(raw)
        events: list[Event] = []
        for row in raw[len(Reply._fields) :]:
            seq, ms, kind, token, feature, cost = _text(row).split("|")
            events.append(
                Event(
                    int(seq),
                    domain.from_ms(int(ms)),
                    kind,
                    ReservationId(coach_id, period, token),
                    feature,
                    int(cost),
                )
            )
        return EventPage(
            events,
            int(reply.extra) if reply.extra else None,
            self._usage(coach_id, period, reply.used, reply.held),
        )

    async def _guard_run_raw(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """A read-only script whose reply carries rows after the status array."""
        started = time.perf_counter()
        raw = await self._guard(self.scripts[name](keys=list(keys), args=list(args)))
        self._observe_latency(name, time.perf_counter() - started)
        return raw

    # --- batches -----------------------------------------------------------------------

    async def reserve_many(
        self, items: Sequence[ReserveItem], *, principal: str = ""
    ) -> list[tuple[Reservation, bool] | CreditsError]:
        """Reserve for many items in one pipelined round trip, each still one atomic script
        call, run in request order. Each item succeeds or fails on its own (its error is
        returned in its place); only an unreachable Redis fails them all."""
        prepared: list[_ReserveCall | CreditsError] = []
        for item in items:
            try:
                _check_batch_item(item)
                prepared.append(
                    self._reserve_call(
                        item.coach_id,
                        item.feature,
                        item.ttl_seconds,
                        item.idempotency_key,
                        principal,
                    )
                )
            except CreditsError as exc:
                prepared.append(exc)
        calls = [p for p in prepared if isinstance(p, _ReserveCall)]
        replies = iter(await self._run_many([("reserve", c.keys, c.args) for c in calls]))
        outcomes: list[tuple[Reservation, bool] | CreditsError] = []
        for p in prepared:
            if isinstance(p, CreditsError):
                outcomes.append(p)
                continue
            try:
                outcomes.append(await self._reserve_outcome(p, next(replies)))
            except CreditsError as exc:
                outcomes.append(exc)
        return outcomes

    async def settle_many(
        self, items: Sequence[tuple[str, SettleAction]]
    ) -> list[Reservation | CreditsError]:
        """Commit or refund many reservations in one pipelined round trip, in request
        order; each succeeds or fails on its own."""
        prepared: list[tuple[SettleAction, ReservationId, list[str], list[Any]] | CreditsError]
        prepared = []
        for reservation_id, action in items:
            try:
                prepared.append((action, *self._settle_call(reservation_id)))
            except CreditsError as exc:
                prepared.append(exc)
        calls = [p for p in prepared if not isinstance(p, CreditsError)]
        replies = iter(await self._run_many([(a, keys, args) for a, _, keys, args in calls]))
        outcomes: list[Reservation | CreditsError] = []
        for p in prepared:
            if isinstance(p, CreditsError):
                outcomes.append(p)
                continue
            try:
                outcomes.append(self._settle_outcome(p[0], p[1], next(replies)))
            except CreditsError as exc:
                outcomes.append(exc)
        return outcomes

    async def _run_many(self, calls: Sequence[ScriptCall]) -> list[Reply]:
        """Script calls in one round trip; calls on one coach run in the order given."""
        if not calls:
            return []
        started = time.perf_counter()

        async def pipelined() -> list[Any]:
            assert isinstance(self.redis, Redis)
            # One MULTI/EXEC that loads the scripts it runs: no SCRIPT FLUSH can land
            # between two calls, so none meets NOSCRIPT. Re-running a call that had, after
            # later calls on its coach had run, broke the order (a refund could beat the
            # commit sent before it).
            names = list(dict.fromkeys(name for name, _, _ in calls))
            async with self.redis.pipeline(transaction=True) as pipe:
                for name in names:
                    pipe.script_load(_source(self.scripts[name]))
                for name, keys, args in calls:
                    pipe.evalsha(self.scripts[name].sha, len(keys), *keys, *args)
                raw = list(await pipe.execute(raise_on_error=False))[len(names) :]
            for reply in raw:
                if isinstance(reply, Exception):
                    raise reply
            return raw

        async def per_coach() -> list[Any]:
            # Cluster pipelines cannot load scripts: one sequential lane per coach (its
            # hash tag) keeps each coach's order, lanes run side by side.
            lanes: dict[str, list[int]] = {}
            for i, (_, keys, _) in enumerate(calls):
                lanes.setdefault(keys[0].split("}", 1)[0], []).append(i)
            results: list[Any] = [None] * len(calls)
            sem = asyncio.Semaphore(64)

            async def lane(indexes: list[int]) -> None:
                async with sem:
                    for i in indexes:
                        name, keys, args = calls[i]
                        results[i] = await self.scripts[name](keys=keys, args=args)

            await asyncio.gather(*(lane(ix) for ix in lanes.values()))
            return results

        raw = await self._guard(
            per_coach() if isinstance(self.redis, RedisCluster) else pipelined()
        )
        self._observe_latency("batch", time.perf_counter() - started)
        replies = [decode_reply(r) for r in raw]
        swept = sum(r.swept for r in replies)
        if swept:
            self._add("credits", "expired")(swept)
        return replies


def _check_batch_item(item: ReserveItem) -> None:
    """What the single-item route checks in its schema and headers, checked per item so
    that one bad item fails alone."""
    ttl = item.ttl_seconds
    if ttl is not None and not domain.MIN_TTL_SECONDS <= ttl <= domain.MAX_TTL_SECONDS:
        raise InvalidRequest(
            f"ttl_seconds must be between {domain.MIN_TTL_SECONDS} and {domain.MAX_TTL_SECONDS}."
        )
    key = item.idempotency_key
    if key is not None and not domain.is_valid_idempotency_key(key):
        raise InvalidRequest("idempotency_key must be 1-255 printable ASCII characters.")


def _adder(child: Any) -> Callable[[float], None]:
    """A faster ``child.inc`` (counter) or ``child.observe`` (histogram) with the same
    effect: the public methods re-check, on every call, that the child is a labelled
    series (it is, once) and walk the buckets one by one. Falls back to the public
    method where prometheus_client's insides are not the expected ones."""
    try:
        if isinstance(child, Histogram):
            bounds = list(child._upper_bounds)
            buckets = [bucket.inc for bucket in child._buckets]
            add_sum = child._sum.inc
            if len(buckets) != len(bounds) or bounds[-1] != math.inf:
                return cast(Callable[[float], None], child.observe)

            def observe(amount: float) -> None:
                add_sum(amount)
                # The first bucket whose upper bound is at least the amount, as observe()
                # finds it.
                buckets[bisect.bisect_left(bounds, amount)](1)

            return observe
        if isinstance(child, Counter):
            add_value = child._value.inc
            public_inc = child.inc

            def inc(amount: float) -> None:
                if amount < 0:
                    public_inc(amount)  # raises as a counter does
                add_value(amount)

            return inc
    except AttributeError:
        pass
    return cast(Callable[[float], None], getattr(child, "inc", None) or child.observe)


def _text(v: Any) -> str:
    # The service's clients decode replies already: the common case is one type check.
    if type(v) is str:
        return v
    return v.decode() if isinstance(v, bytes) else str(v)


def _source(script: AsyncScript) -> str:
    source = script.script
    assert isinstance(source, str)  # registered from load_script_source
    return source


def _unavailable(exc: BaseException) -> BackendUnavailable:
    log.warning("redis unavailable: %s: %s", type(exc).__name__, exc)
    return BackendUnavailable()


def _torn_down(exc: BaseException) -> BackendUnavailable:
    log.warning("redis connection torn down mid-call: %s: %s", type(exc).__name__, exc)
    return BackendUnavailable()


def _raised_by_redis_transport(exc: BaseException) -> bool:
    """Whether an AttributeError/TypeError came out of redis-py's or asyncio's socket
    code. The asyncio client can write on a connection that another task has just torn
    down (a cluster client closes every connection on CLUSTERDOWN during a failover) and
    then raises these instead of ConnectionError; our own bugs must still surface."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return isinstance(module, str) and module.startswith(("redis.", "asyncio."))


def _all_nodes_agree(exists: Any, count: int) -> list[bool]:
    """``SCRIPT EXISTS`` answers a list, or on a cluster a list per node: a script is
    present only where every node has it."""
    if isinstance(exists, dict):
        per_node = list(exists.values())
        return [all(bool(node[i]) for node in per_node) for i in range(count)]
    return [bool(x) for x in exists]
