"""Seeded fault injection against a real redis-server, checked against the reference
model after every step.

Per seed, ``random.Random(seed)`` drives a sequence of steps over a handful of coaches:
batches of reserve / commit / refund / extend / read requests, of the batch calls
reserve_many / settle_many, of grants (each with an Idempotency-Key, as a careful
operator sends them) and of coaches' allowances set and deleted (the requests of one
batch touch distinct coaches and run concurrently), retries of earlier requests (same
Idempotency-Key, same reservation id, same allowance), clock moves (small ticks, past expiries, onto
month and year ends) and faults:

- ``flush``: SCRIPT FLUSH before a batch or while it runs;
- ``pause-short`` / ``pause-long``: CLIENT PAUSE shorter / longer than the client's
  socket timeout, while a batch runs (the long one times calls out);
- ``restart`` / ``kill``: the server stopped (SIGTERM) or killed (SIGKILL) and started
  again between steps, and ``kill-during``: killed while a batch is in flight. The
  server runs with ``appendonly yes`` and ``appendfsync always``, so nothing it
  acknowledged is lost;
- dropped replies: a request is either not sent or applied with its reply thrown
  away, and the caller only learns that it timed out.

A request whose fate is unknown (a dropped reply, a timeout, a broken connection) is
resolved as a careful client would: the same request again, same Idempotency-Key or
reservation id, until Redis answers. The model then accepts either history (applied
once, or not at all) but never a double application. A reserve sent without a key
cannot be retried safely, so its fate is read from Redis instead: at most one unknown
hold may have appeared, and only if the model says it fitted.

After every step the harness checks, against :class:`tests.support.reference.Ledger`:
used + held <= allowance per coach and period (the raw stored counters, which may still
include lapsed holds; the highest allowance any hold was made under, as a lowered one
takes nothing back), used equal to the committed credits and granted to the grants,
every reservation record in the state the model expects, every reservation settled at
most once and the granted events adding up to granted (from the event log), and what the
store reports for usage.

Run on demand::

    python -m tests.support.faults --seeds 5000            # seeds 0..4999
    python -m tests.support.faults --seeds 200 --start 7000 --steps 80
    python -m tests.support.faults --seed 1234 --verbose    # one seed, printing every step

Flags: ``--seeds N`` how many seeds (default 200), ``--start S`` the first seed
(default 0), ``--seed S`` exactly one seed, ``--steps K`` steps per seed (default 40),
``--coaches C`` coaches per seed (default 5), ``--verbose`` print each step as it runs.
It prints ``seeds run: N, violations found: M`` and, for each violation, the seed, the
failed check and the step list; it exits 1 when it found any. A seed replays the same
steps; only where real time decides (a call caught by a pause or a kill) may the
outcome differ between runs, and the model accepts both.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from redis.asyncio import Redis

from app.config import Settings
from app.domain import Grant, Period, Reservation, ReservationId, Status, Usage, from_ms, to_ms
from app.errors import (
    BackendUnavailable,
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
)
from app.main import connect
from app.store import AnyRedis, CreditStore, ReserveItem, SettleAction, period_keys
from tests.support.clock import FrozenClock
from tests.support.ledger_view import logged_events, stored_records
from tests.support.redis import RedisProcess
from tests.support.reference import (
    Decision,
    GrantDecision,
    GrantKind,
    Kind,
    Ledger,
    RefReservation,
    Settle,
)

ALLOWANCE: Final = 50
FEATURES: Final = ("checkin_draft", "trend_analysis")
TTLS: Final = (2, 30, 60, 300, 3600)
PRINCIPALS: Final = ("", "svc-b")
SETTLE_ACTIONS: Final[tuple[SettleAction, ...]] = ("commit", "refund")
ALLOWANCES: Final = (None, 0, 5, 20, 50, 80)
GRANT_CREDITS: Final = (-30, -5, -1, 1, 3, 10)
#: The client's socket timeout; the long pause outlasts it, the short one does not.
SOCKET_TIMEOUT: Final = 0.15
SHORT_PAUSE_MS: Final = 50
LONG_PAUSE_MS: Final = 300
#: How long a request is retried while Redis is away before the harness calls it stuck.
RECOVERY_SECONDS: Final = 15.0
AOF_ARGS: Final = ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]

_STATES: Final = {
    "h": Status.HELD,
    "c": Status.COMMITTED,
    "r": Status.REFUNDED,
    "e": Status.EXPIRED,
}

StoreFactory = Callable[[AnyRedis, FrozenClock], CreditStore]


class Violation(AssertionError):
    """An invariant or model check failed."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Violation(message)


