"""HTTP routes: translate requests to store calls and results to JSON. Domain outcomes
are raised as ``app.errors`` exceptions and turned into problems by ``problems``."""

from __future__ import annotations

from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import State
from starlette.responses import Response

from app import domain
from app.api import paths  # noqa: F401  (registers the {coach_id:coach_id} path type)
from app.api.deps import WORKER_ACCESS, AnyScope, MetricsDep, Reader, StoreDep, Worker, store_of
from app.api.fast import FastJSONResponse, FastRoute, header, json_response, served_by
from app.api.problems import problem_body
from app.api.quota import RawHeader, headers_dict, usage_quota_headers
from app.api.schemas import (
    BatchReserveOut,
    BatchReserveRequest,
    BatchUsageOut,
    BatchUsageRequest,
    FeaturesOut,
    ProblemOut,
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

router = APIRouter(route_class=FastRoute)

#: The two hot routes, whose paths ``app.api.hot`` matches in front of the router.
RESERVE_PATH: Final = "/v1/coaches/{coach_id:coach_id}/reservations"
COMMIT_PATH: Final = "/v1/reservations/{reservation_id}/commit"

# The credit routes take the store from the request (``store_of``) instead of as a
# dependency: FastAPI resolves each dependency with its full parameter machinery, a
# noticeable share of a request's CPU, and the store needs none of it. A ``Request``
# parameter leaves the OpenAPI schema as it was, and the access check stays the one
# dependency, so it still answers before the body is looked at. Reserve and commit go
# further: ``reserve_reply`` and ``commit_reply`` give their answers without a request
# object, to ``app.api.hot`` in front of the router and to ``app.api.fast`` behind it.


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ProblemOut, "content": {"application/problem+json": {}}} for s in statuses}


_AUTH = (401, 403, 413, 503)


