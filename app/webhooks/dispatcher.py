"""Sends delivery attempts in the background, never on the request path.

A commit that recorded deliveries hands their ids over (``submit``: a put on a bounded
queue, nothing awaited), and a few sender tasks attempt them: note the slot for the
sweeper, claim the delivery, POST it signed, record the outcome. A slow or failing
endpoint occupies senders, never a request; a full queue leaves deliveries due in
Redis, where the sweeper finds them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Final

import httpx

from app.errors import CreditsError
from app.metrics import Metrics
from app.webhooks import signing
from app.webhooks.config import Endpoint
from app.webhooks.outbox import Delivery, Outbox

log = logging.getLogger("credits.webhooks")

#: Attempts in flight at once per process.
SENDERS: Final = 8
#: Attempts waiting for a sender; beyond it they wait in Redis for the sweeper.
QUEUE_SIZE: Final = 10_000
#: An attempt's error as recorded: enough to tell what went wrong.
MAX_ERROR_LENGTH: Final = 200

#: (slot, delivery id, whether a commit of this process recorded it just now)
Item = tuple[int, str, bool]


def next_attempt_ms(
    attempts: int,
    recorded_ms: int,
    now_ms: int,
    schedule: Sequence[float],
    window_seconds: float,
) -> int | None:
    """When to try again after failed attempt number ``attempts``: the schedule's delay
    for it (its last delay repeating), or None when that is past the retry window."""
    delay = schedule[min(attempts, len(schedule)) - 1]
    at = now_ms + int(delay * 1000)
    return at if at <= recorded_ms + int(window_seconds * 1000) else None


class Dispatcher:
    def __init__(
        self,
        outbox: Outbox,
        endpoints: Sequence[Endpoint],
        *,
        timeout_seconds: float,
        retry_seconds: Sequence[float],
        retry_window_seconds: float,
        feature_costs: dict[str, int],
        metrics: Metrics,
    ) -> None:
        self.outbox = outbox
        self.endpoints = {e.url: e for e in endpoints}
        self.timeout_seconds = timeout_seconds
        self.retry_seconds = tuple(retry_seconds)
        self.retry_window_seconds = retry_window_seconds
        self.feature_costs = feature_costs
        self.metrics = metrics
        #: How long a claim keeps other processes off an attempt: longer than the
        #: attempt and the Redis calls around it can take.
        self.claim_ms = int((2 * timeout_seconds + 1) * 1000)
        self.queue: asyncio.Queue[Item] = asyncio.Queue(QUEUE_SIZE)
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Stops the senders besides cancelling them: a library call may swallow that.
        self._stopping = False

    def submit(self, slot: int, ids: Sequence[str], *, fresh: bool) -> bool:
        """Queues attempts; False when the queue was full (the rest wait in Redis)."""
        for delivery_id in ids:
            try:
                self.queue.put_nowait((slot, delivery_id, fresh))
            except asyncio.QueueFull:
                log.warning("webhook queue full: deliveries wait in redis for the sweeper")
                return False
        return True

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=self.timeout_seconds,
            follow_redirects=False,
            # Deliveries go where the configuration says, not through an environment proxy.
            trust_env=False,
            limits=httpx.Limits(max_connections=SENDERS, max_keepalive_connections=SENDERS),
            headers={"user-agent": "ai-credits-webhooks/1"},
        )
        self._tasks = [asyncio.create_task(self._sender()) for _ in range(SENDERS)]

    async def stop(self) -> None:
        """Abandons attempts in flight: their claims lapse and they are attempted again."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _sender(self) -> None:
        while not self._stopping:
            slot, delivery_id, fresh = await self.queue.get()
            try:
                await self.attempt(slot, delivery_id, fresh=fresh)
            except CreditsError as exc:  # Redis away: the delivery stays due there
                log.warning("webhook attempt deferred: %s", exc.detail)
            except Exception:
                log.exception("webhook attempt failed unexpectedly")

    async def attempt(self, slot: int, delivery_id: str, *, fresh: bool) -> None:
        outbox = self.outbox
        now = outbox.now_ms()
        lapses = now + self.claim_ms
        if fresh:
            # Before the attempt: should this process die now, the sweeper knows where to look.
            await outbox.watch(slot, lapses, now)
        delivery = await outbox.claim(slot, delivery_id, now, lapses)
        if delivery is None:
            return
        endpoint = self.endpoints.get(delivery.url)
        if endpoint is None:
            error: str | None = "the endpoint is no longer configured in CREDITS_WEBHOOKS"
        else:
            error = await self._post(endpoint, delivery)
        now = outbox.now_ms()
        if error is None:
            await outbox.finish(delivery, "delivered", now_ms=now)
            self.metrics.webhook_deliveries.labels("delivered").inc()
            self.metrics.webhook_lag.observe(max(0, now - delivery.recorded_at) / 1000)
            return
        next_at = (
            None
            if endpoint is None
            else next_attempt_ms(
                delivery.attempts,
                delivery.recorded_at,
                now,
                self.retry_seconds,
                self.retry_window_seconds,
            )
        )
        if next_at is None:
            await outbox.finish(delivery, "failed", now_ms=now, error=error)
            self.metrics.webhook_deliveries.labels("failed").inc()
            log.warning("webhook %s to %s given up: %s", delivery.webhook_id, delivery.url, error)
            return
        status = await outbox.finish(
            delivery, "retry", now_ms=now, next_attempt_ms=next_at, error=error
        )
        self.metrics.webhook_deliveries.labels("retry").inc()
        if status == "OK":
            await outbox.watch(slot, next_at, delivery.recorded_at)

    async def _post(self, endpoint: Endpoint, delivery: Delivery) -> str | None:
        """POSTs one attempt; None on a 2xx answer, else what went wrong."""
        assert self._client is not None
        payload = signing.body(
            threshold=delivery.threshold,
            coach_id=delivery.coach_id,
            period=delivery.period,
            recorded_at_ms=delivery.recorded_at,
            base_allowance=delivery.base_allowance,
            granted=delivery.granted,
            used=delivery.used,
            held=delivery.held,
            feature_costs=self.feature_costs,
        )
        headers = signing.headers(delivery.webhook_id, payload, endpoint.secret, time.time())
        try:
            # One bound on the whole attempt (httpx's own bounds each phase).
            async with asyncio.timeout(self.timeout_seconds):
                request = self._client.build_request(
                    "POST", endpoint.url, content=payload, headers=headers
                )
                # The answer's body is not read: only its status counts.
                response = await self._client.send(request, stream=True)
                await response.aclose()
        except TimeoutError:
            return f"no answer within {self.timeout_seconds:g} s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_LENGTH]
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"
