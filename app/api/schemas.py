"""Request and response shapes of the HTTP API, and their JSON encoders.

Responses are built as plain dicts by the ``*_json`` functions (the models document them
in the OpenAPI schema), which keeps the hot path free of a second validation pass.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app import domain
from app.domain import Grant, Period, Reservation, Usage

LevelName = Literal["green", "amber", "red"]
StatusName = Literal["held", "committed", "refunded", "expired"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ReserveRequest(_Strict):
    feature: Annotated[str, Field(min_length=1, max_length=64, examples=["trend_analysis"])]
    ttl_seconds: (
        Annotated[int, Field(ge=domain.MIN_TTL_SECONDS, le=domain.MAX_TTL_SECONDS)] | None
    ) = Field(default=None, description="How long the hold lives if nobody settles it.")


class ExtendRequest(_Strict):
    ttl_seconds: Annotated[
        int,
        Field(
            ge=domain.MIN_TTL_SECONDS,
            le=domain.MAX_TTL_SECONDS,
            description="The hold then expires this many seconds from now.",
            examples=[300],
        ),
    ]


class AllowanceRequest(_Strict):
    monthly_allowance: Annotated[
        int,
        Field(
            ge=0,
            le=domain.MAX_MONTHLY_ALLOWANCE,
            description="The coach's credits per month, from the current period on.",
            examples=[200],
        ),
    ]


class GrantRequest(_Strict):
    credits: Annotated[
        int,
        Field(
            ge=-domain.MAX_GRANT_CREDITS,
            le=domain.MAX_GRANT_CREDITS,
            description="Credits added to this period's allowance; negative removes them. Not 0.",
            examples=[5],
        ),
    ]
    reason: Annotated[
        str,
        Field(
            min_length=1,
            max_length=domain.MAX_GRANT_REASON_CHARS,
            description="Why, for support staff.",
            examples=["Goodwill after the outage of November 12"],
        ),
    ]

    @field_validator("credits")
    @classmethod
    def _not_zero(cls, credits: int) -> int:
        if credits == 0:
            raise ValueError("a grant adds or removes at least one credit")
        return credits


class BatchUsageRequest(_Strict):
    coach_ids: Annotated[list[str], Field(min_length=1, max_length=1000)]


class FeatureOut(BaseModel):
    feature: str
    cost: int
    label: str


class FeaturesOut(BaseModel):
    features: list[FeatureOut]


class FeatureAvailabilityOut(BaseModel):
    feature: str
    cost: int
    available: bool


class UsageOut(BaseModel):
    coach_id: str
    period: Annotated[str, Field(examples=["2026-11"])]
    allowance: int = Field(
        description="base_allowance + granted (never below 0): what remaining, "
        "percent_used and level are measured against."
    )
    base_allowance: int = Field(
        description="The coach's monthly allowance: its own when set, else the configured one."
    )
    granted: int = Field(description="This period's grants added up; may be negative.")
    used: int
    held: int
    remaining: int
    percent_used: Annotated[int, Field(ge=0, le=100)]
    level: LevelName
    resets_at: Annotated[str, Field(examples=["2026-12-01T00:00:00Z"])]
    features: list[FeatureAvailabilityOut]


class BatchUsageOut(BaseModel):
    items: list[UsageOut]


class ReservationOut(BaseModel):
    reservation_id: str
    coach_id: str
    feature: str
    cost: int
    status: StatusName
    period: str
    expires_at: str
    usage: UsageOut
    note: str | None = Field(
        default=None,
        description="Present once committed, e.g. 'Used 3 credits · 34 of 50 left this month'.",
    )


class GrantOut(BaseModel):
    grant_id: str
    coach_id: str
    period: Annotated[str, Field(examples=["2026-11"])]
    credits: int
    reason: str
    granted_at: Annotated[str, Field(examples=["2026-11-14T09:30:00Z"])]
    usage: UsageOut


class GrantsOut(BaseModel):
    grants: list[GrantOut] = Field(description="Oldest first.")


class ProblemOut(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str


class ReadyOut(BaseModel):
    status: Literal["ready"]
    backend: Literal["embedded", "redis", "cluster"]
    auth: Literal["keys", "open"]
    warnings: list[str]


#: Items per batch request: large enough to amortise a round trip, small enough that
#: one request never holds Redis for long.
MAX_BATCH_ITEMS = 500


class BatchReserveItem(_Strict):
    """Value checks (coach id, feature, ttl, key format) are per item: a bad value fails
    its item alone. Only a wrong shape or type fails the whole request."""

    coach_id: Annotated[str, Field(examples=["coach-42"])]
    feature: Annotated[str, Field(examples=["trend_analysis"])]
    ttl_seconds: int | None = Field(
        default=None, description="1-3600; how long the hold lives if nobody settles it."
    )
    idempotency_key: str | None = Field(
        default=None,
        description="1-255 printable ASCII; same scope and rules as the Idempotency-Key header.",
    )


class BatchReserveRequest(_Strict):
    reservations: Annotated[list[BatchReserveItem], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]


class SettleItem(_Strict):
    reservation_id: str
    action: Literal["commit", "refund"]


class SettleRequest(_Strict):
    settlements: Annotated[list[SettleItem], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]


class ItemProblemOut(ProblemOut):
    model_config = ConfigDict(extra="allow")


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
    results: list[BatchReserveResultOut] = Field(description="One per item, in request order.")


class SettleResultOut(BaseModel):
    status: Literal[200, 404, 409]
    reservation: ReservationOut | None = Field(default=None, description="With 200.")
    problem: ItemProblemOut | None = Field(default=None, description="With 404 or 409.")


class SettleOut(BaseModel):
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
    """``reservation_json`` as the routes send it (see ``app.api.fast.FastJSONResponse``)."""
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
