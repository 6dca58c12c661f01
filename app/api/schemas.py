"""Request and response shapes of the HTTP API, and their JSON encoders.

Responses are built as plain dicts by the ``*_json`` functions (the models document them
in the OpenAPI schema), which keeps the hot path free of a second validation pass.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from app import domain
from app.domain import Grant, Period, Reservation, Usage

LevelName = Literal["green", "amber", "red"]
StatusName = Literal["held", "committed", "refunded", "expired"]

#: What the service accepts as a coach id and an Idempotency-Key, for the schema
#: (anchored, as JSON Schema patterns are searches).
COACH_ID_PATTERN: Final = f"^{domain.COACH_ID_RE.pattern}$"
#: Printable ASCII without spaces at either end, which HTTP drops from header values.
IDEMPOTENCY_KEY_PATTERN: Final = r"^[\x21-\x7e]([\x20-\x7e]{0,253}[\x21-\x7e])?$"
#: The text form of ``domain.ReservationId``.
RESERVATION_ID_PATTERN: Final = r"^[A-Za-z0-9_-]+\.[0-9]{6}\.[A-Za-z0-9_-]{22}$"
PERIOD_PATTERN: Final = r"^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])$"

EXAMPLE_COACH: Final = "coach-42"
EXAMPLE_RESERVATION_ID: Final = "Y29hY2gtNDI.202611.RGeFQA8_dcI_BfJpe9p-BQ"

DateTime = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
CoachIdText = Annotated[
    str,
    Field(
        description="1-128 characters of A-Z a-z 0-9 . _ : @ -, starting with a letter or digit.",
        json_schema_extra={"pattern": COACH_ID_PATTERN, "minLength": 1, "maxLength": 128},
    ),
]


def _whole(value: object) -> object:
    """3.0 as 3: JSON Schema counts a number with a zero fraction as an integer, and some
    clients write every number that way. Anything else is left to the strict check."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: An integer in a strict model that also takes 3.0 (but not "3" or true). Constraints
#: go before it (``Annotated[int, Field(ge=1), WHOLE]``), so the schema shows them.
WHOLE: Final = BeforeValidator(_whole)


def _examples(*examples: Any) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ReserveRequest(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"feature": "trend_analysis"},
                {"feature": "checkin_draft", "ttl_seconds": 600},
            ]
        },
    )

    feature: Annotated[
        str,
        Field(min_length=1, max_length=64, description="One of the features of GET /v1/features."),
    ]
    ttl_seconds: (
        Annotated[int, Field(ge=domain.MIN_TTL_SECONDS, le=domain.MAX_TTL_SECONDS), WHOLE] | None
    ) = Field(default=None, description="How long the hold lives if nobody settles it (300).")


class ExtendRequest(_Strict):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"ttl_seconds": 300}]}
    )

    ttl_seconds: Annotated[
        int,
        Field(
            ge=domain.MIN_TTL_SECONDS,
            le=domain.MAX_TTL_SECONDS,
            description="The hold then expires this many seconds from now.",
        ),
        WHOLE,
    ]


class AllowanceRequest(_Strict):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"monthly_allowance": 200}]}
    )

    monthly_allowance: Annotated[
        int,
        Field(
            ge=0,
            le=domain.MAX_MONTHLY_ALLOWANCE,
            description="The coach's credits per month, from the current period on.",
        ),
        WHOLE,
    ]


class GrantRequest(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"credits": 5, "reason": "Goodwill after the outage of November 12"},
                {"credits": -3, "reason": "Duplicate analysis charged twice, reversed"},
            ]
        },
    )

    credits: Annotated[
        int,
        Field(
            ge=-domain.MAX_GRANT_CREDITS,
            le=domain.MAX_GRANT_CREDITS,
            description="Credits added to this period's allowance; negative removes them. Not 0.",
        ),
        WHOLE,
    ]
    reason: Annotated[
        str,
        Field(
            min_length=1,
            max_length=domain.MAX_GRANT_REASON_CHARS,
            description="Why, for support staff (1-200 characters).",
        ),
    ]

    @field_validator("credits")
    @classmethod
    def _not_zero(cls, credits: int) -> int:
        if credits == 0:
            raise ValueError("a grant adds or removes at least one credit")
        return credits


class BatchUsageRequest(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"coach_ids": ["coach-42", "coach-7"]}]},
    )

    coach_ids: Annotated[list[CoachIdText], Field(min_length=1, max_length=1000)]


class FeatureOut(BaseModel):
    feature: str
    cost: Annotated[int, Field(ge=1)]
    label: str


