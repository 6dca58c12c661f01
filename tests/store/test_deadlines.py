"""The transport's bound on every Redis operation: a call past its deadline ends as
BackendUnavailable, while anyone else's cancellation stays a cancellation. (Calls that
share a write are bounded by the write's deadline: tests/store/test_coalesce.py.)"""

from __future__ import annotations

import asyncio
import time

import fakeredis
import pytest

from app.errors import BackendUnavailable
from app.store import CreditStore
from app.store.transport import SingleServerTransport

# Wide margins on either side of the deadline: a loaded two-core machine must not flip
# a result.
TIMEOUT = 0.5


@pytest.fixture
def store() -> CreditStore:
    return CreditStore(fakeredis.FakeAsyncRedis(decode_responses=True), op_timeout_seconds=TIMEOUT)


async def test_a_call_past_its_deadline_is_unavailable_promptly(store: CreditStore) -> None:
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as caught:
        await store.transport.guard(asyncio.sleep(10))
    took = time.monotonic() - started
    assert took + 0.01 >= TIMEOUT
    assert took < TIMEOUT + 0.5
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert isinstance(caught.value.__cause__.__cause__, asyncio.CancelledError)
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_only_the_slow_calls_of_many_time_out(store: CreditStore) -> None:
    async def call(seconds: float) -> str:
        try:
            await store.transport.guard(asyncio.sleep(seconds))
        except BackendUnavailable:
            return "timeout"
        return "ok"

    delays = [0.01, 0.05, 1.3, 0.1, 1.5, 0.0, 0.15, 1.2] * 8
    results = await asyncio.gather(*(call(d) for d in delays))
    assert results == ["timeout" if d > TIMEOUT else "ok" for d in delays]


async def test_calls_keep_being_bounded_after_the_timer_has_fired(store: CreditStore) -> None:
    for _ in range(3):
        assert await store.transport.guard(asyncio.sleep(0.01, "done")) == "done"
        with pytest.raises(BackendUnavailable):
            await store.transport.guard(asyncio.sleep(10))
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await store.transport.guard(asyncio.sleep(10))
    assert time.monotonic() - started < TIMEOUT + 0.5


async def test_a_shorter_deadline_set_later_still_counts(store: CreditStore) -> None:
    slow = asyncio.ensure_future(store.transport.guard(asyncio.sleep(0.05, "slow")))
    await asyncio.sleep(0)  # its deadline, TIMEOUT from now, is set first
    store.transport.timeout_seconds = 0.02
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await store.transport.guard(asyncio.sleep(10))
    assert time.monotonic() - started < TIMEOUT - 0.1
    assert await slow == "slow"


async def test_cancelling_the_caller_stays_a_cancellation(store: CreditStore) -> None:
    task = asyncio.ensure_future(store.transport.guard(asyncio.sleep(10)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_outer_timeout_that_ends_first_is_the_outer_ones(store: CreditStore) -> None:
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await store.transport.guard(asyncio.sleep(10))
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_a_cancel_at_the_deadline_from_elsewhere_is_not_swallowed(
    store: CreditStore,
) -> None:
    """When someone else cancels the task too, the cancellation wins, as with
    asyncio.timeout: the caller is going away and must not see a 503 instead."""

    async def both() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + TIMEOUT + 0.05, task.cancel)
        await store.transport.guard(asyncio.sleep(TIMEOUT + 0.05 + 0.3))

    runner = asyncio.ensure_future(both())
    # Stall the loop past both moments, so both fire in the same iteration.
    await asyncio.sleep(0.01)
    time.sleep(TIMEOUT + 0.1)  # noqa: ASYNC251 - blocking the loop is the point
    with pytest.raises(asyncio.CancelledError):
        await runner


async def test_the_result_of_a_call_that_beats_its_deadline_is_returned(
    store: CreditStore,
) -> None:
    assert await store.transport.guard(asyncio.sleep(TIMEOUT / 2, "in time")) == "in time"


def test_a_store_serves_more_than_one_event_loop(store: CreditStore) -> None:
    async def slow() -> None:
        with pytest.raises(BackendUnavailable):
            await store.transport.guard(asyncio.sleep(10))

    async def used() -> int:
        return (await store.usage("coach-1")).used

    for _ in range(3):
        asyncio.run(slow())
        assert asyncio.run(used()) == 0
    transport = store.transport
    assert isinstance(transport, SingleServerTransport)
    assert len(transport.shared._by_loop) == 1  # the closed loops' coalescers are dropped
