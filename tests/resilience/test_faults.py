"""Faults on a single Redis: restarts, lost scripts, pauses, cut connections and a Redis
that comes back empty. Each test breaks its own redis-server, so none disturbs another.

Clients are built by ``app.main.connect`` (or the app itself), so the production pool,
timeouts and "no automatic retries" policy are what is under test."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import fakeredis
import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from app.config import Settings
from app.errors import BackendUnavailable
from app.main import connect, create_app
from app.metrics import Metrics
from app.store import INSTANCE_KEY, SCRIPT_NAMES, AnyRedis, CreditStore
from tests.support.clock import FrozenClock
from tests.support.redis import RedisProcess

pytestmark = pytest.mark.real_redis

T = TypeVar("T")

AOF = ["--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
#: A generous bound on anything that should take well under a second: it only stops a
#: hung test, it asserts nothing about speed.
HANG_GUARD_SECONDS = 30.0
#: Rounds of 4 coaches x 10 actions at most, under connection cuts, until one cut has
#: met a request in flight.
CUT_ROUNDS = 50


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """Starts private redis-servers for one test and stops every one of them after it."""
    started: list[RedisProcess] = []

    def make(args: list[str] | None = None) -> RedisProcess:
        proc = RedisProcess(tmp_path, args=args).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


def metric(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def until_available(call: Callable[[], Awaitable[T]], attempts: int = 50) -> T:
    """Retries a call while it reports the backend unavailable, as a careful caller
    would after a restart; stale pooled connections fail once each before healing."""
    for _ in range(attempts - 1):
        try:
            return await call()
        except BackendUnavailable:
            await asyncio.sleep(0.05)
    return await call()


async def until_ready(api: httpx.AsyncClient, attempts: int = 400) -> None:
    """Polls /readyz, as an orchestrator would, until Redis answers again."""
    for _ in range(attempts):
        if (await api.get("/readyz")).status_code == 200:
            return
        await asyncio.sleep(0.05)
    pytest.fail("the service never became ready again")


def new_store(client: AnyRedis, clock: FrozenClock, *, op_timeout: float = 2.5) -> CreditStore:
    return CreditStore(client, clock=clock, op_timeout_seconds=op_timeout)


@asynccontextmanager
async def served(
    settings: Settings, clock: FrozenClock
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The real app, its lifespan running, with the Redis client it builds itself."""
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:
            yield app, client


# --- restart with persistence -------------------------------------------------------


async def test_commit_after_aof_restart_charges_exactly_once(
    make_redis: Callable[..., RedisProcess], clock: FrozenClock
) -> None:
    server = make_redis(AOF)
    client = connect(Settings(redis_url=server.url, allow_open=True))
    store = new_store(client, clock)
    try:
        await store.ensure_scripts()
        reservation, created = await store.reserve("coach-aof", "trend_analysis")
        assert created
        rid = str(reservation.reservation_id)

        server.restart()  # SIGTERM: Redis fsyncs the AOF before it exits

        committed = await until_available(lambda: store.commit(rid))
        assert committed.status.value == "committed"
        assert (committed.usage.used, committed.usage.held) == (3, 0)
        again = await until_available(lambda: store.commit(rid))
        assert again.status.value == "committed"
        usage = await store.usage("coach-aof")
        assert (usage.used, usage.held, usage.remaining) == (3, 0, 47)
        # The restart lost the scripts (they are not persisted) but not the data.
        assert metric(store.metrics, "credits_scripts_reloaded_total") >= 1
        assert metric(store.metrics, "credits_redis_state_lost_total") == 0
    finally:
        await client.aclose()


# --- scripts flushed under load -----------------------------------------------------