class FeaturesOut(BaseModel):
    model_config = _examples(
        {
            "features": [
                {"feature": "checkin_draft", "cost": 1, "label": "Check-in response draft"},
                {"feature": "trend_analysis", "cost": 3, "label": "Client trend analysis"},
            ]
        }
    )

    features: list[FeatureOut]


class FeatureAvailabilityOut(BaseModel):
    feature: str
    cost: Annotated[int, Field(ge=1)]
    available: bool = Field(description="Whether the cost fits in what remains.")


_USAGE_EXAMPLE: Final[dict[str, object]] = {
    "coach_id": EXAMPLE_COACH,
    "period": "2026-11",
    "allowance": 50,
    "base_allowance": 50,
    "granted": 0,
    "used": 13,
    "held": 3,
    "remaining": 34,
    "percent_used": 26,
    "level": "green",
    "resets_at": "2026-12-01T00:00:00Z",
    "features": [
        {"feature": "checkin_draft", "cost": 1, "available": True},
        {"feature": "trend_analysis", "cost": 3, "available": True},
    ],
}


class UsageOut(BaseModel):
    model_config = _examples(_USAGE_EXAMPLE)

    coach_id: str
    period: Annotated[str, Field(pattern=PERIOD_PATTERN, description="YYYY-MM, UTC.")]
    allowance: Annotated[
        int,
        Field(
            ge=0,
            description="base_allowance + granted, never below 0: what remaining, "
            "percent_used and level are measured against.",
        ),
    ]
    base_allowance: Annotated[
        int,
        Field(
            ge=0,
            description="The coach's monthly allowance: its own when set, else the configured one.",
        ),
    ]
    granted: int = Field(description="This period's grants added up; may be negative.")
    used: Annotated[int, Field(ge=0)]
    held: Annotated[int, Field(ge=0)]
    remaining: Annotated[int, Field(ge=0, description="allowance - used - held, never below 0.")]
    percent_used: Annotated[int, Field(ge=0, le=100)]
    level: LevelName
    resets_at: DateTime
    features: list[FeatureAvailabilityOut]


class BatchUsageOut(BaseModel):
    model_config = _examples({"items": [_USAGE_EXAMPLE]})

    items: list[UsageOut] = Field(description="One per coach id, in request order.")


_RESERVATION_EXAMPLE: Final[dict[str, object]] = {
    "reservation_id": EXAMPLE_RESERVATION_ID,
    "coach_id": EXAMPLE_COACH,
    "feature": "trend_analysis",
    "cost": 3,
    "status": "held",
    "period": "2026-11",
    "expires_at": "2026-11-14T12:05:00Z",
    "usage": _USAGE_EXAMPLE,
}
_COMMITTED_EXAMPLE: Final[dict[str, object]] = {
    **_RESERVATION_EXAMPLE,
    "status": "committed",
    "usage": {**_USAGE_EXAMPLE, "used": 16, "held": 0, "remaining": 34, "percent_used": 32},
    "note": "Used 3 credits · 34 of 50 left this month",
}


class ReservationOut(BaseModel):
    model_config = _examples(_RESERVATION_EXAMPLE, _COMMITTED_EXAMPLE)

    reservation_id: Annotated[str, Field(pattern=RESERVATION_ID_PATTERN)]
    coach_id: str
    feature: str
    cost: Annotated[int, Field(ge=1)]
    status: StatusName
    period: Annotated[str, Field(pattern=PERIOD_PATTERN)]
    expires_at: DateTime
    usage: UsageOut = Field(description="The usage of the reservation's period.")
    note: str | None = Field(
        default=None,
        description="Present once committed, e.g. 'Used 3 credits · 34 of 50 left this month'.",
    )


_GRANT_EXAMPLE: Final[dict[str, object]] = {
    "grant_id": "nq3Xw0sE1kq0bP6w8T0M7A",
    "coach_id": EXAMPLE_COACH,
    "period": "2026-11",
    "credits": 5,
    "reason": "Goodwill after the outage of November 12",
    "granted_at": "2026-11-14T09:30:00Z",
    "usage": {**_USAGE_EXAMPLE, "allowance": 55, "granted": 5, "remaining": 39, "percent_used": 23},
}


class GrantOut(BaseModel):
    model_config = _examples(_GRANT_EXAMPLE)

    grant_id: str
    coach_id: str
    period: Annotated[str, Field(pattern=PERIOD_PATTERN)]
    credits: int = Field(description="Added to the period's allowance; negative removed them.")
    reason: str
    granted_at: DateTime
    usage: UsageOut = Field(description="The period's usage as this call left it.")


