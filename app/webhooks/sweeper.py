"""The sweeper: in every service process, and working in the one that holds its lease.

Every few seconds the leaseholder hands over the deliveries that are due (retries, and
attempts whose claim lapsed because their process died), and looks over a share of all
16,384 slot outboxes for any the slot indexes miss (a process that died between its
commit and noting the slot), so every outbox is looked at within ``RESCAN_SECONDS``.
The lease is a Redis lock (``SET NX PX``, renewed by its holder while it lives): when
the holder dies another process takes over once it lapses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Final

from redis.exceptions import LockError

from app.errors import CreditsError
from app.metrics import Metrics
from app.store import AnyRedis
from app.store.keys import OUTBOX_SWEEPER_LEASE, SLOT_COUNT
from app.webhooks.dispatcher import Dispatcher
from app.webhooks.outbox import IDS_PER_SLOT, Outbox

log = logging.getLogger("credits.webhooks")

#: Every slot's outbox is looked over once in this many seconds.
RESCAN_SECONDS: Final = 60.0
#: Slots with due deliveries handled per sweep; more wait for the next.
DUE_SLOTS_PER_SWEEP: Final = 256


class Sweeper:
    def __init__(
        self,
        redis: AnyRedis,
        outbox: Outbox,
        dispatcher: Dispatcher,
        *,
        interval_seconds: float,
        metrics: Metrics,
    ) -> None:
        self.outbox = outbox
        self.dispatcher = dispatcher
        self.interval_seconds = interval_seconds
        self.metrics = metrics
        # The lease outlives a few missed renewals, and lapses soon after its holder died.
        self.lease = redis.lock(
            OUTBOX_SWEEPER_LEASE,
            timeout=3 * interval_seconds,
            blocking=False,
            thread_local=False,
        )
        self.holds_lease = False
        #: Set to stop ``run`` (besides cancelling it: a library call may swallow that).
        self.stopping = asyncio.Event()
        self.per_sweep = math.ceil(SLOT_COUNT * interval_seconds / RESCAN_SECONDS)
        self._next_slot = 0

    async def run(self) -> None:
        while not self.stopping.is_set():
            try:
                await self.sweep()
            except CreditsError as exc:  # Redis away: try again next time
                log.warning("webhook sweep skipped: %s", exc.detail)
            except Exception:
                log.exception("webhook sweep failed unexpectedly")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_seconds):
                    await self.stopping.wait()

    async def sweep(self) -> bool:
        """One sweep, if this process holds (or gets) the lease; whether it did."""
        if not await self._lease():
            return False
        outbox, dispatcher = self.outbox, self.dispatcher
        now = outbox.now_ms()
        for slot in await outbox.due_slots(now, DUE_SLOTS_PER_SWEEP):
            ids = await outbox.due_ids(slot, now)
            queued = dispatcher.submit(slot, ids, fresh=False)
            backlog = len(ids) == IDS_PER_SLOT or not queued
            await outbox.reschedule(slot, now, dispatcher.claim_ms, backlog=backlog)
        start = self._next_slot
        self._next_slot = (start + self.per_sweep) % SLOT_COUNT
        await outbox.rescan(
            (s % SLOT_COUNT for s in range(start, start + self.per_sweep)),
            now,
            dispatcher.claim_ms,
        )
        await outbox.forget_old_slots(now)
        self.metrics.webhook_pending.set(await outbox.pending_count())
        return True

    async def _lease(self) -> bool:
        guard = self.outbox.transport.guard
        if self.holds_lease:
            try:
                await guard(self.lease.reacquire())
                return True
            except LockError:
                self.holds_lease = False
                self.metrics.webhook_pending.set(0)
        self.holds_lease = bool(await guard(self.lease.acquire()))
        return self.holds_lease

    async def release(self) -> None:
        """Hands the lease back, so another process takes over without waiting."""
        if self.holds_lease:
            self.holds_lease = False
            with contextlib.suppress(LockError, CreditsError):
                await self.outbox.transport.guard(self.lease.release())
