"""The sans-IO part of a hold: its state, and when its keep-alive extends it.

Times are seconds on the ``time.monotonic`` clock, passed in by the driver.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

import httpx

from ai_credits_client import core
from ai_credits_client.errors import CreditsClientError, ReservationConflict, Unavailable
from ai_credits_client.models import Reservation

__all__ = ["Hold", "HoldStart", "KeepAlive", "reserve_for_hold"]

log = logging.getLogger("ai_credits_client")

#: The longest hold the service grants (``ttl_seconds`` 1-3600).
MAX_TTL_SECONDS: Final = 3600
#: After an extend failed for a reason that may pass, never try again sooner than this.
MIN_RETRY_SECONDS: Final = 0.25


class KeepAlive:
    """When a hold's next extend goes out, and when extending stops.

    A hold is extended by its TTL at ``fraction`` (half) of the TTL after it was made or
    last extended, so an extend that fails still leaves time to try again: after an
    error that may pass (the service unavailable for all of the client's retries) it
    tries again halfway to the hold's expiry, while there is time left. Extending stops
    for good (``stopped`` says why) when:

    * the service answers 409 ``extension_limit``: the hold reached its period's end
      plus an hour. The block runs on, but the hold lapses at its current expiry unless
      settled before, so **such an action may go uncharged**;
    * the hold is settled another way (409 ``reservation_*``), unknown (404) or the
      call is refused (401, 403, 422): ``stopped`` is the problem's code;
    * the hold already lives past the block's deadline (``"deadline"``): whatever the
      block does after it is not kept;
    * the hold's owner settles it (``"settled"``).

    A process killed while holding extends nothing more, so its hold lapses within one
    TTL and its credits come back by themselves.
    """

    def __init__(
        self, ttl_seconds: int, now: float, *, deadline: float | None = None, fraction: float = 0.5
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.fraction = fraction
        self.deadline = deadline
        self.stopped: str | None = None
        self._expires = now + ttl_seconds
        self._next = now
        self._plan(now)

    def next_at(self) -> float | None:
        """When to send the next extend; ``None`` once extending has stopped."""
        return None if self.stopped is not None else self._next

    def extended(self, now: float) -> None:
        if self.stopped is None:
            self._expires = now + self.ttl_seconds
            self._plan(now)

    def failed(self, error: Exception, now: float) -> None:
        if self.stopped is not None:
            return
        if not isinstance(error, Unavailable):
            code = error.code if isinstance(error, CreditsClientError) else ""
            self.stop(code or type(error).__name__)
        elif now >= self._expires:
            self.stop("lapsed")
        else:
            self._next = now + max((self._expires - now) / 2, MIN_RETRY_SECONDS)

    def stop(self, reason: str) -> None:
        if self.stopped is None:
            self.stopped = reason

    def _plan(self, now: float) -> None:
        if self.deadline is not None and self._expires >= self.deadline:
            self.stop("deadline")
        else:
            self._next = now + self.ttl_seconds * self.fraction


@dataclass(frozen=True, slots=True)
class HoldStart:
    """A hold's reservation, and the TTL it was granted (what each extend asks for)."""

    reservation: Reservation
    ttl_seconds: int


def reserve_for_hold(
    coach_id: str, feature: str, ttl_seconds: int | None, idempotency_key: str | None
) -> core.Call[HoldStart]:
    call = core.reserve(coach_id, feature, ttl_seconds, idempotency_key)

    def decode(response: httpx.Response) -> HoldStart:
        reservation = Reservation.from_json(response.json())
        ttl = ttl_seconds or granted_ttl(reservation, response.headers.get("Date"))
        return HoldStart(reservation, ttl)

    return core.Call(call.request, decode, retry_safe=call.retry_safe)


def granted_ttl(reservation: Reservation, date: str | None, now: datetime | None = None) -> int:
    """The service's default TTL, seen as ``expires_at`` minus the answer's ``Date``.

    Both instants come from the service's clock, so a skewed local clock does not
    matter; without a ``Date`` the local clock stands in.
    """
    sent = now or datetime.now(UTC)
    if date is not None:
        with suppress(TypeError, ValueError):
            sent = parsedate_to_datetime(date)
    seconds = math.floor((reservation.expires_at - sent).total_seconds())
    return min(max(seconds, 1), MAX_TTL_SECONDS)


class Hold:
    """A live hold inside ``client.hold(...)``; after the block, the settled one.

    ``reservation`` follows the hold: extended while the block runs, then committed (or
    refunded). ``keep_alive_stopped`` is ``None`` while the hold is being kept alive,
    else why it is not (see :class:`KeepAlive`); ``"extension_limit"`` means the hold
    will lapse at ``expires_at`` unless the block ends before.
    """

    def __init__(
        self,
        start: HoldStart,
        *,
        feature: str,
        timeout: float | None,
        now: float,
    ) -> None:
        self.reservation = check_held(start.reservation)
        self.feature = feature
        self.timeout = timeout
        self.started_at = now
        self.discarded = False
        self._schedule = KeepAlive(
            start.ttl_seconds, now, deadline=None if timeout is None else now + timeout
        )
        # The keep-alive runs beside the block (a task, or a thread for the sync client).
        self._lock = threading.Lock()

    @property
    def reservation_id(self) -> str:
        return self.reservation.reservation_id

    @property
    def cost(self) -> int:
        return self.reservation.cost

    @property
    def status(self) -> str:
        return self.reservation.status

    @property
    def committed(self) -> bool:
        return self.reservation.status == "committed"

    @property
    def note(self) -> str | None:
        """The coach-facing note once committed, e.g. "Used 3 credits · 47 of 50 left"."""
        return self.reservation.note

    @property
    def expires_at(self) -> datetime:
        return self.reservation.expires_at

    @property
    def ttl_seconds(self) -> int:
        return self._schedule.ttl_seconds

    @property
    def keep_alive_stopped(self) -> str | None:
        return self._schedule.stopped

    def time_left(self) -> float | None:
        """Seconds left before the block's ``timeout`` (``None`` without one), to bound
        the work inside."""
        if self.timeout is None:
            return None
        return max(0.0, self.started_at + self.timeout - time.monotonic())

    def _next_extend_at(self) -> float | None:
        with self._lock:
            return self._schedule.next_at()

    def _extended(self, reservation: Reservation, now: float) -> None:
        with self._lock:
            if self._schedule.stopped is None:
                self.reservation = reservation
                self._schedule.extended(now)

    def _extend_failed(self, error: Exception, now: float) -> None:
        with self._lock:
            self._schedule.failed(error, now)
            reason = self._schedule.stopped
        if reason == "extension_limit":
            log.warning(
                "hold %s reached its extension limit; it lapses at %s unless settled before",
                self.reservation_id,
                self.expires_at.isoformat(),
            )
        elif reason is not None and reason != "settled":
            log.warning("hold %s is no longer extended (%s)", self.reservation_id, error)

    def _settled(self, reservation: Reservation | None = None) -> None:
        """The owner has taken over: no more extends, nor their answers."""
        with self._lock:
            self._schedule.stop("settled")
            if reservation is not None:
                self.reservation = reservation

    def _overran(self, now: float) -> bool:
        return self.timeout is not None and now - self.started_at > self.timeout

    def _timeout_error(self, now: float, *, interrupted: bool) -> TimeoutError:
        action = f"The {self.feature} action for coach {self.reservation.coach_id}"
        if interrupted:
            return TimeoutError(
                f"{action} did not finish within its {self.timeout:g} s timeout: it was "
                "cancelled and its hold released, nothing charged."
            )
        return TimeoutError(
            f"{action} ran {now - self.started_at:.1f} s, past its {self.timeout:g} s "
            "timeout: its result is discarded and its hold released, nothing charged."
        )


def check_held(reservation: Reservation) -> Reservation:
    """A replayed reserve answers the reservation as it is now. One settled since (an
    earlier delivery of the same job committed it, or it lapsed while the answer was
    lost) cannot be held again with that key."""
    if reservation.status != "held":
        raise ReservationConflict(
            f"The reservation was already {reservation.status} before it could be used.",
            code=f"reservation_{reservation.status}",
            reservation=reservation,
        )
    return reservation