class GrantsOut(BaseModel):
    model_config = _examples({"grants": [_GRANT_EXAMPLE]})

    grants: list[GrantOut] = Field(description="Oldest first.")


class FieldError(BaseModel):
    loc: str = Field(description="Where, e.g. body.ttl_seconds.")
    msg: str


class ProblemOut(BaseModel):
    """An RFC 9457 problem: ``code`` is stable, ``detail`` a sentence a person can read."""

    model_config = ConfigDict(title="Problem")

    type: str = Field(description="/problems/<code>")
    title: str
    status: Annotated[int, Field(ge=400, le=599)]
    detail: str
    code: str


class InvalidRequestProblemOut(ProblemOut):
    """A 422: what was wrong, per field when the request's shape was."""

    model_config = ConfigDict(title="InvalidRequestProblem")

    errors: list[FieldError] | None = Field(
        default=None, description="Present when fields failed their schema."
    )


class CreditsExhaustedProblemOut(ProblemOut):
    """A 429 credits_exhausted: what did not fit and when credits come back."""

    model_config = ConfigDict(title="CreditsExhaustedProblem")

    feature: str
    cost: Annotated[int, Field(ge=1)]
    remaining: Annotated[int, Field(ge=0)]
    resets_at: DateTime


class GrantExceedsRemainingProblemOut(ProblemOut):
    """A 409 grant_exceeds_remaining: what remains to take."""

    model_config = ConfigDict(title="GrantExceedsRemainingProblem")

    remaining: Annotated[int, Field(ge=0)]


class ExtensionLimitProblemOut(ProblemOut):
    """A 409 extension_limit: the latest expiry the hold may have."""

    model_config = ConfigDict(title="ExtensionLimitProblem")

    latest_expires_at: DateTime


class ReadyOut(BaseModel):
    model_config = _examples(
        {"status": "ready", "backend": "redis", "auth": "keys", "fast_path": True, "warnings": []}
    )

    status: Literal["ready"]
    backend: Literal["embedded", "redis", "cluster"]
    auth: Literal["keys", "open"]
    fast_path: bool = Field(
        description="Whether reserve and commit are answered ahead of the middleware "
        "stack; when not, a warning says why."
    )
    warnings: list[str]


#: Items per batch request: large enough to amortise a round trip, small enough that
#: one request never holds Redis for long.
MAX_BATCH_ITEMS = 500


class BatchReserveItem(_Strict):
    """Value checks (coach id, feature, ttl, key format) are per item: a bad value fails
    its item alone. Only a wrong shape or type fails the whole request."""

    coach_id: str = Field(description="Checked per item, as the single route checks it.")
    feature: str
    ttl_seconds: Annotated[int, WHOLE] | None = Field(
        default=None, description="1-3600; how long the hold lives if nobody settles it."
    )
    idempotency_key: str | None = Field(
        default=None,
        description="1-255 printable ASCII; same scope and rules as the Idempotency-Key header.",
    )


class BatchReserveRequest(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "reservations": [
                        {"coach_id": "coach-42", "feature": "trend_analysis"},
                        {
                            "coach_id": "coach-7",
                            "feature": "checkin_draft",
                            "ttl_seconds": 600,
                            "idempotency_key": "draft-7-1042",
                        },
                    ]
                }
            ]
        },
    )

    reservations: Annotated[list[BatchReserveItem], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]


class SettleItem(_Strict):
    reservation_id: str
    action: Literal["commit", "refund"]


class SettleRequest(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"settlements": [{"reservation_id": EXAMPLE_RESERVATION_ID, "action": "commit"}]}
            ]
        },
    )

    settlements: Annotated[list[SettleItem], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]


class ItemProblemOut(ProblemOut):
    """A batch item's problem: the single route's problem, with what its headers would say
    (``retry_after``, seconds) in the body."""

    model_config = ConfigDict(title="ItemProblem")

    errors: list[FieldError] | None = None
    feature: str | None = None
    cost: Annotated[int, Field(ge=1)] | None = None
    remaining: Annotated[int, Field(ge=0)] | None = None
    resets_at: DateTime | None = None
    retry_after: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="With a 429: seconds to wait, as Retry-After would say."
    )


_EXHAUSTED_ITEM: Final[dict[str, object]] = {
    "type": "/problems/credits_exhausted",
    "title": "Not enough AI credits",
    "status": 429,
    "detail": "Client trend analysis needs 3 credits and you have 2 left this month. "
    "Credits refresh on December 1 at 00:00 UTC.",
    "code": "credits_exhausted",
    "feature": "trend_analysis",
    "cost": 3,
    "remaining": 2,
    "resets_at": "2026-12-01T00:00:00Z",
    "retry_after": 1425600,
}


