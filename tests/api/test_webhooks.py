"""Threshold webhooks over HTTP: configuration, delivery to a real receiver that verifies
signatures, retries with the same webhook-id, a slow endpoint, the deliveries route, and
the sweeper, on fakeredis, a real Redis and a cluster."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import fakeredis
import httpx
import pytest

from app.config import ConfigurationError, Settings, load_settings
from app.main import create_app
from app.metrics import Metrics
from app.store import AnyRedis, CreditStore, utc_now
from app.store.keys import OUTBOX_DUE_SLOTS, SLOT_COUNT
from app.webhooks.config import parse_endpoints
from app.webhooks.dispatcher import QUEUE_SIZE, Dispatcher, next_attempt_ms
from app.webhooks.outbox import Outbox
from app.webhooks.runtime import Webhooks
from app.webhooks.sweeper import Sweeper
from tests.support.service import ADMIN_KEY, READER_KEY, WORKER_KEY
from tests.support.webhooks import Receiver, new_secret, spend

#: Far above any wait a passing test needs: tripping it means something hung.
HANG_GUARD_SECONDS = 60.0

URL_A = "http://127.0.0.1:9/a"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


# --- configuration ------------------------------------------------------------------

SECRET = new_secret()


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The environment without any CREDITS_ setting of the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("CREDITS_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize(
    "value",
    [
        "not json " + SECRET,
        json.dumps({"url": URL_A, "secret": SECRET}),
        json.dumps([{"url": "ftp://127.0.0.1/x", "secret": SECRET}]),
        json.dumps([{"url": "http:///no-host", "secret": SECRET}]),
        json.dumps([{"url": "http://127.0.0.1/a b", "secret": SECRET}]),
        json.dumps([{"url": URL_A, "secret": SECRET[:-24]}]),
        json.dumps([{"url": URL_A, "secret": SECRET.removeprefix("whsec_")}]),
        json.dumps([{"url": URL_A, "secret": SECRET, "extra": 1}]),
        json.dumps([{"url": URL_A, "secret": SECRET}, {"url": URL_A, "secret": SECRET}]),
    ],
    ids=[
        "not-json",
        "not-a-list",
        "ftp",
        "no-host",
        "space",
        "short-secret",
        "no-prefix",
        "extra-field",
        "same-url-twice",
    ],
)
def test_a_webhook_configuration_error_names_the_setting_and_never_prints_the_secret(
    environment: pytest.MonkeyPatch, value: str
) -> None:
    environment.setenv("CREDITS_WEBHOOKS", value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("invalid configuration: CREDITS_WEBHOOKS: ")
    assert SECRET.removeprefix("whsec_")[:16] not in message
    assert SECRET[:-24].removeprefix("whsec_") not in message
    assert "127.0.0.1" not in message


def test_webhook_endpoints_may_be_http_or_https_on_loopback_or_private_addresses(
    environment: pytest.MonkeyPatch,
) -> None:
    urls = ["http://127.0.0.1:8080/hooks", "https://10.0.0.7/credits", "http://[::1]:9/x"]
    endpoints = json.dumps([{"url": u, "secret": SECRET} for u in urls])
    environment.setenv("CREDITS_WEBHOOKS", endpoints)
    settings = load_settings()
    assert [e.url for e in settings.webhooks] == urls
    assert SECRET not in repr(settings)
    assert parse_endpoints("") == ()
    assert settings.webhook_retry_seconds[0] <= 30  # the first retry within 30 s


def test_a_bad_retry_schedule_names_its_setting(environment: pytest.MonkeyPatch) -> None:
    environment.setenv("CREDITS_WEBHOOK_RETRY_SECONDS", "[0]")
    with pytest.raises(ConfigurationError, match="CREDITS_WEBHOOK_RETRY_SECONDS: must be"):
        load_settings()
    environment.setenv("CREDITS_WEBHOOK_RETRY_SECONDS", "[1, 2.5]")
    assert load_settings().webhook_retry_seconds == (1.0, 2.5)


def test_retries_follow_the_schedule_and_stop_at_the_window() -> None:
    schedule = (10.0, 30.0)
    assert next_attempt_ms(1, 0, 1000, schedule, 3600) == 11_000
    assert next_attempt_ms(2, 0, 1000, schedule, 3600) == 31_000
    assert next_attempt_ms(7, 0, 1000, schedule, 3600) == 31_000  # the last delay repeats
    assert next_attempt_ms(2, 0, 3_590_000, schedule, 3600) is None


# --- delivery over HTTP ---------------------------------------------------------------


def hook_settings(receiver: Receiver, **overrides: Any) -> Settings:
    """Short waits everywhere, so retries and sweeps happen within a test."""
    values: dict[str, Any] = {
        "webhooks": [receiver.endpoint()],
        "webhook_retry_seconds": [0.2],
        "webhook_sweep_seconds": 0.1,
        "webhook_timeout_seconds": 1.0,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
async def serve(backend: AnyRedis) -> AsyncIterator[Any]:
    """Runs the app (real clock) with given settings on the parametrized backend."""
    stack: list[Any] = []

    async def start(settings: Settings) -> tuple[httpx.AsyncClient, Webhooks]:
        app = create_app(settings, redis=backend, clock=utc_now)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        stack.append(lifespan)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c")
        stack.append(client)
        return client, app.state.webhooks

    yield start
    for item in reversed(stack):
        await item.__aexit__(None, None, None)


async def spend_http(client: httpx.AsyncClient, coach: str, credits: int) -> dict[str, Any]:
    """Reserves and commits actions costing ``credits`` in all; the last commit's body."""
    body: dict[str, Any] = {}
    while credits > 0:
        feature = "trend_analysis" if credits >= 3 else "checkin_draft"
        held = await client.post(f"/v1/coaches/{coach}/reservations", json={"feature": feature})
        assert held.status_code == 201, held.text
        done = await client.post(f"/v1/reservations/{held.json()['reservation_id']}/commit")
        assert done.status_code == 200, done.text
        body = done.json()
        credits -= body["cost"]
    return body


