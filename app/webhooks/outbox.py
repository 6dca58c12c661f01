"""The outboxes in Redis: one per Redis Cluster slot, so that the commit that crosses a
threshold records its deliveries in the same script call (a script touches one slot).

What lives where (key names in ``app.store.keys``):

- per slot: the delivery records, the pending ones by when they are due, every one by
  when it was recorded, and the failed ones; trimmed by the commit that adds to them
  (age and count) and expiring with their newest delivery;
- ``OUTBOX_DUE_SLOTS``: slots with pending deliveries, by when the sweeper should look
  there next; ``OUTBOX_SLOTS``: slots holding deliveries, by the newest one's time.
  Both are written after the commit (a script cannot reach them), so a process that
  dies in between leaves a slot out; the sweeper's pass over every slot puts it back.

Every operation here runs through the store's transport: one deadline, one failure
mapping, and on one server the calls of a loop turn share a write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from app import domain
from app.store import CreditStore
from app.store.keys import (
    OUTBOX_DUE_SLOTS,
    OUTBOX_SLOTS,
    OutboxKeys,
    coach_slot,
    key_slot_of,
    outbox_keys,
)
from app.store.replies import text
from app.store.transport import Command

#: Deliveries are kept this long after they were recorded.
RETENTION_MS: Final = 7 * 86_400_000
#: How many deliveries of one slot one sweep hands over at most; more wait for the next.
IDS_PER_SLOT: Final = 100
#: Slots per round trip when reading many outboxes.
SLOTS_PER_ROUND: Final = 64
#: Slots per round trip of the sweeper's reads over many outboxes.
RESCAN_CHUNK: Final = 32

DeliveryStatus = Literal["pending", "failed", "delivered"]
Outcome = Literal["delivered", "retry", "failed"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """One threshold webhook for one endpoint, as its outbox holds it."""

    slot: int
    id: str  # "<url> <webhook_id>"
    webhook_id: str
    url: str
    threshold: int
    coach_id: str
    period: str
    used: int
    held: int
    allowance: int  # the effective allowance: base_allowance + granted
    base_allowance: int
    granted: int
    recorded_at: int  # ms
    attempts: int
    status: DeliveryStatus
    last_error: str | None
    next_attempt_at: int | None  # ms; None once delivered or failed

    @classmethod
    def parse(cls, slot: int, delivery_id: str, record: str | bytes) -> Delivery:
        d = orjson.loads(record)
        return cls(
            slot,
            delivery_id,
            d["webhook_id"],
            d["url"],
            int(d["threshold"]),
            d["coach_id"],
            d["period"],
            int(d["used"]),
            int(d["held"]),
            int(d["allowance"]),
            int(d.get("base_allowance", d["allowance"])),
            int(d.get("granted", 0)),
            int(d["recorded_at"]),
            int(d["attempts"]),
            d["status"],
            d.get("last_error"),
            None if d.get("next_attempt_at") is None else int(d["next_attempt_at"]),
        )


class Outbox:
    """The outboxes of one service; also the store's ``ThresholdOutbox``: what a commit
    passes to record deliveries, and where the deliveries it recorded go."""

    def __init__(self, store: CreditStore, urls: Sequence[str], *, keep: int) -> None:
        self.store = store
        self.transport = store.transport
        self.keep = keep
        self._urls = " ".join(urls)
        #: Told of every delivery a commit of this process recorded: (slot, ids).
        self.on_recorded: Callable[[int, list[str]], None] | None = None

    def now_ms(self) -> int:
        return domain.to_ms(self.store.clock())

    # --- what a commit passes (ThresholdOutbox) ------------------------------------

    def commit_keys(self, coach_id: str) -> OutboxKeys:
        return outbox_keys(coach_slot(coach_id))

    def commit_args(self) -> tuple[Any, ...]:
        return (self._urls, self.keep, RETENTION_MS)

    def recorded(self, tail: Sequence[Any]) -> None:
        if not tail or text(tail[0]) != "deliveries" or self.on_recorded is None:
            return
        self.on_recorded(key_slot_of(text(tail[1])), [text(i) for i in tail[2:]])

    # --- one attempt -----------------------------------------------------------------

    async def claim(
        self, slot: int, delivery_id: str, now_ms: int, lapses_ms: int
    ) -> Delivery | None:
        """The delivery, claimed for one attempt until ``lapses_ms``; None when it is not
        due, claimed elsewhere, finished or gone."""
        keys = outbox_keys(slot)
        reply = await self.store.call_script(
            "outbox_claim", (keys.deliveries, keys.due), (now_ms, delivery_id, lapses_ms)
        )
        if reply.status != "OK":
            return None
        return Delivery.parse(slot, delivery_id, reply.extra)

    async def finish(
        self,
        delivery: Delivery,
        outcome: Outcome,
        *,
        now_ms: int,
        next_attempt_ms: int = 0,
        error: str = "",
    ) -> str:
        """Records how the attempt ended: OK, STALE (a later attempt took over) or DONE
        (finished already)."""
        keys = outbox_keys(delivery.slot)
        reply = await self.store.call_script(
            "outbox_finish",
            (keys.deliveries, keys.due, keys.failed),
            (now_ms, delivery.id, delivery.attempts, outcome, next_attempt_ms, error),
        )
        return reply.status

    # --- the slot indexes ------------------------------------------------------------

    async def watch(self, slot: int, look_at_ms: int, recorded_ms: int) -> None:
        """Notes a slot with a pending delivery: the sweeper looks there by
        ``look_at_ms`` (earlier if noted so before)."""
        await self._all(
            [
                ("ZADD", OUTBOX_DUE_SLOTS, "LT", look_at_ms, slot),
                ("ZADD", OUTBOX_SLOTS, "GT", recorded_ms, slot),
            ]
        )

    async def due_slots(self, now_ms: int, limit: int) -> list[int]:
        raw = await self.transport.call(
            "ZRANGEBYSCORE", OUTBOX_DUE_SLOTS, "-inf", now_ms, "LIMIT", 0, limit
        )
        return [int(text(s)) for s in raw]

    async def due_ids(self, slot: int, now_ms: int, limit: int = IDS_PER_SLOT) -> list[str]:
        raw = await self.transport.call(
            "ZRANGEBYSCORE", outbox_keys(slot).due, "-inf", now_ms, "LIMIT", 0, limit
        )
        return [text(i) for i in raw]

    async def reschedule(self, slot: int, now_ms: int, claim_ms: int, *, backlog: bool) -> None:
        """When the sweeper next looks at a slot whose due deliveries it just handed
        over: at once with a backlog, else when the earliest delivery is due (one due
        now is being attempted: when its claim would lapse), or never when none is
        pending. Each change is checked again after it is made: a commit may have
        added a delivery (and noted the slot) in between."""

        def look_at(due_ms: int) -> int:
            return due_ms if due_ms > now_ms else now_ms + claim_ms

        if backlog:
            await self.transport.call("ZADD", OUTBOX_DUE_SLOTS, now_ms, slot)
            return
        first = await self._earliest_due(slot)
        if first is None:
            await self.transport.call("ZREM", OUTBOX_DUE_SLOTS, slot)
        else:
            await self.transport.call("ZADD", OUTBOX_DUE_SLOTS, look_at(first), slot)
        again = await self._earliest_due(slot)
        if again is not None and (first is None or look_at(again) < look_at(first)):
            await self.transport.call("ZADD", OUTBOX_DUE_SLOTS, "LT", look_at(again), slot)

    async def rescan(self, slots: Iterable[int], now_ms: int, claim_ms: int) -> None:
        """Puts back into the indexes any of these slots whose outbox they miss, a few
        slots at a time (on a cluster each read takes a connection the routes share)."""
        slots = list(slots)
        for start in range(0, len(slots), RESCAN_CHUNK):
            await self._rescan(slots[start : start + RESCAN_CHUNK], now_ms, claim_ms)

    async def _rescan(self, slots: list[int], now_ms: int, claim_ms: int) -> None:
        newest = await self._all(
            [("ZREVRANGE", outbox_keys(s).log, 0, 0, "WITHSCORES") for s in slots]
        )
        held = [(s, _pairs(r)[0][1]) for s, r in zip(slots, newest, strict=True) if r]
        if not held:
            return
        earliest = await self._all(
            [("ZRANGE", outbox_keys(s).due, 0, 0, "WITHSCORES") for s, _ in held]
        )
        commands: list[Command] = [("ZADD", OUTBOX_SLOTS, "GT", ms, s) for s, ms in held]
        for (slot, _), first in zip(held, earliest, strict=True):
            if first:
                due_ms = _pairs(first)[0][1]
                look_at = due_ms if due_ms > now_ms else now_ms + claim_ms
                commands.append(("ZADD", OUTBOX_DUE_SLOTS, "LT", look_at, slot))
        await self._all(commands)

    async def forget_old_slots(self, now_ms: int) -> None:
        """Slots whose newest delivery is past keeping have no deliveries left."""
        await self.transport.call("ZREMRANGEBYSCORE", OUTBOX_SLOTS, "-inf", now_ms - RETENTION_MS)

    async def pending_count(self) -> int:
        slots = [int(text(s)) for s in await self.transport.call("ZRANGE", OUTBOX_DUE_SLOTS, 0, -1)]
        total = 0
        for start in range(0, len(slots), RESCAN_CHUNK):
            chunk = slots[start : start + RESCAN_CHUNK]
            counts = await self._all([("ZCARD", outbox_keys(s).due) for s in chunk])
            total += sum(int(n) for n in counts)
        return total

    async def _earliest_due(self, slot: int) -> int | None:
        raw = await self.transport.call("ZRANGE", outbox_keys(slot).due, 0, 0, "WITHSCORES")
        return _pairs(raw)[0][1] if raw else None

    # --- reading deliveries back -----------------------------------------------------

    async def deliveries(self, status: DeliveryStatus | None, limit: int) -> list[Delivery]:
        """The newest ``limit`` deliveries (of one status, if given), newest first.

        Slots are read newest first, a few at a time, until no slot left can hold a
        delivery newer than the ones found."""
        raw = await self.transport.call("ZREVRANGE", OUTBOX_SLOTS, 0, -1, "WITHSCORES")
        slots = [(int(s), ms) for s, ms in _pairs(raw)]
        found: list[Delivery] = []
        for start in range(0, len(slots), SLOTS_PER_ROUND):
            chunk = slots[start : start + SLOTS_PER_ROUND]
            if len(found) >= limit and chunk[0][1] < found[limit - 1].recorded_at:
                break
            for some in await asyncio.gather(
                *(self._slot_deliveries(slot, status, limit) for slot, _ in chunk)
            ):
                found.extend(some)
            found.sort(key=lambda d: (-d.recorded_at, d.id))
            del found[limit:]
        return found

    async def _slot_deliveries(
        self, slot: int, status: DeliveryStatus | None, limit: int
    ) -> list[Delivery]:
        """One slot's newest ``limit`` deliveries (of ``status``, if given)."""
        keys = outbox_keys(slot)
        call = self.transport.call
        if status == "pending":  # few, and ordered by due time: read them all
            ids = await call("ZRANGE", keys.due, 0, -1)
            return _newest(await self._records(slot, ids), limit)
        if status == "failed":
            return await self._records(slot, await call("ZREVRANGE", keys.failed, 0, limit - 1))
        found: list[Delivery] = []
        start = 0
        while len(found) < limit:
            ids = await call("ZREVRANGE", keys.log, start, start + limit - 1)
            if not ids:
                break
            found += [d for d in await self._records(slot, ids) if status in (None, d.status)]
            start += limit
        return found[:limit]

    async def _records(self, slot: int, ids: Sequence[Any]) -> list[Delivery]:
        if not ids:
            return []
        ids = [text(i) for i in ids]
        records = await self.transport.call("HMGET", outbox_keys(slot).deliveries, *ids)
        return [
            Delivery.parse(slot, i, r) for i, r in zip(ids, records, strict=True) if r is not None
        ]

    async def _all(self, commands: Sequence[Command]) -> list[Any]:
        replies = await self.transport.call_all(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies


def _newest(deliveries: list[Delivery], limit: int) -> list[Delivery]:
    return sorted(deliveries, key=lambda d: (-d.recorded_at, d.id))[:limit]


def _pairs(raw: Any) -> list[tuple[str, int]]:
    """A WITHSCORES reply as (member, score) pairs: flat from a raw call, already paired
    where the client applied its own reply parsing."""
    items = list(raw)
    if items and isinstance(items[0], list | tuple):
        return [(text(m), int(float(s))) for m, s in items]
    return [(text(items[i]), int(float(items[i + 1]))) for i in range(0, len(items), 2)]
