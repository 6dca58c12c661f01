"""Threshold webhooks wired for one app: the outbox reader always (the deliveries
route), and while endpoints are configured the commit hook, the dispatcher and the
sweeper."""

from __future__ import annotations

import asyncio
import contextlib

from app.config import Settings
from app.metrics import Metrics
from app.store import CreditStore
from app.store.keys import slot_tags
from app.webhooks.dispatcher import Dispatcher
from app.webhooks.outbox import Outbox
from app.webhooks.sweeper import Sweeper


class Webhooks:
    def __init__(self, store: CreditStore, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.outbox = Outbox(
            store,
            [e.url for e in settings.webhooks],
            keep=settings.webhook_deliveries_per_outbox,
        )
        self.dispatcher: Dispatcher | None = None
        self.sweeper: Sweeper | None = None
        if settings.webhooks:
            self.dispatcher = Dispatcher(
                self.outbox,
                settings.webhooks,
                timeout_seconds=settings.webhook_timeout_seconds,
                retry_seconds=settings.webhook_retry_seconds,
                retry_window_seconds=settings.webhook_retry_window_seconds,
                feature_costs=store.feature_costs,
                metrics=metrics,
            )
            self.sweeper = Sweeper(
                store.redis,
                self.outbox,
                self.dispatcher,
                interval_seconds=settings.webhook_sweep_seconds,
                metrics=metrics,
            )
        self._sweeping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        dispatcher, sweeper = self.dispatcher, self.sweeper
        if dispatcher is None or sweeper is None:
            return
        # The slot tags, found once (a fifth of a second) before the first commit needs one.
        await asyncio.to_thread(slot_tags)

        def recorded(slot: int, ids: list[str]) -> None:
            dispatcher.submit(slot, ids, fresh=True)

        self.outbox.on_recorded = recorded
        self.store.outbox = self.outbox
        await dispatcher.start()
        self._sweeping = asyncio.create_task(sweeper.run())

    async def stop(self) -> None:
        if self._sweeping is not None and self.sweeper is not None:
            self.sweeper.stopping.set()
            self._sweeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeping
            self._sweeping = None
        if self.sweeper is not None:
            await self.sweeper.release()
        if self.dispatcher is not None:
            await self.dispatcher.stop()
