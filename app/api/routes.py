"""HTTP routes: translate requests to store calls and results to JSON. Domain outcomes
are raised as ``app.errors`` exceptions and turned into problems by ``problems``."""

from __future__ import annotations

from typing import Annotated, Final

from fastapi import APIRouter, Body, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app import domain
from app.api import paths  # noqa: F401  (registers the {coach_id:coach_id} path type)
from app.api.answers import Answer, FastJSONResponse, json_answer
from app.api.deps import AnyScope, MetricsDep, Principal, Reader, StoreDep, Worker, store_of
from app.api.openapi import QUOTA_HEADERS, problems
from app.api.problems import problem_body
from app.api.quota import RawHeader, headers_dict, usage_quota_headers
from app.api.schemas import (
    BatchReserveOut,
    BatchReserveRequest,
    BatchUsageOut,
    BatchUsageRequest,
    FeaturesOut,
    ReadyOut,
    ReservationOut,
    ReserveRequest,
    SettleOut,
    SettleRequest,
    UsageOut,
    encode_reservation,
    reservation_json,
    usage_json,
)
from app.domain import Reservation
from app.errors import CreditsError, InvalidRequest
from app.store import CreditStore, ReserveItem

router = APIRouter()

#: The two hot routes, whose paths ``app.api.hot`` matches in front of the router.
RESERVE_PATH: Final = "/v1/coaches/{coach_id:coach_id}/reservations"
COMMIT_PATH: Final = "/v1/reservations/{reservation_id}/commit"

# The credit routes take the store from the request (``store_of``) instead of as a
# dependency: FastAPI resolves each dependency with its full parameter machinery, a
# noticeable share of a request's CPU, and the store needs none of it. A ``Request``
# parameter leaves the OpenAPI schema as it was, and the access check stays the one
# dependency, so it still answers before the body is looked at. Reserve and commit go
# further: ``reserve_answer`` and ``commit_answer`` build their answers without a request
# object, for these routes and for the front in ``app.api.hot``.


#: A new hold's id leads to the routes that read and settle it.
_RESERVATION_LINKS: Final = {
    name: {
        "operationId": operation,
        "parameters": {"reservation_id": "$response.body#/reservation_id"},
        "description": description,
    }
    for name, operation, description in (
        ("GetReservation", "get_reservation", "Read the reservation."),
        ("Commit", "commit", "Charge it: the AI action succeeded."),
        ("Refund", "refund", "Return its credits: the AI action failed."),
    )
}


@router.get(
    "/v1/features",
    response_model=FeaturesOut,
    tags=["credits"],
    summary="The AI features and what each costs",
)
async def list_features(request: Request, _: AnyScope) -> JSONResponse:
    store = store_of(request)
    return JSONResponse(
        {
            "features": [
                {"feature": name, "cost": cost, "label": domain.feature_label(name)}
                for name, cost in store.feature_costs.items()
            ]
        }
    )


async def reserve_answer(
    store: CreditStore,
    coach_id: str,
    body: ReserveRequest,
    principal: Principal,
    idempotency_key: str | None,
) -> Answer:
    """A reserve as both ways answer it once the caller is admitted and the body is valid."""
    if idempotency_key is not None and not domain.is_valid_idempotency_key(idempotency_key):
        raise InvalidRequest("Idempotency-Key must be 1-255 printable ASCII characters.")
    reservation, created = await store.reserve(
        coach_id,
        body.feature,
        ttl_seconds=body.ttl_seconds,
        idempotency_key=idempotency_key,
        principal=principal.key_id,
    )
    return json_answer(
        201 if created else 200,
        encode_reservation(reservation),
        reserve_quota_headers(store, reservation),
    )


def reserve_quota_headers(store: CreditStore, reservation: Reservation) -> list[RawHeader]:
    """A reserve answer's quota headers: of the current period, also when a replay answers
    with an earlier period's reservation."""
    return usage_quota_headers(reservation.current or reservation.usage, store.clock())


async def commit_answer(store: CreditStore, reservation_id: str) -> Answer:
    """A commit as both ways answer it once the caller is admitted."""
    return json_answer(200, encode_reservation(await store.commit(reservation_id)))


