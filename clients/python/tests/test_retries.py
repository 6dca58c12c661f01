"""Which calls are sent again, when, and how often: the core's decisions, then both
clients carrying them out against the offline service."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from ai_credits_client import CreditsClientError, InvalidRequest, RetryPolicy, Unavailable
from ai_credits_client.core import Call, Request, Sleep, decode_error
from conftest import Either
from fake_service import FAST_RETRY, LOST, FakeService, problem_response


def some_call(*, retry_safe: bool) -> Call[str]:
    return Call(Request("POST", "/v1/things"), lambda r: r.text, retry_safe=retry_safe)


def unavailable(retry_after: str) -> httpx.Response:
    return problem_response(503, "backend_unavailable", headers={"Retry-After": retry_after})


# --- the core's decisions -------------------------------------------------------------


def test_the_exchange_waits_what_retry_after_asks_then_sends_again() -> None:
    call = some_call(retry_safe=True)
    steps = call.exchange(RetryPolicy(attempts=3, max_delay=5))
    assert next(steps) == call.request
    assert steps.send(unavailable("2")) == Sleep(2.0)
    assert steps.send(None) == call.request
    with pytest.raises(StopIteration) as done:
        steps.send(httpx.Response(200, text="done"))
    assert done.value.value == "done"


def test_the_exchange_gives_up_after_its_attempts_with_the_last_answer() -> None:
    call = some_call(retry_safe=True)
    steps = call.exchange(RetryPolicy(attempts=2, max_delay=5))
    next(steps)
    assert isinstance(steps.send(unavailable("1")), Sleep)
    steps.send(None)
    with pytest.raises(Unavailable) as caught:
        steps.send(problem_response(503, "backend_unavailable", "Redis is away."))
    assert caught.value.detail == "Redis is away."


def test_a_retry_after_longer_than_the_cap_ends_the_retries_at_once() -> None:
    steps = some_call(retry_safe=True).exchange(RetryPolicy(attempts=5, max_delay=2))
    next(steps)
    with pytest.raises(Unavailable) as caught:
        steps.send(unavailable("30"))
    assert caught.value.retry_after == 30


def test_a_call_that_may_apply_twice_is_not_sent_again_once_it_left() -> None:
    policy = RetryPolicy(attempts=5)
    steps = some_call(retry_safe=False).exchange(policy)
    next(steps)
    with pytest.raises(Unavailable):
        steps.send(unavailable("0"))

    steps = some_call(retry_safe=False).exchange(policy)
    request = next(steps)
    lost = httpx.ReadError("connection reset", request=httpx.Request("POST", "http://x"))
    with pytest.raises(Unavailable, match="may or may not have been applied") as caught:
        steps.send(lost)
    assert caught.value.__cause__ is lost

    # Refused before it was sent: nothing can have been applied, so it goes again.
    steps = some_call(retry_safe=False).exchange(policy)
    next(steps)
    refused = httpx.ConnectError("connection refused")
    assert isinstance(steps.send(refused), Sleep)
    assert steps.send(None) == request


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 429, 500])
def test_answers_that_would_not_change_are_not_retried(status: int) -> None:
    steps = some_call(retry_safe=True).exchange(RetryPolicy(attempts=5))
    next(steps)
    with pytest.raises(CreditsClientError) as caught:
        steps.send(problem_response(status, "whatever"))
    assert caught.value.status == status


def test_backoff_grows_with_each_try_and_stays_under_the_cap() -> None:
    policy = RetryPolicy(attempts=10, base_delay=0.1, max_delay=0.5)
    for tries, bound in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        delays = [policy.next_delay(tries, None) for _ in range(200)]
        assert all(d is not None and 0 <= d <= bound for d in delays)
    assert policy.next_delay(10, None) is None
    assert policy.next_delay(1, 0) == 0.0


def test_every_built_call_is_safe_to_send_again() -> None:
    # Reserves and grants carry a key made for them; the rest are idempotent by nature.
    from ai_credits_client import core

    calls: list[Call[Any]] = [
        core.features(),
        core.reserve("c", "checkin_draft", None, None),
        core.get_reservation("r"),
        core.commit("r"),
        core.refund("r"),
        core.extend("r", 60),
        core.usage("c"),
        core.events("c", 100, None, None),
        core.grant("c", 1, "why", None),
        core.grants("c", None),
        core.set_allowance("c", 10),
        core.delete_allowance("c"),
    ]
    assert all(c.retry_safe for c in calls)
    assert calls[1].request.headers["Idempotency-Key"]
    assert calls[8].request.headers["Idempotency-Key"]


# --- both clients carrying them out ---------------------------------------------------------


async def test_a_503_then_an_answer_returns_the_answer(either: Either, fake: FakeService) -> None:
    fake.fail("GET /v1/coaches/.*/usage", unavailable("0"), unavailable("0"))
    usage = await either("usage", "coach-1")
    assert usage.remaining == 50
    assert len(fake.sent("GET /v1/coaches/.*/usage")) == 3


async def test_a_dropped_connection_then_an_answer_returns_the_answer(
    either: Either, fake: FakeService
) -> None:
    fake.fail("POST .*/commit", httpx.ReadError("connection reset"))
    held = await either("reserve", "coach-1", "checkin_draft")
    committed = await either("commit", held.reservation_id)
    assert committed.status == "committed"
    assert len(fake.sent("POST .*/commit")) == 2


async def test_a_reserve_whose_answer_was_lost_is_resent_with_its_key_and_holds_once(
    either: Either, fake: FakeService
) -> None:
    reserve = "POST /v1/coaches/.*/reservations"
    fake.fail(reserve, LOST)
    held = await either("reserve", "coach-1", "trend_analysis")
    keys = [r.headers["Idempotency-Key"] for r in fake.sent(reserve)]
    assert len(keys) == 2
    assert keys[0] == keys[1]
    assert len(fake.reservations) == 1
    assert held.usage.held == 3


async def test_a_service_that_stays_away_is_unavailable_after_every_attempt(
    either: Either, fake: FakeService
) -> None:
    fake.fail("GET /v1/features", *[unavailable("0") for _ in range(FAST_RETRY.attempts)])
    with pytest.raises(Unavailable) as caught:
        await either("features")
    assert caught.value.status == 503
    assert len(fake.sent("GET /v1/features")) == FAST_RETRY.attempts


async def test_an_unreachable_service_is_unavailable_with_the_cause(
    either: Either, fake: FakeService
) -> None:
    refused = [httpx.ConnectError("connection refused") for _ in range(FAST_RETRY.attempts)]
    fake.fail("GET /v1/features", *refused)
    with pytest.raises(Unavailable, match="could not be reached") as caught:
        await either("features")
    assert caught.value.status is None
    assert isinstance(caught.value.__cause__, httpx.ConnectError)
    assert len(fake.sent("GET /v1/features")) == FAST_RETRY.attempts


async def test_a_long_retry_after_is_handed_to_the_caller_at_once(
    either: Either, fake: FakeService
) -> None:
    fake.fail("GET /v1/features", unavailable("120"))
    with pytest.raises(Unavailable) as caught:
        await either("features")
    assert caught.value.retry_after == 120
    assert len(fake.sent("GET /v1/features")) == 1


async def test_a_bad_request_is_answered_once(either: Either, fake: FakeService) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await either("reserve", "coach-1", "poetry")
    assert caught.value.code == "unknown_feature"
    assert len(fake.sent("POST .*/reservations")) == 1


def test_decoding_a_gateway_error_is_unavailable() -> None:
    assert isinstance(decode_error(httpx.Response(502, text="bad gateway")), Unavailable)
    assert isinstance(decode_error(httpx.Response(504, text="timeout")), Unavailable)
