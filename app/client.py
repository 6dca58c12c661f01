"""Worker SDK for the AI credits service: hold credits around an AI action.

::

    async with CreditsClient("http://credits:8000", api_key=KEY) as credits:
        async with credits.hold(coach_id, "trend_analysis", timeout=30) as hold:
            draft = await generate(...)         # the AI action
        print(hold.note)                        # "Used 3 credits · 47 of 50 left this month"

The hold reserves on entry, commits when the block finishes, and refunds when the block
raises, is cancelled or runs past ``timeout``. Dropped connections and 503s are retried
with backoff; a reserve retry carries the same ``Idempotency-Key`` (one per hold), so it
never holds twice, and commit and refund are idempotent by nature.

This module needs only ``httpx`` and the standard library, so a worker can vendor it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import httpx

__all__ = [
    "CreditsClient",
    "CreditsClientError",
    "CreditsExhausted",
    "FeatureAvailability",
    "Forbidden",
    "Hold",
    "InvalidRequest",
    "NotFound",
    "Reservation",
    "ReservationConflict",
    "RetryPolicy",
    "SyncCreditsClient",
    "Unauthorized",
    "Unavailable",
    "Usage",
]

log = logging.getLogger("credits.client")

#: Statuses worth retrying: the service (or a proxy in front of it) could not answer now.
RETRY_STATUSES: Final = frozenset({502, 503, 504})


# --- errors ---------------------------------------------------------------------------


class CreditsClientError(Exception):
    """A problem the service answered (``status``, ``code``, ``detail``) or could not."""

    def __init__(
        self, detail: str, *, status: int | None = None, code: str = "", body: Any = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code
        self.body = body


class CreditsExhausted(CreditsClientError):
    """429: the action does not fit. ``detail`` is the sentence to show the coach."""

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str = "",
        body: Any = None,
        feature: str = "",
        cost: int = 0,
        remaining: int = 0,
        resets_at: datetime | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(detail, status=status, code=code, body=body)
        self.feature = feature
        self.cost = cost
        self.remaining = remaining
        self.resets_at = resets_at
        self.retry_after = retry_after


class ReservationConflict(CreditsClientError):
    """409: the reservation was already settled another way (``code`` says how)."""


class NotFound(CreditsClientError):
    """404: no such reservation (or path)."""


class InvalidRequest(CreditsClientError):
    """422: a bad coach id, unknown feature, reused idempotency key or malformed request."""


class Unauthorized(CreditsClientError):
    """401: no API key, or one the service does not know."""


class Forbidden(CreditsClientError):
    """403: the API key lacks the scope for this call."""


class Unavailable(CreditsClientError):
    """The service could not be reached, or answered 503, for every attempt."""


_ERROR_BY_STATUS: Final[Mapping[int, type[CreditsClientError]]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: ReservationConflict,
    422: InvalidRequest,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


# --- what the service answers ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeatureAvailability:
    feature: str
    cost: int
    available: bool


@dataclass(frozen=True, slots=True)
class Usage:
    coach_id: str
    period: str
    allowance: int
    used: int
    held: int
    remaining: int
    percent_used: int
    level: str
    resets_at: datetime
    features: tuple[FeatureAvailability, ...]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Usage:
        return cls(
            coach_id=body["coach_id"],
            period=body["period"],
            allowance=body["allowance"],
            used=body["used"],
            held=body["held"],
            remaining=body["remaining"],
            percent_used=body["percent_used"],
            level=body["level"],
            resets_at=_parse_time(body["resets_at"]),
            features=tuple(
                FeatureAvailability(f["feature"], f["cost"], f["available"])
                for f in body["features"]
            ),
        )


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    coach_id: str
    feature: str
    cost: int
    status: str
    period: str
    expires_at: datetime
    usage: Usage
    note: str | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Reservation:
        return cls(
            reservation_id=body["reservation_id"],
            coach_id=body["coach_id"],
            feature=body["feature"],
            cost=body["cost"],
            status=body["status"],
            period=body["period"],
            expires_at=_parse_time(body["expires_at"]),
            usage=Usage.from_json(body["usage"]),
            note=body.get("note"),
        )


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class Hold:
    """A live hold inside ``client.hold(...)``; after a clean exit, the committed one."""

    def __init__(self, reservation: Reservation) -> None:
        self.reservation = reservation

    @property
    def reservation_id(self) -> str:
        return self.reservation.reservation_id

    @property
    def cost(self) -> int:
        return self.reservation.cost

    @property
    def committed(self) -> bool:
        return self.reservation.status == "committed"

    @property
    def note(self) -> str | None:
        """The coach-facing note once committed, e.g. "Used 3 credits · 47 of 50 left"."""
        return self.reservation.note


# --- shared request logic ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter; ``Retry-After`` is honoured up to the cap."""

    attempts: int = 5
    base_delay: float = 0.05
    max_delay: float = 2.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None and retry_after.isdigit():
            return min(float(retry_after), self.max_delay)
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json"}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def _error(response: httpx.Response) -> CreditsClientError:
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    fields: Mapping[str, Any] = body if isinstance(body, dict) else {}
    detail = str(fields.get("detail") or f"HTTP {response.status_code}")
    code = str(fields.get("code", ""))
    status = response.status_code
    if status == 429:
        retry_after = response.headers.get("Retry-After", "")
        resets_at = fields.get("resets_at")
        return CreditsExhausted(
            detail,
            status=status,
            code=code,
            body=body,
            feature=str(fields.get("feature", "")),
            cost=int(fields.get("cost", 0)),
            remaining=int(fields.get("remaining", 0)),
            resets_at=_parse_time(resets_at) if isinstance(resets_at, str) else None,
            retry_after=int(retry_after) if retry_after.isdigit() else None,
        )
    cls = _ERROR_BY_STATUS.get(status, CreditsClientError)
    return cls(detail, status=status, code=code, body=body)