@router.post(
    RESERVE_PATH,
    status_code=201,
    response_model=ReservationOut,
    responses={
        201: {
            "description": "Held now: the cost counts against what is left until settled.",
            "headers": QUOTA_HEADERS,
            "links": _RESERVATION_LINKS,
        },
        200: {
            "model": ReservationOut,
            "description": "A replayed Idempotency-Key: the same reservation, as it is now.",
            "headers": QUOTA_HEADERS,
            "links": _RESERVATION_LINKS,
        },
        **problems(
            "invalid_coach_id",
            "unknown_feature",
            "invalid_request",
            "idempotency_key_reused",
            "credits_exhausted",
            "too_many_holds",
            "backend_unavailable",
            headers={429: QUOTA_HEADERS},
        ),
    },
    tags=["reservations"],
    summary="Hold a feature's cost before running the AI action",
    description=(
        "Holds the cost until the hold is committed, refunded or lapses (ttl_seconds). "
        "A 429 says calmly what is missing and when credits come back; Retry-After is the "
        "seconds until the reset, or until the first hold lapses when only holds in "
        "progress are in the way. The quota headers (RateLimit, RateLimit-Policy) are "
        "about the current month; their unit is credits."
    ),
)
async def reserve(
    coach_id: str,
    body: ReserveRequest,
    request: Request,
    principal: Worker,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="1-255 printable ASCII",
            # Documented only: the route checks it itself, to answer with its own detail.
            json_schema_extra={"pattern": "^[\\x20-\\x7e]{1,255}$"},
        ),
    ] = None,
) -> Response:
    answer = await reserve_answer(store_of(request), coach_id, body, principal, idempotency_key)
    return answer.response()


@router.get(
    # Not batch or settle: those paths are the POST-only batch routes.
    "/v1/reservations/{reservation_id:reservation_id}",
    response_model=ReservationOut,
    responses=problems("reservation_not_found", "not_found", "backend_unavailable"),
    tags=["reservations"],
    summary="A reservation as it is now",
)
async def get_reservation(reservation_id: str, request: Request, _: Worker) -> Response:
    reservation = await store_of(request).get_reservation(reservation_id)
    return FastJSONResponse(reservation_json(reservation))


@router.post(
    COMMIT_PATH,
    response_model=ReservationOut,
    responses=problems(
        "reservation_not_found",
        "not_found",
        "reservation_refunded",
        "reservation_expired",
        "backend_unavailable",
    ),
    tags=["reservations"],
    summary="Charge a hold: the AI action succeeded",
    description=(
        "Commits the hold and answers with a `note` on what it cost and what is left. "
        "Repeating it returns the same outcome."
    ),
)
async def commit(reservation_id: str, request: Request, _: Worker) -> Response:
    return (await commit_answer(store_of(request), reservation_id)).response()


@router.post(
    "/v1/reservations/{reservation_id}/refund",
    response_model=ReservationOut,
    responses=problems(
        "reservation_not_found", "not_found", "reservation_committed", "backend_unavailable"
    ),
    tags=["reservations"],
    summary="Return a hold's credits: the AI action failed",
    description=(
        "Refunds the hold; a hold that already lapsed answers with status expired, its "
        "credits already back. Repeating it returns the same outcome."
    ),
)
async def refund(reservation_id: str, request: Request, _: Worker) -> Response:
    return FastJSONResponse(reservation_json(await store_of(request).refund(reservation_id)))


@router.post(
    "/v1/reservations/batch",
    response_model=BatchReserveOut,
    responses=problems("invalid_request", "backend_unavailable"),
    tags=["reservations"],
    summary="Reserve for many items in one round trip",
    description=(
        "Each item is reserved on its own, in request order, exactly as the single-item "
        "route would (idempotency_key plays the Idempotency-Key header). An item that is "
        "invalid or does not fit fails alone: its result carries the status and problem "
        "the single-item route would answer. The request itself is 422 only when its "
        "shape is wrong (not a list of 1-500 objects with the right fields and types)."
    ),
)
async def reserve_batch(
    body: BatchReserveRequest, request: Request, principal: Worker
) -> JSONResponse:
    items = [
        ReserveItem(i.coach_id, i.feature, i.ttl_seconds, i.idempotency_key)
        for i in body.reservations
    ]
    results: list[dict[str, object]] = []
    for outcome in await store_of(request).reserve_many(items, principal=principal.key_id):
        if isinstance(outcome, CreditsError):
            results.append(_item_problem(outcome))
        else:
            reservation, created = outcome
            results.append(
                {"status": 201 if created else 200, "reservation": reservation_json(reservation)}
            )
    return FastJSONResponse({"results": results})


