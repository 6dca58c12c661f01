"""Script calls made in one event-loop turn share one write (app.store.shared_writes): each caller
still gets its own reply or its own error, a caller that gives up before the write sends
nothing, and a stalled or cut connection fails only the calls on it and is not reused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from app.errors import BackendUnavailable, CreditsExhausted, ReservationNotFound
from app.store import CreditStore
from app.store import shared_writes as coalesce
from app.store.shared_writes import Coalescer
from app.store.transport import SingleServerTransport
from tests.support.clock import FrozenClock
from tests.support.redis import RedisProcess


def single_server(store: CreditStore) -> SingleServerTransport:
    assert isinstance(store.transport, SingleServerTransport)
    return store.transport


class CheckoutCounter:
    """Counts connections lent by a client's pool: one per write."""

    def __init__(self, client: Redis) -> None:
        self.count = 0
        pool = client.connection_pool
        lend = pool.get_connection

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await lend(*args, **kwargs)  # type: ignore[no-untyped-call]

        pool.get_connection = counted  # type: ignore[method-assign]


async def test_concurrent_calls_share_one_write_and_get_their_own_replies(
    single_redis: Redis, clock: FrozenClock
) -> None:
    store = CreditStore(single_redis, clock=clock)
    await store.ensure_scripts()
    counter = CheckoutCounter(single_redis)
    coaches = [f"c{i}" for i in range(64)]
    features = ["checkin_draft" if i % 2 else "trend_analysis" for i in range(64)]
    made = await asyncio.gather(
        *(store.reserve(c, f) for c, f in zip(coaches, features, strict=True))
    )
    assert counter.count == 1
    for coach, feature, (reservation, _) in zip(coaches, features, made, strict=True):
        assert reservation.reservation_id.coach_id == coach
        assert reservation.feature == feature
    usages = await asyncio.gather(*(store.usage(c) for c in coaches))
    assert counter.count == 2
    registry = store.metrics.registry
    assert registry.get_sample_value("credits_redis_commands_per_write_count") == 2
    assert registry.get_sample_value("credits_redis_commands_per_write_sum") == 128
    # Both writes carried 64 calls: the bucket up to 32 counts none, the one up to 64 both.
    bucket = "credits_redis_commands_per_write_bucket"
    assert registry.get_sample_value(bucket, {"le": "32.0"}) == 0
    assert registry.get_sample_value(bucket, {"le": "64.0"}) == 2
    assert [u.held for u in usages] == [3 if f == "trend_analysis" else 1 for f in features]


async def test_a_batch_can_mix_outcomes_and_each_caller_gets_its_own(
    single_redis: Redis, clock: FrozenClock
) -> None:
    store = CreditStore(single_redis, allowance=3, clock=clock)
    await store.ensure_scripts()
    held, _ = await store.reserve("full", "trend_analysis")
    counter = CheckoutCounter(single_redis)
    outcomes = await asyncio.gather(
        store.reserve("full", "checkin_draft"),
        store.reserve("free", "checkin_draft"),
        store.commit(str(held.reservation_id)),
        store.refund("free:2099-11:" + "A" * 22),
        store.usage("full"),
        return_exceptions=True,
    )
    assert counter.count == 1
    exhausted, fresh, committed, unknown, usage = outcomes
    assert isinstance(exhausted, CreditsExhausted)
    assert not isinstance(fresh, BaseException)
    assert fresh[0].reservation_id.coach_id == "free"
    assert not isinstance(committed, BaseException)
    assert committed.status.value == "committed"
    assert isinstance(unknown, ReservationNotFound)
    assert not isinstance(usage, BaseException)
    # Read in the same write, after the commit that came before it.
    assert (usage.used, usage.held) == (3, 0)


async def test_scripts_flushed_under_a_batch_are_reloaded_once_and_every_call_lands(
    single_redis: Redis, clock: FrozenClock
) -> None:
    store = CreditStore(single_redis, clock=clock)
    await store.ensure_scripts()
    registry = store.metrics.registry
    before = registry.get_sample_value("credits_scripts_reloaded_total") or 0.0
    await single_redis.script_flush()
    coaches = [f"f{i}" for i in range(32)]
    made = await asyncio.gather(*(store.reserve(c, "checkin_draft") for c in coaches))
    assert [r.reservation_id.coach_id for r, _ in made] == coaches
    # Each NOSCRIPT reached its own caller, who reloaded; one reload per script in all.
    reloaded = registry.get_sample_value("credits_scripts_reloaded_total")
    assert reloaded == before + len(store.scripts.by_name)
    assert all(u.held == 1 for u in await asyncio.gather(*(store.usage(c) for c in coaches)))


async def test_a_caller_that_gives_up_before_the_write_sends_nothing(
    single_redis: Redis, clock: FrozenClock
) -> None:
    store = CreditStore(single_redis, clock=clock)
    await store.ensure_scripts()
    task = asyncio.create_task(store.reserve("gave-up", "checkin_draft"))
    await asyncio.sleep(0)  # the reserve is queued; the write goes at the end of the turn
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.drain()
    assert await single_redis.keys("credits:{gave-up}:*") == []
    assert (await store.usage("gave-up")).held == 0


