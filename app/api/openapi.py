"""The API reference: the OpenAPI document, and Swagger UI and ReDoc to read it, served
by the service itself so that they work with no internet.

Routes name the problems they can answer with ``problems(...)``; everything the routes
cannot say for themselves is added to the document here, once for all of them: the
bearer scheme and each operation's scopes (read from its access dependency), the
401/403/413 answers that follow from those, the constraints the service checks by hand
(coach ids, reservation ids, Idempotency-Key, the configured features), and the problem
schemas.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from importlib.resources import files
from pathlib import Path
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from app import domain
from app.api.deps import BEARER_SCHEME
from app.api.problems import PROBLEM_JSON, response_body, status_for
from app.api.schemas import (
    COACH_ID_PATTERN,
    EXAMPLE_COACH,
    EXAMPLE_RESERVATION_ID,
    IDEMPOTENCY_KEY_PATTERN,
    PERIOD_PATTERN,
    RESERVATION_ID_PATTERN,
    CreditsExhaustedProblemOut,
    ExtensionLimitProblemOut,
    GrantExceedsRemainingProblemOut,
    InvalidRequestProblemOut,
    ProblemOut,
)
from app.config import Scope
from app.errors import (
    BackendUnavailable,
    CreditsError,
    CreditsExhausted,
    ExtensionLimit,
    Forbidden,
    GrantExceedsRemaining,
    GrantLimit,
    IdempotencyKeyReused,
    InvalidCoachId,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ReservationCommitted,
    ReservationExpired,
    ReservationNotFound,
    ReservationRefunded,
    TooManyHolds,
    TooManyStreams,
    Unauthorized,
    UnknownFeature,
    WriteRefused,
)

# --- problems --------------------------------------------------------------------------

_NOVEMBER: Final = domain.Period(2026, 11)


def _exhausted(*, used: int, held: int, cost: int, wait: int | None) -> CreditsExhausted:
    feature = "trend_analysis" if cost == 3 else "checkin_draft"
    return CreditsExhausted(
        domain.exhausted_detail(
            feature=feature,
            cost=cost,
            allowance=50,
            used=used,
            held=held,
            period=_NOVEMBER,
            hold_wait_seconds=wait,
        ),
        title=domain.exhausted_title(cost=cost, allowance=50, used=used, hold_wait_seconds=wait),
        feature=feature,
        cost=cost,
        remaining=domain.remaining(50, used, held),
        resets_at=_NOVEMBER.resets_at,
        retry_after=wait or 1_425_600,
        allowance=50,
        period=_NOVEMBER,
    )


#: An example of every problem the service answers, by code: each is built by the same
#: classes and body builder as the real answer. A problem class without an example
#: here fails tests/api/test_api_reference.py.
EXAMPLES: Final[dict[str, list[CreditsError]]] = {
    "invalid_request": [
        InvalidRequest(
            "The request is not valid. body.ttl_seconds: Input should be less than or "
            "equal to 3600",
            [{"loc": "body.ttl_seconds", "msg": "Input should be less than or equal to 3600"}],
        )
    ],
    "invalid_coach_id": [
        InvalidCoachId(
            "A coach id is 1-128 characters of letters, digits and . _ : @ -, "
            "starting with a letter or digit."
        )
    ],
    "unknown_feature": [
        UnknownFeature(
            "There is no feature called 'meal_plan'. Known features: checkin_draft, trend_analysis."
        )
    ],
    "idempotency_key_reused": [
        IdempotencyKeyReused(
            "This Idempotency-Key was already used to reserve 'checkin_draft'; use a new "
            "key for a different request."
        )
    ],
    "payload_too_large": [PayloadTooLarge("Request bodies are limited to 256 KiB.")],
    "unauthorized": [Unauthorized("Send an API key as 'Authorization: Bearer <key>'.")],
    "forbidden": [Forbidden("This API key lacks the worker scope needed here.")],
    "not_found": [NotFound("There is nothing at this path.")],
    "reservation_not_found": [ReservationNotFound(EXAMPLE_RESERVATION_ID)],
    "reservation_refunded": [
        ReservationRefunded(EXAMPLE_RESERVATION_ID),
        ReservationRefunded(EXAMPLE_RESERVATION_ID, extending=True),
    ],
    "reservation_expired": [
        ReservationExpired(EXAMPLE_RESERVATION_ID),
        ReservationExpired(EXAMPLE_RESERVATION_ID, extending=True),
    ],
    "reservation_committed": [
        ReservationCommitted(EXAMPLE_RESERVATION_ID),
        ReservationCommitted(EXAMPLE_RESERVATION_ID, extending=True),
    ],
    "extension_limit": [ExtensionLimit(_NOVEMBER.holds_end_at)],
    "grant_exceeds_remaining": [GrantExceedsRemaining(-10, 3)],
    "grant_limit": [GrantLimit(domain.MAX_GRANTS_PER_PERIOD)],
    "credits_exhausted": [
        _exhausted(used=50, held=0, cost=1, wait=None),
        _exhausted(used=48, held=0, cost=3, wait=None),
        _exhausted(used=40, held=9, cost=3, wait=90),
    ],
    "too_many_holds": [
        TooManyHolds(retry_after=214, allowance=2000, remaining=400, period=_NOVEMBER)
    ],
    "too_many_streams": [
        TooManyStreams(
            "This server already has 1000 usage streams open; try again shortly.", retry_after=42
        )
    ],
    "backend_unavailable": [
        BackendUnavailable(),
        WriteRefused("OOM command not allowed when used memory > 'maxmemory'"),
    ],
}

#: The body's schema by kind of problem; any other problem carries the common fields.
_PROBLEM_MODELS: Final[tuple[tuple[type[CreditsError], type[ProblemOut]], ...]] = (
    (InvalidRequest, InvalidRequestProblemOut),
    (CreditsExhausted, CreditsExhaustedProblemOut),
    (GrantExceedsRemaining, GrantExceedsRemainingProblemOut),
    (ExtensionLimit, ExtensionLimitProblemOut),
)


def _model_of(exc: CreditsError) -> type[ProblemOut]:
    for cls, model in _PROBLEM_MODELS:
        if isinstance(exc, cls):
            return model
    return ProblemOut


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{_schema_name(model)}"}


def _schema_name(model: type[BaseModel]) -> str:
    title = model.model_config.get("title")
    return title if isinstance(title, str) else model.__name__


RETRY_AFTER: Final[dict[str, Any]] = {
    "description": "Seconds to wait before trying again.",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
    "example": 90,
}
#: The IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers, structured fields);
#: the quota unit is credits.
QUOTA_HEADERS: Final[dict[str, dict[str, Any]]] = {
    "RateLimit-Policy": {
        "description": "The monthly quota: q = the allowance, w = seconds in this month.",
        "schema": {"type": "string"},
        "example": '"monthly";q=50;w=2592000',
    },
    "RateLimit": {
        "description": "What is left of it: r = remaining credits, t = seconds until the reset "
        "(or, when only holds in progress are in the way, until the first lapses).",
        "schema": {"type": "string"},
        "example": '"monthly";r=34;t=1425600',
    },
}
_HEADERS_BY_STATUS: Final[dict[int, dict[str, dict[str, Any]]]] = {
    401: {
        "WWW-Authenticate": {
            "description": "The scheme to authenticate with.",
            "required": True,
            "schema": {"type": "string"},
            "example": 'Bearer realm="ai-credits"',
        }
    },
    429: {"Retry-After": RETRY_AFTER},
    503: {"Retry-After": RETRY_AFTER},
}


def problem_response(status: int, codes: Iterable[str]) -> dict[str, Any]:
    """The OpenAPI response for ``status`` answering with problems of ``codes``."""
    examples: dict[str, Any] = {}
    models: list[type[ProblemOut]] = []
    for code in codes:
        for n, exc in enumerate(EXAMPLES[code], start=1):
            if status_for(exc) != status:
                raise ValueError(f"{code} is answered {status_for(exc)}, not {status}")
            name = code if len(EXAMPLES[code]) == 1 else f"{code}_{n}"
            examples[name] = {"summary": exc.title, "value": response_body(exc)}
            model = _model_of(exc)
            if model not in models:
                models.append(model)
    # anyOf: a problem with extra fields is a plain problem too.
    schema = _ref(models[0]) if len(models) == 1 else {"anyOf": [_ref(m) for m in models]}
    titles = sorted({example["summary"] for example in examples.values()})
    response: dict[str, Any] = {
        "description": "; ".join(titles),
        "content": {PROBLEM_JSON: {"schema": schema, "examples": examples}},
    }
    headers = _HEADERS_BY_STATUS.get(status)
    if headers:
        response["headers"] = dict(headers)
    return response


def problems(
    *codes: str, headers: dict[int, dict[str, dict[str, Any]]] | None = None
) -> dict[int | str, Any]:
    """A route's ``responses=`` for the problems it answers (by code), grouped by status;
    ``headers`` documents more headers by status (the quota headers on a 429)."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(status_for(EXAMPLES[code][0]), []).append(code)
    responses: dict[int | str, Any] = {}
    for status, grouped in sorted(by_status.items()):
        response = problem_response(status, grouped)
        if headers and status in headers:
            response["headers"] = {**response.get("headers", {}), **headers[status]}
        responses[status] = response
    return responses