async def listed(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    resp = await client.get("/v1/webhook-deliveries", params=params)
    assert resp.status_code == 200, resp.text
    deliveries: list[dict[str, Any]] = resp.json()["deliveries"]
    return deliveries


async def until_listed(
    client: httpx.AsyncClient, check: Any, **params: Any
) -> list[dict[str, Any]]:
    async with asyncio.timeout(HANG_GUARD_SECONDS):
        while True:
            found = await listed(client, **params)
            if check(found):
                return found
            await asyncio.sleep(0.05)


async def test_a_crossing_is_delivered_signed_with_the_usage_as_the_api_renders_it(
    serve: Any, receiver: Receiver
) -> None:
    client, _ = await serve(hook_settings(receiver))
    committed = await spend_http(client, "coach-h1", 36)
    [got] = await receiver.arrival(lambda r: len(r) >= 1)
    assert got.verified
    assert got.path == "/hooks"
    assert got.body["type"] == "usage.threshold_crossed"
    data = got.body["data"]
    assert (data["threshold"], data["coach_id"], data["period"]) == (
        70,
        "coach-h1",
        committed["period"],
    )
    assert data["usage"] == committed["usage"]
    assert data["usage"] == (await client.get("/v1/coaches/coach-h1/usage")).json()
    assert got.body["timestamp"].endswith("Z")
    [delivery] = await until_listed(client, lambda d: d and d[0]["status"] == "delivered")
    assert delivery == {
        "webhook_id": got.webhook_id,
        "type": "usage.threshold_crossed",
        "url": receiver.url,
        "attempts": 1,
        "status": "delivered",
        "last_error": None,
        "next_attempt_at": None,
    }
    metrics = (await client.get("/metrics")).text
    assert 'credits_webhook_deliveries_total{outcome="delivered"} 1.0' in metrics
    assert "credits_webhook_delivery_lag_seconds_count 1.0" in metrics
    # The rest of the month: 90 % and 100 %, one each.
    await spend_http(client, "coach-h1", 14)
    got_all = await receiver.arrival(lambda r: len(r) >= 3)
    assert sorted(r.body["data"]["threshold"] for r in got_all) == [70, 90, 100]
    assert len({r.webhook_id for r in got_all}) == 3


async def test_an_endpoint_that_is_down_for_a_while_gets_the_delivery_with_the_same_webhook_id(
    serve: Any,
) -> None:
    receiver = Receiver()  # not listening yet: connections are refused
    client, _ = await serve(hook_settings(receiver))
    await spend_http(client, "coach-h2", 36)
    [pending] = await until_listed(client, lambda d: d and d[0]["attempts"] >= 2)
    assert pending["status"] == "pending"
    assert pending["last_error"]
    assert "Connect" in pending["last_error"]
    assert pending["next_attempt_at"] is not None
    receiver.start()
    try:
        got = await receiver.arrival(lambda r: len(r) >= 1)
        [delivered] = await until_listed(client, lambda d: d[0]["status"] == "delivered")
    finally:
        receiver.stop()
    assert {r.webhook_id for r in got} == {pending["webhook_id"]} == {delivered["webhook_id"]}
    assert all(r.verified for r in got)
    assert delivered["attempts"] > pending["attempts"]


async def test_an_endpoint_answering_errors_is_retried_then_served_with_the_same_webhook_id(
    serve: Any, receiver: Receiver
) -> None:
    receiver.answer(503)
    client, _ = await serve(hook_settings(receiver))
    await spend_http(client, "coach-h3", 36)
    failing = await receiver.arrival(lambda r: len(r) >= 3)
    await until_metric(client, "credits_webhook_deliveries_pending 1.0")
    receiver.answer(200)
    [delivered] = await until_listed(client, lambda d: d[0]["status"] == "delivered")
    got = receiver.snapshot()
    assert len(got) >= len(failing) + 1
    assert {r.webhook_id for r in got} == {delivered["webhook_id"]}
    # Each attempt is signed when sent, and verifies.
    assert all(r.verified for r in got)
    assert delivered["last_error"] == "HTTP 503"
    metrics = await until_metric(client, "credits_webhook_deliveries_pending 0.0")
    assert 'credits_webhook_deliveries_total{outcome="retry"}' in metrics


async def until_metric(client: httpx.AsyncClient, line: str) -> str:
    """The metrics page, once it shows ``line``."""
    async with asyncio.timeout(HANG_GUARD_SECONDS):
        while True:
            text = (await client.get("/metrics")).text
            if line in text.splitlines():
                return text
            await asyncio.sleep(0.05)


def test_attempts_wait_in_a_bounded_queue_and_the_rest_in_redis() -> None:
    dispatcher = Dispatcher(
        Outbox(CreditStore(fakeredis.FakeAsyncRedis()), [URL_A], keep=100),
        [],
        timeout_seconds=1,
        retry_seconds=[1],
        retry_window_seconds=10,
        feature_costs={},
        metrics=Metrics(),
    )
    ids = [f"{URL_A} msg_{i}" for i in range(QUEUE_SIZE + 5)]
    assert dispatcher.submit(7, ids, fresh=True) is False
    assert dispatcher.queue.qsize() == QUEUE_SIZE


async def test_a_delivery_still_failing_after_the_retry_window_is_given_up(
    serve: Any, receiver: Receiver
) -> None:
    receiver.answer(500)
    client, _ = await serve(hook_settings(receiver, webhook_retry_window_seconds=0.5))
    await spend_http(client, "coach-h4", 36)
    [failed] = await until_listed(client, lambda d: len(d) == 1, status="failed")
    assert failed["last_error"] == "HTTP 500"
    assert failed["next_attempt_at"] is None
    assert await listed(client, status="pending") == []
    assert await listed(client, status="delivered") == []
    metrics = (await client.get("/metrics")).text
    assert 'credits_webhook_deliveries_total{outcome="failed"} 1.0' in metrics


async def test_a_slow_endpoint_never_holds_up_the_credit_routes(
    serve: Any, receiver: Receiver
) -> None:
    receiver.hold.set()
    client, _ = await serve(hook_settings(receiver))
    await spend_http(client, "coach-h5", 36)
    await receiver.arrival(lambda r: len(r) >= 1)
    # The delivery is in flight and unanswered; the credit routes answer meanwhile.
    await spend_http(client, "coach-h5", 14)
    await spend_http(client, "coach-h6", 50)
    assert receiver.answered == 0
    receiver.hold.clear()
    await until_listed(client, lambda d: len(d) == 6 and all(x["status"] == "delivered" for x in d))


async def test_the_deliveries_route_is_for_admins_and_checks_its_query(
    serve: Any, receiver: Receiver
) -> None:
    keys = {WORKER_KEY: ["worker"], READER_KEY: ["reader"], ADMIN_KEY: ["admin"]}
    client, _ = await serve(hook_settings(receiver, api_keys=keys))
    path = "/v1/webhook-deliveries"
    assert (await client.get(path)).status_code == 401
    for key in (WORKER_KEY, READER_KEY):
        resp = await client.get(path, headers={"authorization": f"Bearer {key}"})
        assert resp.status_code == 403
        assert resp.json()["code"] == "forbidden"
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    assert (await client.get(path, headers=admin)).json() == {"deliveries": []}
    for bad in ({"status": "lost"}, {"limit": 0}, {"limit": 501}):
        resp = await client.get(path, params=bad, headers=admin)
        assert resp.status_code == 422
        assert resp.json()["code"] == "invalid_request"


async def test_the_sweeper_delivers_what_a_process_recorded_but_never_noted(
    serve: Any, backend: AnyRedis, receiver: Receiver
) -> None:
    # A process that died right after its commit answered: the delivery is in the
    # outbox, and no index names its slot.
    gone = CreditStore(backend, clock=utc_now)
    gone.outbox = Outbox(gone, [receiver.url], keep=1000)
    await spend(gone, "coach-h7", 36)
    assert await backend.zcard(OUTBOX_DUE_SLOTS) == 0
    client, webhooks = await serve(hook_settings(receiver))
    assert webhooks.sweeper is not None
    webhooks.sweeper.per_sweep = SLOT_COUNT  # look over every slot at once
    [got] = await receiver.arrival(lambda r: len(r) >= 1)
    assert got.verified
    assert got.body["data"]["coach_id"] == "coach-h7"
    await until_listed(client, lambda d: d and d[0]["status"] == "delivered")


async def test_one_process_at_a_time_holds_the_sweeper_lease(
    backend: AnyRedis, receiver: Receiver
) -> None:
    settings = hook_settings(receiver, webhook_sweep_seconds=5.0)
    sweepers: list[Sweeper] = []
    for _ in range(2):
        runtime = Webhooks(CreditStore(backend, clock=utc_now), settings, Metrics())
        assert runtime.sweeper is not None
        sweepers.append(runtime.sweeper)
    first, second = sweepers
    assert await first.sweep() is True
    assert await second.sweep() is False
    assert await first.sweep() is True  # renewed by its holder
    await first.release()
    assert await second.sweep() is True
    assert await first.sweep() is False
    await second.release()
