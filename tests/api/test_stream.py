"""The live usage stream (Server-Sent Events) against the real service on a private Redis.

Streams need a real server: an in-process ASGI transport collects the whole body
before answering, and a stream has no end.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from ai_credits_client import CreditsClient
from prometheus_client.parser import text_string_to_metric_families

from tests.support.redis import RedisProcess
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
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient(base_url=service.url, headers=headers, timeout=WAIT) as http,
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
