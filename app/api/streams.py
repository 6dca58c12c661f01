"""The live usage streams of one process, read together.

Every open stream is a ``Watch`` on one coach. One poller reads the usage of every
watched coach in one batched store call per poll interval (``usage_many``), however many
streams there are and however many of them watch the same coach, and hands each watch
the coach's usage as text, encoded once per coach. A stream sends an event only when
that text differs from the last it sent, so a reserve-and-refund between two polls sends
nothing. The poller runs while any stream is open.

Streams are capped per process (``CREDITS_STREAMS_MAX``): one more is refused with
``TooManyStreams`` (429), with ``Retry-After`` set to when the oldest open stream ends
by its bounded lifetime, the latest a slot frees.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import Sequence
from typing import Final

from app.api.schemas import usage_json
from app.domain import Usage
from app.errors import BackendUnavailable, TooManyStreams
from app.metrics import Metrics
from app.store import CreditStore

log = logging.getLogger("credits.api")

#: Coaches per store call: the bound of the batch usage route, so no one call holds
#: Redis for long; below it (the default cap of streams) a poll is one call.
READ_BATCH: Final = 1000


def usage_text(usage: Usage) -> str:
    """Usage as a stream event's data."""
    return json.dumps(usage_json(usage), separators=(",", ":"))


class Watch:
    """One open stream's view of its coach: the text it sent last and the newest one."""

    __slots__ = ("_changed", "_newest", "coach_id", "ends_at", "sent")

    def __init__(self, coach_id: str, ends_at: float) -> None:
        self.coach_id = coach_id
        self.ends_at = ends_at
        self.sent = ""
        self._newest = ""
        self._changed = asyncio.Event()

    def offer(self, text: str) -> None:
        self._newest = text
        if text != self.sent:
            self._changed.set()
        else:
            self._changed.clear()

    async def next_change(self) -> str:
        """The coach's usage text once it differs from the text sent last; it is then
        taken as sent."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            if self._newest != self.sent:  # (offered before the first text was sent)
                self.sent = self._newest
                return self.sent


class UsageStreams:
    def __init__(
        self,
        store: CreditStore,
        metrics: Metrics,
        *,
        poll_seconds: float,
        lifetime_seconds: float,
        max_streams: int,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.lifetime_seconds = lifetime_seconds
        self.max_streams = max_streams
        #: Every open watch, oldest first.
        self._open: dict[Watch, None] = {}
        self._by_coach: dict[str, set[Watch]] = {}
        self._poller: asyncio.Task[None] | None = None

    @property
    def count(self) -> int:
        return len(self._open)

    def open(self, coach_id: str) -> Watch:
        """A watch on ``coach_id``, or ``TooManyStreams`` when the cap is reached."""
        now = asyncio.get_running_loop().time()
        if len(self._open) >= self.max_streams:
            oldest = next(iter(self._open))
            raise TooManyStreams(
                f"This server has {self.max_streams} usage streams open, as many as it "
                "allows. Retry later, or read the usage without a stream.",
                retry_after=max(1, math.ceil(oldest.ends_at - now)),
            )
        watch = Watch(coach_id, now + self.lifetime_seconds)
        self._open[watch] = None
        self._by_coach.setdefault(coach_id, set()).add(watch)
        self.metrics.streams_open.inc()
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll(), name="usage-streams")
        return watch

    def close(self, watch: Watch) -> None:
        """Frees the watch's slot; closing twice is harmless."""
        if watch not in self._open:
            return
        del self._open[watch]
        self.metrics.streams_open.dec()
        watchers = self._by_coach[watch.coach_id]
        watchers.discard(watch)
        if not watchers:
            del self._by_coach[watch.coach_id]

    async def aclose(self) -> None:
        """Stops the poller (at shutdown); open streams keep their last figures."""
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

    async def _poll(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.poll_seconds)
                if not self._by_coach:
                    return
                await self._read_once(list(self._by_coach))
        finally:
            if self._poller is asyncio.current_task():
                self._poller = None

    async def _read_once(self, coaches: Sequence[str]) -> None:
        chunks = [coaches[i : i + READ_BATCH] for i in range(0, len(coaches), READ_BATCH)]
        try:
            read = await asyncio.gather(*(self.store.usage_many(c) for c in chunks))
        except BackendUnavailable:
            return  # the streams keep their last figures until Redis answers again
        except Exception:
            log.exception("reading the usage of %d streamed coaches failed", len(coaches))
            return
        for usages in read:
            for usage in usages:
                watchers = self._by_coach.get(usage.coach_id)
                if watchers:
                    text = usage_text(usage)
                    for watch in watchers:
                        watch.offer(text)
