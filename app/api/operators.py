"""What the people who run the coaching app need: a coach's own monthly allowance,
grants of credits, and holds that live as long as the work (extend)."""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.responses import Response

from app import domain
from app.api import paths  # noqa: F401  (registers the {coach_id:coach_id} path type)
from app.api.deps import Principal, Reader, Worker, require, store_of
from app.api.fast import FastJSONResponse
from app.api.problems import PROBLEM_JSON
from app.api.schemas import (
    AllowanceRequest,
    ExtendRequest,
    GrantOut,
    GrantRequest,
    GrantsOut,
    ProblemOut,
    ReservationOut,
    UsageOut,
    grant_json,
    reservation_json,
    usage_json,
)
from app.config import Scope
from app.domain import Period
from app.errors import InvalidRequest

router = APIRouter()

Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]

ALLOWANCE_PATH: Final = "/v1/coaches/{coach_id:coach_id}/allowance"
GRANTS_PATH: Final = "/v1/coaches/{coach_id:coach_id}/grants"

_AUTH = (401, 403, 413, 503)

_USAGE_EXAMPLE: Final = {
    "coach_id": "coach-42",
    "period": "2026-11",
    "allowance": 205,
    "base_allowance": 200,
    "granted": 5,
    "used": 13,
    "held": 0,
    "remaining": 192,
    "percent_used": 6,
    "level": "green",
    "resets_at": "2026-12-01T00:00:00Z",
    "features": [
        {"feature": "checkin_draft", "cost": 1, "available": True},
        {"feature": "trend_analysis", "cost": 3, "available": True},
    ],
}
_GRANT_EXAMPLE: Final = {
    "grant_id": "nq3Xw0sE1kq0bP6w8T0M7A",
    "coach_id": "coach-42",
    "period": "2026-11",
    "credits": 5,
    "reason": "Goodwill after the outage of November 12",
    "granted_at": "2026-11-14T09:30:00Z",
    "usage": _USAGE_EXAMPLE,
}
_RESERVATION_EXAMPLE: Final = {
    "reservation_id": "Y29hY2gtNDI.202611.DzUcuqCxgVPRgWRBUBiyvw",
    "coach_id": "coach-42",
    "feature": "trend_analysis",
    "cost": 3,
    "status": "held",
    "period": "2026-11",
    "expires_at": "2026-11-14T09:40:00Z",
    "usage": {**_USAGE_EXAMPLE, "held": 3, "remaining": 189},
}


def _problem(status: int, *examples: tuple[str, str]) -> dict[str, Any]:
    """A problem response, with one example per code it may carry."""
    content: dict[str, Any] = {}
    if examples:
        content["examples"] = {
            code: {
                "value": {
                    "type": f"/problems/{code}",
                    "title": code.replace("_", " ").capitalize(),
                    "status": status,
                    "detail": detail,
                    "code": code,
                }
            }
            for code, detail in examples
        }
    return {"model": ProblemOut, "content": {PROBLEM_JSON: content}}


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: _problem(s) for s in statuses}


def _ok(example: object, description: str = "Successful Response") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"example": example}}}


def _period(period: str | None) -> Period | None:
    if period is None:
        return None
    try:
        return Period.parse(period)
    except ValueError:
        raise InvalidRequest("period must be a month written YYYY-MM, e.g. 2026-11.") from None


# --- allowance ---------------------------------------------------------------------------


@router.put(
    ALLOWANCE_PATH,
    response_model=UsageOut,
    responses={200: _ok(_USAGE_EXAMPLE), **_problems(422, *_AUTH)},
    tags=["operators"],
    summary="Give a coach its own monthly allowance",
    description=(
        "From the current period on, every month, until deleted: `base_allowance` becomes "
        "`monthly_allowance` (0-1,000,000). Lowering it below what is used takes nothing "
        "back: remaining reads 0 and reservations are refused until the next period. "
        "The change is logged as an `allowance_changed` event in the current period; "
        "setting the value the coach already has changes and logs nothing. Answers the "
        "current period's usage."
    ),
)
async def put_allowance(
    coach_id: str, body: AllowanceRequest, request: Request, _: Admin
) -> Response:
    usage = await store_of(request).set_allowance(coach_id, body.monthly_allowance)
    return FastJSONResponse(usage_json(usage))


@router.delete(
    ALLOWANCE_PATH,
    response_model=UsageOut,
    responses={
        200: _ok(
            {
                **_USAGE_EXAMPLE,
                "allowance": 55,
                "base_allowance": 50,
                "remaining": 42,
                "percent_used": 23,
            }
        ),
        **_problems(422, *_AUTH),
    },
    tags=["operators"],
    summary="Take a coach back to the configured monthly allowance",
    description=(
        "`base_allowance` is `CREDITS_MONTHLY_ALLOWANCE` again from the current period on. "
        "Logged as an `allowance_changed` event with `monthly_allowance: null`; a coach "
        "without an allowance of its own changes and logs nothing. Answers the current "
        "period's usage."
    ),
)
async def delete_allowance(coach_id: str, request: Request, _: Admin) -> Response:
    usage = await store_of(request).set_allowance(coach_id, None)
    return FastJSONResponse(usage_json(usage))


