"""A hold that lives as long as its block: the scheduler's decisions, then both clients
extending a one-second hold while the block runs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from ai_credits_client import (
    CreditsClient,
    ExtensionLimit,
    ReservationConflict,
    SyncCreditsClient,
    Unavailable,
)
from ai_credits_client.holds import KeepAlive, granted_ttl
from ai_credits_client.models import Reservation
from fake_service import WAIT, FakeService, problem_response

EXTEND = "POST /v1/reservations/.*/extend"


# --- the scheduler ------------------------------------------------------------------------


def test_a_hold_is_extended_at_half_its_ttl_each_time() -> None:
    schedule = KeepAlive(60, now=1000.0)
    assert schedule.next_at() == 1030.0
    schedule.extended(now=1030.5)
    assert schedule.next_at() == 1060.5
    assert schedule.stopped is None


def test_the_extension_limit_stops_extending_for_good() -> None:
    schedule = KeepAlive(60, now=0.0)
    schedule.failed(ExtensionLimit("past the period", status=409, code="extension_limit"), 30.0)
    assert (schedule.next_at(), schedule.stopped) == (None, "extension_limit")
    schedule.extended(now=31.0)
    assert schedule.next_at() is None


@pytest.mark.parametrize("code", ["reservation_committed", "reservation_expired"])
def test_a_settled_hold_is_not_extended_again(code: str) -> None:
    schedule = KeepAlive(60, now=0.0)
    schedule.failed(ReservationConflict("settled", status=409, code=code), 30.0)
    assert (schedule.next_at(), schedule.stopped) == (None, code)


def test_an_unavailable_service_is_tried_again_halfway_to_the_expiry() -> None:
    schedule = KeepAlive(60, now=0.0)
    schedule.failed(Unavailable("away"), now=30.0)  # expires at 60
    assert schedule.next_at() == 45.0
    schedule.failed(Unavailable("away"), now=45.0)
    assert schedule.next_at() == 52.5
    schedule.failed(Unavailable("away"), now=59.9)
    assert schedule.next_at() == pytest.approx(60.15)  # never sooner than a quarter second
    schedule.failed(Unavailable("away"), now=60.2)
    assert (schedule.next_at(), schedule.stopped) == (None, "lapsed")


def test_an_unexpected_error_stops_extending() -> None:
    schedule = KeepAlive(60, now=0.0)
    schedule.failed(RuntimeError("client closed"), now=30.0)
    assert schedule.stopped == "RuntimeError"


def test_a_hold_that_outlives_the_blocks_deadline_is_not_extended() -> None:
    assert KeepAlive(60, now=0.0, deadline=50.0).stopped == "deadline"
    schedule = KeepAlive(60, now=0.0, deadline=100.0)
    assert schedule.next_at() == 30.0
    schedule.extended(now=30.0)  # now lives to 90: one more
    assert schedule.next_at() == 60.0
    schedule.extended(now=60.0)  # lives to 120, past the deadline
    assert (schedule.next_at(), schedule.stopped) == (None, "deadline")


def test_stopping_keeps_the_first_reason() -> None:
    schedule = KeepAlive(60, now=0.0)
    schedule.stop("settled")
    schedule.stop("extension_limit")
    assert schedule.stopped == "settled"


def reservation_expiring(at: datetime) -> Reservation:
    usage = {
        "coach_id": "c",
        "period": "2099-11",
        "allowance": 50,
        "used": 0,
        "held": 1,
        "remaining": 49,
        "percent_used": 0,
        "level": "green",
        "resets_at": "2099-12-01T00:00:00Z",
        "features": [],
    }
    return Reservation.from_json(
        {
            "reservation_id": "r",
            "coach_id": "c",
            "feature": "checkin_draft",
            "cost": 1,
            "status": "held",
            "period": "2099-11",
            "expires_at": at.isoformat(),
            "usage": usage,
        }
    )


def test_the_default_ttl_is_read_on_the_services_clock() -> None:
    expires = datetime(2099, 11, 14, 12, 5, 0, 700000, tzinfo=UTC)
    reservation = reservation_expiring(expires)
    # The local clock is an hour off; the answer's Date is what counts.
    skewed = expires + timedelta(hours=1)
    assert granted_ttl(reservation, "Sat, 14 Nov 2099 12:00:00 GMT", skewed) == 300
    assert granted_ttl(reservation, None, expires - timedelta(seconds=60)) == 60
    assert granted_ttl(reservation, "not a date", expires - timedelta(seconds=60)) == 60
    assert granted_ttl(reservation, None, expires + timedelta(seconds=5)) == 1
    assert granted_ttl(reservation, None, expires - timedelta(days=1)) == 3600


# --- the clients ---------------------------------------------------------------------------


async def wait_for(check: Callable[[], object]) -> None:
    async with asyncio.timeout(WAIT):
        while not check():  # noqa: ASYNC110  (state the fake and the hold expose)
            await asyncio.sleep(0.01)


def wait_for_sync(check: Callable[[], object]) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, "the keep-alive did not act in time"
        time.sleep(0.01)


async def test_the_async_hold_is_extended_while_the_block_runs(
    aclient: CreditsClient, fake: FakeService
) -> None:
    async with aclient.hold("coach-1", "trend_analysis", ttl_seconds=1) as hold:
        first_expiry = hold.expires_at
        await wait_for(lambda: len(fake.sent(EXTEND)) >= 2)
        assert fake.status(hold.reservation_id) == "held"
        assert hold.keep_alive_stopped is None
    assert hold.committed
    assert all(json.loads(r.content) == {"ttl_seconds": 1} for r in fake.sent(EXTEND))
    page = await aclient.events("coach-1")
    assert {e.kind for e in page.events} >= {"held", "extended", "committed"}
    assert hold.keep_alive_stopped == "settled"
    assert hold.reservation.status == "committed"
    assert hold.expires_at > first_expiry


def test_the_sync_hold_is_extended_while_the_block_runs(
    client: SyncCreditsClient, fake: FakeService
) -> None:
    with client.hold("coach-1", "trend_analysis", ttl_seconds=1) as hold:
        wait_for_sync(lambda: len(fake.sent(EXTEND)) >= 2)
        assert fake.status(hold.reservation_id) == "held"
    assert hold.committed
    assert hold.keep_alive_stopped == "settled"


async def test_the_hold_extends_by_the_services_default_ttl(
    aclient: CreditsClient, fake: FakeService
) -> None:
    fake.default_ttl = 1
    async with aclient.hold("coach-1", "checkin_draft") as hold:
        assert hold.ttl_seconds == 1
        await wait_for(lambda: fake.sent(EXTEND))
    assert json.loads(fake.sent(EXTEND)[0].content) == {"ttl_seconds": 1}


def limit_reached() -> httpx.Response:
    return problem_response(
        409, "extension_limit", "The hold cannot be extended past the end of its month."
    )


async def test_at_the_extension_limit_the_async_block_runs_on_unextended(
    aclient: CreditsClient, fake: FakeService, caplog: pytest.LogCaptureFixture
) -> None:
    fake.fail(EXTEND, limit_reached())
    with caplog.at_level(logging.WARNING, "ai_credits_client"):
        async with aclient.hold("coach-1", "trend_analysis", ttl_seconds=1) as hold:
            await wait_for(lambda: hold.keep_alive_stopped is not None)
            assert hold.keep_alive_stopped == "extension_limit"
    assert hold.committed, "the block ran on and was charged, the hold being still live"
    assert len(fake.sent(EXTEND)) == 1
    assert "extension limit" in caplog.text


def test_at_the_extension_limit_the_sync_block_runs_on_unextended(
    client: SyncCreditsClient, fake: FakeService
) -> None:
    fake.fail(EXTEND, limit_reached())
    with client.hold("coach-1", "trend_analysis", ttl_seconds=1) as hold:
        wait_for_sync(lambda: hold.keep_alive_stopped is not None)
        assert hold.keep_alive_stopped == "extension_limit"
    assert hold.committed
    assert len(fake.sent(EXTEND)) == 1


async def test_a_hold_past_the_extension_limit_may_lapse_uncharged(
    aclient: CreditsClient, fake: FakeService
) -> None:
    fake.fail(EXTEND, limit_reached())
    with pytest.raises(ReservationConflict) as caught:
        async with aclient.hold("coach-1", "trend_analysis", ttl_seconds=1) as hold:
            await wait_for(lambda: fake.status(hold.reservation_id) == "expired")
    assert caught.value.code == "reservation_expired"
    assert (await aclient.usage("coach-1")).used == 0


async def test_a_short_outage_is_ridden_out_by_extending_again(
    aclient: CreditsClient, fake: FakeService
) -> None:
    away = problem_response(503, "backend_unavailable", headers={"Retry-After": "0"})
    fake.fail(EXTEND, *[away] * 4)  # every try of the first extend
    async with aclient.hold("coach-1", "checkin_draft", ttl_seconds=2) as hold:
        first_expiry = hold.expires_at
        await wait_for(lambda: hold.expires_at > first_expiry)
        assert len(fake.sent(EXTEND)) == 5
        assert hold.keep_alive_stopped is None
    assert hold.committed


async def test_no_extend_goes_out_after_the_async_block_ends(
    aclient: CreditsClient, fake: FakeService
) -> None:
    async with aclient.hold("coach-1", "checkin_draft", ttl_seconds=1):
        pass
    await asyncio.sleep(0.8)  # past the first extend the hold would have had
    assert fake.sent(EXTEND) == []


def test_no_extend_goes_out_after_the_sync_block_ends(
    client: SyncCreditsClient, fake: FakeService
) -> None:
    with client.hold("coach-1", "checkin_draft", ttl_seconds=1) as hold:
        pass
    hold._keeper.join(WAIT)
    assert not hold._keeper.is_alive()
    assert fake.sent(EXTEND) == []
