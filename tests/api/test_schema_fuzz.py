"""The API against its own OpenAPI schema with schemathesis: every phase (examples,
coverage, fuzzing, stateful) and every check, none left out. Generated requests, valid
and not, never get a 5xx; valid ones are accepted and invalid ones refused; every answer
matches what the schema documents for its status, headers and media type; the methods a
path does not take are 405 with the right Allow; a key is needed where the schema says.

One answer is listed beyond schemathesis' defaults, for a rule no schema can state: a
reserve whose Idempotency-Key was used before with another feature is 422. Coach ids,
lengths and ranges are all in the schema, so their 422s are never excused.
"""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.config import SchemathesisConfig

from app.config import Scope, Settings
from app.main import create_app

ADMIN_KEY = "schema-fuzz-admin-key-0123456789"
#: Embedded fakeredis; keys configured so the bearer scheme is checked; an allowance
#: generous enough that generated reserves rarely run out; short live streams so a
#: generated request to one ends quickly.
APP = create_app(
    Settings(
        api_keys={ADMIN_KEY: [Scope.ADMIN]},
        monthly_allowance=1_000_000,
        stream_max_seconds=0.3,
        stream_poll_seconds=0.05,
        stream_heartbeat_seconds=0.1,
    )
)
SPEC: dict[str, Any] = APP.openapi()

POSITIVE_DEFAULTS = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]

CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": 20991114,
        "generation": {"max-examples": 40},
        "auth": {"openapi": {"bearerAuth": {"bearer": ADMIN_KEY}}},
        # Every check; the response-time one needs a limit (seconds) to run at all.
        "checks": {"max_response_time": 5},
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": True, "max-steps": 10},
        },
        "operations": [
            {
                "include-path": "/v1/coaches/{coach_id}/reservations",
                "include-method": "POST",
                "checks": {
                    "positive_data_acceptance": {
                        # idempotency_key_reused: the key's earlier use, not the request.
                        "expected-statuses": [*POSITIVE_DEFAULTS, "422"]
                    }
                },
            }
        ],
    }
)

schema = schemathesis.openapi.from_asgi("/openapi.json", APP, config=CONFIG)
RESERVE = "POST /v1/coaches/{coach_id}/reservations"


@schemathesis.check
def only_a_reused_key_excuses_a_valid_reserve(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: Case[Any]
) -> None:
    """The 422 listed for a schema-valid reserve is the reused key, never anything else."""
    meta = case.meta
    if meta is None or case.operation.label != RESERVE or response.status_code != 422:
        return
    if meta.generation.mode.is_positive:
        assert response.json()["code"] == "idempotency_key_reused", response.text


FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@schema.parametrize()
@FUZZ_SETTINGS
def test_every_operation_keeps_every_promise_of_the_schema(case: Case[Any]) -> None:
    case.call_and_validate()


Workflow = schema.as_state_machine()
Workflow.TestCase.settings = settings(
    FUZZ_SETTINGS, max_examples=25, stateful_step_count=10, database=None
)
TestReservationLifecycleAgainstTheSchema = Workflow.TestCase


def test_the_fuzzing_runs_with_every_phase_and_check() -> None:
    project = schema.config
    phases = project.phases
    assert all(p.enabled for p in (phases.examples, phases.coverage, phases.fuzzing))
    assert phases.stateful.enabled
    checks = project.checks
    names = [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        "positive_data_acceptance",
        "negative_data_rejection",
        "use_after_free",
        "ensure_resource_availability",
        "missing_required_header",
        "ignored_auth",
        "object_level_authorization",
        "unsupported_method",
        "allow_header_conformance",
        "max_response_time",
    ]
    assert all(checks.get_by_name(name=n).enabled for n in names)
    # The stateful phase has links to follow: a new hold leads to reading and settling it.
    links = SPEC["paths"]["/v1/coaches/{coach_id}/reservations"]["post"]["responses"]["201"]
    assert set(links["links"]) == {"GetReservation", "Commit", "Refund"}


async def test_the_batch_paths_answer_405_with_their_own_allow() -> None:
    transport = httpx.ASGITransport(app=APP)
    async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:
        for path in ("/v1/reservations/batch", "/v1/reservations/settle"):
            for method in ("GET", "OPTIONS", "PATCH", "DELETE"):
                r = await client.request(method, path)
                assert r.status_code == 405, (method, path, r.text)
                assert r.headers["allow"] == "POST", (method, path)
                assert r.headers["content-type"] == "application/problem+json"


async def test_an_unparseable_body_is_the_documented_422() -> None:
    # No lifespan needed: the body is refused before any route touches the store.
    transport = httpx.ASGITransport(app=APP)
    headers = {"content-type": "application/json", "authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:
        for body in (b"\xff\xfe", b"{", b"\x00"):
            r = await client.post("/v1/usage/batch", content=body, headers=headers)
            assert r.status_code == 422, (body, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["code"] == "invalid_request"
