"""The live usage stream (Server-Sent Events) against the real service on a private Redis.

Streams need a real server: an in-process ASGI transport collects the whole body
before answering, and a stream has no end. Most tests run the service in a process of
its own; those that count the store calls of the streams run uvicorn in the test's own
event loop, so that they can watch the store.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
import uvicorn
from ai_credits_client import CreditsClient
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from app.config import Scope, Settings
from app.main import create_app
from tests.support.http import assert_problem
from tests.support.redis import RedisProcess, free_port
from tests.support.service import READER_KEY, WORKER_KEY, ServiceProcess

#: Generous bound on waiting for something the service is expected to do; a hang fails.
WAIT = 20.0


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    workdir = tmp_path_factory.mktemp("stream-service")
    env = {"CREDITS_STREAM_POLL_SECONDS": "0.05", "CREDITS_STREAM_HEARTBEAT_SECONDS": "0.3"}
    with RedisProcess(workdir) as redis:
        proc = ServiceProcess(workdir, redis, env).start()
        try:
            yield proc
        finally:
            proc.stop()


@pytest.fixture
async def worker(service: ServiceProcess) -> AsyncIterator[CreditsClient]:
    async with CreditsClient(service.url, api_key=WORKER_KEY) as client:
        yield client


class Stream:
    """Reads one SSE response item by item: ``("usage", {...})`` or ``(":", comment)``."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self) -> tuple[str, Any]:
        async with asyncio.timeout(WAIT):
            event, data = "message", []
            async for line in self._lines:
                if line.startswith(":"):
                    return ":", line[1:].strip()
                if line.startswith("event:"):
                    event = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    data.append(line.removeprefix("data:").strip())
                elif line == "" and data:
                    return event, json.loads("\n".join(data))
            raise EOFError("the stream ended")

    async def next_usage(self) -> dict[str, Any]:
        """The next usage event, skipping keep-alive comments."""
        while True:
            kind, value = await self.next()
            if kind == "usage":
                assert isinstance(value, dict)
                return value


@asynccontextmanager
async def open_stream(service: ServiceProcess, coach: str, key: str) -> AsyncIterator[Stream]:
    async with open_stream_at(service.url, coach, key) as stream:
        yield stream


@asynccontextmanager
async def open_stream_at(url: str, coach: str, key: str) -> AsyncIterator[Stream]:
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient(base_url=url, headers=headers, timeout=WAIT) as http,
        http.stream("GET", f"/v1/coaches/{coach}/usage/stream") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Stream(response)


def new_coach() -> str:
    return f"coach-{uuid.uuid4().hex[:12]}"


async def streams_open(service: ServiceProcess) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{service.url}/metrics")).text
    for family in text_string_to_metric_families(text):
        if family.name == "credits_usage_streams_open":
            return float(family.samples[0].value)
    raise AssertionError("credits_usage_streams_open is missing from /metrics")


async def wait_for_streams_open(service: ServiceProcess, expected: float) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            if await streams_open(service) == expected:
                return
            await asyncio.sleep(0.05)


async def test_first_event_then_one_per_change(
    service: ServiceProcess, worker: CreditsClient
) -> None:
    coach = new_coach()
    async with open_stream(service, coach, READER_KEY) as stream:
        first = await stream.next_usage()
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {READER_KEY}"}) as http:
            assert first == (await http.get(f"{service.url}/v1/coaches/{coach}/usage")).json()
        assert (first["used"], first["held"], first["remaining"]) == (0, 0, 50)

        reservation = await worker.reserve(coach, "trend_analysis")
        held = await stream.next_usage()
        assert (held["used"], held["held"], held["remaining"]) == (0, 3, 47)

        await worker.commit(reservation.reservation_id)
        used = await stream.next_usage()
        assert (used["used"], used["held"], used["remaining"]) == (3, 0, 47)


async def test_nothing_is_sent_without_a_change_but_keep_alives(service: ServiceProcess) -> None:
    coach = new_coach()
    async with open_stream(service, coach, WORKER_KEY) as stream:
        await stream.next_usage()
        for _ in range(3):
            assert await stream.next() == (":", "keep-alive")


async def test_a_lapsed_hold_shows_up_by_itself(
    service: ServiceProcess, worker: CreditsClient
) -> None:
    coach = new_coach()
    async with open_stream(service, coach, READER_KEY) as stream:
        await stream.next_usage()
        await worker.reserve(coach, "checkin_draft", ttl_seconds=1)
        assert (await stream.next_usage())["held"] == 1
        # Nobody calls anything: the hold lapses, and the stream says so.
        lapsed = await stream.next_usage()
        assert (lapsed["used"], lapsed["held"], lapsed["remaining"]) == (0, 0, 50)


