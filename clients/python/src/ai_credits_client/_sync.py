"""The sync client: the core's calls carried out on ``httpx.Client``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar, cast

import httpx

from ai_credits_client import core
from ai_credits_client.core import Call, Outcome, RetryPolicy, Sleep
from ai_credits_client.holds import Hold, HoldStart, reserve_for_hold
from ai_credits_client.models import EventPage, Feature, Grant, Reservation, Usage

__all__ = ["SyncCreditsClient", "SyncHold"]

log = logging.getLogger("ai_credits_client")

T = TypeVar("T")


class SyncCreditsClient:
    """The same calls for synchronous workers. Use as ``with SyncCreditsClient(url,
    api_key=...) as c``, or call ``close()``. ``timeout`` bounds each HTTP request;
    ``http`` lends an ``httpx.Client`` of your own (then you close it)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._owns_http = http is None
        self._http = http or httpx.Client(timeout=timeout)
        self._base = base_url.rstrip("/")
        self._headers = core.base_headers(api_key)

    def __enter__(self) -> SyncCreditsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def _send(self, call: Call[T]) -> T:
        exchange = call.exchange(self.retry)
        step = next(exchange)
        while True:
            outcome: Outcome | None = None
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
            else:
                try:
                    outcome = self._http.request(
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

    def features(self) -> tuple[Feature, ...]:
        return self._send(core.features())

    def reserve(
        self,
        coach_id: str,
        feature: str,
        *,
        ttl_seconds: int | None = None,
        idempotency_key: str | None = None,
    ) -> Reservation:
        """Hold the feature's cost. Retries reuse one Idempotency-Key (made here unless
        given), so a lost answer never leaves a second hold behind."""
        return self._send(core.reserve(coach_id, feature, ttl_seconds, idempotency_key))

    def get_reservation(self, reservation_id: str) -> Reservation:
        return self._send(core.get_reservation(reservation_id))

    def commit(self, reservation_id: str) -> Reservation:
        return self._send(core.commit(reservation_id))

    def refund(self, reservation_id: str) -> Reservation:
        return self._send(core.refund(reservation_id))

    def extend(self, reservation_id: str, ttl_seconds: int) -> Reservation:
        """Move a live hold's expiry to now + ``ttl_seconds`` (1-3600)."""
        return self._send(core.extend(reservation_id, ttl_seconds))

    def usage(self, coach_id: str) -> Usage:
        return self._send(core.usage(coach_id))

    def events(
        self,
        coach_id: str,
        *,
        limit: int = 100,
        before: int | None = None,
        period: str | None = None,
    ) -> EventPage:
        """One page of the coach's event log, newest first (needs a reader key)."""
        return self._send(core.events(coach_id, limit, before, period))

    def grant(
        self, coach_id: str, credits: int, reason: str, idempotency_key: str | None = None
    ) -> Grant:
        """Add ``credits`` (remove, when negative) to this period's allowance (admin key).
        Retries reuse one Idempotency-Key (made here unless given)."""
        return self._send(core.grant(coach_id, credits, reason, idempotency_key))

    def grants(self, coach_id: str, period: str | None = None) -> tuple[Grant, ...]:
        """The period's grants, oldest first (the current period unless ``YYYY-MM``)."""
        return self._send(core.grants(coach_id, period))

    def set_allowance(self, coach_id: str, monthly_allowance: int) -> Usage:
        """The coach's allowance from this period on, every month, until deleted."""
        return self._send(core.set_allowance(coach_id, monthly_allowance))

    def delete_allowance(self, coach_id: str) -> Usage:
        """Back to the service's configured allowance."""
        return self._send(core.delete_allowance(coach_id))

    # --- the hold ---------------------------------------------------------------------

    @contextmanager
    def hold(
        self,
        coach_id: str,
        feature: str,
        *,
        ttl_seconds: int | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[SyncHold]:
        """Reserve, run the block while keeping the hold alive, then commit.

        As :meth:`CreditsClient.hold`, with two differences a thread imposes. A thread
        cannot be interrupted safely, so a block that runs past ``timeout`` is not
        stopped: when it ends, its result is discarded, the hold refunded and
        ``TimeoutError`` raised (bound the work itself too, e.g. with
        ``hold.time_left()``). The keep-alive is a daemon thread.
        ``KeyboardInterrupt`` inside the block refunds like any error.
        """
        start = self._send(reserve_for_hold(coach_id, feature, ttl_seconds, idempotency_key))
        hold = SyncHold(self, start, feature=feature, timeout=timeout, now=time.monotonic())
        try:
            yield hold
        except BaseException:
            hold._stop_keep_alive()
            if not hold.discarded:
                self._refund_quietly(hold)
            raise
        hold._stop_keep_alive()
        now = time.monotonic()
        if hold._overran(now):
            if not hold.discarded:
                self._refund_quietly(hold)
            raise hold._timeout_error(now, interrupted=False)
        if not hold.discarded:
            hold._settled(self.commit(hold.reservation_id))

    def _refund_quietly(self, hold: SyncHold) -> None:
        try:
            hold._settled(self.refund(hold.reservation_id))
        except Exception as exc:
            # Never let a failed refund hide why the block failed; the hold lapses anyway.
            log.warning("refund of %s failed (%s); it will lapse", hold.reservation_id, exc)


class SyncHold(Hold):
    """The hold inside ``SyncCreditsClient.hold``; its keep-alive is a daemon thread."""

    def __init__(
        self,
        client: SyncCreditsClient,
        start: HoldStart,
        *,
        feature: str,
        timeout: float | None,
        now: float,
    ) -> None:
        super().__init__(start, feature=feature, timeout=timeout, now=now)
        self._client = client
        self._stop = threading.Event()
        self._keeper = threading.Thread(
            target=self._keep_alive,
            name=f"credits-keep-alive-{self.reservation_id[:12]}",
            daemon=True,
        )
        self._keeper.start()

    def refund(self) -> Reservation:
        """Release the hold now (the output is unusable); nothing is charged at the end."""
        self.discarded = True
        self._stop_keep_alive()
        reservation = self._client.refund(self.reservation_id)
        self._settled(reservation)
        return reservation

    def _stop_keep_alive(self) -> None:
        # Not joined: an extend in flight may still be retrying, and its answer is
        # ignored once settled, so the block's end never waits for it.
        self._settled()
        self._stop.set()

    def _keep_alive(self) -> None:
        while (at := self._next_extend_at()) is not None:
            if self._stop.wait(max(0.0, at - time.monotonic())):
                return
            try:
                reservation = self._client.extend(self.reservation_id, self.ttl_seconds)
            except Exception as exc:
                self._extend_failed(exc, time.monotonic())
            else:
                self._extended(reservation, time.monotonic())
