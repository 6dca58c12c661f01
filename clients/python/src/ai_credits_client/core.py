"""The sans-IO core: what each call sends, what an answer means, and whether to try again.

Nothing here touches the network or sleeps. Each API call is built once as a
:class:`Call` (the request, how to read a success, whether it may be sent again), and
:meth:`Call.exchange` is the whole retry loop as a generator: it yields a
:class:`Request` to send or a :class:`Sleep` to wait, is sent back the
``httpx.Response`` (or the ``httpx.TransportError``), and returns the decoded value or
raises the decoded error. The async and the sync client only carry out those steps, so
the two cannot disagree on what a call means.

Only calls that cannot be applied twice are sent again: reads, commits, refunds and
extends (idempotent by reservation id), allowance changes (``PUT``/``DELETE``), and
reserves and grants carrying an ``Idempotency-Key``. A call that never left the machine
(connection refused, no pooled connection) may always be sent again.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final, Generic, TypeVar
from urllib.parse import quote

import httpx

from ai_credits_client.errors import (
    Conflict,
    CreditsClientError,
    CreditsExhausted,
    ExtensionLimit,
    Forbidden,
    GrantRefused,
    InvalidRequest,
    NotFound,
    ReservationConflict,
    Unauthorized,
    Unavailable,
)
from ai_credits_client.models import (
    EventPage,
    Feature,
    Grant,
    Reservation,
    Usage,
    parse_time,
)

__all__ = [
    "RETRY_STATUSES",
    "Call",
    "Exchange",
    "Outcome",
    "Request",
    "RetryPolicy",
    "Sleep",
    "Step",
    "base_headers",
    "commit",
    "decode_error",
    "delete_allowance",
    "events",
    "extend",
    "features",
    "get_reservation",
    "grant",
    "grants",
    "new_idempotency_key",
    "parse_retry_after",
    "refund",
    "reserve",
    "set_allowance",
    "usage",
]

log = logging.getLogger("ai_credits_client")

T = TypeVar("T")

#: The service (or a proxy in front of it) could not answer now; the call may be retried.
RETRY_STATUSES: Final = frozenset({502, 503, 504})

#: Transport failures before the request left: resending cannot apply anything twice.
NEVER_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _user_agent() -> str:
    try:
        return f"ai-credits-client/{version('ai-credits-client')}"
    except PackageNotFoundError:  # vendored without its metadata
        return "ai-credits-client"


USER_AGENT: Final = _user_agent()


# --- the steps a driver carries out ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request, relative to the client's base URL."""

    method: str
    path: str
    json: Any = None
    params: Mapping[str, str | int] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait this long before the next step."""

    seconds: float


Step = Request | Sleep
Outcome = httpx.Response | httpx.TransportError
#: Yields steps; is sent the outcome of each Request (and None after a Sleep).
Exchange = Generator[Step, Outcome | None, T]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to try again when the service cannot answer now.

    At most ``attempts`` tries in all. Between two tries the client waits the
    ``Retry-After`` the service asked for, or else exponential backoff with full jitter
    (up to ``base_delay * 2**n``, never over ``max_delay``). A ``Retry-After`` longer than
    ``max_delay`` ends the retries at once: the error carries it (``retry_after``) for
    the caller, or its job queue, to try again later.
    """

    attempts: int = 5
    base_delay: float = 0.05
    max_delay: float = 2.0

    def next_delay(self, tries: int, retry_after: int | None) -> float | None:
        """Seconds to wait after ``tries`` failed tries, or ``None`` to give up."""
        if tries >= self.attempts:
            return None
        if retry_after is not None:
            return float(retry_after) if retry_after <= self.max_delay else None
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (tries - 1)))


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One API call: the request, how to read a success, and whether resending is safe."""

    request: Request
    decode: Callable[[httpx.Response], T]
    #: Sending it again cannot apply it twice (idempotent by id, method or key).
    retry_safe: bool

    def exchange(self, policy: RetryPolicy) -> Exchange[T]:
        tries = 0
        while True:
            outcome = yield self.request
            tries += 1
            if isinstance(outcome, httpx.Response):
                if outcome.is_success:
                    return self._read(outcome)
                error = decode_error(outcome)
                again = self.retry_safe and outcome.status_code in RETRY_STATUSES
            else:
                assert outcome is not None, "a Request step is answered with its outcome"
                error = self._unreachable(outcome)
                again = self.retry_safe or isinstance(outcome, NEVER_SENT)
            delay = policy.next_delay(tries, error.retry_after) if again else None
            if delay is None:
                raise error from (outcome if isinstance(outcome, Exception) else None)
            log.info(
                "credits %s %s: %s; trying again in %.2fs",
                self.request.method,
                self.request.path,
                error.detail,
                delay,
            )
            yield Sleep(delay)

    def _read(self, response: httpx.Response) -> T:
        try:
            return self.decode(response)
        except (ValueError, KeyError, TypeError) as exc:
            raise CreditsClientError(
                f"The credits service answered {self.request.method} {self.request.path} "
                f"with HTTP {response.status_code} and a body this client cannot read ({exc!r}).",
                status=response.status_code,
            ) from exc

    def _unreachable(self, exc: httpx.TransportError) -> Unavailable:
        if isinstance(exc, NEVER_SENT) or self.retry_safe:
            return Unavailable(f"The credits service could not be reached: {exc!r}.")
        return Unavailable(
            f"The answer to {self.request.method} {self.request.path} was lost ({exc!r}); "
            "the call may or may not have been applied."
        )


# --- reading answers ---------------------------------------------------------------------


_CONFLICT_BY_CODE: Final[Mapping[str, type[Conflict]]] = {
    "reservation_committed": ReservationConflict,
    "reservation_refunded": ReservationConflict,
    "reservation_expired": ReservationConflict,
    "extension_limit": ExtensionLimit,
    "grant_exceeds_remaining": GrantRefused,
    "grant_limit": GrantRefused,
}

_ERROR_BY_STATUS: Final[Mapping[int, type[CreditsClientError]]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    422: InvalidRequest,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}


def decode_error(response: httpx.Response) -> CreditsClientError:
    """The error for a non-2xx answer, read from its problem+json body when it has one."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    fields: Mapping[str, Any] = body if isinstance(body, dict) else {}
    status = response.status_code
    detail = str(fields.get("detail") or f"The credits service answered HTTP {status}.")
    code = str(fields.get("code") or "")
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if status == 429:
        resets_at = fields.get("resets_at")
        return CreditsExhausted(
            detail,
            status=status,
            code=code,
            body=body,
            retry_after=retry_after,
            feature=str(fields.get("feature", "")),
            cost=int(fields.get("cost", 0)),
            remaining=int(fields.get("remaining", 0)),
            resets_at=parse_time(resets_at) if isinstance(resets_at, str) else None,
        )
    cls = _ERROR_BY_STATUS.get(status, CreditsClientError)
    if status == 409:
        cls = _CONFLICT_BY_CODE.get(code, Conflict)
    return cls(detail, status=status, code=code, body=body, retry_after=retry_after)