async def test_script_flush_under_load_is_invisible_to_callers(
    make_redis: Callable[..., RedisProcess], clock: FrozenClock
) -> None:
    server = make_redis()
    client = connect(Settings(redis_url=server.url, allow_open=True, redis_max_connections=16))
    flusher = Redis.from_url(server.url, decode_responses=True)
    store = new_store(client, clock)
    coaches = [f"coach-{i}" for i in range(6)]
    rounds = 12
    committed: dict[str, int] = dict.fromkeys(coaches, 0)
    stop = asyncio.Event()

    async def flush_scripts() -> int:
        flushes = 0
        while not stop.is_set():
            await flusher.script_flush()
            flushes += 1
            await asyncio.sleep(0.002)
        return flushes

    async def work(coach: str) -> None:
        for i in range(rounds):
            feature = "trend_analysis" if i % 3 == 0 else "checkin_draft"
            reservation, _ = await store.reserve(coach, feature)
            rid = str(reservation.reservation_id)
            if i % 4 == 3:
                await store.refund(rid)
            else:
                done = await store.commit(rid)
                committed[coach] += done.cost
            await store.get_reservation(rid)
            await store.usage_many(coaches)

    try:
        await store.ensure_scripts()
        flushing = asyncio.create_task(flush_scripts())
        try:
            async with asyncio.timeout(HANG_GUARD_SECONDS):
                await asyncio.gather(*(work(c) for c in coaches))
        finally:
            stop.set()
            flushes = await flushing
        assert flushes > 0
        for usage in await store.usage_many(coaches):
            assert usage.used == committed[usage.coach_id]
            assert usage.held == 0
        assert metric(store.metrics, "credits_scripts_reloaded_total") >= 1
        assert metric(store.metrics, "credits_redis_state_lost_total") == 0
    finally:
        await flusher.aclose()
        await client.aclose()


# --- Redis paused longer than the client timeout ------------------------------------


async def test_client_pause_gives_fast_503s_and_the_service_recovers(
    make_redis: Callable[..., RedisProcess], clock: FrozenClock
) -> None:
    server = make_redis()
    max_connections = 4
    settings = Settings(
        redis_url=server.url,
        allow_open=True,
        redis_timeout_seconds=0.3,
        redis_max_connections=max_connections,
    )
    admin = Redis.from_url(server.url, decode_responses=True)
    burst = max_connections * 6

    async def one(api: httpx.AsyncClient, i: int) -> httpx.Response:
        coach = f"paused-{i % 5}"
        if i % 3 == 0:
            return await api.get(f"/v1/coaches/{coach}/usage")
        if i % 3 == 1:
            return await api.post("/v1/usage/batch", json={"coach_ids": [coach, "other"]})
        return await api.post(
            f"/v1/coaches/{coach}/reservations", json={"feature": "checkin_draft"}
        )

    try:
        async with served(settings, clock) as (app, api):
            assert (
                await api.post(
                    "/v1/coaches/paused-0/reservations", json={"feature": "checkin_draft"}
                )
            ).status_code == 201

            # Long enough that the whole burst runs inside it, even on a busy machine.
            await admin.client_pause(6000, all=True)
            async with asyncio.timeout(HANG_GUARD_SECONDS):
                during = await asyncio.gather(*(one(api, i) for i in range(burst)))
            for response in during:
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "1"
                assert response.headers["content-type"] == "application/problem+json"
                assert response.json()["code"] == "backend_unavailable"
            assert metric(app.state.metrics, "credits_redis_unavailable_total") == burst

            async with asyncio.timeout(HANG_GUARD_SECONDS):
                await until_ready(api)
                # Every connection the pool handed out came back: a burst wider than
                # the pool succeeds in full.
                after = await asyncio.gather(*(one(api, i) for i in range(burst)))
            assert [r.status_code for r in after if r.status_code not in (200, 201)] == []
            usage = (await api.get("/v1/coaches/paused-0/usage")).json()
            assert usage["used"] + usage["held"] <= usage["allowance"]
    finally:
        await admin.aclose()


# --- connections cut while requests run -----------------------------------------------


