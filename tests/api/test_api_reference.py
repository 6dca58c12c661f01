"""The API reference says what the service does: every example validates against its own
schema, every problem the service answers is documented with its fields and headers,
the constraints the service checks are in the schema, and /docs and /redoc work in
Chromium with the network cut off."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
import pytest
from playwright.sync_api import Page, Request, Route, expect

from app import domain, errors
from app.api.openapi import EXAMPLES
from app.main import create_app
from tests.support.browser import ARTIFACTS, chromium, uvicorn_service

APP = create_app()
SPEC: dict[str, Any] = APP.openapi()
OPERATIONS = [
    (method.upper(), path, operation)
    for path, item in SPEC["paths"].items()
    for method, operation in item.items()
]
#: Error classes that only group others: never raised themselves.
BASES = {errors.CreditsError, errors.Conflict, errors.ReservationConflict}
PROBLEM_JSON = "application/problem+json"
OPEN_ROUTES = {"/healthz", "/readyz", "/metrics"}


def validator(schema: dict[str, Any]) -> Any:
    """A validator for ``schema``, which may refer to the document's components."""
    return jsonschema_rs.Draft202012Validator(
        {**schema, "components": SPEC["components"]}, validate_formats=True
    )


def all_subclasses(cls: type[errors.CreditsError]) -> Iterator[type[errors.CreditsError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from all_subclasses(sub)


def documented_examples() -> Iterator[tuple[str, dict[str, Any], Any]]:
    """Every example in the document: where it is, the schema it claims, the value."""
    for name, schema in SPEC["components"]["schemas"].items():
        yield from _schema_examples(f"components.{name}", schema)
    for method, path, operation in OPERATIONS:
        where = f"{method} {path}"
        for parameter in operation.get("parameters", []):
            if "example" in parameter:
                yield f"{where} {parameter['name']}", parameter["schema"], parameter["example"]
        body = operation.get("requestBody", {}).get("content", {})
        for media, content in body.items():
            yield from _media_examples(f"{where} request {media}", content)
        for status, response in operation["responses"].items():
            for media, content in response.get("content", {}).items():
                yield from _media_examples(f"{where} {status} {media}", content)
            for header, spec in response.get("headers", {}).items():
                if "example" in spec:
                    yield f"{where} {status} {header}", spec["schema"], spec["example"]


def _schema_examples(where: str, schema: dict[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    for example in schema.get("examples", []):
        yield where, schema, example
    for name, prop in schema.get("properties", {}).items():
        yield from _schema_examples(f"{where}.{name}", prop)


def _media_examples(where: str, content: dict[str, Any]) -> Iterator[tuple[str, Any, Any]]:
    schema = content.get("schema", {})
    if "example" in content:
        yield where, schema, content["example"]
    for name, example in content.get("examples", {}).items():
        yield f"{where} {name}", schema, example["value"]


EXAMPLE_CASES = list(documented_examples())


@pytest.mark.parametrize(
    ("where", "schema", "example"), EXAMPLE_CASES, ids=[w for w, _, _ in EXAMPLE_CASES]
)
def test_every_documented_example_validates_against_its_own_schema(
    where: str, schema: dict[str, Any], example: Any
) -> None:
    errors_found = [e.message for e in validator(schema).iter_errors(example)]
    assert errors_found == [], (where, example)


def _has_example(content: dict[str, Any]) -> bool:
    if "example" in content or content.get("examples"):
        return True
    ref = content.get("schema", {}).get("$ref", "")
    target = SPEC["components"]["schemas"].get(ref.rsplit("/", 1)[-1], {})
    return bool(target.get("examples"))


def test_every_request_and_response_body_has_an_example() -> None:
    missing = []
    for method, path, operation in OPERATIONS:
        bodies = [
            ("request", c) for c in operation.get("requestBody", {}).get("content", {}).values()
        ]
        for status, response in operation["responses"].items():
            bodies += [(status, c) for c in response.get("content", {}).values()]
        missing += [(method, path, where) for where, c in bodies if not _has_example(c)]
    assert missing == []


def test_every_problem_code_the_service_can_emit_is_documented_with_an_example() -> None:
    classes = [c for c in all_subclasses(errors.CreditsError) if c not in BASES]
    codes = {c.code for c in classes}
    documented = {
        example["value"]["code"]
        for _, _, operation in OPERATIONS
        for response in operation["responses"].values()
        for example in response.get("content", {})
        .get(PROBLEM_JSON, {})
        .get("examples", {})
        .values()
    }
    assert codes <= documented, codes - documented
    assert set(EXAMPLES) == codes, set(EXAMPLES) ^ codes


def test_every_error_answer_is_problem_json_with_its_schema_and_examples() -> None:
    for method, path, operation in OPERATIONS:
        for status, response in operation["responses"].items():
            if not status.startswith(("4", "5")):
                continue
            where = (method, path, status)
            assert set(response["content"]) == {PROBLEM_JSON}, where
            content = response["content"][PROBLEM_JSON]
            assert content["schema"], where
            for example in content["examples"].values():
                assert example["value"]["status"] == int(status), where


def test_the_problem_schemas_carry_the_fields_their_problems_really_have() -> None:
    schemas = SPEC["components"]["schemas"]
    exhausted = schemas["CreditsExhaustedProblem"]
    assert {"feature", "cost", "remaining", "resets_at"} <= set(exhausted["required"])
    assert "errors" in schemas["InvalidRequestProblem"]["properties"]
    item = schemas["ItemProblemOut"]["properties"]
    assert {"feature", "cost", "remaining", "resets_at", "retry_after", "errors"} <= set(item)
    for name in ("Problem", "InvalidRequestProblem", "CreditsExhaustedProblem"):
        assert {"type", "title", "status", "detail", "code"} <= set(schemas[name]["required"])


def test_retry_after_and_the_quota_headers_are_documented() -> None:
    for method, path, operation in OPERATIONS:
        for status in ("429", "503"):
            if status in operation["responses"]:
                headers = operation["responses"][status]["headers"]
                assert headers["Retry-After"]["required"] is True, (method, path, status)
        if "401" in operation["responses"]:
            assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
    quota = {"RateLimit", "RateLimit-Policy"}
    reserve = SPEC["paths"]["/v1/coaches/{coach_id}/reservations"]["post"]["responses"]
    for status in ("200", "201", "429"):
        assert quota <= set(reserve[status]["headers"]), status
    usage = SPEC["paths"]["/v1/coaches/{coach_id}/usage"]["get"]["responses"]
    assert quota <= set(usage["200"]["headers"])


def test_every_route_that_needs_a_key_says_so_and_names_its_scopes() -> None:
    scheme = SPEC["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for method, path, operation in OPERATIONS:
        if path in OPEN_ROUTES:
            assert not operation.get("security"), (method, path)
            continue
        assert operation["security"] == [{"bearerAuth": []}], (method, path)
        # Admin-only routes (a coach's allowance, grants) say just that.
        scopes = r"\*\*Scopes:\*\* ([a-z ]+ \(or admin\)|admin)\.$"
        assert re.search(scopes, operation["description"]), (method, path)
        assert {"401", "403"} <= set(operation["responses"]), (method, path)


def _parameter(path: str, method: str, name: str) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = SPEC["paths"][path][method]["parameters"]
    for parameter in parameters:
        if parameter["name"] == name:
            return parameter
    raise KeyError(name)


@pytest.mark.parametrize(
    "coach_id",
    ["a", "coach-42", "A.b_c:d@e-f", "9" * 128, "", "9" * 129, ".a", "-a", "a b", "a/b", "{a}"],
)
def test_the_coach_id_pattern_in_the_schema_is_the_one_the_service_checks(coach_id: str) -> None:
    accepted = domain.is_valid_coach_id(coach_id)
    for path, method in (
        ("/v1/coaches/{coach_id}/reservations", "post"),
        ("/v1/coaches/{coach_id}/usage", "get"),
        ("/v1/coaches/{coach_id}/events", "get"),
    ):
        schema = _parameter(path, method, "coach_id")["schema"]
        assert validator(schema).is_valid(coach_id) == accepted, (path, coach_id)
    batch = SPEC["components"]["schemas"]["BatchUsageRequest"]
    assert validator(batch).is_valid({"coach_ids": [coach_id]}) == accepted


@pytest.mark.parametrize(
    ("key", "accepted"),
    [
        ("k", True),
        ("draft-42-1042", True),
        ("a b", True),
        ("~" * 255, True),
        ("", False),
        ("~" * 256, False),
        ("é", False),
        ("a\tb", False),
    ],
)
def test_the_idempotency_key_pattern_in_the_schema_is_the_one_the_service_checks(
    key: str, accepted: bool
) -> None:
    parameter = _parameter("/v1/coaches/{coach_id}/reservations", "post", "Idempotency-Key")
    assert validator(parameter["schema"]).is_valid(key) == accepted
    assert domain.is_valid_idempotency_key(key) == accepted


def test_ranges_and_the_configured_features_are_in_the_schema() -> None:
    schemas = SPEC["components"]["schemas"]
    reserve = schemas["ReserveRequest"]["properties"]
    assert reserve["feature"]["enum"] == ["checkin_draft", "trend_analysis"]
    ttl = reserve["ttl_seconds"]["anyOf"][0]
    assert (ttl["minimum"], ttl["maximum"]) == (1, 3600)
    coach_ids = schemas["BatchUsageRequest"]["properties"]["coach_ids"]
    assert (coach_ids["minItems"], coach_ids["maxItems"]) == (1, 1000)
    for name in ("BatchReserveRequest", "SettleRequest"):
        items = next(iter(schemas[name]["properties"].values()))
        assert (items["minItems"], items["maxItems"]) == (1, 500)
    limit = _parameter("/v1/coaches/{coach_id}/events", "get", "limit")["schema"]
    assert (limit["minimum"], limit["maximum"]) == (1, 500)


# --- the pages, offline, in Chromium ------------------------------------------------------


@pytest.fixture(scope="module")
def docs_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # The embedded store and open mode: the pages need nothing else.
    with uvicorn_service(tmp_path_factory.mktemp("docs"), "app.main:app", {}) as url:
        yield url


@pytest.fixture
def offline_page(docs_url: str) -> Iterator[tuple[Page, list[str], list[str]]]:
    """A page that can reach the service and nothing else; yields it with the requests
    that tried to leave and the console's CSP complaints."""
    with chromium() as browser:
        context = browser.new_context()
        left: list[str] = []

        def only_the_service(route: Route, request: Request) -> None:
            if request.url.startswith(docs_url + "/"):
                route.continue_()
            else:
                left.append(request.url)
                route.abort("internetdisconnected")

        context.route("**/*", only_the_service)
        page = context.new_page()
        complaints: list[str] = []
        page.on(
            "console",
            lambda m: complaints.append(m.text) if "Content Security Policy" in m.text else None,
        )
        page.on("pageerror", lambda exc: complaints.append(str(exc)))
        yield page, left, complaints
        context.close()


def test_swagger_ui_lists_every_operation_with_the_network_cut_off(
    docs_url: str, offline_page: tuple[Page, list[str], list[str]]
) -> None:
    page, left, complaints = offline_page
    response = page.goto(f"{docs_url}/docs")
    assert response is not None
    csp = response.headers["content-security-policy"]
    assert "'unsafe-inline'" not in csp.split("script-src", 1)[1].split(";", 1)[0]

    operations = page.locator(".opblock")
    expect(operations).to_have_count(len(OPERATIONS), timeout=20_000)
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert {p.replace("\u200b", "") for p in paths} == {p for _, p, _ in OPERATIONS}
    expect(page.get_by_role("button", name=re.compile("Authorize"))).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "docs-swagger-offline.png"))
    assert left == []
    assert complaints == []


def test_redoc_shows_the_operations_with_the_network_cut_off(
    docs_url: str, offline_page: tuple[Page, list[str], list[str]]
) -> None:
    page, left, complaints = offline_page
    page.goto(f"{docs_url}/redoc")

    expect(
        page.get_by_text("Hold a feature's cost before running the AI action").first
    ).to_be_attached(timeout=20_000)
    expect(page.locator("[data-section-id^='operation/']")).to_have_count(len(OPERATIONS))
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "docs-redoc-offline.png"))
    assert left == []
    # ReDoc's footer always shows Redocly's logo from their CDN: the page's policy
    # blocks it before any request leaves, and ReDoc hides the broken image.
    assert [c for c in complaints if "cdn.redoc.ly/redoc/logo-mini.svg" not in c] == []


def test_the_openapi_document_is_served_as_built(docs_url: str) -> None:
    served = httpx.get(f"{docs_url}/openapi.json").json()
    assert served["components"]["securitySchemes"] == SPEC["components"]["securitySchemes"]
    assert set(served["paths"]) == set(SPEC["paths"])