# --- the document --------------------------------------------------------------------------


def _scopes_sentence(scopes: list[str]) -> str:
    named = [s for s in scopes if s != Scope.ADMIN.value]
    if not named:
        return "**Scopes:** admin."
    return f"**Scopes:** {' or '.join(named)} (or admin)."


def _constrain_parameters(operation: dict[str, Any]) -> None:
    """Constraints the service checks by hand, to answer with its own problem codes."""
    for parameter in operation.get("parameters", []):
        name, where = parameter["name"], parameter["in"]
        if where == "path" and name == "coach_id":
            parameter["schema"] = {
                "type": "string",
                "pattern": COACH_ID_PATTERN,
                "minLength": 1,
                "maxLength": 128,
                "title": "Coach Id",
            }
            parameter["description"] = (
                "1-128 characters of A-Z a-z 0-9 . _ : @ -, starting with a letter or digit; "
                "anything else is 422 invalid_coach_id."
            )
            parameter["example"] = EXAMPLE_COACH
        elif where == "path" and name == "reservation_id":
            parameter["schema"] = {
                "type": "string",
                "pattern": RESERVATION_ID_PATTERN,
                "maxLength": 256,
                "title": "Reservation Id",
            }
            parameter["description"] = "As the reservation gave it; an unknown id is a 404."
            parameter["example"] = EXAMPLE_RESERVATION_ID
        elif where == "header" and name.lower() == "idempotency-key":
            parameter["schema"] = {
                "type": "string",
                "pattern": IDEMPOTENCY_KEY_PATTERN,
                "minLength": 1,
                "maxLength": 255,
                "title": "Idempotency-Key",
            }
            parameter["description"] = (
                "1-255 printable ASCII characters. A retry with the same key returns the "
                "same reservation or grant (200) and never holds or grants twice; kept 24 "
                "hours, or until 1,000 newer keys of the coach exist."
            )
            parameter["example"] = "draft-42-1042"
        elif where == "query" and name == "period":
            parameter["schema"] = {"type": "string", "pattern": PERIOD_PATTERN, "title": "Period"}
            parameter["example"] = "2026-11"


