"""What the client raises.

Every error is a :class:`CreditsClientError` carrying ``status`` (``None`` when the
service was never heard), ``code`` (the problem's stable code), ``detail`` (a sentence a
person can read), ``body`` (the problem+json body) and ``retry_after`` (seconds, when the
service sent ``Retry-After``). The service's answers map onto this tree::

    CreditsClientError                any other answer (500, 405, an unreadable body)
    ├── CreditsExhausted              429 credits_exhausted, too_many_holds: the action does
    │                                 not fit now; .feature, .cost, .remaining, .resets_at
    ├── Unauthorized                  401 unauthorized: no API key, or an unknown one
    ├── Forbidden                     403 forbidden: the key lacks the scope
    ├── NotFound                      404 reservation_not_found (or an unknown path)
    ├── Conflict                      409 with any other code
    │   ├── ReservationConflict       409 reservation_committed, reservation_refunded,
    │   │   │                         reservation_expired: settled another way
    │   │   └── ExtensionLimit        409 extension_limit: the hold cannot live any longer
    │   └── GrantRefused              409 grant_exceeds_remaining, grant_limit
    ├── InvalidRequest                422 (invalid_coach_id, unknown_feature, invalid_request,
    │                                 idempotency_key_reused), 413 payload_too_large, 400
    └── Unavailable                   502, 503 backend_unavailable, 504, or no connection,
                                      once the retries allowed are spent
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ai_credits_client.models import Reservation

__all__ = [
    "Conflict",
    "CreditsClientError",
    "CreditsExhausted",
    "ExtensionLimit",
    "Forbidden",
    "GrantRefused",
    "InvalidRequest",
    "NotFound",
    "ReservationConflict",
    "Unauthorized",
    "Unavailable",
]


class CreditsClientError(Exception):
    """A problem the service answered, or the service could not be heard."""

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str = "",
        body: Any = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code
        self.body = body
        self.retry_after = retry_after


class CreditsExhausted(CreditsClientError):
    """429: the action does not fit. ``detail`` is the calm sentence to show the coach."""

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str = "",
        body: Any = None,
        retry_after: int | None = None,
        feature: str = "",
        cost: int = 0,
        remaining: int = 0,
        resets_at: datetime | None = None,
    ) -> None:
        super().__init__(detail, status=status, code=code, body=body, retry_after=retry_after)
        self.feature = feature
        self.cost = cost
        self.remaining = remaining
        self.resets_at = resets_at


class Unauthorized(CreditsClientError):
    """401: no API key, or one the service does not know."""


class Forbidden(CreditsClientError):
    """403: the API key lacks the scope for this call."""


class NotFound(CreditsClientError):
    """404: no such reservation (or path)."""


class Conflict(CreditsClientError):
    """409: the call does not fit the current state (``code`` says why)."""


class ReservationConflict(Conflict):
    """409: the reservation was already settled another way (``code`` says how).

    ``reservation`` is set when the client knows it: a hold whose ``Idempotency-Key``
    was replayed gets the reservation in its current state, e.g. committed by an earlier
    delivery of the same job.
    """

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str = "",
        body: Any = None,
        retry_after: int | None = None,
        reservation: Reservation | None = None,
    ) -> None:
        super().__init__(detail, status=status, code=code, body=body, retry_after=retry_after)
        self.reservation = reservation


class ExtensionLimit(ReservationConflict):
    """409 ``extension_limit``: a hold cannot be extended past its period's end + 1 hour."""


class GrantRefused(Conflict):
    """409 ``grant_exceeds_remaining`` or ``grant_limit``: nothing was granted."""


class InvalidRequest(CreditsClientError):
    """422 (or 400, 413): a bad coach id, unknown feature, reused key or malformed call."""


class Unavailable(CreditsClientError):
    """The service could not be reached, or answered 502/503/504, for every attempt."""