@router.get(
    "/v1/features",
    response_model=FeaturesOut,
    responses=_problems(*_AUTH),
    tags=["credits"],
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


async def _hold(
    store: CreditStore,
    coach_id: str,
    body: ReserveRequest,
    key_id: str,
    idempotency_key: str | None,
) -> tuple[Reservation, bool]:
    if idempotency_key is not None and not domain.is_valid_idempotency_key(idempotency_key):
        raise InvalidRequest("Idempotency-Key must be 1-255 printable ASCII characters.")
    return await store.reserve(
        coach_id,
        body.feature,
        ttl_seconds=body.ttl_seconds,
        idempotency_key=idempotency_key,
        principal=key_id,
    )


def _reserve_answer(
    store: CreditStore, reservation: Reservation, created: bool
) -> tuple[int, bytes, list[RawHeader]]:
    """A reserve's answer, whichever way it came: status, body and quota headers (those
    speak of the current period, also for a replay of an earlier period's reservation)."""
    quota = usage_quota_headers(reservation.current or reservation.usage, store.clock())
    return 201 if created else 200, encode_reservation(reservation), quota


async def _reserve(
    request: Request, coach_id: str, body: ReserveRequest, key_id: str, idempotency_key: str | None
) -> Response:
    store = store_of(request)
    reservation, created = await _hold(store, coach_id, body, key_id, idempotency_key)
    return json_response(*_reserve_answer(store, reservation, created))


async def reserve_reply(
    state: State,
    coach_id: str,
    raw: bytes,
    authorization: str | None,
    idempotency_key: str | None,
) -> tuple[int, bytes, list[RawHeader]] | None:
    """A reserve with the JSON body ``raw``, as the route answers it: status, body and
    the extra headers.

    None when the body does not validate: the standard handler answers that, with its
    exact wording. In the route's order too: a body that is not JSON at all is refused
    before the key is looked at, a valid one after."""
    try:
        body = ReserveRequest.model_validate_json(raw)
    except ValidationError:
        return None
    principal = WORKER_ACCESS.admit(state.keyring, authorization)
    store: CreditStore = state.store
    reservation, created = await _hold(store, coach_id, body, principal.key_id, idempotency_key)
    return _reserve_answer(store, reservation, created)


async def _reserve_fast(request: Request) -> Response | None:
    # Only a plain JSON body that validates is served here; anything else (a body that
    # is not JSON, fails the schema or comes as another content type) takes the standard
    # path, which answers it exactly as before.
    if header(request, b"content-type") != "application/json":
        return None
    try:
        raw = await request.body()
    except Exception:  # a failed read: the standard path answers it as before
        return None
    reply = await reserve_reply(
        request.app.state,
        request.path_params["coach_id"],
        raw,
        header(request, b"authorization"),
        header(request, b"idempotency-key"),
    )
    return None if reply is None else json_response(*reply)


@router.post(
    RESERVE_PATH,
    status_code=201,
    response_model=ReservationOut,
    responses={
        200: {"model": ReservationOut, "description": "Idempotent replay"},
        **_problems(422, 429, *_AUTH),
    },
    tags=["reservations"],
)
@served_by(_reserve_fast)
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
    return await _reserve(request, coach_id, body, principal.key_id, idempotency_key)


@router.get(
    "/v1/reservations/{reservation_id}",
    response_model=ReservationOut,
    responses=_problems(404, 422, *_AUTH),
    tags=["reservations"],
)
async def get_reservation(reservation_id: str, request: Request, _: Worker) -> Response:
    reservation = await store_of(request).get_reservation(reservation_id)
    return FastJSONResponse(reservation_json(reservation))


async def commit_reply(state: State, reservation_id: str, authorization: str | None) -> bytes:
    """A commit as the route answers it with 200: the encoded reservation."""
    WORKER_ACCESS.admit(state.keyring, authorization)
    store: CreditStore = state.store
    return encode_reservation(await store.commit(reservation_id))


async def _commit_fast(request: Request) -> Response:
    reply = await commit_reply(
        request.app.state,
        request.path_params["reservation_id"],
        header(request, b"authorization"),
    )
    return json_response(200, reply)


@router.post(
    COMMIT_PATH,
    response_model=ReservationOut,
    responses=_problems(404, 409, 422, *_AUTH),
    tags=["reservations"],
)
@served_by(_commit_fast)
async def commit(reservation_id: str, request: Request, _: Worker) -> Response:
    return FastJSONResponse(reservation_json(await store_of(request).commit(reservation_id)))


@router.post(
    "/v1/reservations/{reservation_id}/refund",
    response_model=ReservationOut,
    responses=_problems(404, 409, 422, *_AUTH),
    tags=["reservations"],
)
async def refund(reservation_id: str, request: Request, _: Worker) -> Response:
    return FastJSONResponse(reservation_json(await store_of(request).refund(reservation_id)))


@router.post(
    "/v1/reservations/batch",
    response_model=BatchReserveOut,
    responses=_problems(422, *_AUTH),
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
    responses=_problems(422, *_AUTH),
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
    responses=_problems(422, *_AUTH),
    tags=["usage"],
)
async def get_usage(coach_id: str, request: Request, _: AnyScope) -> JSONResponse:
    store = store_of(request)
    usage = await store.usage(coach_id)
    quota = usage_quota_headers(usage, store.clock())
    return FastJSONResponse(usage_json(usage), headers=headers_dict(quota))


@router.post(
    "/v1/usage/batch",
    response_model=BatchUsageOut,
    responses=_problems(422, *_AUTH),
    tags=["usage"],
)
async def batch_usage(
    body: Annotated[BatchUsageRequest, Body()], request: Request, _: Reader
) -> JSONResponse:
    items = await store_of(request).usage_many(body.coach_ids)
    return FastJSONResponse({"items": [usage_json(u) for u in items]})


@router.get("/healthz", tags=["operations"])
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses=_problems(503),
    tags=["operations"],
)
async def readyz(request: Request, store: StoreDep) -> JSONResponse:
    settings = request.app.state.settings
    await store.ping()
    await store.ensure_scripts()
    warnings: list[str] = []
    if settings.open_mode:
        warnings.append("OPEN MODE: no API keys are configured; anyone can spend credits.")
    if settings.embedded:
        warnings.append("EMBEDDED REDIS: in-process and not persisted; for trying out only.")
    backend = "embedded" if settings.embedded else "cluster" if settings.redis_cluster else "redis"
    return JSONResponse(
        {
            "status": "ready",
            "backend": backend,
            "auth": "open" if settings.open_mode else "keys",
            "warnings": warnings,
        }
    )


@router.get("/metrics", response_class=PlainTextResponse, tags=["operations"])
async def metrics_endpoint(metrics: MetricsDep) -> PlainTextResponse:
    return PlainTextResponse(
        generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST
    )