class _Unknown:
    """The caller could not tell whether the request was applied."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()


@dataclass(frozen=True)
class Request:
    op: str  # reserve, commit, refund, extend, get, usage, usage_many, grant, allowance
    coach: str
    feature: str = ""
    ttl: int = 0
    key: str | None = None
    principal: str = ""
    rid: str = ""
    coaches: tuple[str, ...] = ()
    #: For reserve_many: (feature, ttl, key) per item, all for ``coach``.
    reserves: tuple[tuple[str, int, str], ...] = ()
    #: For settle_many: (reservation id, "commit" or "refund") per item.
    settles: tuple[tuple[str, SettleAction], ...] = ()
    #: For grant: the credits and the reason; for allowance: the value (None deletes).
    credits: int = 0
    reason: str = ""
    allowance: int | None = None
    #: None: delivered; "before": lost on the way; "after": applied, reply lost.
    drop: str | None = None

    def describe(self, names: dict[str, str]) -> str:
        parts = [self.op]
        if self.op == "reserve":
            parts += [self.coach, self.feature, f"ttl={self.ttl}", f"key={self.key}"]
            parts.append(f"principal={self.principal or '-'}")
        elif self.op in ("commit", "refund", "get"):
            parts.append(names.get(self.rid, "res?"))
        elif self.op == "extend":
            parts += [names.get(self.rid, "res?"), f"ttl={self.ttl}"]
        elif self.op == "grant":
            parts += [self.coach, f"{self.credits:+d}", f"key={self.key}"]
            parts.append(f"principal={self.principal or '-'}")
        elif self.op == "allowance":
            parts += [self.coach, str(self.allowance)]
        elif self.op == "usage":
            parts.append(self.coach)
        elif self.op == "reserve_many":
            parts.append(self.coach)
            parts.append(",".join(f"{f}/{ttl}/{key}" for f, ttl, key in self.reserves))
            parts.append(f"principal={self.principal or '-'}")
        elif self.op == "settle_many":
            parts.append(",".join(f"{a} {names.get(rid, 'res?')}" for rid, a in self.settles))
        else:
            parts.append(",".join(self.coaches))
        if self.drop:
            parts.append(f"drop={self.drop}")
        return " ".join(parts)


def default_store(redis: AnyRedis, clock: FrozenClock) -> CreditStore:
    return CreditStore(
        redis, allowance=ALLOWANCE, clock=clock, op_timeout_seconds=SOCKET_TIMEOUT * 2.5
    )


@dataclass
class SeedResult:
    seed: int
    steps: list[str] = field(default_factory=list)
    violation: str | None = None
    seconds: float = 0.0
    #: Requests whose fate the caller could not know, and how many of those Redis had
    #: in fact applied (found by the retry or by reading the coach's holds).
    unknown: int = 0
    unknown_applied: int = 0

    def report(self) -> str:
        lines = [f"seed {self.seed}: {self.violation}"]
        lines += [f"  {i:03d} {s}" for i, s in enumerate(self.steps)]
        return "\n".join(lines)


class SeedRun:
    """One seed: its own model, clock and store over the shared server."""

    def __init__(
        self,
        server: RedisProcess,
        seed: int,
        *,
        steps: int = 40,
        coaches: int = 5,
        store_factory: StoreFactory = default_store,
        timing_faults: bool = True,
        verbose: bool = False,
    ) -> None:
        self.server = server
        self.timing_faults = timing_faults
        self.seed = seed
        self.rng = random.Random(seed)
        self.n_steps = steps
        self.coaches = [f"c{seed}-{i}" for i in range(coaches)]
        start = datetime(2427 + self.rng.randrange(2), self.rng.randint(1, 12), 1, tzinfo=UTC)
        self.clock = FrozenClock(start + timedelta(seconds=self.rng.randrange(28 * 86400)))
        self.model = Ledger(allowance=ALLOWANCE)
        self.store_factory = store_factory
        self.verbose = verbose
        self.result = SeedResult(seed)
        #: Requests that may be retried later, as sent (same key or reservation id).
        self.history: list[Request] = []
        #: Readable names for reservation ids, in the order the model learnt them.
        self.names: dict[str, str] = {}

    # --- plumbing ------------------------------------------------------------------------

    def log(self, text: str) -> None:
        self.result.steps.append(text)
        if self.verbose:
            print(f"  {len(self.result.steps) - 1:03d} {text}", flush=True)

    def learn(self, ref: RefReservation) -> None:
        self.names.setdefault(ref.rid, f"res{len(self.names)}")

    async def run(self) -> SeedResult:
        started = time.perf_counter()
        settings = Settings(
            redis_url=self.server.url, allow_open=True, redis_timeout_seconds=SOCKET_TIMEOUT
        )
        self.redis = connect(settings)
        self.admin = Redis.from_url(self.server.url, decode_responses=True)
        self.store = self.store_factory(self.redis, self.clock)
        # The audit reads the event log through the store's own decoders.
        self.reader = CreditStore(self.admin, clock=self.clock)
        try:
            await self.admin.flushall()
            for _ in range(self.n_steps):
                await self.step()
                await self.audit()
        except Violation as exc:
            self.result.violation = str(exc) or repr(exc)
        except Exception as exc:  # anything else escaping the service is a bug too
            self.result.violation = f"unexpected {type(exc).__name__}: {exc}"
        finally:
            try:
                # The admin connection may be stale after a restart; leave no pause behind.
                await self.wait_for_redis()
                await self.admin.client_unpause()
            except Exception as exc:
                self.result.violation = self.result.violation or f"cleanup failed: {exc!r}"
            await self.redis.aclose()
            await self.admin.aclose()
            self.result.seconds = time.perf_counter() - started
        return self.result

    # --- choosing steps ----------------------------------------------------------------

    async def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.10:
            self.move_clock()
        elif roll < 0.14:
            await self.restart(kill=self.rng.random() < 0.5)
        elif roll < 0.22:
            self.log("flush")
            await self.admin.script_flush()
        else:
            batch = self.make_batch()
            fault = self.rng.choices(
                ["none", "flush-during", "pause-short", "pause-long", "kill-during"],
                weights=[72, 10, 6, 5, 1.5],
            )[0]
            if not self.timing_faults and fault in ("pause-short", "pause-long", "kill-during"):
                # Drawn all the same, so the rest of the seed's steps stay as they were.
                fault = "none"
            await self.run_batch(batch, fault)

    def move_clock(self) -> None:
        now = self.clock()
        kind = self.rng.choice(["tick", "tick", "expiries", "month-end", "year-end", "days"])
        if kind == "tick":
            self.clock.advance(self.rng.randint(1, 120))
        elif kind == "expiries":
            self.clock.advance(self.rng.randint(3601, 7200))
        elif kind == "days":
            self.clock.advance(days=self.rng.randint(1, 20))
        else:
            period = Period.containing(now)
            end = Period(period.year, 12).resets_at if kind == "year-end" else period.resets_at
            target = end - timedelta(seconds=self.rng.randint(0, 90))
            if target > now:
                self.clock.set(target)
        self.log(f"clock {kind} -> {self.clock().isoformat()}")

    def make_batch(self) -> list[Request]:
        size = self.rng.choice([1, 1, 2, 3, 4])
        free = list(self.coaches)
        self.rng.shuffle(free)
        batch = [self.make_request(coach) for coach in free[:size]]
        # Requests of one batch race each other, so each reads and writes only coaches
        # no other request of the batch touches: then any order gives the same outcome.
        taken = {r.coach for r in batch}
        return [
            replace(r, coaches=tuple(c for c in r.coaches if c == r.coach or c not in taken))
            if r.op == "usage_many"
            else r
            for r in batch
        ]

    def make_request(self, coach: str) -> Request:
        drop = self.rng.choices([None, "before", "after"], weights=[88, 6, 6])[0]
        mine = [r for r in self.model.reservations.values() if r.coach_id == coach]
        retries = [r for r in self.history if r.coach == coach]
        roll = self.rng.random()
        if roll < 0.12 and retries:
            return replace(self.rng.choice(retries), drop=drop)
        if roll < 0.5 or not mine:
            key = self.rng.choice([None, f"k{self.rng.randrange(6)}"])
            return Request(
                "reserve",
                coach,
                feature=self.rng.choice(FEATURES),
                ttl=self.rng.choice(TTLS),
                key=key,
                principal=self.rng.choice(PRINCIPALS),
                drop=drop,
            )
        if roll < 0.56:
            # A batch caller that may retry sends keys, so every item can be replayed.
            reserves = tuple(
                (self.rng.choice(FEATURES), self.rng.choice(TTLS), f"k{self.rng.randrange(6)}")
                for _ in range(self.rng.randint(1, 4))
            )
            principal = self.rng.choice(PRINCIPALS)
            return Request("reserve_many", coach, reserves=reserves, principal=principal, drop=drop)
        if roll < 0.62:
            settles = tuple(
                (self.rng.choice(mine).rid, self.rng.choice(SETTLE_ACTIONS))
                for _ in range(self.rng.randint(1, 4))
            )
            return Request("settle_many", coach, settles=settles, drop=drop)
        if roll < 0.66:
            return Request(
                "grant",
                coach,
                credits=self.rng.choice(GRANT_CREDITS),
                reason=self.rng.choice(["goodwill", "a | b"]),
                key=f"g{self.rng.randrange(4)}",
                principal=self.rng.choice(PRINCIPALS),
                drop=drop,
            )
        if roll < 0.68:
            return Request("allowance", coach, allowance=self.rng.choice(ALLOWANCES), drop=drop)
        rid = self.rng.choice(mine).rid
        if roll < 0.72:
            return Request("extend", coach, rid=rid, ttl=self.rng.choice(TTLS), drop=drop)
        if roll < 0.80:
            return Request("commit", coach, rid=rid, drop=drop)
        if roll < 0.88:
            return Request("refund", coach, rid=rid, drop=drop)
        if roll < 0.92:
            return Request("get", coach, rid=rid, drop=drop)
        if roll < 0.96:
            return Request("usage", coach, drop=drop)
        others = self.rng.sample(self.coaches, self.rng.randint(1, len(self.coaches)))
        return Request("usage_many", coach, coaches=(coach, *others), drop=drop)

    # --- faults ------------------------------------------------------------------------

    async def restart(self, *, kill: bool) -> None:
        self.log("kill+start" if kill else "restart")
        await asyncio.to_thread(self.server.restart, kill=kill)

    async def run_batch(self, batch: list[Request], fault: str) -> None:
        self.log(f"batch [{'; '.join(r.describe(self.names) for r in batch)}] fault={fault}")
        if fault in ("pause-short", "pause-long"):
            ms = SHORT_PAUSE_MS if fault == "pause-short" else LONG_PAUSE_MS
            await self.admin.client_pause(ms, all=True)
        calls = [asyncio.create_task(self.send(r)) for r in batch]
        if fault == "flush-during":
            for _ in range(3):
                await self.admin.script_flush()
                await asyncio.sleep(0)
        elif fault == "kill-during":
            await asyncio.sleep(self.rng.random() * 0.003)
            await asyncio.to_thread(self.server.restart, kill=True)
        results = await asyncio.gather(*calls)
        for request, result in zip(batch, results, strict=True):
            await self.settle_request(request, result)
            if request.op != "reserve" or request.key is not None:
                self.history.append(replace(request, drop=None))

    async def send(self, request: Request) -> Any:
        """The request's reply, a CreditsError it raised, or UNKNOWN."""
        if request.drop == "before":
            return UNKNOWN
        try:
            result = await self.call(request)
        except BackendUnavailable:
            return UNKNOWN
        except CreditsError as exc:
            result = exc
        if isinstance(result, list) and any(isinstance(r, BackendUnavailable) for r in result):
            # A batch answers per item, and an item can meet an outage of its own (a
            # replay from another period reads that period afterwards): its fate is
            # unknown, so the batch is retried like any request of unknown fate.
            return UNKNOWN
        return UNKNOWN if request.drop == "after" else result

    async def call(self, request: Request) -> Any:
        s = self.store
        match request.op:
            case "reserve":
                return await s.reserve(
                    request.coach,
                    request.feature,
                    ttl_seconds=request.ttl,
                    idempotency_key=request.key,
                    principal=request.principal,
                )
            case "commit":
                return await s.commit(request.rid)
            case "extend":
                return await s.extend(request.rid, request.ttl)
            case "grant":
                return await s.grant(
                    request.coach,
                    request.credits,
                    request.reason,
                    idempotency_key=request.key,
                    principal=request.principal,
                )
            case "allowance":
                return await s.set_allowance(request.coach, request.allowance)
            case "refund":
                return await s.refund(request.rid)
            case "get":
                return await s.get_reservation(request.rid)
            case "usage":
                return await s.usage(request.coach)
            case "reserve_many":
                items = [
                    ReserveItem(request.coach, f, ttl, key) for f, ttl, key in request.reserves
                ]
                return await s.reserve_many(items, principal=request.principal)
            case "settle_many":
                return await s.settle_many(list(request.settles))
            case _:
                return await s.usage_many(list(request.coaches))

    async def definite(self, request: Request) -> Any:
        """Retry the very same request until Redis gives an answer."""
        deadline = time.monotonic() + RECOVERY_SECONDS
        again = replace(request, drop=None)
        while True:
            result = await self.send(again)
            if result is not UNKNOWN:
                return result
            check(time.monotonic() < deadline, f"{request.op} never recovered")
            await asyncio.sleep(0.02)

    # --- checking one request ---------------------------------------------------------

    async def settle_request(self, request: Request, result: Any) -> None:
        ambiguous = result is UNKNOWN
        self.result.unknown += ambiguous
        now = self.clock()
        if request.op == "reserve":
            decision = self.model.reserve(
                request.coach,
                request.feature,
                now,
                ttl_seconds=request.ttl,
                idempotency_key=request.key,
                principal=request.principal,
            )
            if ambiguous and request.key is None:
                await self.adopt_orphan(request, decision.kind)
                return
            if ambiguous:
                result = await self.definite(request)
            self.check_reserve(request, decision, result, may_have_applied=ambiguous)
            return
        if request.op == "grant":
            grant = self.model.grant(
                request.coach,
                request.credits,
                request.reason,
                now,
                idempotency_key=request.key,
                principal=request.principal,
            )
            if ambiguous:
                result = await self.definite(request)
            self.check_grant(request, grant, result, may_have_applied=ambiguous)
            return
        if ambiguous:
            result = await self.definite(request)
        if request.op in ("commit", "refund"):
            self.check_settle(request.op, request.rid, result)
        elif request.op == "extend":
            self.check_extend(request, result)
        elif request.op == "allowance":
            # Setting a value is idempotent: a retry of one already applied changes nothing.
            self.model.set_allowance(request.coach, request.allowance)
            check(isinstance(result, Usage), f"allowance: got {result!r}")
            self.check_usage(result)
        elif request.op == "reserve_many":
            check(
                isinstance(result, list) and len(result) == len(request.reserves),
                f"reserve_many: got {result!r}",
            )
            # Items run in order, each as if sent alone; after a retry, an item the first
            # attempt applied comes back as a replay of its key.
            for (feature, ttl, key), outcome in zip(request.reserves, result, strict=True):
                item = replace(request, op="reserve", feature=feature, ttl=ttl, key=key)
                decision = self.model.reserve(
                    request.coach,
                    feature,
                    now,
                    ttl_seconds=ttl,
                    idempotency_key=key,
                    principal=request.principal,
                )
                self.check_reserve(
                    item, decision, outcome, may_have_applied=ambiguous, snapshot=not ambiguous
                )
        elif request.op == "settle_many":
            check(
                isinstance(result, list) and len(result) == len(request.settles),
                f"settle_many: got {result!r}",
            )
            for (rid, action), outcome in zip(request.settles, result, strict=True):
                self.check_settle(action, rid, outcome, snapshot=not ambiguous)
        elif request.op == "get":
            ref = self.model.get(request.rid)
            assert ref is not None
            check(isinstance(result, Reservation), f"get: got {result!r}")
            self.check_reservation(result, ref)
        else:
            usages = [result] if request.op == "usage" else result
            check(isinstance(usages, list), f"{request.op}: got {result!r}")
            for usage in usages:
                self.check_usage(usage)

    def check_settle(self, op: str, rid: str, result: Any, *, snapshot: bool = True) -> None:
        step = self.model.commit if op == "commit" else self.model.refund
        outcome, ref = step(rid, self.clock())
        check(ref is not None, "settling a reservation the model never saw")
        assert ref is not None
        expected_error = {
            Settle.REFUNDED: ReservationRefunded,
            Settle.EXPIRED: ReservationExpired,
            Settle.COMMITTED: ReservationCommitted,
            Settle.NOT_FOUND: ReservationNotFound,
        }.get(outcome)
        name = self.names[ref.rid]
        if expected_error is not None:
            check(
                isinstance(result, expected_error), f"{op} {name}: want {outcome}, got {result!r}"
            )
            return
        check(isinstance(result, Reservation), f"{op} {name}: want ok, got {result!r}")
        self.check_reservation(result, ref, snapshot=snapshot)

    def check_extend(self, request: Request, result: Any) -> None:
        # Retried after an unknown fate, an extension moves the expiry to the same
        # instant again (the clock stands still): applied once or twice, one outcome.
        outcome = self.model.extend(request.rid, self.clock(), request.ttl)
        ref = self.model.get(request.rid)
        check(ref is not None, "extending a reservation the model never saw")
        assert ref is not None
        name = self.names[ref.rid]
        expected_error = {
            Settle.REFUNDED: ReservationRefunded,
            Settle.EXPIRED: ReservationExpired,
            Settle.COMMITTED: ReservationCommitted,
            Settle.LIMIT: ExtensionLimit,
        }.get(outcome)
        if expected_error is not None:
            check(
                isinstance(result, expected_error), f"extend {name}: want {outcome}, got {result!r}"
            )
            return
        check(isinstance(result, Reservation), f"extend {name}: want ok, got {result!r}")
        self.check_reservation(result, ref)

    def check_grant(
        self, request: Request, decision: GrantDecision, result: Any, *, may_have_applied: bool
    ) -> None:
        what = f"grant {request.coach} {request.credits:+d} key={request.key}"
        errors = {
            GrantKind.REUSED: IdempotencyKeyReused,
            GrantKind.EXCEEDS: GrantExceedsRemaining,
            GrantKind.LIMIT: GrantLimit,
        }
        if decision.kind in errors:
            want = errors[decision.kind]
            check(isinstance(result, want), f"{what}: want {decision.kind}, got {result!r}")
            return
        check(isinstance(result, tuple), f"{what}: want a grant, got {result!r}")
        made, created = result
        check(isinstance(made, Grant), f"{what}: want a grant, got {made!r}")
        if decision.kind is GrantKind.REPLAY:
            check(not created, f"{what}: a replay granted again")
            assert decision.earlier is not None
            check(made.grant_id == decision.earlier.grant_id, f"{what}: another grant replayed")
            return
        # Granted now, or (the first attempt's fate unknown) by that attempt and replayed.
        check(created or may_have_applied, f"{what}: replayed a grant nobody made")
        self.result.unknown_applied += not created
        self.model.bind_grant(decision, made.grant_id)
        check(
            (made.credits, made.reason, made.period)
            == (request.credits, request.reason, decision.period),
            f"{what}: the grant differs from the request",
        )

    def check_reserve(
        self,
        request: Request,
        decision: Decision,
        result: Any,
        *,
        may_have_applied: bool,
        snapshot: bool = True,
    ) -> None:
        what = f"reserve {request.coach} {request.feature} key={request.key}"
        if decision.kind is Kind.EXHAUSTED:
            check(isinstance(result, CreditsExhausted), f"{what}: want exhausted, got {result!r}")
            assert decision.counters is not None
            check(result.remaining == decision.counters.remaining, f"{what}: remaining")
            check(result.remaining < result.cost, f"{what}: refused though it fitted")
            return
        if decision.kind is Kind.REUSED:
            check(isinstance(result, IdempotencyKeyReused), f"{what}: want reused, got {result!r}")
            return
        check(isinstance(result, tuple), f"{what}: want a reservation, got {result!r}")
        res, created = result
        rid = str(res.reservation_id)
        if decision.kind is Kind.REPLAY:
            check(not created, f"{what}: a replay held again")
            assert decision.earlier is not None
            self.check_reservation(res, decision.earlier, snapshot=snapshot)
            return
        known = self.model.get(rid)
        check(known is None, f"{what}: a new hold reuses {self.names.get(rid)}")
        # Held now, or (when the first attempt's fate was unknown) held by that attempt
        # and merely replayed here: either way exactly one hold.
        check(created or may_have_applied, f"{what}: replayed a hold nobody made")
        self.result.unknown_applied += not created
        ref = self.model.bind(decision, rid)
        self.learn(ref)
        self.check_reservation(res, ref, snapshot=snapshot)

    async def adopt_orphan(self, request: Request, kind: Kind) -> None:
        """A keyless reserve of unknown fate: read what Redis holds for the coach."""
        period = Period.containing(self.clock())
        keys = period_keys(request.coach, period)
        await self.wait_for_redis()
        raw = await self.hash_of(keys.account)
        known = {
            ReservationId.parse(rid).token  # type: ignore[union-attr]
            for rid in self.model.by_period.get((request.coach, period), [])
        }
        records = await stored_records(self.admin, request.coach, period)
        orphans = {t: r for t, r in records.items() if t not in known}
        check(len(orphans) <= 1, f"keyless reserve left {len(orphans)} holds")
        if not orphans:
            return
        check(kind is Kind.HELD, f"keyless reserve held although the model says {kind}")
        ((token, record),) = orphans.items()
        state = record.state
        decision = self.model.reserve(
            request.coach, request.feature, self.clock(), ttl_seconds=request.ttl
        )
        check(
            (record.cost, raw.get(f"fn:{record.code}"), from_ms(record.expires_ms))
            == (decision.cost, decision.feature, decision.expires_at),
            f"orphan hold {record} does not match the request",
        )
        ref = self.model.bind(decision, str(ReservationId.of(request.coach, period, token)))
        self.learn(ref)
        self.result.unknown_applied += 1
        self.log(f"  (unanswered reserve was applied: {self.names[ref.rid]}, state {state})")

    async def hash_of(self, key: str) -> dict[str, str]:
        raw = await self.admin.hgetall(key)
        return {_text(k): _text(v) for k, v in raw.items()}

    async def wait_for_redis(self) -> None:
        deadline = time.monotonic() + RECOVERY_SECONDS
        while True:
            try:
                await self.admin.ping()
                return
            except Exception as exc:
                check(time.monotonic() < deadline, f"redis never came back: {exc}")
                await asyncio.sleep(0.02)

    def check_reservation(
        self, res: Reservation, ref: RefReservation, *, snapshot: bool = True
    ) -> None:
        """``snapshot``: also compare the counters the reply carries. Not for the items of
        a retried batch: each item's reply then shows the whole first attempt's effect,
        while the model applies them one by one (the audit checks the counters after)."""
        now = self.clock()
        name = self.names.get(ref.rid, ref.rid)
        check(str(res.reservation_id) == ref.rid, f"{name}: id differs")
        check(res.status is ref.state_at(now), f"{name}: {res.status} != {ref.state_at(now)}")
        check(
            (res.feature, res.cost, res.expires_at) == (ref.feature, ref.cost, ref.expires_at),
            f"{name}: feature, cost or expiry differs",
        )
        if not snapshot:
            return
        want = self.model.counters(ref.coach_id, ref.period, now)
        check(
            (res.usage.used, res.usage.held) == (want.used, want.held),
            f"{name}: usage {res.usage.used}/{res.usage.held} != {want.used}/{want.held}",
        )

    def check_usage(self, usage: Usage) -> None:
        want = self.model.usage(usage.coach_id, self.clock())
        got = (usage.used, usage.held, usage.remaining, usage.base_allowance, usage.granted)
        expected = (want.used, want.held, want.remaining, want.base_allowance, want.granted)
        check(got == expected, f"usage of {usage.coach_id}: {got} != {expected}")

    # --- the audit after every step ------------------------------------------------------

    async def audit(self) -> None:
        now = self.clock()
        await self.wait_for_redis()
        try:
            self.model.check(now)
        except AssertionError as exc:
            raise Violation(f"model: {exc}") from exc
        for coach, period in sorted(self.model.periods(), key=str):
            await self.audit_period(coach, period, now)
        usages = await self.definite(Request("usage_many", "", coaches=tuple(self.coaches)))
        check(isinstance(usages, list), f"usage_many: {usages!r}")
        for usage in usages:
            self.check_usage(usage)

    async def audit_period(self, coach: str, period: Period, now: datetime) -> None:
        keys = period_keys(coach, period)
        raw = await self.hash_of(keys.account)
        used, held = int(raw.get("used", 0)), int(raw.get("held", 0))
        granted = int(raw.get("granted", 0))
        where = f"{coach} {period}"
        want = self.model.counters(coach, period, now)
        # A lowered allowance takes nothing back: the bound is the highest allowance any
        # hold was made under.
        high = self.model.high.get((coach, period), 0)
        check(used + held <= high, f"{where}: used {used} + held {held} > {high}")
        check(used == want.used, f"{where}: used {used} != {want.used}")
        check(granted == want.granted, f"{where}: granted {granted} != {want.granted}")
        # Lapsed holds nobody swept yet still count in the stored figure, never fewer.
        check(held >= want.held, f"{where}: held {held} < live {want.held}")
        records = await stored_records(self.admin, coach, period)
        mine = self.model.by_period[(coach, period)]
        check(len(records) == len(mine), f"{where}: {len(records)} records, model {len(mine)}")
        now_ms = to_ms(now)
        for rid in mine:
            ref = self.model.reservations[rid]
            token = rid.rsplit(".", 1)[1]
            check(token in records, f"{where}: {self.names.get(rid)} missing")
            record = records[token]
            status = _STATES[record.state]
            if status is Status.HELD and record.expires_ms <= now_ms:
                status = Status.EXPIRED
            check(
                status is ref.state_at(now),
                f"{where}: {self.names.get(rid)} is {status}, model {ref.state_at(now)}",
            )
            check(record.cost == ref.cost, f"{where}: {self.names.get(rid)} cost")
        settled: Counter[str] = Counter()
        held_events: Counter[str] = Counter()
        # Events trimmed off the log live on in its baseline.
        logged_grants = (await self.reader.events(coach, period=period, limit=1)).baseline.granted
        for event in await logged_events(self.reader, coach, period):
            kind = event.kind
            token = event.reservation_id.token if event.reservation_id else ""
            if kind == "held":
                held_events[token] += 1
            elif kind in ("committed", "refunded", "expired"):
                settled[token] += 1
            elif kind == "granted":
                logged_grants += event.credits
        twice = [t for t, n in settled.items() if n > 1]
        check(not twice, f"{where}: settled more than once: {twice}")
        check(set(held_events.values()) <= {1}, f"{where}: a hold was made twice: {held_events}")
        check(logged_grants == granted, f"{where}: granted events {logged_grants} != {granted}")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def run_seeds(
    seeds: Sequence[int],
    *,
    workdir: Path,
    steps: int = 40,
    coaches: int = 5,
    store_factory: StoreFactory = default_store,
    timing_faults: bool = True,
    verbose: bool = False,
) -> list[SeedResult]:
    """Run seeds one after another against one private AOF-backed redis-server."""
    server = RedisProcess(workdir, args=list(AOF_ARGS)).start()
    results: list[SeedResult] = []
    try:
        for n, seed in enumerate(seeds):
            if verbose:
                print(f"seed {seed}", flush=True)
            run = SeedRun(
                server,
                seed,
                steps=steps,
                coaches=coaches,
                store_factory=store_factory,
                timing_faults=timing_faults,
                verbose=verbose,
            )
            results.append(await run.run())
            if n % 25 == 24:
                # Keep the AOF small so restarts stay quick over thousands of seeds.
                await _rewrite_aof(server)
    finally:
        server.stop()
    return results


