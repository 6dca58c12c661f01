"""The quota headers (IETF RateLimit fields) on single reserves and usage reads: always
the current period, ``t`` = Retry-After on a 429, none on batch routes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from app import domain
from app.api.quota import usage_quota_headers
from app.domain import Period, Usage
from tests.support.clock import FrozenClock

COACH = "coach-quota"
NOVEMBER_SECONDS = 30 * 86400
DECEMBER_SECONDS = 31 * 86400
JSON_UTF8 = {"content-type": "application/json; charset=utf-8"}


def quota(resp: httpx.Response) -> tuple[str, str]:
    return resp.headers["RateLimit-Policy"], resp.headers["RateLimit"]


def until(instant: datetime, clock: FrozenClock) -> int:
    return int((instant - clock.now).total_seconds())


async def reserve(
    api: httpx.AsyncClient, feature: str = "checkin_draft", **kw: Any
) -> httpx.Response:
    return await api.post(f"/v1/coaches/{COACH}/reservations", json={"feature": feature}, **kw)


@pytest.mark.parametrize("headers", [{}, JSON_UTF8], ids=["front", "standard"])
async def test_a_reserve_carries_the_quota_of_the_current_period(
    api: httpx.AsyncClient, clock: FrozenClock, headers: dict[str, str]
) -> None:
    # Two ways to a reserve: answered in front of the router, and the standard way (a
    # content type with parameters takes it): the same fields.
    resp = await reserve(api, "trend_analysis", headers=headers)
    assert resp.status_code == 201
    reset = until(datetime(2099, 12, 1, tzinfo=UTC), clock)
    assert quota(resp) == (
        f'"monthly";q=50;w={NOVEMBER_SECONDS}',
        f'"monthly";r=47;t={reset}',
    )
    again = await reserve(api, headers={**headers, "Idempotency-Key": "k"})
    replay = await reserve(api, headers={**headers, "Idempotency-Key": "k"})
    assert (again.status_code, replay.status_code) == (201, 200)
    assert (
        quota(replay)
        == quota(again)
        == (
            f'"monthly";q=50;w={NOVEMBER_SECONDS}',
            f'"monthly";r=46;t={reset}',
        )
    )
    assert "qu=" not in resp.headers["RateLimit-Policy"]


async def test_a_replay_of_last_month_s_reservation_speaks_of_this_month(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    clock.set(datetime(2099, 11, 30, 23, 59, 0, tzinfo=UTC))
    first = await reserve(api, "trend_analysis", headers={"Idempotency-Key": "late"})
    assert first.status_code == 201
    clock.set(datetime(2099, 12, 1, 0, 0, 30, tzinfo=UTC))
    await reserve(api)  # December: 1 held
    assert (
        await api.post(f"/v1/coaches/{COACH}/grants", json={"credits": 10, "reason": "x"})
    ).status_code == 201
    replay = await reserve(api, "trend_analysis", headers={"Idempotency-Key": "late"})
    assert replay.status_code == 200
    assert replay.json()["period"] == "2099-11"
    assert replay.json()["usage"]["held"] == 3  # the reservation's own month
    assert quota(replay) == (
        f'"monthly";q=60;w={DECEMBER_SECONDS}',
        f'"monthly";r=59;t={until(datetime(2100, 1, 1, tzinfo=UTC), clock)}',
    )


async def test_a_usage_read_carries_the_effective_allowance(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    await api.put(f"/v1/coaches/{COACH}/allowance", json={"monthly_allowance": 200})
    await api.post(f"/v1/coaches/{COACH}/grants", json={"credits": -20, "reason": "refund"})
    await reserve(api, "trend_analysis")
    resp = await api.get(f"/v1/coaches/{COACH}/usage")
    assert quota(resp) == (
        f'"monthly";q=180;w={NOVEMBER_SECONDS}',
        f'"monthly";r=177;t={until(datetime(2099, 12, 1, tzinfo=UTC), clock)}',
    )


async def test_on_a_429_t_is_retry_after(api: httpx.AsyncClient, clock: FrozenClock) -> None:
    await api.put(f"/v1/coaches/{COACH}/allowance", json={"monthly_allowance": 4})
    held = await api.post(
        f"/v1/coaches/{COACH}/reservations", json={"feature": "trend_analysis", "ttl_seconds": 90}
    )
    assert held.status_code == 201
    clock.advance(10)
    # Only the hold blocks: t is when it lapses, as Retry-After says.
    refused = await reserve(api, "trend_analysis")
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "80"
    assert quota(refused) == (f'"monthly";q=4;w={NOVEMBER_SECONDS}', '"monthly";r=1;t=80')
    # Used up: t is the reset, as Retry-After says.
    assert (
        await api.post(f"/v1/reservations/{held.json()['reservation_id']}/commit")
    ).status_code == 200
    refused = await reserve(api, "trend_analysis")
    reset = until(datetime(2099, 12, 1, tzinfo=UTC), clock)
    assert refused.headers["Retry-After"] == str(reset)
    assert quota(refused) == (f'"monthly";q=4;w={NOVEMBER_SECONDS}', f'"monthly";r=1;t={reset}')


async def test_batch_routes_and_other_answers_carry_none(api: httpx.AsyncClient) -> None:
    rid = (await reserve(api)).json()["reservation_id"]
    answers = [
        await api.post("/v1/usage/batch", json={"coach_ids": [COACH]}),
        await api.post(
            "/v1/reservations/batch",
            json={"reservations": [{"coach_id": COACH, "feature": "checkin_draft"}]},
        ),
        await api.post(
            "/v1/reservations/settle",
            json={"settlements": [{"reservation_id": rid, "action": "commit"}]},
        ),
        await api.post(f"/v1/reservations/{rid}/commit"),
        await api.get(f"/v1/reservations/{rid}"),
        await reserve(api, "nope"),  # a 422
    ]
    for resp in answers:
        assert "RateLimit" not in resp.headers, resp.request.url
        assert "RateLimit-Policy" not in resp.headers, resp.request.url


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2400, 12, 31)))
def test_t_is_the_seconds_until_the_reset_rounded_up(naive: datetime) -> None:
    now = naive.replace(tzinfo=UTC)
    period = Period.containing(now)
    usage = Usage.of("c", period, allowance=50, used=1, held=0, costs={"checkin_draft": 1})
    fields = dict(usage_quota_headers(usage, now))
    t = domain.seconds_until(period.resets_at, now)
    assert fields[b"ratelimit"] == f'"monthly";r=49;t={t}'.encode()
    assert fields[b"ratelimit-policy"] == f'"monthly";q=50;w={period.seconds}'.encode()
