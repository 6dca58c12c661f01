"""The one error hierarchy. Each class names a stable problem ``code``.

The HTTP status for each lives in ``app.api.problems``; nothing here knows about HTTP.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar


class CreditsError(Exception):
    """Base of every outcome the service reports to a caller as a problem."""

    code: ClassVar[str] = "error"
    #: The problem's title; a class may word it per instance (``CreditsExhausted``).
    title: str = "Error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def extra(self) -> dict[str, object]:
        """Fields added to the problem body beside type/title/status/detail/code."""
        return {}


class InvalidRequest(CreditsError):
    code = "invalid_request"
    title = "Invalid request"

    def __init__(self, detail: str, errors: list[dict[str, object]] | None = None) -> None:
        super().__init__(detail)
        self.errors = errors or []

    def extra(self) -> dict[str, object]:
        return {"errors": self.errors} if self.errors else {}


class InvalidCoachId(InvalidRequest):
    code = "invalid_coach_id"
    title = "Invalid coach id"


class UnknownFeature(InvalidRequest):
    code = "unknown_feature"
    title = "Unknown feature"


class IdempotencyKeyReused(InvalidRequest):
    code = "idempotency_key_reused"
    title = "Idempotency key reused"


class PayloadTooLarge(CreditsError):
    code = "payload_too_large"
    title = "Payload too large"


class Unauthorized(CreditsError):
    code = "unauthorized"
    title = "Unauthorized"


class Forbidden(CreditsError):
    code = "forbidden"
    title = "Forbidden"


class NotFound(CreditsError):
    code = "not_found"
    title = "Not found"


class ReservationNotFound(NotFound):
    code = "reservation_not_found"
    title = "Reservation not found"

    def __init__(self, reservation_id: str) -> None:
        super().__init__("No reservation has this id.")
        self.reservation_id = reservation_id


class ReservationConflict(CreditsError):
    """The reservation was already settled another way."""

    code = "reservation_conflict"
    title = "Reservation already settled"
    verb: ClassVar[str] = "settled"

    def __init__(self, reservation_id: str) -> None:
        super().__init__(f"This reservation was already {self.verb}.")
        self.reservation_id = reservation_id


class ReservationRefunded(ReservationConflict):
    code = "reservation_refunded"
    title = "Reservation refunded"
    verb = "refunded; its credits were returned, so it can no longer be committed"


class ReservationExpired(ReservationConflict):
    code = "reservation_expired"
    title = "Reservation expired"
    verb = "expired before it was committed; its credits were returned"


class ReservationCommitted(ReservationConflict):
    code = "reservation_committed"
    title = "Reservation committed"
    verb = "committed, so its credits were spent and cannot be refunded"


class CreditsExhausted(CreditsError):
    """A reserve that does not fit. The code is the same whatever the reason; the title
    says which (``domain.exhausted_title``: "exhausted" only when all is used)."""

    code = "credits_exhausted"

    def __init__(
        self,
        detail: str,
        *,
        title: str,
        feature: str,
        cost: int,
        remaining: int,
        resets_at: datetime,
        retry_after: int,
    ) -> None:
        super().__init__(detail)
        self.title = title
        self.feature = feature
        self.cost = cost
        self.remaining = remaining
        self.resets_at = resets_at
        self.retry_after = retry_after

    def extra(self) -> dict[str, object]:
        from app.domain import iso_z

        return {
            "feature": self.feature,
            "cost": self.cost,
            "remaining": self.remaining,
            "resets_at": iso_z(self.resets_at),
        }


class TooManyHolds(CreditsError):
    """The coach already holds the most live reservations a coach may: the next waits
    until one of them is settled or lapses."""

    code = "too_many_holds"
    title = "Too many reservations in progress"

    def __init__(self, retry_after: int) -> None:
        super().__init__(
            "This coach already has as many AI actions in progress as a coach may have at "
            "once; commit or refund one, or retry when the earliest lapses."
        )
        self.retry_after = retry_after


class BackendUnavailable(CreditsError):
    code = "backend_unavailable"
    title = "Credits backend unavailable"

    def __init__(self, detail: str = "The credits store is not reachable right now.") -> None:
        super().__init__(detail + " Please retry shortly.")


class WriteRefused(BackendUnavailable):
    """Redis answers but refuses writes (out of memory, read-only, failed persistence):
    the same 503 for callers, told apart so reads and /readyz keep answering."""

    def __init__(self, refusal: str) -> None:
        super().__init__(f"Redis refused the write ({refusal}).")


class TooManyStreams(CreditsError):
    """This process has as many usage streams open as it allows."""

    code = "too_many_streams"
    title = "Too many usage streams"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
