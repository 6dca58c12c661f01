"""The API against its own OpenAPI schema: generated requests, valid and not, never get a
5xx, and every response matches what the schema documents for its status code."""

from __future__ import annotations

import re
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import CheckFunction
from schemathesis.specs.openapi.checks import allow_header_conformance, positive_data_acceptance

from app.config import Settings
from app.main import create_app

#: Embedded fakeredis; short live streams so a generated request to one ends quickly.
APP = create_app(
    Settings(stream_max_seconds=0.3, stream_poll_seconds=0.05, stream_heartbeat_seconds=0.1)
)
SPEC: dict[str, Any] = APP.openapi()

schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$")


#: Literal paths that another path's template also matches (/v1/reservations/batch is
#: also /v1/reservations/{reservation_id}): their truthful Allow header names both
#: routes' methods, which a schema cannot say for one path.
SHADOWED = {
    path
    for path in SPEC["paths"]
    if "{" not in path
    and any(other != path and _template_regex(other).match(path) for other in SPEC["paths"])
}


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_no_server_errors_and_responses_match_the_schema(case: Case[Any]) -> None:
    # Positive-data acceptance is left out on purpose: a schema-valid request may still
    # be refused by configuration (unknown feature) or by the coach-id rules, with the
    # documented 422 problem. Every other built-in check applies.
    excluded: list[CheckFunction] = [positive_data_acceptance]
    if case.operation.path in SHADOWED:
        excluded.append(allow_header_conformance)
    case.call_and_validate(excluded_checks=excluded)


def test_the_schema_documents_problem_json_for_every_error_it_returns() -> None:
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    where = (method, path, status)
                    assert "application/problem+json" in response.get("content", {}), where


async def test_method_not_allowed_names_every_method_the_path_takes() -> None:
    assert SHADOWED  # the case below exists
    transport = httpx.ASGITransport(app=APP)
    async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:
        for path in SHADOWED:
            r = await client.request("PATCH", path)
            assert r.status_code == 405
            allowed = {m.strip() for m in r.headers["allow"].split(",")}
            documented = {m.upper() for m in SPEC["paths"][path]}
            assert documented <= allowed, (path, allowed)


async def test_an_unparseable_body_is_the_documented_422() -> None:
    # No lifespan needed: the body is refused before any route touches the store.
    transport = httpx.ASGITransport(app=APP)
    async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:
        for body in (b"\xff\xfe", b"{", b"\x00"):
            r = await client.post(
                "/v1/usage/batch", content=body, headers={"content-type": "application/json"}
            )
            assert r.status_code == 422, (body, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == "invalid_request"
