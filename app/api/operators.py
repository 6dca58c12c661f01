"""What the people who run the coaching app need: a coach's own monthly allowance,
grants of credits, and holds that live as long as the work (extend)."""

from __future__ import annotations

from typing import Annotated, Final

from fastapi import APIRouter, Header, Query, Request
from starlette.responses import Response

from app import domain
from app.api import paths  # noqa: F401  (registers the {coach_id:coach_id} path type)
from app.api.answers import FastJSONResponse
from app.api.deps import Principal, Reader, Worker, guarded, require, store_of
from app.api.openapi import problems
from app.api.schemas import (
    AllowanceRequest,
    ExtendRequest,
    GrantOut,
    GrantRequest,
    GrantsOut,
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

Admin = Annotated[Principal, guarded(require(Scope.ADMIN))]

ALLOWANCE_PATH: Final = "/v1/coaches/{coach_id:coach_id}/allowance"
GRANTS_PATH: Final = "/v1/coaches/{coach_id:coach_id}/grants"


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
    responses=problems("invalid_coach_id", "invalid_request", "not_found", "backend_unavailable"),
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
    responses=problems("invalid_coach_id", "not_found", "backend_unavailable"),
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
        201: {"description": "Granted now."},
        200: {
            "model": GrantOut,
            "description": "A replayed Idempotency-Key: the grant it made, granted once.",
        },
        **problems(
            "invalid_coach_id",
            "invalid_request",
            "idempotency_key_reused",
            "not_found",
            "grant_exceeds_remaining",
            "grant_limit",
            "backend_unavailable",
        ),
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
    responses=problems("invalid_coach_id", "invalid_request", "not_found", "backend_unavailable"),
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
    responses=problems(
        "invalid_request",
        "reservation_not_found",
        "not_found",
        "reservation_committed",
        "reservation_refunded",
        "reservation_expired",
        "extension_limit",
        "backend_unavailable",
    ),
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
