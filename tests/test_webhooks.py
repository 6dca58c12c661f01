"""Threshold webhooks: configuration, the decision in the commit's own script call, the
outbox's bounds and claims, delivery to a real HTTP receiver that verifies signatures,
retries, the sweeper, and a service killed between commit and delivery."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from app.config import Settings
from app.domain import Period, to_ms
from app.main import create_app
from app.metrics import Metrics
from app.store import AnyRedis, CreditStore, period_keys, utc_now
from app.store.keys import (
    OUTBOX_DUE_SLOTS,
    SLOT_COUNT,
    coach_slot,
    key_slot_of,
    outbox_keys,
)
from app.store.replies import text
from app.webhooks.config import parse_endpoints
from app.webhooks.dispatcher import next_attempt_ms
from app.webhooks.outbox import Delivery, Outbox
from app.webhooks.runtime import Webhooks
from app.webhooks.sweeper import Sweeper
from tests.cluster import wait_for
from tests.conftest import FrozenClock
from tests.redis_procs import RedisProcess
from tests.service_proc import ADMIN_KEY, READER_KEY, WORKER_KEY, ServiceProcess
from tests.webhook_receiver import Receiver, new_secret

#: Far above any wait a passing test needs: tripping it means something hung.
HANG_GUARD_SECONDS = 60.0

URL_A = "http://127.0.0.1:9/a"
URL_B = "https://10.1.2.3:8443/b"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


class Handed:
    """Stands in for the dispatcher: what commits handed over, by slot."""

    def __init__(self) -> None:
        self.got: list[tuple[int, list[str]]] = []

    def __call__(self, slot: int, ids: list[str]) -> None:
        self.got.append((slot, ids))

    @property
    def ids(self) -> list[str]:
        return [i for _, some in self.got for i in some]


def with_outbox(store: CreditStore, urls: list[str], keep: int = 1000) -> tuple[Outbox, Handed]:
    outbox = Outbox(store, urls, keep=keep)
    handed = Handed()
    outbox.on_recorded = handed
    store.outbox = outbox
    return outbox, handed


async def spend(store: CreditStore, coach: str, credits: int) -> None:
    """Commits actions that cost ``credits`` in all, one by one."""
    while credits > 0:
        feature = "trend_analysis" if credits >= 3 else "checkin_draft"
        reservation, _ = await store.reserve(coach, feature)
        await store.commit(str(reservation.reservation_id))
        credits -= reservation.cost


async def records(redis: AnyRedis, coach: str) -> list[Delivery]:
    slot = coach_slot(coach)
    raw = await redis.hgetall(outbox_keys(slot).deliveries)
    return sorted(
        (Delivery.parse(slot, text(k), v) for k, v in raw.items()),
        key=lambda d: (d.threshold, d.url),
    )


# --- configuration ------------------------------------------------------------------

SECRET = new_secret()


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
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("CREDITS_WEBHOOKS", value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    message = str(caught.value)
    assert "CREDITS_WEBHOOKS" in message
    assert SECRET.removeprefix("whsec_")[:16] not in message
    assert SECRET[:-24].removeprefix("whsec_") not in message
    assert "127.0.0.1" not in message


def test_webhook_endpoints_may_be_http_or_https_on_loopback_or_private_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    urls = ["http://127.0.0.1:8080/hooks", "https://10.0.0.7/credits", "http://[::1]:9/x"]
    monkeypatch.setenv("CREDITS_WEBHOOKS", json.dumps([{"url": u, "secret": SECRET} for u in urls]))
    settings = Settings()
    assert [e.url for e in settings.webhooks] == urls
    assert SECRET not in repr(settings)
    assert parse_endpoints("") == ()
    assert Settings().webhook_retry_seconds[0] <= 30  # the first retry within 30 s


def test_a_bad_retry_schedule_names_its_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDITS_WEBHOOK_RETRY_SECONDS", "[0]")
    with pytest.raises(ValidationError, match="CREDITS_WEBHOOK_RETRY_SECONDS"):
        Settings()
    monkeypatch.setenv("CREDITS_WEBHOOK_RETRY_SECONDS", "[1, 2.5]")
    assert Settings().webhook_retry_seconds == (1.0, 2.5)


def test_retries_follow_the_schedule_and_stop_at_the_window() -> None:
    schedule = (10.0, 30.0)
    assert next_attempt_ms(1, 0, 1000, schedule, 3600) == 11_000
    assert next_attempt_ms(2, 0, 1000, schedule, 3600) == 31_000
    assert next_attempt_ms(7, 0, 1000, schedule, 3600) == 31_000  # the last delay repeats
    assert next_attempt_ms(2, 0, 3_590_000, schedule, 3600) is None


# --- the decision, in the commit's script call ---------------------------------------


async def test_a_commit_that_passes_70_percent_records_one_delivery_per_endpoint(
    store: CreditStore, backend: AnyRedis
) -> None:
    _, handed = with_outbox(store, [URL_A, URL_B])
    await spend(store, "coach-1", 35)  # 70 % exactly: not past it
    assert handed.got == []
    await spend(store, "coach-1", 1)
    [(slot, ids)] = handed.got
    assert slot == coach_slot("coach-1")
    assert key_slot_of(outbox_keys(slot).deliveries) == slot
    found = await records(backend, "coach-1")
    assert sorted(ids) == sorted(d.id for d in found)
    assert [(d.url, d.threshold, d.status, d.attempts) for d in found] == [
        (URL_A, 70, "pending", 0),
        (URL_B, 70, "pending", 0),
    ]
    first = found[0]
    assert first.webhook_id == found[1].webhook_id  # one event, one id on every endpoint
    assert (first.coach_id, first.period, first.used, first.allowance) == (
        "coach-1",
        str(Period.containing(store.clock())),
        36,
        50,
    )
    assert first.next_attempt_at == first.recorded_at  # due at once


async def test_a_commit_passing_several_thresholds_records_one_delivery_per_threshold(
    store: CreditStore, backend: AnyRedis
) -> None:
    _, handed = with_outbox(store, [URL_A])
    reservation, _ = await store.reserve("coach-2", "trend_analysis")
    store.allowance = 3  # lowered while the hold lives: its commit uses all of it
    await store.commit(str(reservation.reservation_id))
    assert [d.threshold for d in await records(backend, "coach-2")] == [70, 90, 100]
    assert len(handed.ids) == 3


async def test_thresholds_are_notified_once_per_period_and_never_rearmed(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    _, handed = with_outbox(store, [URL_A])
    await spend(store, "coach-3", 36)
    assert len(handed.ids) == 1
    store.allowance = 100  # 36 % now: 70 % is passed again later, and not sent again
    await spend(store, "coach-3", 90 - 36)
    assert len(handed.ids) == 1
    await spend(store, "coach-3", 1)
    assert [d.threshold for d in await records(backend, "coach-3")] == [70, 90]
    clock.set(Period.containing(clock()).resets_at + timedelta(hours=1))
    store.allowance = 50
    await spend(store, "coach-3", 36)  # a new period notifies afresh
    assert len(handed.ids) == 3


async def test_refunds_and_repeated_commits_record_nothing(
    store: CreditStore, backend: AnyRedis
) -> None:
    _, handed = with_outbox(store, [URL_A])
    await spend(store, "coach-4", 33)
    last, _ = await store.reserve("coach-4", "trend_analysis")
    await store.commit(str(last.reservation_id))
    assert len(handed.ids) == 1
    await store.commit(str(last.reservation_id))
    refunded, _ = await store.reserve("coach-4", "trend_analysis")
    await store.refund(str(refunded.reservation_id))
    assert len(handed.ids) == 1
    assert len(await records(backend, "coach-4")) == 1


async def test_without_endpoints_a_commit_leaves_no_outbox_and_no_mark(
    store: CreditStore, backend: AnyRedis
) -> None:
    await spend(store, "coach-5", 50)
    assert await records(backend, "coach-5") == []
    account = period_keys("coach-5", Period.containing(store.clock())).account
    assert await backend.hget(account, "wh") is None


async def test_a_batch_settlement_hands_over_what_its_commits_recorded(
    store: CreditStore, backend: AnyRedis
) -> None:
    _, handed = with_outbox(store, [URL_A])
    held = [(await store.reserve("coach-6", "trend_analysis"))[0] for _ in range(16)]
    await store.settle_many([(str(r.reservation_id), "commit") for r in held])
    assert sorted(d.threshold for d in await records(backend, "coach-6")) == [70, 90]
    assert len(handed.ids) == 2


async def test_concurrent_commits_crossing_thresholds_record_exactly_one_delivery_each(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    # Two stores on one Redis stand for two service processes.
    other = CreditStore(backend, clock=clock)
    _, handed = with_outbox(store, [URL_A, URL_B])
    _, handed_other = with_outbox(other, [URL_A, URL_B])
    coaches = [f"busy-{i}" for i in range(4)]
    holds = [
        (await store.reserve(c, "checkin_draft"))[0].reservation_id
        for c in coaches
        for _ in range(50)
    ]
    await asyncio.gather(
        *((store if i % 2 else other).commit(str(rid)) for i, rid in enumerate(holds))
    )
    for coach in coaches:
        found = await records(backend, coach)
        assert [(d.threshold, d.url) for d in found] == [
            (t, u) for t in (70, 90, 100) for u in (URL_A, URL_B)
        ]
    handed_ids = handed.ids + handed_other.ids
    assert len(handed_ids) == len(set(handed_ids)) == len(coaches) * 6


def coaches_in_one_slot(count: int) -> list[str]:
    slot = coach_slot("slot-mate-0")
    found, n = ["slot-mate-0"], 1
    while len(found) < count:
        candidate = f"slot-mate-{n}"
        if coach_slot(candidate) == slot:
            found.append(candidate)
        n += 1
    return found


async def test_an_outbox_keeps_at_most_its_bound_and_nothing_older_than_seven_days(
    store: CreditStore, backend: AnyRedis, clock: FrozenClock
) -> None:
    with_outbox(store, [URL_A], keep=4)
    first, second, third = coaches_in_one_slot(3)
    keys = outbox_keys(coach_slot(first))
    await spend(store, first, 50)
    clock.advance(seconds=1)
    await spend(store, second, 50)
    # Six recorded, four kept: the newest.
    assert await backend.zcard(keys.log) == 4
    assert await backend.hlen(keys.deliveries) == 4
    kept = [d.coach_id for d in await records(backend, first)]
    assert kept.count(second) == 3
    assert kept.count(first) == 1
    # The outbox goes seven days after its newest delivery.
    for key in (keys.deliveries, keys.due, keys.log):
        assert await backend.pexpiretime(key) == to_ms(clock()) + 7 * 86_400_000
    clock.advance(days=8)  # same month: the old ones age out when the outbox is next written
    await spend(store, third, 36)
    assert [d.coach_id for d in await records(backend, first)] == [third]
    assert await backend.zcard(keys.log) == 1
    assert await backend.zcard(keys.due) == 1


async def test_a_claim_admits_one_attempt_at_a_time(store: CreditStore, backend: AnyRedis) -> None:
    outbox, handed = with_outbox(store, [URL_A])
    await spend(store, "coach-7", 36)
    [(slot, [delivery_id])] = handed.got
    now = outbox.now_ms()
    first = await outbox.claim(slot, delivery_id, now, now + 1000)
    assert first is not None
    assert first.attempts == 1
    assert await outbox.claim(slot, delivery_id, now + 999, now + 2000) is None
    # The claim lapses (its process died): another attempt takes over.
    second = await outbox.claim(slot, delivery_id, now + 1000, now + 3000)
    assert second is not None
    assert second.attempts == 2
    assert (
        await outbox.finish(first, "retry", now_ms=now, next_attempt_ms=now, error="x") == "STALE"
    )
    # A delivery counts whichever attempt made it.
    assert await outbox.finish(first, "delivered", now_ms=now + 1500) == "OK"
    assert await outbox.finish(second, "retry", now_ms=now, next_attempt_ms=now) == "DONE"
    assert await outbox.claim(slot, delivery_id, now + 10_000, now + 20_000) is None
    [done] = await records(backend, "coach-7")
    assert (done.status, done.attempts, done.next_attempt_at) == ("delivered", 2, None)


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
    receiver.answer(200)
    [delivered] = await until_listed(client, lambda d: d[0]["status"] == "delivered")
    got = receiver.snapshot()
    assert len(got) >= len(failing) + 1
    assert {r.webhook_id for r in got} == {delivered["webhook_id"]}
    # Each attempt is signed when sent, and verifies.
    assert all(r.verified for r in got)
    assert delivered["last_error"] == "HTTP 503"
    metrics = (await client.get("/metrics")).text
    assert 'credits_webhook_deliveries_total{outcome="retry"}' in metrics


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


# --- a real service, killed ---------------------------------------------------------


@pytest.mark.real_redis
def test_a_service_killed_between_commit_and_delivery_delivers_after_restart(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.hold.set()  # the first attempt hangs: the kill lands before any answer
    env = {
        "CREDITS_WEBHOOKS": json.dumps([receiver.endpoint()]),
        "CREDITS_WEBHOOK_TIMEOUT_SECONDS": "1",
        "CREDITS_WEBHOOK_SWEEP_SECONDS": "0.2",
        "CREDITS_WEBHOOK_RETRY_SECONDS": "[0.5]",
    }
    worker = {"authorization": f"Bearer {WORKER_KEY}"}
    with RedisProcess(tmp_path) as redis:
        first = ServiceProcess(tmp_path, redis, env).start()
        try:
            for _ in range(12):
                held = httpx.post(
                    f"{first.url}/v1/coaches/coach-k/reservations",
                    json={"feature": "trend_analysis"},
                    headers=worker,
                    timeout=10,
                )
                rid = held.json()["reservation_id"]
                done = httpx.post(
                    f"{first.url}/v1/reservations/{rid}/commit", headers=worker, timeout=10
                )
                assert done.status_code == 200
            [attempt] = receiver.wait_for(lambda r: len(r) >= 1)
            assert first.proc is not None
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(timeout=10)
        finally:
            first.stop()
        assert receiver.answered == 0
        receiver.hold.clear()
        second = ServiceProcess(tmp_path, redis, env).start()
        try:
            got = receiver.wait_for(lambda r: len(r) >= 2)
            assert {r.webhook_id for r in got} == {attempt.webhook_id}
            assert all(r.verified for r in got)
            admin = {"authorization": f"Bearer {ADMIN_KEY}"}

            def delivered() -> list[Any]:
                url = f"{second.url}/v1/webhook-deliveries?status=delivered"
                found: list[Any] = httpx.get(url, headers=admin, timeout=10).json()["deliveries"]
                return found

            wait_for("the delivery recorded as delivered", lambda: bool(delivered()), 20)
            [done] = delivered()
            assert done["webhook_id"] == attempt.webhook_id
            assert done["attempts"] >= 2
        finally:
            second.stop()