async def test_bursts_beyond_one_batch_go_out_as_several_writes(
    single_redis: Redis, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coalesce, "MAX_BATCH", 10)
    store = CreditStore(single_redis, clock=clock)
    await store.ensure_scripts()
    counter = CheckoutCounter(single_redis)
    made = await asyncio.gather(*(store.reserve(f"b{i}", "checkin_draft") for i in range(35)))
    assert counter.count == 4
    assert [r.reservation_id.coach_id for r, _ in made] == [f"b{i}" for i in range(35)]


async def test_without_coalescing_every_call_has_its_own_round_trip(
    single_redis: Redis, clock: FrozenClock
) -> None:
    store = CreditStore(single_redis, clock=clock, coalesce=False)
    await store.ensure_scripts()
    counter = CheckoutCounter(single_redis)
    await asyncio.gather(*(store.reserve(f"o{i}", "checkin_draft") for i in range(5)))
    assert counter.count == 5


# --- faults on a real server of the test's own ---------------------------------------


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[tuple[Redis, Redis]]:
    """A private server (these tests pause it and cut its connections): the store's
    client and an admin client."""
    server = RedisProcess(tmp_path).start()
    client = Redis.from_url(server.url, decode_responses=True)
    admin = Redis.from_url(server.url, decode_responses=True)
    try:
        yield client, admin
    finally:
        await admin.aclose()
        await client.aclose()
        server.stop()


async def test_a_stalled_write_fails_its_callers_and_its_connection_is_not_reused(
    own_redis: tuple[Redis, Redis], clock: FrozenClock
) -> None:
    client, admin = own_redis
    store = CreditStore(client, clock=clock, op_timeout_seconds=0.3)
    await store.ensure_scripts()
    await admin.client_pause(800, all=True)
    stalled = await asyncio.gather(
        *(store.reserve(f"s{i}", "checkin_draft") for i in range(8)),
        return_exceptions=True,
    )
    assert all(isinstance(r, BackendUnavailable) for r in stalled), stalled
    await store.drain()
    await asyncio.sleep(0.8)  # the pause ends; the stalled calls then ran in Redis
    # Their late replies were never read by anyone: the next calls get their own.
    coalescer = single_server(store).coalescer()
    echoes = await asyncio.gather(*(coalescer.call("ECHO", f"e{i}") for i in range(8)))
    assert echoes == [f"e{i}" for i in range(8)]
    made, _ = await store.reserve("after", "trend_analysis")
    assert made.reservation_id.coach_id == "after"
    assert made.cost == 3


async def test_a_cut_connection_fails_the_calls_on_it_and_the_next_write_heals(
    own_redis: tuple[Redis, Redis], clock: FrozenClock
) -> None:
    client, admin = own_redis
    store = CreditStore(client, clock=clock, op_timeout_seconds=2.0)
    await store.ensure_scripts()
    await store.usage("warm")  # one pooled connection, idle now
    # The reply never comes: the server closes the connection mid-batch.
    coalescer = single_server(store).coalescer()
    blocked = coalescer.call("BLPOP", "never", "0")
    queued = coalescer.call("PING")
    await asyncio.sleep(0.05)
    assert await admin.client_kill_filter(_type="normal", skipme=True) >= 1
    for future in (blocked, queued):
        with pytest.raises(redis_errors.ConnectionError):
            await future
    made, _ = await store.reserve("healed", "checkin_draft")
    assert made.reservation_id.coach_id == "healed"


async def test_drain_waits_for_writes_in_flight(single_redis: Redis) -> None:
    coalescer = Coalescer(single_redis, asyncio.get_running_loop(), timeout_seconds=2.0)
    futures = [coalescer.call("INCR", "drained") for _ in range(5)]
    await coalescer.drain()
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [1, 2, 3, 4, 5]


def test_the_redis_py_connection_api_the_shared_writes_use_is_still_there() -> None:
    """Shared writes lend a pooled connection and talk on it directly: the one use of
    redis-py below its command API. A release that moves it must fail here, loudly."""
    import inspect

    from redis.asyncio import BlockingConnectionPool, ConnectionPool
    from redis.asyncio.connection import Connection

    for pool in (ConnectionPool, BlockingConnectionPool):
        assert inspect.iscoroutinefunction(pool.get_connection)
        assert inspect.iscoroutinefunction(pool.release)
        # Lent without arguments (older releases required a command name).
        required = [
            p
            for p in inspect.signature(pool.get_connection).parameters.values()
            if p.name != "self"
            and p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        assert required == [], required
    for name in ("send_packed_command", "read_response", "disconnect"):
        assert inspect.iscoroutinefunction(getattr(Connection, name)), name
    assert "check_health" in inspect.signature(Connection.send_packed_command).parameters
    assert "nowait" in inspect.signature(Connection.disconnect).parameters
    assert callable(Connection.pack_commands)
    assert callable(Connection.pack_command)