async def test_connections_killed_mid_request_give_503_or_success_and_heal(
    make_redis: Callable[..., RedisProcess], clock: FrozenClock
) -> None:
    server = make_redis()
    settings = Settings(
        redis_url=server.url, allow_open=True, redis_timeout_seconds=1.0, redis_max_connections=8
    )
    killer = Redis.from_url(server.url, decode_responses=True)
    coaches: list[str] = []
    charged: dict[str, int] = {}
    statuses: list[int] = []
    stop = asyncio.Event()

    async def kill_connections() -> int:
        kills = 0
        while not stop.is_set():
            kills += await killer.client_kill_filter(_type="normal", skipme=True)
            await asyncio.sleep(0.005)
        return kills

    async def commit(api: httpx.AsyncClient, coach: str, rid: str) -> bool:
        c = await api.post(f"/v1/reservations/{rid}/commit")
        statuses.append(c.status_code)
        if c.status_code != 200:
            return False
        assert c.json()["status"] == "committed"
        charged[coach] += 1
        return True

    unanswered: list[tuple[str, str]] = []

    async def work(api: httpx.AsyncClient, coach: str) -> None:
        for _ in range(10):
            r = await api.post(
                f"/v1/coaches/{coach}/reservations", json={"feature": "checkin_draft"}
            )
            statuses.append(r.status_code)
            if r.status_code != 201:
                continue
            rid = r.json()["reservation_id"]
            # Commit is idempotent, so a careful caller repeats it until it gets an answer;
            # one still unanswered while the cuts go on is repeated once they stop.
            for _ in range(20):
                if await commit(api, coach, rid):
                    break
                await asyncio.sleep(0.01)
            else:
                unanswered.append((coach, rid))

    try:
        async with served(settings, clock) as (_, api):
            killing = asyncio.create_task(kill_connections())
            try:
                async with asyncio.timeout(HANG_GUARD_SECONDS):
                    # Calls in flight share connections and are brief: a cut lands on
                    # one only now and then, so rounds go on until one has (bounded).
                    for round_ in range(CUT_ROUNDS):
                        fresh = [f"cut-{round_}-{i}" for i in range(4)]
                        coaches.extend(fresh)
                        charged.update(dict.fromkeys(fresh, 0))
                        await asyncio.gather(*(work(api, c) for c in fresh))
                        if 503 in statuses:
                            break
            finally:
                stop.set()
                kills = await killing
            assert kills > 0
            assert set(statuses) <= {200, 201, 503}, statuses
            assert 503 in statuses  # the cuts did reach requests in flight

            # Healed: every request succeeds again, and each coach was charged exactly
            # for the commits that answered (a reserve cut after it ran leaves a hold,
            # which never turns into a charge).
            async with asyncio.timeout(HANG_GUARD_SECONDS):
                await until_ready(api)
                for coach, rid in unanswered:
                    # A pooled connection cut while idle fails once; the next is fresh.
                    for _ in range(10):
                        if await commit(api, coach, rid):
                            break
                    else:
                        pytest.fail(f"commit of {rid} never succeeded once the cuts stopped")
                for coach in coaches:
                    r = await api.get(f"/v1/coaches/{coach}/usage")
                    while r.status_code == 503:  # a pooled connection cut while idle
                        r = await api.get(f"/v1/coaches/{coach}/usage")
                    assert r.status_code == 200
                    body = r.json()
                    assert body["used"] == charged[coach]
                    assert body["used"] + body["held"] <= body["allowance"]
                    ok = await api.post(
                        f"/v1/coaches/{coach}/reservations", json={"feature": "checkin_draft"}
                    )
                    assert ok.status_code == 201
    finally:
        await killer.aclose()


# --- Redis back empty ---------------------------------------------------------------