class BatchReserveResultOut(BaseModel):
    status: Annotated[
        Literal[200, 201, 422, 429],
        Field(description="What the single-item route would have answered for this item."),
    ]
    reservation: ReservationOut | None = Field(
        default=None, description="With 201 (held now) or 200 (idempotent replay)."
    )
    problem: ItemProblemOut | None = Field(
        default=None,
        description="With 422 or 429; a 429 also carries retry_after (seconds).",
    )


class BatchReserveOut(BaseModel):
    model_config = _examples(
        {
            "results": [
                {"status": 201, "reservation": _RESERVATION_EXAMPLE},
                {"status": 429, "problem": _EXHAUSTED_ITEM},
            ]
        }
    )

    results: list[BatchReserveResultOut] = Field(description="One per item, in request order.")


class SettleResultOut(BaseModel):
    status: Literal[200, 404, 409]
    reservation: ReservationOut | None = Field(default=None, description="With 200.")
    problem: ItemProblemOut | None = Field(default=None, description="With 404 or 409.")


class SettleOut(BaseModel):
    model_config = _examples(
        {
            "results": [
                {"status": 200, "reservation": _COMMITTED_EXAMPLE},
                {
                    "status": 404,
                    "problem": {
                        "type": "/problems/reservation_not_found",
                        "title": "Reservation not found",
                        "status": 404,
                        "detail": "No reservation has this id.",
                        "code": "reservation_not_found",
                    },
                },
            ]
        }
    )

    results: list[SettleResultOut] = Field(description="One per item, in request order.")


def usage_json(u: Usage) -> dict[str, object]:
    period, resets_at = _period_texts(u.period)
    return {
        "coach_id": u.coach_id,
        "period": period,
        "allowance": u.allowance,
        "base_allowance": u.base_allowance,
        "granted": u.granted,
        "used": u.used,
        "held": u.held,
        "remaining": u.remaining,
        "percent_used": u.percent_used,
        "level": u.level.value,
        "resets_at": resets_at,
        "features": [
            {"feature": f.feature, "cost": f.cost, "available": f.available} for f in u.features
        ],
    }


def reservation_json(r: Reservation) -> dict[str, object]:
    rid = r.reservation_id
    body: dict[str, object] = {
        "reservation_id": str(rid),
        "coach_id": rid.coach_id,
        "feature": r.feature,
        "cost": r.cost,
        "status": r.status.value,
        "period": _period_texts(rid.period)[0],
        "expires_at": _iso_z(r.expires_at),
        "usage": usage_json(r.usage),
    }
    note = r.note
    if note is not None:
        body["note"] = note
    return body


def grant_json(g: Grant) -> dict[str, object]:
    return {
        "grant_id": g.grant_id,
        "coach_id": g.coach_id,
        "period": _period_texts(g.period)[0],
        "credits": g.credits,
        "reason": g.reason,
        "granted_at": _iso_z(g.granted_at),
        "usage": usage_json(g.usage),
    }


def encode_reservation(r: Reservation) -> bytes:
    """``reservation_json`` as the routes send it (see ``app.api.answers.FastJSONResponse``)."""
    return orjson.dumps(reservation_json(r))


#: A period's text and its ``resets_at`` in ``iso_z`` form: the same for every reply in
#: the month, so worked out once. Bounded, as periods come from caller-supplied ids.
_PERIOD_TEXTS: dict[Period, tuple[str, str]] = {}
_PERIOD_TEXTS_MAX: Final = 64


def _period_texts(period: Period) -> tuple[str, str]:
    texts = _PERIOD_TEXTS.get(period)
    if texts is None:
        if len(_PERIOD_TEXTS) >= _PERIOD_TEXTS_MAX:
            _PERIOD_TEXTS.clear()
        texts = _PERIOD_TEXTS[period] = (str(period), domain.iso_z(period.resets_at))
    return texts


def _iso_z(instant: datetime) -> str:
    """``domain.iso_z``, by the C formatter when the instant is in UTC already (as every
    instant the store reads is): ``isoformat`` truncates to milliseconds as ``iso_z``
    does. Years before 1000 keep the general path, whose ``strftime`` may not pad them."""
    if instant.tzinfo is UTC and instant.year >= 1000:
        if instant.microsecond:
            return instant.isoformat(timespec="milliseconds")[:-6] + "Z"
        return instant.isoformat(timespec="seconds")[:-6] + "Z"
    return domain.iso_z(instant)