def _problem_components(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (
        ProblemOut,
        InvalidRequestProblemOut,
        CreditsExhaustedProblemOut,
        GrantExceedsRemainingProblemOut,
        ExtensionLimitProblemOut,
    ):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, nested in body.pop("$defs", {}).items():
            components.setdefault(name, nested)
        body["examples"] = [
            response_body(exc)
            for examples in EXAMPLES.values()
            for exc in examples
            if _model_of(exc) is model
        ]
        components[_schema_name(model)] = body
    # FastAPI's own 422 shape is never sent: validation errors are problems too.
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)


def _document(app: FastAPI, schema: dict[str, Any]) -> None:
    settings = app.state.settings
    components = schema.setdefault("components", {})
    components["securitySchemes"] = {
        BEARER_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": (
                "An API key from CREDITS_API_KEYS. Scopes: worker (reserve, commit, refund, "
                "extend, read reservations and usage), reader (features, usage, batches of "
                "usage, the event log, grants, the usage stream) and admin (everything; "
                "alone it sets coaches' allowances and grants credits). A missing or unknown "
                "key is 401, a key without the scope 403. With no keys configured the "
                "service runs open, for local use only."
            ),
        }
    }
    models = components.get("schemas", {})
    if "ReserveRequest" in models:
        # The configured features, so that a schema-valid request names one that exists.
        models["ReserveRequest"]["properties"]["feature"]["enum"] = list(settings.feature_costs)

    for item in schema["paths"].values():
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            _constrain_parameters(operation)
            for requirement in operation.get("security", []):
                # The access dependency's scopes become words: a bearer key has roles,
                # not OAuth scopes, and any one of them (or admin) will do.
                scopes = requirement.get(BEARER_SCHEME)
                if scopes is None:
                    continue
                requirement[BEARER_SCHEME] = []
                description = operation.get("description", "")
                operation["description"] = f"{description}\n\n{_scopes_sentence(scopes)}".strip()
                responses.setdefault("401", problem_response(401, ["unauthorized"]))
                responses.setdefault("403", problem_response(403, ["forbidden"]))
            if method.upper() not in ("GET", "HEAD", "OPTIONS"):
                responses.setdefault("413", problem_response(413, ["payload_too_large"]))
            if "HTTPValidationError" in str(responses.get("422", {})):
                # FastAPI's own 422: a problem where a body, query or header is validated;
                # none at all where the only parameters are path segments, which the
                # routes take as any text and check themselves.
                checked = "requestBody" in operation or any(
                    p["in"] != "path" for p in operation.get("parameters", [])
                )
                if checked:
                    responses["422"] = problem_response(422, ["invalid_request"])
                else:
                    del responses["422"]
    _problem_components(schema)


