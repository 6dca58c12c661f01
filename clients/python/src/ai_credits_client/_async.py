"""The async client: the core's calls carried out on ``httpx.AsyncClient``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar, cast

import httpx

from ai_credits_client import core
from ai_credits_client.core import Call, Outcome, RetryPolicy, Sleep
from ai_credits_client.holds import Hold, HoldStart, reserve_for_hold
from ai_credits_client.models import EventPage, Feature, Grant, Reservation, Usage

__all__ = ["AsyncHold", "CreditsClient"]

log = logging.getLogger("ai_credits_client")

T = TypeVar("T")


class CreditsClient:
    """Async client. Use as ``async with CreditsClient(url, api_key=...) as c``, or call
    ``aclose()``. ``timeout`` bounds each HTTP request; ``http`` lends an
    ``httpx.AsyncClient`` of your own (then you close it)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._base = base_url.rstrip("/")
        self._headers = core.base_headers(api_key)

    async def __aenter__(self) -> CreditsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def _send(self, call: Call[T]) -> T:
        exchange = call.exchange(self.retry)
        step = next(exchange)
        while True:
            outcome: Outcome | None = None
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
            else:
                try:
                    outcome = await self._http.request(
                        step.method,
                        self._base + step.path,
                        json=step.json,
                        params=step.params,
                        headers={**self._headers, **step.headers},
                    )
                except httpx.TransportError as exc:
                    outcome = exc
            try:
                step = exchange.send(outcome)
            except StopIteration as done:
                return cast(T, done.value)

    # --- calls ------------------------------------------------------------------------

    async def features(self) -> tuple[Feature, ...]:
        return await self._send(core.features())

    async def reserve(
        self,
        coach_id: str,
        feature: str,
        *,
        ttl_seconds: int | None = None,
        idempotency_key: str | None = None,
    ) -> Reservation:
        """Hold the feature's cost. Retries reuse one Idempotency-Key (made here unless
        given), so a lost answer never leaves a second hold behind."""
        return await self._send(core.reserve(coach_id, feature, ttl_seconds, idempotency_key))

    async def get_reservation(self, reservation_id: str) -> Reservation:
        return await self._send(core.get_reservation(reservation_id))

    async def commit(self, reservation_id: str) -> Reservation:
        return await self._send(core.commit(reservation_id))

    async def refund(self, reservation_id: str) -> Reservation:
        return await self._send(core.refund(reservation_id))

    async def extend(self, reservation_id: str, ttl_seconds: int) -> Reservation:
        """Move a live hold's expiry to now + ``ttl_seconds`` (1-3600)."""
        return await self._send(core.extend(reservation_id, ttl_seconds))

    async def usage(self, coach_id: str) -> Usage:
        return await self._send(core.usage(coach_id))

    async def events(
        self,
        coach_id: str,
        *,
        limit: int = 100,
        before: int | None = None,
        period: str | None = None,
    ) -> EventPage:
        """One page of the coach's event log, newest first (needs a reader key)."""
        return await self._send(core.events(coach_id, limit, before, period))

    async def grant(
        self, coach_id: str, credits: int, reason: str, idempotency_key: str | None = None
    ) -> Grant:
        """Add ``credits`` (remove, when negative) to this period's allowance (admin key).
        Retries reuse one Idempotency-Key (made here unless given)."""
        return await self._send(core.grant(coach_id, credits, reason, idempotency_key))

    async def grants(self, coach_id: str, period: str | None = None) -> tuple[Grant, ...]:
        """The period's grants, oldest first (the current period unless ``YYYY-MM``)."""
        return await self._send(core.grants(coach_id, period))

    async def set_allowance(self, coach_id: str, monthly_allowance: int) -> Usage:
        """The coach's allowance from this period on, every month, until deleted."""
        return await self._send(core.set_allowance(coach_id, monthly_allowance))

    async def delete_allowance(self, coach_id: str) -> Usage:
        """Back to the service's configured allowance."""
        return await self._send(core.delete_allowance(coach_id))

    # --- the hold ---------------------------------------------------------------------

    @asynccontextmanager
    async def hold(
        self,
        coach_id: str,
        feature: str,
        *,
        ttl_seconds: int | None = None,
        idempotency_key: str | None = None,
        # A bound on the caller's block, enforced inside with asyncio.timeout.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[AsyncHold]:
        """Reserve, run the block while keeping the hold alive, then commit.

        The block raising or being cancelled refunds the hold (the refund is shielded
        from the cancellation); ``await hold.refund()`` inside it releases the hold at
        once and nothing is charged at the end. ``timeout`` bounds the block (not the
        reserve): past it the block is cancelled, the hold refunded and ``TimeoutError``
        raised. A background task extends the hold at about half its TTL (the service's
        default unless ``ttl_seconds``) while the block runs; see
        :class:`~ai_credits_client.holds.KeepAlive` for when it stops, notably at
        ``extension_limit``, after which the hold may lapse and the action go uncharged.
        ``idempotency_key`` makes a re-delivered job hold once: a replay of a hold
        settled since raises ``ReservationConflict`` with that ``reservation``. A refund
        that cannot reach the service, or a failed commit, leaves the hold to lapse by
        itself; a failed commit raises, and the action is not charged.
        """
        start = await self._send(reserve_for_hold(coach_id, feature, ttl_seconds, idempotency_key))
        hold = AsyncHold(self, start, feature=feature, timeout=timeout, now=time.monotonic())
        limit = asyncio.timeout(timeout)
        try:
            async with limit:
                yield hold
        except BaseException as exc:
            hold._stop_keep_alive()
            if not hold.discarded:
                await self._refund_quietly(hold)
            if isinstance(exc, TimeoutError) and limit.expired():
                raise hold._timeout_error(time.monotonic(), interrupted=True) from exc
            raise
        hold._stop_keep_alive()
        if not hold.discarded:
            hold._settled(await self.commit(hold.reservation_id))

    async def _refund_quietly(self, hold: AsyncHold) -> None:
        # Shielded: when the block was cancelled, the refund must not be cancelled with it.
        task = asyncio.ensure_future(self.refund(hold.reservation_id))
        try:
            hold._settled(await asyncio.shield(task))
        except asyncio.CancelledError:
            # Cancelled again while refunding: let the refund finish on its own.
            task.add_done_callback(_log_refund_failure)
            raise
        except Exception as exc:
            # Never let a failed refund hide why the block failed; the hold lapses anyway.
            log.warning("refund of %s failed (%s); it will lapse", hold.reservation_id, exc)


class AsyncHold(Hold):
    """The hold inside ``CreditsClient.hold``; its keep-alive is a task on the loop."""

    def __init__(
        self,
        client: CreditsClient,
        start: HoldStart,
        *,
        feature: str,
        timeout: float | None,
        now: float,
    ) -> None:
        super().__init__(start, feature=feature, timeout=timeout, now=now)
        self._client = client
        self._keeper = asyncio.create_task(
            self._keep_alive(), name=f"credits-keep-alive-{self.reservation_id[:12]}"
        )

    async def refund(self) -> Reservation:
        """Release the hold now (the output is unusable); nothing is charged at the end."""
        self.discarded = True
        self._stop_keep_alive()
        reservation = await self._client.refund(self.reservation_id)
        self._settled(reservation)
        return reservation

    def _stop_keep_alive(self) -> None:
        # Not awaited: a cancelled task runs none of its code past its current await.
        self._settled()
        self._keeper.cancel()

    async def _keep_alive(self) -> None:
        while (at := self._next_extend_at()) is not None:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            try:
                reservation = await self._client.extend(self.reservation_id, self.ttl_seconds)
            except Exception as exc:
                self._extend_failed(exc, time.monotonic())
            else:
                self._extended(reservation, time.monotonic())


def _log_refund_failure(task: asyncio.Future[Reservation]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("refund failed (%s); the hold will lapse", task.exception())
