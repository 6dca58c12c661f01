"""The one table from outcomes to HTTP, and the problem+json responses built from it."""

from __future__ import annotations

import json
import logging
from typing import Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

from app.api.quota import headers_dict, quota_headers
from app.errors import (
    BackendUnavailable,
    Conflict,
    CreditsError,
    CreditsExhausted,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    TooManyHolds,
    TooManyStreams,
    Unauthorized,
)

log = logging.getLogger("credits.api")

PROBLEM_JSON: Final = "application/problem+json"

#: Most specific class first; the first match wins.
STATUS_BY_ERROR: Final[tuple[tuple[type[CreditsError], int], ...]] = (
    (CreditsExhausted, 429),
    (TooManyHolds, 429),
    (TooManyStreams, 429),
    (Conflict, 409),
    (NotFound, 404),
    (InvalidRequest, 422),
    (PayloadTooLarge, 413),
    (Unauthorized, 401),
    (Forbidden, 403),
    (BackendUnavailable, 503),
)


def status_for(exc: CreditsError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def problem_response(
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    extra: dict[str, object] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = _body(status=status, code=code, title=title, detail=detail, extra=extra)
    return Response(
        json.dumps(body, ensure_ascii=False, separators=(",", ":")),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def _body(
    *, status: int, code: str, title: str, detail: str, extra: dict[str, object] | None
) -> dict[str, object]:
    body: dict[str, object] = {
        "type": f"/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if extra:
        body.update(extra)
    return body


def response_body(exc: CreditsError) -> dict[str, object]:
    """The problem object for one outcome, as a single route answers it."""
    return _body(
        status=status_for(exc), code=exc.code, title=exc.title, detail=exc.detail, extra=exc.extra()
    )


def problem_body(exc: CreditsError) -> dict[str, object]:
    """The problem object for one outcome, as a batch item carries it (no headers there,
    so what a header would say is in the body: ``retry_after`` with every 429)."""
    body = response_body(exc)
    if isinstance(exc, CreditsExhausted | TooManyHolds | TooManyStreams):
        body["retry_after"] = exc.retry_after
    return body


def error_response(exc: CreditsError, *, retry_after_unavailable: int = 1) -> Response:
    status = status_for(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, CreditsExhausted | TooManyHolds | TooManyStreams):
        headers["Retry-After"] = str(exc.retry_after)
        if isinstance(exc, CreditsExhausted | TooManyHolds):
            # Quota headers: a single reserve's 429 (batch items carry no headers). ``t``
            # is Retry-After: the reset, or when holds alone block, the first hold's lapse.
            quota = quota_headers(exc.allowance, exc.remaining, exc.period, exc.retry_after)
            headers.update(headers_dict(quota))
    elif isinstance(exc, BackendUnavailable):
        headers["Retry-After"] = str(retry_after_unavailable)
    elif isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="ai-credits"'
    return problem_response(
        status=status,
        code=exc.code,
        title=exc.title,
        detail=exc.detail,
        extra=exc.extra(),
        headers=headers,
    )


_HTTP_CODES: Final = {
    404: ("not_found", "Not found", "There is nothing at this path."),
    405: ("method_not_allowed", "Method not allowed", "This path does not take that method."),
}


def _allowed_methods(request: Request) -> list[str]:
    # Asked of the router itself, so included routers and mounts answer for themselves.
    routes = request.app.router.routes
    return [
        method
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
        if any(r.matches({**request.scope, "method": method})[0] is Match.FULL for r in routes)
    ]


async def on_credits_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, CreditsError)
    if isinstance(exc, BackendUnavailable):
        request.app.state.metrics.redis_unavailable.inc()
    retry = request.app.state.settings.unavailable_retry_after_seconds
    return error_response(exc, retry_after_unavailable=retry)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(
        status=500,
        code="internal_error",
        title="Internal error",
        detail="Something went wrong on our side. Retrying with the same Idempotency-Key is safe.",
    )


def install(app: FastAPI) -> None:
    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        pairs = [
            (".".join(str(p) for p in e.get("loc", ())), str(e.get("msg", "")))
            for e in exc.errors()
        ]
        where = "; ".join(f"{loc}: {msg}" for loc, msg in pairs[:5])
        errors: list[dict[str, object]] = [{"loc": loc, "msg": msg} for loc, msg in pairs]
        return error_response(InvalidRequest(f"The request is not valid. {where}", errors))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:
            # A body that cannot even be parsed (bad bytes, bad encoding) is as invalid
            # as one that fails its schema: the documented 422, not a bare 400.
            return error_response(InvalidRequest("The request body could not be parsed."))
        code, title, detail = _HTTP_CODES.get(
            exc.status_code, ("http_error", "HTTP error", str(exc.detail))
        )
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette lists only the first route whose path matched, but a path such as
            # /v1/reservations/batch also matches /v1/reservations/{reservation_id}.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return problem_response(
            status=exc.status_code,
            code=code,
            title=title,
            detail=detail,
            headers=headers,
        )

    app.add_exception_handler(CreditsError, on_credits_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