def install(app: FastAPI) -> None:
    """Serve the document at /openapi.json, Swagger UI at /docs and ReDoc at /redoc."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
            )
            _document(app, schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.mount("/docs/assets", StaticFiles(directory=ASSETS), name="docs-assets")
    app.add_api_route("/docs", swagger_ui, include_in_schema=False, methods=["GET"])
    app.add_api_route("/redoc", redoc, include_in_schema=False, methods=["GET"])


# --- the pages ---------------------------------------------------------------------------------

#: Swagger UI and ReDoc as the fastapi-offline package ships them.
ASSETS: Final = Path(str(files("fastapi_offline") / "static"))


def _page_headers(nonce: str, *, workers: bool) -> dict[str, str]:
    # Scripts only from this origin, and the one inline start-up script by its nonce.
    # Both viewers set inline styles; ReDoc also runs its search in a blob: worker.
    worker = " worker-src blob:;" if workers else ""
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src 'self' 'nonce-{nonce}'; "
            f"style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self'; "
            f"connect-src 'self';{worker} base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'self'"
        ),
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
    }


def _with_nonce(page: HTMLResponse, nonce: str, *, workers: bool) -> HTMLResponse:
    html = bytes(page.body).decode().replace("<script", f'<script nonce="{nonce}"')
    return HTMLResponse(html, headers=_page_headers(nonce, workers=workers))


async def swagger_ui(request: Request) -> HTMLResponse:
    # Paths relative to /docs, so a prefix in front of the service is kept.
    nonce = secrets.token_urlsafe(16)
    page = get_swagger_ui_html(
        openapi_url="openapi.json",
        title="AI credits API",
        swagger_js_url="docs/assets/swagger-ui-bundle.js",
        swagger_css_url="docs/assets/swagger-ui.css",
        swagger_favicon_url="docs/assets/favicon.png",
        swagger_ui_parameters={"persistAuthorization": False, "tryItOutEnabled": False},
    )
    return _with_nonce(page, nonce, workers=False)


async def redoc(request: Request) -> HTMLResponse:
    nonce = secrets.token_urlsafe(16)
    page = get_redoc_html(
        openapi_url="openapi.json",
        title="AI credits API",
        redoc_js_url="docs/assets/redoc.standalone.js",
        redoc_favicon_url="docs/assets/favicon.png",
        with_google_fonts=False,
    )
    return _with_nonce(page, nonce, workers=True)