async def test_the_stream_ends_when_the_client_disconnects(service: ServiceProcess) -> None:
    await wait_for_streams_open(service, 0)
    async with open_stream(service, new_coach(), READER_KEY) as stream:
        await stream.next_usage()
        assert await streams_open(service) == 1
    await wait_for_streams_open(service, 0)
    assert "Traceback" not in service.log()


@pytest.mark.parametrize(
    ("coach", "key", "status", "code"),
    [
        ("{bad}", READER_KEY, 422, "invalid_coach_id"),
        ("a%2Fb", READER_KEY, 422, "invalid_coach_id"),
        ("coach-1", None, 401, "unauthorized"),
        ("coach-1", "not-a-key-at-all-000", 401, "unauthorized"),
    ],
)
def test_refusals_are_problems_not_streams(
    service: ServiceProcess, coach: str, key: str | None, status: int, code: str
) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(f"{service.url}/v1/coaches/{coach}/usage/stream", headers=headers)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == code


# --- the streams of one process, read together ---------------------------------------------


@asynccontextmanager
async def served_here(app: FastAPI) -> AsyncIterator[str]:
    """``app`` served by uvicorn in this event loop; its base URL."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(WAIT):
            while not server.started:
                if serving.done():
                    serving.result()
                    raise RuntimeError("uvicorn stopped before it started")
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(WAIT):
            await serving


async def eventually(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


@pytest.fixture
async def redis_client(redis_server: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    await client.flushall()
    yield client
    await client.flushall()
    await client.aclose()


def stream_app(redis: Redis, **settings: Any) -> FastAPI:
    keys = {READER_KEY: [Scope.READER], WORKER_KEY: [Scope.WORKER]}
    defaults: dict[str, Any] = {"stream_poll_seconds": 0.05, "stream_heartbeat_seconds": 0.1}
    return create_app(Settings(api_keys=keys, **(defaults | settings)), redis=redis)


async def stream_refusal(url: str, coach: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {READER_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=WAIT) as http:
        return await http.get(f"/v1/coaches/{coach}/usage/stream")


@pytest.mark.real_redis
async def test_one_stream_over_the_cap_is_refused_until_one_closes(redis_client: Redis) -> None:
    app = stream_app(redis_client, streams_max=2, stream_max_seconds=60)
    async with served_here(app) as url, AsyncExitStack() as streams:
        first = await streams.enter_async_context(open_stream_at(url, "cap-a", READER_KEY))
        second = await streams.enter_async_context(open_stream_at(url, "cap-b", READER_KEY))
        for stream in (first, second):
            await stream.next_usage()
        refused = await stream_refusal(url, "cap-c")
        assert_problem(refused, 429, "too_many_streams")
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert app.state.streams.count == 2

        await streams.aclose()  # both clients hang up
        await eventually(lambda: app.state.streams.count == 0)
        async with open_stream_at(url, "cap-c", READER_KEY) as third:
            assert (await third.next_usage())["coach_id"] == "cap-c"


@pytest.mark.real_redis
async def test_a_refused_first_read_gives_its_slot_back(redis_client: Redis) -> None:
    app = stream_app(redis_client, streams_max=1)
    async with served_here(app) as url:
        assert_problem(await stream_refusal(url, "{bad}"), 422, "invalid_coach_id")
        assert app.state.streams.count == 0
        async with open_stream_at(url, "slot-back", READER_KEY) as stream:
            await stream.next_usage()


@pytest.mark.real_redis
async def test_the_streams_of_a_process_are_read_together_once_per_coach(
    redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    coaches = [new_coach() for _ in range(3)]
    app = stream_app(redis_client)
    async with served_here(app) as url, AsyncExitStack() as opened:
        store = app.state.store
        batches: list[list[str]] = []
        singles: list[str] = []
        usage_many, usage = store.usage_many, store.usage

        async def counted_many(coach_ids: list[str]) -> Any:
            batches.append(list(coach_ids))
            return await usage_many(coach_ids)

        async def counted(coach_id: str) -> Any:
            singles.append(coach_id)
            return await usage(coach_id)

        monkeypatch.setattr(store, "usage_many", counted_many)
        monkeypatch.setattr(store, "usage", counted)
        streams = {
            coach: [
                await opened.enter_async_context(open_stream_at(url, coach, READER_KEY))
                for _ in range(4)
            ]
            for coach in coaches
        }
        for stream in [s for per_coach in streams.values() for s in per_coach]:
            await stream.next_usage()
        assert len(singles) == 12  # one read before each stream answers, then none
        batches.clear()
        await eventually(lambda: len(batches) >= 5)
        assert len(singles) == 12
        assert all(sorted(batch) == sorted(coaches) for batch in batches), batches

        # A change reaches every stream of its coach, and those of the others see none.
        await store.reserve(coaches[1], "trend_analysis")
        for stream in streams[coaches[1]]:
            assert (await stream.next_usage())["held"] == 3
        for stream in streams[coaches[0]]:
            assert await stream.next() == (":", "keep-alive")