def parse_retry_after(value: str | None, now: datetime | None = None) -> int | None:
    """``Retry-After`` as whole seconds from now: delay-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0, round((when - (now or datetime.now(UTC))).total_seconds()))


# --- building calls --------------------------------------------------------------------------


def base_headers(api_key: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def new_idempotency_key() -> str:
    return f"sdk-{secrets.token_urlsafe(24)}"


def _seg(value: str) -> str:
    # Quoted whole, so a bad id reaches the service (and is refused there) as one segment.
    return quote(value, safe="")


def _body(read: Callable[[Any], T]) -> Callable[[httpx.Response], T]:
    return lambda response: read(response.json())


def features() -> Call[tuple[Feature, ...]]:
    return Call(
        Request("GET", "/v1/features"),
        _body(lambda b: tuple(Feature.from_json(f) for f in b["features"])),
        retry_safe=True,
    )


def reserve(
    coach_id: str, feature: str, ttl_seconds: int | None, idempotency_key: str | None
) -> Call[Reservation]:
    """A key is made here unless given, so a retry after a lost answer never holds twice."""
    body: dict[str, Any] = {"feature": feature}
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    return Call(
        Request(
            "POST",
            f"/v1/coaches/{_seg(coach_id)}/reservations",
            json=body,
            headers={"Idempotency-Key": idempotency_key or new_idempotency_key()},
        ),
        _body(Reservation.from_json),
        retry_safe=True,
    )


def get_reservation(reservation_id: str) -> Call[Reservation]:
    return Call(
        Request("GET", f"/v1/reservations/{_seg(reservation_id)}"),
        _body(Reservation.from_json),
        retry_safe=True,
    )


def commit(reservation_id: str) -> Call[Reservation]:
    return Call(
        Request("POST", f"/v1/reservations/{_seg(reservation_id)}/commit"),
        _body(Reservation.from_json),
        retry_safe=True,
    )


def refund(reservation_id: str) -> Call[Reservation]:
    return Call(
        Request("POST", f"/v1/reservations/{_seg(reservation_id)}/refund"),
        _body(Reservation.from_json),
        retry_safe=True,
    )


def extend(reservation_id: str, ttl_seconds: int) -> Call[Reservation]:
    # Sent twice, it moves the expiry to now + ttl twice: the same hold, a little later.
    return Call(
        Request(
            "POST",
            f"/v1/reservations/{_seg(reservation_id)}/extend",
            json={"ttl_seconds": ttl_seconds},
        ),
        _body(Reservation.from_json),
        retry_safe=True,
    )


def usage(coach_id: str) -> Call[Usage]:
    return Call(
        Request("GET", f"/v1/coaches/{_seg(coach_id)}/usage"),
        _body(Usage.from_json),
        retry_safe=True,
    )


def events(coach_id: str, limit: int, before: int | None, period: str | None) -> Call[EventPage]:
    params: dict[str, str | int] = {"limit": limit}
    if before is not None:
        params["before"] = before
    if period is not None:
        params["period"] = period
    return Call(
        Request("GET", f"/v1/coaches/{_seg(coach_id)}/events", params=params),
        _body(EventPage.from_json),
        retry_safe=True,
    )


def grant(coach_id: str, credits: int, reason: str, idempotency_key: str | None) -> Call[Grant]:
    """A key is made here unless given, so a retry after a lost answer never grants twice."""
    return Call(
        Request(
            "POST",
            f"/v1/coaches/{_seg(coach_id)}/grants",
            json={"credits": credits, "reason": reason},
            headers={"Idempotency-Key": idempotency_key or new_idempotency_key()},
        ),
        _body(Grant.from_json),
        retry_safe=True,
    )


def grants(coach_id: str, period: str | None) -> Call[tuple[Grant, ...]]:
    return Call(
        Request(
            "GET",
            f"/v1/coaches/{_seg(coach_id)}/grants",
            params={"period": period} if period is not None else None,
        ),
        _body(lambda b: tuple(Grant.from_json(g) for g in b["grants"])),
        retry_safe=True,
    )


def set_allowance(coach_id: str, monthly_allowance: int) -> Call[Usage]:
    return Call(
        Request(
            "PUT",
            f"/v1/coaches/{_seg(coach_id)}/allowance",
            json={"monthly_allowance": monthly_allowance},
        ),
        _body(Usage.from_json),
        retry_safe=True,
    )


def delete_allowance(coach_id: str) -> Call[Usage]:
    return Call(
        Request("DELETE", f"/v1/coaches/{_seg(coach_id)}/allowance"),
        _body(Usage.from_json),
        retry_safe=True,
    )
