"""The one error hierarchy. Each class names a stable problem ``code``.

The HTTP status for each lives in ``app.api.problems``; nothing here knows about HTTP.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from app.domain import Period


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


class Conflict(CreditsError):
    """The request clashes with the state it would change."""

    code = "conflict"
    title = "Conflict"


class ReservationConflict(Conflict):
    """The reservation was already settled another way."""

    code = "reservation_conflict"
    title = "Reservation already settled"
    verb: ClassVar[str] = "settled"
    #: The detail when the reservation was to be extended rather than settled.
    extend_detail: ClassVar[str] = "This reservation is no longer held, so it cannot be extended."

    def __init__(self, reservation_id: str, *, extending: bool = False) -> None:
        super().__init__(
            self.extend_detail if extending else f"This reservation was already {self.verb}."
        )
        self.reservation_id = reservation_id


class ReservationRefunded(ReservationConflict):
    code = "reservation_refunded"
    title = "Reservation refunded"
    verb = "refunded; its credits were returned, so it can no longer be committed"
    extend_detail = "This reservation was refunded, so there is no hold left to extend."


class ReservationExpired(ReservationConflict):
    code = "reservation_expired"
    title = "Reservation expired"
    verb = "expired before it was committed; its credits were returned"
    extend_detail = (
        "This reservation expired before it was extended; its credits were returned. "
        "Reserve again to hold credits."
    )


class ReservationCommitted(ReservationConflict):
    code = "reservation_committed"
    title = "Reservation committed"
    verb = "committed, so its credits were spent and cannot be refunded"
    extend_detail = "This reservation was committed, so there is no hold left to extend."


class ExtensionLimit(Conflict):
    code = "extension_limit"
    title = "Extension limit reached"

    def __init__(self, latest: datetime) -> None:
        from app.domain import iso_z

        super().__init__(
            "A hold may live at most one hour past the end of its month: this one can be "
            f"extended to {iso_z(latest)} at the latest."
        )
        self.latest = latest

    def extra(self) -> dict[str, object]:
        from app.domain import iso_z

        return {"latest_expires_at": iso_z(self.latest)}


class GrantExceedsRemaining(Conflict):
    code = "grant_exceeds_remaining"
    title = "Grant exceeds remaining credits"

    def __init__(self, credits: int, remaining: int) -> None:
        super().__init__(
            f"Removing {-credits} credits would take the coach below zero: only "
            f"{remaining} remain this month."
        )
        self.remaining = remaining

    def extra(self) -> dict[str, object]:
        return {"remaining": self.remaining}


class GrantLimit(Conflict):
    code = "grant_limit"
    title = "Too many grants"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"A coach can receive at most {limit} grants per month, and this month has "
            "them all. Set the coach's monthly allowance instead."
        )


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
        allowance: int,
        period: Period,
    ) -> None:
        super().__init__(detail)
        self.title = title
        self.feature = feature
        self.cost = cost
        self.remaining = remaining
        self.resets_at = resets_at
        self.retry_after = retry_after
        #: The effective allowance and the period, for the quota headers.
        self.allowance = allowance
        self.period = period

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

    def __init__(self, retry_after: int, *, allowance: int, remaining: int, period: Period) -> None:
        super().__init__(
            "This coach already has as many AI actions in progress as a coach may have at "
            "once; commit or refund one, or retry when the earliest lapses."
        )
        self.retry_after = retry_after
        #: The effective allowance, what remains and the period, for the quota headers.
        self.allowance = allowance
        self.remaining = remaining
        self.period = period


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
