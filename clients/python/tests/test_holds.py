"""``hold()``: commit on success, refund on failure, explicit discard, timeouts and
re-delivered jobs, in both clients, offline."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ai_credits_client import (
    CreditsClient,
    CreditsExhausted,
    ReservationConflict,
    SyncCreditsClient,
    SyncHold,
)
from fake_service import FakeService, problem_response

RESERVE = "POST /v1/coaches/.*/reservations"
COMMIT = "POST /v1/reservations/.*/commit"
REFUND = "POST /v1/reservations/.*/refund"


def unavailable() -> httpx.Response:
    return problem_response(503, "backend_unavailable", headers={"Retry-After": "0"})


# --- async -------------------------------------------------------------------------------


async def test_an_async_block_that_succeeds_is_committed(
    aclient: CreditsClient, fake: FakeService
) -> None:
    async with aclient.hold("coach-1", "trend_analysis") as hold:
        assert (hold.status, hold.cost) == ("held", 3)
        assert fake.sent(COMMIT) == []
    assert hold.committed
    assert hold.note == "Used 3 credits · 47 of 50 left this month"
    assert fake.status(hold.reservation_id) == "committed"


async def test_an_async_block_that_raises_is_refunded(
    aclient: CreditsClient, fake: FakeService
) -> None:
    with pytest.raises(ValueError, match="model failed"):
        async with aclient.hold("coach-1", "trend_analysis") as hold:
            raise ValueError("model failed")
    assert fake.status(hold.reservation_id) == "refunded"
    assert hold.status == "refunded"
    assert fake.sent(COMMIT) == []


async def test_an_async_block_refunded_explicitly_is_not_committed(
    aclient: CreditsClient, fake: FakeService
) -> None:
    async with aclient.hold("coach-1", "trend_analysis") as hold:
        refunded = await hold.refund()
        assert refunded.status == "refunded"
        assert (await aclient.usage("coach-1")).held == 0
    assert (hold.discarded, hold.committed, hold.status) == (True, False, "refunded")
    assert fake.sent(COMMIT) == []
    assert len(fake.sent(REFUND)) == 1


async def test_an_async_block_that_raises_after_refunding_is_refunded_once(
    aclient: CreditsClient, fake: FakeService
) -> None:
    async def refund_then_fail() -> None:
        async with aclient.hold("coach-1", "checkin_draft") as hold:
            await hold.refund()
            raise RuntimeError("and then it failed")

    with pytest.raises(RuntimeError):
        await refund_then_fail()
    assert len(fake.sent(REFUND)) == 1


async def test_an_async_block_past_its_timeout_is_cancelled_and_refunded(
    aclient: CreditsClient, fake: FakeService
) -> None:
    with pytest.raises(TimeoutError) as caught:
        async with aclient.hold("coach-1", "trend_analysis", timeout=0.05) as hold:
            await asyncio.Event().wait()
    assert str(caught.value) == (
        "The trend_analysis action for coach coach-1 did not finish within its 0.05 s "
        "timeout: it was cancelled and its hold released, nothing charged."
    )
    assert fake.status(hold.reservation_id) == "refunded"


async def test_a_timeout_raised_by_the_block_itself_is_left_as_it_is(
    aclient: CreditsClient, fake: FakeService
) -> None:
    with pytest.raises(TimeoutError, match=r"^the model timed out$"):
        async with aclient.hold("coach-1", "checkin_draft", timeout=30) as hold:
            raise TimeoutError("the model timed out")
    assert fake.status(hold.reservation_id) == "refunded"


async def test_a_cancelled_async_block_is_refunded(
    aclient: CreditsClient, fake: FakeService
) -> None:
    entered = asyncio.Event()
    holds: list[str] = []

    async def worker() -> None:
        async with aclient.hold("coach-1", "checkin_draft") as hold:
            holds.append(hold.reservation_id)
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(worker())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.status(holds[0]) == "refunded"


async def test_a_failed_refund_does_not_hide_why_the_block_failed(
    aclient: CreditsClient, fake: FakeService
) -> None:
    fake.fail(REFUND, *[unavailable() for _ in range(4)])
    with pytest.raises(ValueError, match="model failed"):
        async with aclient.hold("coach-1", "checkin_draft") as hold:
            raise ValueError("model failed")
    assert fake.status(hold.reservation_id) == "held", "left to lapse by itself"


async def test_a_commit_that_fails_raises_and_charges_nothing(
    aclient: CreditsClient, fake: FakeService
) -> None:
    fake.fail(COMMIT, problem_response(409, "reservation_expired"))
    with pytest.raises(ReservationConflict) as caught:
        async with aclient.hold("coach-1", "checkin_draft"):
            pass
    assert caught.value.code == "reservation_expired"
    assert (await aclient.usage("coach-1")).used == 0


async def test_an_exhausted_coach_never_enters_the_block(
    aclient: CreditsClient, fake: FakeService
) -> None:
    await aclient.set_allowance("coach-1", 2)
    with pytest.raises(CreditsExhausted):
        async with aclient.hold("coach-1", "trend_analysis"):
            pytest.fail("the block must not run without credits")


async def test_a_redelivered_async_job_holds_once(
    aclient: CreditsClient, fake: FakeService
) -> None:
    async with aclient.hold("coach-1", "trend_analysis", idempotency_key="job-42") as first:
        pass
    assert fake.sent(RESERVE)[0].headers["Idempotency-Key"] == "job-42"
    with pytest.raises(ReservationConflict) as caught:
        async with aclient.hold("coach-1", "trend_analysis", idempotency_key="job-42"):
            pytest.fail("the job was already done")
    assert caught.value.code == "reservation_committed"
    assert caught.value.reservation is not None
    assert caught.value.reservation.reservation_id == first.reservation_id
    assert len(fake.reservations) == 1
    assert (await aclient.usage("coach-1")).used == 3


async def test_a_job_redelivered_after_its_worker_died_takes_over_the_live_hold(
    aclient: CreditsClient, fake: FakeService
) -> None:
    # The first delivery reserved, then its process died before settling.
    orphan = await aclient.reserve("coach-1", "trend_analysis", idempotency_key="job-9")
    async with aclient.hold("coach-1", "trend_analysis", idempotency_key="job-9") as hold:
        assert hold.reservation_id == orphan.reservation_id
    assert hold.committed
    usage = await aclient.usage("coach-1")
    assert (usage.used, usage.held) == (3, 0)


# --- sync --------------------------------------------------------------------------------


def test_a_sync_block_that_succeeds_is_committed(
    client: SyncCreditsClient, fake: FakeService
) -> None:
    with client.hold("coach-1", "trend_analysis") as hold:
        assert client.usage("coach-1").held == 3
    assert hold.note == "Used 3 credits · 47 of 50 left this month"
    assert fake.status(hold.reservation_id) == "committed"


def test_a_sync_block_that_raises_is_refunded(client: SyncCreditsClient, fake: FakeService) -> None:
    with pytest.raises(RuntimeError), client.hold("coach-1", "checkin_draft") as hold:
        raise RuntimeError("model failed")
    assert fake.status(hold.reservation_id) == "refunded"


def test_a_sync_block_refunded_explicitly_is_not_committed(
    client: SyncCreditsClient, fake: FakeService
) -> None:
    with client.hold("coach-1", "trend_analysis") as hold:
        assert hold.refund().status == "refunded"
    assert (hold.discarded, hold.status) == (True, "refunded")
    assert fake.sent(COMMIT) == []


def test_a_sync_block_past_its_timeout_is_refunded_when_it_ends(
    client: SyncCreditsClient, fake: FakeService
) -> None:
    holds: list[SyncHold] = []

    def slow_action() -> None:
        with client.hold("coach-1", "trend_analysis", timeout=0.05) as hold:
            holds.append(hold)
            left = hold.time_left()
            assert left is not None
            assert 0 < left <= 0.05
            time.sleep(0.1)
            assert hold.time_left() == 0

    with pytest.raises(TimeoutError, match=r"ran \d+\.\d s, past its 0.05 s timeout") as caught:
        slow_action()
    assert "its result is discarded" in str(caught.value)
    assert fake.status(holds[0].reservation_id) == "refunded"
    assert fake.sent(COMMIT) == []


def test_a_sync_block_within_its_timeout_is_committed(
    client: SyncCreditsClient, fake: FakeService
) -> None:
    with client.hold("coach-1", "checkin_draft", timeout=30) as hold:
        pass
    assert hold.committed


def test_a_redelivered_sync_job_holds_once(client: SyncCreditsClient, fake: FakeService) -> None:
    with client.hold("coach-1", "checkin_draft", idempotency_key="job-7"):
        pass
    with (
        pytest.raises(ReservationConflict, match="already committed"),
        client.hold("coach-1", "checkin_draft", idempotency_key="job-7"),
    ):
        pytest.fail("the job was already done")
    assert len(fake.reservations) == 1