# --- grants ------------------------------------------------------------------------------


@router.post(
    GRANTS_PATH,
    status_code=201,
    response_model=GrantOut,
    responses={
        201: _ok(_GRANT_EXAMPLE, "Granted"),
        200: {
            "model": GrantOut,
            "description": "Idempotent replay: the grant the key made, granted once",
        },
        409: _problem(
            409,
            (
                "grant_exceeds_remaining",
                "Removing 10 credits would take the coach below zero: only 3 remain this month.",
            ),
            (
                "grant_limit",
                "A coach can receive at most 100 grants per month, and this month has them "
                "all. Set the coach's monthly allowance instead.",
            ),
        ),
        **_problems(422, *_AUTH),
    },
    tags=["operators"],
    summary="Add credits to (or remove them from) a coach's current period",
    description=(
        "`credits` (non-zero, within ±1,000,000) change this period's allowance only: "
        "granted credits end with the period like the rest. A negative grant may not "
        "take remaining below 0. At most 100 grants per coach and period. The grant and "
        "its `granted` event are one atomic step. With an `Idempotency-Key` (scoped to "
        "the calling API key and the coach) a retry answers 200 with the same grant; the "
        "same key with other credits or another reason is 422 `idempotency_key_reused`."
    ),
)
async def post_grant(
    coach_id: str,
    body: GrantRequest,
    request: Request,
    principal: Admin,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="1-255 printable ASCII",
            json_schema_extra={"pattern": "^[\\x20-\\x7e]{1,255}$"},
        ),
    ] = None,
) -> Response:
    if idempotency_key is not None and not domain.is_valid_idempotency_key(idempotency_key):
        raise InvalidRequest("Idempotency-Key must be 1-255 printable ASCII characters.")
    grant, created = await store_of(request).grant(
        coach_id,
        body.credits,
        body.reason,
        idempotency_key=idempotency_key,
        principal=principal.key_id,
    )
    return FastJSONResponse(grant_json(grant), status_code=201 if created else 200)


@router.get(
    GRANTS_PATH,
    response_model=GrantsOut,
    responses={200: _ok({"grants": [_GRANT_EXAMPLE]}), **_problems(422, *_AUTH)},
    tags=["operators"],
    summary="A coach's grants for one period, oldest first",
    description="Each grant carries the period's usage as it is now. Reads only.",
)
async def list_grants(
    coach_id: str,
    request: Request,
    _: Reader,
    period: Annotated[
        str | None, Query(description="YYYY-MM (UTC); the current month when omitted")
    ] = None,
) -> Response:
    grants = await store_of(request).grants(coach_id, period=_period(period))
    return FastJSONResponse({"grants": [grant_json(g) for g in grants]})


# --- extend ------------------------------------------------------------------------------


@router.post(
    "/v1/reservations/{reservation_id}/extend",
    response_model=ReservationOut,
    responses={
        200: _ok(_RESERVATION_EXAMPLE),
        404: _problem(404, ("reservation_not_found", "No reservation has this id.")),
        409: _problem(
            409,
            (
                "reservation_committed",
                "This reservation was committed, so there is no hold left to extend.",
            ),
            (
                "reservation_refunded",
                "This reservation was refunded, so there is no hold left to extend.",
            ),
            (
                "reservation_expired",
                "This reservation expired before it was extended; its credits were "
                "returned. Reserve again to hold credits.",
            ),
            (
                "extension_limit",
                "A hold may live at most one hour past the end of its month: this one can "
                "be extended to 2026-12-01T01:00:00Z at the latest.",
            ),
        ),
        **_problems(422, *_AUTH),
    },
    tags=["reservations"],
    summary="Keep a hold alive while the work runs",
    description=(
        "Moves a live hold's `expires_at` to now + `ttl_seconds` (1-3600; it may also "
        "come earlier). Never past one hour after the end of the hold's period "
        "(`extension_limit`, with `latest_expires_at`). A hold that lapsed first stays "
        "expired (`reservation_expired`): of a lapse and an extension exactly one wins, "
        "and the event log says which (`expired` or `extended`). A bad body is 422 before "
        "the reservation is looked at."
    ),
)
async def extend(reservation_id: str, body: ExtendRequest, request: Request, _: Worker) -> Response:
    reservation = await store_of(request).extend(reservation_id, body.ttl_seconds)
    return FastJSONResponse(reservation_json(reservation))
