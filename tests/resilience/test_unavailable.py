"""Redis away: every store-backed route answers 503 backend_unavailable with Retry-After
instead of hanging, and the same app heals by itself once Redis is back, even empty.

These run the real connect() path (no injected client) against private redis-server
processes that the tests stop, restart and pause.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from app.config import Settings
from app.domain import Period, ReservationId
from app.main import create_app
from tests.support.http import assert_problem
from tests.support.redis import RedisProcess, free_port

pytestmark = pytest.mark.real_redis

#: A hang guard only: a request that takes this long has hung. Not a speed check.
HANG_GUARD_SECONDS = 10.0
COACH = "coach-away"


@asynccontextmanager
async def service(port: int) -> AsyncIterator[httpx.AsyncClient]:
    """The app as deployed, pointed at a Redis URL, its lifespan running."""
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{port}/0", allow_open=True, redis_timeout_seconds=0.3
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:
            yield client


async def call(
    client: httpx.AsyncClient, method: str, path: str, body: Any = None
) -> httpx.Response:
    return await asyncio.wait_for(
        client.request(method, path, json=body), timeout=HANG_GUARD_SECONDS
    )


def store_routes(rid: str) -> dict[str, tuple[str, str, Any]]:
    """Every route that needs Redis, each with a request that is otherwise valid."""
    return {
        "reserve": ("POST", f"/v1/coaches/{COACH}/reservations", {"feature": "checkin_draft"}),
        "get": ("GET", f"/v1/reservations/{rid}", None),
        "commit": ("POST", f"/v1/reservations/{rid}/commit", None),
        "refund": ("POST", f"/v1/reservations/{rid}/refund", None),
        "usage": ("GET", f"/v1/coaches/{COACH}/usage", None),
        "batch usage": ("POST", "/v1/usage/batch", {"coach_ids": [COACH, "other"]}),
        "readyz": ("GET", "/readyz", None),
        "events": ("GET", f"/v1/coaches/{COACH}/events", None),
        "usage stream": ("GET", f"/v1/coaches/{COACH}/usage/stream", None),
        "batch reserve": (
            "POST",
            "/v1/reservations/batch",
            {"reservations": [{"coach_id": COACH, "feature": "checkin_draft"}]},
        ),
        "batch settle": (
            "POST",
            "/v1/reservations/settle",
            {"settlements": [{"reservation_id": rid, "action": "commit"}]},
        ),
        "extend": ("POST", f"/v1/reservations/{rid}/extend", {"ttl_seconds": 60}),
        "set allowance": ("PUT", f"/v1/coaches/{COACH}/allowance", {"monthly_allowance": 60}),
        "delete allowance": ("DELETE", f"/v1/coaches/{COACH}/allowance", None),
        "grant": ("POST", f"/v1/coaches/{COACH}/grants", {"credits": 1, "reason": "retry"}),
        "list grants": ("GET", f"/v1/coaches/{COACH}/grants", None),
    }


async def assert_all_unavailable(client: httpx.AsyncClient, rid: str) -> None:
    for name, (method, path, body) in store_routes(rid).items():
        resp = await call(client, method, path, body)
        assert resp.status_code == 503, (name, resp.text)
        assert_problem(resp, 503, "backend_unavailable")
        assert int(resp.headers["Retry-After"]) >= 1, name


async def assert_serving(client: httpx.AsyncClient) -> str:
    """A full reserve, read, commit and usage round; returns the committed id."""
    resp = await call(
        client, "POST", f"/v1/coaches/{COACH}/reservations", {"feature": "trend_analysis"}
    )
    assert resp.status_code == 201, resp.text
    rid = str(resp.json()["reservation_id"])
    assert (await call(client, "GET", f"/v1/reservations/{rid}")).status_code == 200
    resp = await call(client, "POST", f"/v1/reservations/{rid}/commit")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "committed"
    resp = await call(client, "POST", "/v1/usage/batch", {"coach_ids": [COACH, "other"]})
    assert resp.status_code == 200, resp.text
    resp = await call(client, "GET", "/readyz")
    assert resp.status_code == 200, resp.text
    return rid


async def test_no_redis_then_redis_arrives(tmp_path: Path) -> None:
    port = free_port()
    made_up = str(ReservationId.new(COACH, Period.containing(datetime.now(UTC))))
    async with service(port) as client:
        await assert_all_unavailable(client, made_up)
        # Routes that never touch Redis keep answering.
        for path in ("/healthz", "/v1/features", "/metrics"):
            assert (await call(client, "GET", path)).status_code == 200, path
        metrics = (await call(client, "GET", "/metrics")).text
        assert "credits_redis_unavailable_total" in metrics

        server = RedisProcess(tmp_path, port=port)
        # Process control runs in a thread: the service's event loop keeps running while
        # Redis comes and goes, as it would in production.
        await asyncio.to_thread(server.start)
        try:
            rid = await assert_serving(client)
            usage = (await call(client, "GET", f"/v1/coaches/{COACH}/usage")).json()
            assert (usage["used"], usage["held"]) == (3, 0)
            assert (await call(client, "GET", f"/v1/reservations/{rid}")).status_code == 200
        finally:
            await asyncio.to_thread(server.stop)

        # Gone again: unavailable again, still without hanging.
        await assert_all_unavailable(client, rid)


async def test_redis_restarts_empty(tmp_path: Path) -> None:
    server = RedisProcess(tmp_path).start()
    try:
        async with service(server.port) as client:
            rid = await assert_serving(client)
            await asyncio.to_thread(server.stop)
            await assert_all_unavailable(client, rid)
            # Back, but empty: no data and no cached scripts.
            await asyncio.to_thread(server.start)
            resp = await call(
                client, "POST", f"/v1/coaches/{COACH}/reservations", {"feature": "checkin_draft"}
            )
            assert resp.status_code == 201, resp.text
            assert resp.json()["usage"]["used"] == 0  # the old month's data went with it
            assert_problem(
                await call(client, "GET", f"/v1/reservations/{rid}"),
                404,
                "reservation_not_found",
            )
            await asyncio.to_thread(server.restart)
            # Every script is gone again; the first call of each kind must still work.
            await assert_serving(client)
    finally:
        server.stop()


async def test_redis_restarts_empty_batch_first(tmp_path: Path) -> None:
    """After an empty restart, a pipelined call (which cannot load scripts on the fly
    like a single call does) is the first to run."""
    server = RedisProcess(tmp_path).start()
    try:
        async with service(server.port) as client:
            await assert_serving(client)
            await asyncio.to_thread(server.restart)
            resp = await call(client, "POST", "/v1/usage/batch", {"coach_ids": [COACH]})
            assert resp.status_code == 200, resp.text
            assert resp.json()["items"][0]["used"] == 0
            resp = await call(
                client,
                "POST",
                "/v1/reservations/batch",
                {"reservations": [{"coach_id": COACH, "feature": "checkin_draft"}]},
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["results"][0]["status"] == 201
    finally:
        server.stop()


async def test_paused_redis_is_503_not_a_hang(tmp_path: Path) -> None:
    # Four calls of at most 0.3 s each must all meet the pause: a long one, so a loaded
    # machine cannot see it end between them.
    pause_ms = 5000
    with RedisProcess(tmp_path) as server:
        async with service(server.port) as client:
            await assert_serving(client)
            admin = Redis.from_url(server.url)
            try:
                paused_at = time.monotonic()
                await admin.client_pause(pause_ms, all=True)
                for method, path, body in (
                    ("POST", f"/v1/coaches/{COACH}/reservations", {"feature": "trend_analysis"}),
                    ("GET", f"/v1/coaches/{COACH}/usage", None),
                    ("POST", "/v1/usage/batch", {"coach_ids": [COACH]}),
                    ("GET", "/readyz", None),
                ):
                    resp = await call(client, method, path, body)
                    assert_problem(resp, 503, "backend_unavailable")
                    assert "Retry-After" in resp.headers
                # Only to let the pause run out; nothing here measures speed.
                await asyncio.sleep(max(0.0, paused_at + pause_ms / 1000 - time.monotonic()))
                await asyncio.wait_for(admin.ping(), HANG_GUARD_SECONDS)
            finally:
                await admin.aclose()
            await assert_serving(client)


async def test_reserve_retried_after_503_never_holds_twice(tmp_path: Path) -> None:
    """A reserve that timed out may still run once Redis wakes up; the caller's retry with
    the same Idempotency-Key then finds that hold instead of making a second one."""
    pause_ms = 4000
    with RedisProcess(tmp_path) as server:
        async with service(server.port) as client:
            await assert_serving(client)  # used 3 from here on
            admin = Redis.from_url(server.url)
            headers = {"Idempotency-Key": "retry-me"}
            path = f"/v1/coaches/{COACH}/reservations"
            body = {"feature": "trend_analysis"}
            try:
                paused_at = time.monotonic()
                await admin.client_pause(pause_ms, all=True)
                resp = await asyncio.wait_for(
                    client.post(path, json=body, headers=headers), HANG_GUARD_SECONDS
                )
                assert_problem(resp, 503, "backend_unavailable")
                await asyncio.sleep(max(0.0, paused_at + pause_ms / 1000 - time.monotonic()))
                await asyncio.wait_for(admin.ping(), HANG_GUARD_SECONDS)
            finally:
                await admin.aclose()
            first = await asyncio.wait_for(
                client.post(path, json=body, headers=headers), HANG_GUARD_SECONDS
            )
            assert first.status_code in (200, 201), first.text
            again = await asyncio.wait_for(
                client.post(path, json=body, headers=headers), HANG_GUARD_SECONDS
            )
            assert again.status_code == 200, again.text
            assert again.json()["reservation_id"] == first.json()["reservation_id"]
            usage = (await call(client, "GET", f"/v1/coaches/{COACH}/usage")).json()
            assert (usage["used"], usage["held"]) == (3, 3)
