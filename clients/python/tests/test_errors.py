"""Problem answers decoded into the documented error tree."""

from __future__ import annotations

from datetime import UTC, datetime

import ai_credits_client
import httpx
import pytest
from ai_credits_client import (
    Conflict,
    CreditsClientError,
    CreditsExhausted,
    ExtensionLimit,
    Forbidden,
    GrantRefused,
    InvalidRequest,
    NotFound,
    ReservationConflict,
    Unauthorized,
    Unavailable,
    errors,
)
from ai_credits_client.core import decode_error, parse_retry_after
from conftest import Either
from fake_service import FakeService, problem_response


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (401, "unauthorized", Unauthorized),
        (403, "forbidden", Forbidden),
        (404, "reservation_not_found", NotFound),
        (409, "reservation_committed", ReservationConflict),
        (409, "reservation_refunded", ReservationConflict),
        (409, "reservation_expired", ReservationConflict),
        (409, "extension_limit", ExtensionLimit),
        (409, "grant_exceeds_remaining", GrantRefused),
        (409, "grant_limit", GrantRefused),
        (409, "something_new", Conflict),
        (413, "payload_too_large", InvalidRequest),
        (422, "invalid_coach_id", InvalidRequest),
        (422, "unknown_feature", InvalidRequest),
        (422, "idempotency_key_reused", InvalidRequest),
        (429, "credits_exhausted", CreditsExhausted),
        (429, "too_many_holds", CreditsExhausted),
        (503, "backend_unavailable", Unavailable),
        (500, "internal", CreditsClientError),
    ],
)
def test_each_problem_maps_to_its_error(
    status: int, code: str, expected: type[CreditsClientError]
) -> None:
    error = decode_error(problem_response(status, code, "A sentence for people."))
    assert type(error) is expected
    assert (error.status, error.code, error.detail) == (status, code, "A sentence for people.")
    assert error.body["code"] == code
    assert str(error) == "A sentence for people."


def test_the_extension_limit_is_a_reservation_conflict_and_both_are_conflicts() -> None:
    assert issubclass(ExtensionLimit, ReservationConflict)
    assert issubclass(ReservationConflict, Conflict)
    assert issubclass(GrantRefused, Conflict)


def test_every_error_is_in_the_documented_tree() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, CreditsClientError)
        assert name in doc, f"{name} is missing from the tree in the errors docstring"
        assert getattr(ai_credits_client, name) is cls


def test_credits_exhausted_carries_what_the_coach_is_told() -> None:
    error = decode_error(
        problem_response(
            429,
            "credits_exhausted",
            "Client trend analysis needs 3 credits and you have 2 left this month.",
            headers={"Retry-After": "3600"},
            feature="trend_analysis",
            cost=3,
            remaining=2,
            resets_at="2099-12-01T00:00:00Z",
        )
    )
    assert isinstance(error, CreditsExhausted)
    assert (error.feature, error.cost, error.remaining) == ("trend_analysis", 3, 2)
    assert error.resets_at == datetime(2099, 12, 1, tzinfo=UTC)
    assert error.retry_after == 3600


def test_an_answer_without_a_problem_body_still_names_its_status() -> None:
    error = decode_error(httpx.Response(500, text="<html>oops</html>"))
    assert type(error) is CreditsClientError
    assert (error.status, error.code, error.body) == (500, "", None)
    assert error.detail == "The credits service answered HTTP 500."


def test_retry_after_is_read_as_seconds_or_as_a_date() -> None:
    now = datetime(2099, 11, 14, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7
    assert parse_retry_after(" 0 ") == 0
    assert parse_retry_after("Sat, 14 Nov 2099 12:00:30 GMT", now) == 30
    assert parse_retry_after("Sat, 14 Nov 2099 11:00:00 GMT", now) == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None
    assert parse_retry_after(None) is None


async def test_a_settled_reservation_refuses_the_other_settlement(
    either: Either, fake: FakeService
) -> None:
    held = await either("reserve", "coach-1", "checkin_draft")
    await either("refund", held.reservation_id)
    with pytest.raises(ReservationConflict) as caught:
        await either("commit", held.reservation_id)
    assert caught.value.code == "reservation_refunded"
    assert len(fake.sent("POST .*/commit")) == 1, "a 409 is not retried"


async def test_a_grant_that_would_overdraw_is_refused(either: Either, fake: FakeService) -> None:
    with pytest.raises(GrantRefused) as caught:
        await either("grant", "coach-1", -51, "clawback")
    assert caught.value.code == "grant_exceeds_remaining"
    assert (await either("usage", "coach-1")).granted == 0


async def test_a_refused_reserve_raises_with_the_coach_facing_details(
    either: Either, fake: FakeService
) -> None:
    for _ in range(16):
        await either("reserve", "coach-1", "trend_analysis")
    with pytest.raises(CreditsExhausted) as caught:
        await either("reserve", "coach-1", "trend_analysis")
    assert (caught.value.remaining, caught.value.retry_after) == (2, 86400)
    assert len(fake.sent("POST .*/reservations")) == 17, "a 429 is not retried"


async def test_a_success_body_the_client_cannot_read_is_an_error(
    either: Either, fake: FakeService
) -> None:
    fake.fail("GET /v1/coaches/.*/usage", httpx.Response(200, json={"unexpected": True}))
    with pytest.raises(CreditsClientError, match="cannot read") as caught:
        await either("usage", "coach-1")
    assert caught.value.status == 200