async def _rewrite_aof(server: RedisProcess) -> None:
    admin = Redis.from_url(server.url, decode_responses=True)
    try:
        await admin.flushall()
        await admin.bgrewriteaof()
    except Exception:  # noqa: S110 - a rewrite already running is fine
        pass
    finally:
        await admin.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.faults", description=__doc__)
    parser.add_argument("--seeds", type=int, default=200, help="how many seeds")
    parser.add_argument("--start", type=int, default=0, help="the first seed")
    parser.add_argument("--seed", type=int, default=None, help="run exactly this seed")
    parser.add_argument("--steps", type=int, default=40, help="steps per seed")
    parser.add_argument("--coaches", type=int, default=5, help="coaches per seed")
    parser.add_argument("--verbose", action="store_true", help="print every step")
    args = parser.parse_args(argv)
    # Every injected outage makes the store warn; the summary is what matters here.
    logging.getLogger("credits").setLevel(logging.ERROR)
    # Stopped with SIGTERM, still unwind, so the private redis-server is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="credits-faults-") as tmp:
        results = asyncio.run(
            run_seeds(
                list(seeds),
                workdir=Path(tmp),
                steps=args.steps,
                coaches=args.coaches,
                verbose=args.verbose,
            )
        )
    failed = [r for r in results if r.violation]
    for r in failed:
        print(r.report())
    elapsed = time.perf_counter() - started
    print(f"seeds run: {len(results)}, violations found: {len(failed)} ({elapsed:.1f} s)")
    steps = sum(len(r.steps) for r in results)
    unknown = sum(r.unknown for r in results)
    applied = sum(r.unknown_applied for r in results)
    print(f"steps: {steps}, requests of unknown fate: {unknown}, of which applied: {applied}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