@router.post(
    "/v1/reservations/settle",
    response_model=SettleOut,
    responses=problems("invalid_request", "backend_unavailable"),
    tags=["reservations"],
    summary="Commit or refund many reservations in one round trip",
    description=(
        "Each settlement runs on its own, in request order, exactly as the single-item "
        "commit or refund route would; its result carries that route's status and "
        "reservation or problem. The request is 422 only when its shape is wrong."
    ),
)
async def settle_batch(body: SettleRequest, request: Request, _: Worker) -> JSONResponse:
    outcomes = await store_of(request).settle_many(
        [(i.reservation_id, i.action) for i in body.settlements]
    )
    return FastJSONResponse(
        {
            "results": [
                _item_problem(o)
                if isinstance(o, CreditsError)
                else {"status": 200, "reservation": reservation_json(o)}
                for o in outcomes
            ]
        }
    )


def _item_problem(exc: CreditsError) -> dict[str, object]:
    body = problem_body(exc)
    return {"status": body["status"], "problem": body}


@router.get(
    "/v1/coaches/{coach_id:coach_id}/usage",
    response_model=UsageOut,
    responses={
        200: {"description": "The coach's usage this month.", "headers": QUOTA_HEADERS},
        **problems("invalid_coach_id", "not_found", "backend_unavailable"),
    },
    tags=["usage"],
    summary="A coach's credits this month",
    description="A coach never seen before reads as untouched. Reading creates nothing.",
)
async def get_usage(coach_id: str, request: Request, _: AnyScope) -> JSONResponse:
    store = store_of(request)
    usage = await store.usage(coach_id)
    quota = usage_quota_headers(usage, store.clock())
    return FastJSONResponse(usage_json(usage), headers=headers_dict(quota))


@router.post(
    "/v1/usage/batch",
    response_model=BatchUsageOut,
    responses=problems("invalid_coach_id", "invalid_request", "backend_unavailable"),
    tags=["usage"],
    summary="Many coaches' usage in one round trip, in request order",
)
async def batch_usage(
    body: Annotated[BatchUsageRequest, Body()], request: Request, _: Reader
) -> JSONResponse:
    items = await store_of(request).usage_many(body.coach_ids)
    return FastJSONResponse({"items": [usage_json(u) for u in items]})


@router.get(
    "/healthz",
    tags=["operations"],
    summary="The process is up",
    responses={
        200: {
            "description": "Always, while the process serves.",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {"status": {"const": "ok"}},
                        "required": ["status"],
                    },
                    "example": {"status": "ok"},
                }
            },
        }
    },
)
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses=problems("backend_unavailable"),
    tags=["operations"],
    summary="Redis answers and the scripts are loaded",
)
async def readyz(request: Request, store: StoreDep) -> JSONResponse:
    """Ready while Redis answers. What every instance shares (open mode, Redis refusing
    writes) or what costs this one speed is listed in ``warnings``, never a 503: taking
    every instance out of rotation for a shared fault would only make it worse."""
    state = request.app.state
    settings = state.settings
    await store.ping()
    await store.ensure_scripts()
    warnings: list[str] = []
    if settings.open_mode:
        warnings.append("OPEN MODE: no API keys are configured; anyone can spend credits.")
    if settings.embedded:
        warnings.append("EMBEDDED REDIS: in-process and not persisted; for trying out only.")
    refusal: str | None = getattr(store, "write_refusal", None)
    if refusal:
        warnings.append(f"REDIS REFUSES WRITES: {refusal}")
    fast_path_warning: str | None = state.fast_path_warning
    if fast_path_warning:
        warnings.append(fast_path_warning)
    backend = "embedded" if settings.embedded else "cluster" if settings.redis_cluster else "redis"
    return JSONResponse(
        {
            "status": "ready",
            "backend": backend,
            "auth": "open" if settings.open_mode else "keys",
            "fast_path": fast_path_warning is None,
            "warnings": warnings,
        }
    )


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    tags=["operations"],
    summary="Prometheus metrics",
    responses={
        200: {
            "description": "The Prometheus text format.",
            "content": {
                "text/plain": {
                    "schema": {"type": "string"},
                    "example": (
                        "# HELP credits_reservations_total Reservation outcomes by feature: "
                        "held, committed, refunded, expired, exhausted.\n"
                        "# TYPE credits_reservations_total counter\n"
                    ),
                }
            },
        }
    },
)
async def metrics_endpoint(metrics: MetricsDep) -> PlainTextResponse:
    return PlainTextResponse(
        generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST
    )