async def test_redis_back_empty_keeps_serving_and_reports_state_lost(
    make_redis: Callable[..., RedisProcess],
    clock: FrozenClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = make_redis()  # no persistence: a restart comes back empty
    settings = Settings(redis_url=server.url, allow_open=True)
    async with served(settings, clock) as (app, api):
        r = await api.post("/v1/coaches/amnesia/reservations", json={"feature": "trend_analysis"})
        assert r.status_code == 201
        assert (
            await api.post(f"/v1/reservations/{r.json()['reservation_id']}/commit")
        ).status_code == 200
        assert (await api.get("/v1/coaches/amnesia/usage")).json()["used"] == 3
        assert metric(app.state.metrics, "credits_redis_state_lost_total") == 0

        server.restart()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="credits.store"):
            async with asyncio.timeout(HANG_GUARD_SECONDS):
                while True:
                    r = await api.post(
                        "/v1/coaches/amnesia/reservations", json={"feature": "checkin_draft"}
                    )
                    assert r.status_code in (201, 503), r.text
                    if r.status_code == 201:
                        break
                    await asyncio.sleep(0.05)

        # The coach starts fresh: the earlier charge is gone, the new hold is the only one.
        assert (r.json()["usage"]["used"], r.json()["usage"]["held"]) == (0, 1)
        assert metric(app.state.metrics, "credits_redis_state_lost_total") == 1
        assert any(
            rec.levelno == logging.WARNING and "REDIS STATE LOST" in rec.getMessage()
            for rec in caplog.records
        )
        exposed = (await api.get("/metrics")).text
        assert "credits_redis_state_lost_total 1.0" in exposed

        # Detected once: later checks see the new epoch and stay quiet.
        assert (await api.get("/readyz")).status_code == 200
        assert metric(app.state.metrics, "credits_redis_state_lost_total") == 1


async def test_flushall_is_reported_by_the_readiness_check(
    make_redis: Callable[..., RedisProcess],
    clock: FrozenClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # FLUSHALL keeps the scripts, so no NOSCRIPT announces it: /readyz must.
    server = make_redis()
    admin = Redis.from_url(server.url, decode_responses=True)
    try:
        async with served(Settings(redis_url=server.url, allow_open=True), clock) as (app, api):
            assert (await api.get("/readyz")).status_code == 200
            await admin.flushall()
            with caplog.at_level(logging.WARNING, logger="credits.store"):
                assert (await api.get("/readyz")).status_code == 200
            assert metric(app.state.metrics, "credits_redis_state_lost_total") == 1
            assert "REDIS STATE LOST" in caplog.text
            assert await admin.get(INSTANCE_KEY) is not None
    finally:
        await admin.aclose()


async def test_script_flush_alone_reloads_scripts_without_claiming_data_loss(
    make_redis: Callable[..., RedisProcess], clock: FrozenClock
) -> None:
    server = make_redis()
    client = connect(Settings(redis_url=server.url, allow_open=True))
    store = new_store(client, clock)
    try:
        await store.ensure_scripts()
        await store.reserve("coach-sf", "checkin_draft")
        before = metric(store.metrics, "credits_scripts_reloaded_total")
        await client.script_flush()
        reservation, _ = await store.reserve("coach-sf", "checkin_draft")
        assert reservation.usage.held == 2
        # One NOSCRIPT reloads every script Redis forgot, each counted once.
        assert metric(store.metrics, "credits_scripts_reloaded_total") == before + len(SCRIPT_NAMES)
        assert metric(store.metrics, "credits_redis_state_lost_total") == 0
    finally:
        await client.aclose()


async def test_every_process_notices_the_loss_once_and_they_agree_on_the_new_epoch(
    clock: FrozenClock,
) -> None:
    server = fakeredis.FakeServer()
    a = new_store(fakeredis.FakeAsyncRedis(server=server, decode_responses=True), clock)
    b = new_store(fakeredis.FakeAsyncRedis(server=server, decode_responses=True), clock)
    assert await a.check_instance()
    assert await b.check_instance()
    assert a.instance_epoch == b.instance_epoch is not None

    await a.redis.flushall()
    assert not await b.check_instance()
    assert not await a.check_instance()
    assert await a.check_instance()
    assert await b.check_instance()
    assert a.instance_epoch == b.instance_epoch
    for s in (a, b):
        assert metric(s.metrics, "credits_redis_state_lost_total") == 1