def _reserve_body(feature: str, ttl_seconds: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"feature": feature}
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    return body


def _new_idempotency_key() -> str:
    return f"hold-{secrets.token_urlsafe(24)}"


def _check_held(reservation: Reservation) -> Reservation:
    # A replayed reserve answers the reservation as it is now; one that lapsed while the
    # answer was lost cannot be used any more, and its key cannot hold again.
    if reservation.status != "held":
        raise ReservationConflict(
            f"The reservation was already {reservation.status} before it could be used.",
            code=f"reservation_{reservation.status}",
        )
    return reservation


# --- async client -------------------------------------------------------------------------


class CreditsClient:
    """Async client. Use as ``async with CreditsClient(url) as c`` or call ``aclose()``."""

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
        self._headers = _headers(api_key)

    async def __aenter__(self) -> CreditsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Any:
        """One call, retried on transport errors and 502/503/504. Only safe to use for
        requests that are idempotent (all of this API's are, given an Idempotency-Key)."""
        last: Exception | None = None
        for attempt in range(self.retry.attempts):
            retry_after: str | None = None
            try:
                response = await self._http.request(
                    method,
                    f"{self._base}{path}",
                    json=json,
                    params=params,
                    headers={**self._headers, **(headers or {})},
                )
            except httpx.TransportError as exc:
                log.info("credits %s %s failed (%s); retrying", method, path, exc)
                last = exc
            else:
                if response.is_success:
                    return response.json()
                if response.status_code not in RETRY_STATUSES:
                    raise _error(response)
                last = _error(response)
                retry_after = response.headers.get("Retry-After")
            if attempt + 1 < self.retry.attempts:
                await asyncio.sleep(self.retry.delay(attempt, retry_after))
        raise _unavailable(last)

    # --- plain calls --------------------------------------------------------------

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
        key = idempotency_key or _new_idempotency_key()
        body = await self._request(
            "POST",
            f"/v1/coaches/{coach_id}/reservations",
            json=_reserve_body(feature, ttl_seconds),
            headers={"Idempotency-Key": key},
        )
        return Reservation.from_json(body)

    async def commit(self, reservation_id: str) -> Reservation:
        return Reservation.from_json(
            await self._request("POST", f"/v1/reservations/{reservation_id}/commit")
        )

    async def refund(self, reservation_id: str) -> Reservation:
        return Reservation.from_json(
            await self._request("POST", f"/v1/reservations/{reservation_id}/refund")
        )

    async def get_reservation(self, reservation_id: str) -> Reservation:
        return Reservation.from_json(
            await self._request("GET", f"/v1/reservations/{reservation_id}")
        )

    async def usage(self, coach_id: str) -> Usage:
        return Usage.from_json(await self._request("GET", f"/v1/coaches/{coach_id}/usage"))

    async def events(
        self, coach_id: str, *, limit: int = 100, before: int | None = None
    ) -> dict[str, Any]:
        """One page of the coach's event log (needs a reader key), as the service sends it."""
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            params["before"] = before
        page: dict[str, Any] = await self._request(
            "GET", f"/v1/coaches/{coach_id}/events", params=params
        )
        return page

    # --- the hold ----------------------------------------------------------------

    @asynccontextmanager
    async def hold(
        self,
        coach_id: str,
        feature: str,
        *,
        ttl_seconds: int | None = None,
        # A bound on the caller's block, enforced inside with asyncio.timeout.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> AsyncIterator[Hold]:
        """Reserve, run the block, then commit; refund if the block fails.

        ``timeout`` bounds the block (not the reserve): past it the block is cancelled,
        the hold refunded and ``TimeoutError`` raised. Cancellation of the surrounding
        task also refunds; the refund is shielded so it still goes out. If the refund
        cannot reach the service, the hold lapses by itself after its TTL. If the commit
        fails, the error propagates: the action is not charged (the hold lapses).
        """
        reservation = _check_held(
            await self.reserve(
                coach_id,
                feature,
                ttl_seconds=ttl_seconds,
                idempotency_key=_new_idempotency_key(),
            )
        )
        hold = Hold(reservation)
        try:
            async with asyncio.timeout(timeout):
                yield hold
        except BaseException:
            await self._refund_quietly(reservation.reservation_id)
            raise
        hold.reservation = await self.commit(reservation.reservation_id)

    async def _refund_quietly(self, reservation_id: str) -> None:
        # Shielded: when the block was cancelled, the refund must not be cancelled with it.
        task = asyncio.ensure_future(self.refund(reservation_id))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            # Cancelled again while refunding: let the refund finish on its own.
            task.add_done_callback(_log_refund_failure)
            raise
        except Exception as exc:
            # Never let a failed refund hide why the block failed; the hold lapses anyway.
            log.warning("refund of %s failed (%s); it will lapse", reservation_id, exc)


def _log_refund_failure(task: asyncio.Future[Reservation]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("refund failed (%s); the hold will lapse", task.exception())


def _unavailable(last: Exception | None) -> Unavailable:
    if isinstance(last, CreditsClientError):
        return Unavailable(last.detail, status=last.status, code=last.code, body=last.body)
    return Unavailable(f"The credits service could not be reached: {last}")


# --- sync client ------------------------------------------------------------------------------


class SyncCreditsClient:
    """The same calls for synchronous workers, on ``httpx.Client``.

    ``hold`` has no ``timeout``: plain threads cannot be interrupted safely, so bound
    the work itself. ``KeyboardInterrupt`` inside the block refunds like any error.
    """

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
        self._headers = _headers(api_key)

    def __enter__(self) -> SyncCreditsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        last: Exception | None = None
        for attempt in range(self.retry.attempts):
            retry_after: str | None = None
            try:
                response = self._http.request(
                    method,
                    f"{self._base}{path}",
                    json=json,
                    headers={**self._headers, **(headers or {})},
                )
            except httpx.TransportError as exc:
                log.info("credits %s %s failed (%s); retrying", method, path, exc)
                last = exc
            else:
                if response.is_success:
                    return response.json()
                if response.status_code not in RETRY_STATUSES:
                    raise _error(response)
                last = _error(response)
                retry_after = response.headers.get("Retry-After")
            if attempt + 1 < self.retry.attempts:
                time.sleep(self.retry.delay(attempt, retry_after))
        raise _unavailable(last)

    def reserve(
        self,
        coach_id: str,
        feature: str,
        *,
        ttl_seconds: int | None = None,
        idempotency_key: str | None = None,
    ) -> Reservation:
        key = idempotency_key or _new_idempotency_key()
        body = self._request(
            "POST",
            f"/v1/coaches/{coach_id}/reservations",
            json=_reserve_body(feature, ttl_seconds),
            headers={"Idempotency-Key": key},
        )
        return Reservation.from_json(body)

    def commit(self, reservation_id: str) -> Reservation:
        return Reservation.from_json(
            self._request("POST", f"/v1/reservations/{reservation_id}/commit")
        )

    def refund(self, reservation_id: str) -> Reservation:
        return Reservation.from_json(
            self._request("POST", f"/v1/reservations/{reservation_id}/refund")
        )

    def get_reservation(self, reservation_id: str) -> Reservation:
        return Reservation.from_json(self._request("GET", f"/v1/reservations/{reservation_id}"))

    def usage(self, coach_id: str) -> Usage:
        return Usage.from_json(self._request("GET", f"/v1/coaches/{coach_id}/usage"))

    @contextmanager
    def hold(
        self, coach_id: str, feature: str, *, ttl_seconds: int | None = None
    ) -> Iterator[Hold]:
        reservation = _check_held(
            self.reserve(
                coach_id, feature, ttl_seconds=ttl_seconds, idempotency_key=_new_idempotency_key()
            )
        )
        hold = Hold(reservation)
        try:
            yield hold
        except BaseException:
            try:
                self.refund(reservation.reservation_id)
            except Exception as exc:
                log.warning(
                    "refund of %s failed (%s); it will lapse", reservation.reservation_id, exc
                )
            raise
        hold.reservation = self.commit(reservation.reservation_id)
