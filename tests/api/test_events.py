"""The event log: GET /v1/coaches/{coach_id}/events, on fakeredis and on a real Redis.

The central property: replaying the whole log reproduces the ledger's counters exactly,
and paging through it visits every event once, newest first.
"""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import Scope, Settings
from app.domain import Period
from app.main import create_app
from app.store import AnyRedis, period_keys
from tests.support.clock import FrozenClock

COACH = "coach-events-1"
PERIOD = Period(2099, 11)


async def all_events(api: httpx.AsyncClient, coach: str, *, limit: int, **params: str) -> list[Any]:
    """Every event, following next_before from page to page."""
    events: list[Any] = []
    query: dict[str, str | int] = {"limit": limit, **params}
    for _ in range(10_000):
        r = await api.get(f"/v1/coaches/{coach}/events", params=query)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["events"]) <= limit
        events.extend(body["events"])
        if body["next_before"] is None:
            return events
        assert body["next_before"] == body["events"][-1]["seq"]
        query["before"] = body["next_before"]
    raise AssertionError("pagination did not end")


def replay(events: list[Any]) -> tuple[int, int, dict[str, str]]:
    """(used, held, final state per reservation) from the log alone, oldest first."""
    state: dict[str, str] = {}
    cost: dict[str, int] = {}
    for e in sorted(events, key=lambda e: e["seq"]):
        rid = e["reservation_id"]
        if e["kind"] == "held":
            assert rid not in state, "a reservation was held twice"
            state[rid], cost[rid] = "held", e["cost"]
        else:
            assert state.get(rid) == "held", f"{e['kind']} of a hold that was not live"
            assert e["cost"] == cost[rid]
            state[rid] = e["kind"]
    used = sum(cost[r] for r, s in state.items() if s == "committed")
    held = sum(cost[r] for r, s in state.items() if s == "held")
    return used, held, state


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_replaying_the_log_reproduces_the_counters(
    api: httpx.AsyncClient, backend: AnyRedis, clock: FrozenClock, seed: int
) -> None:
    rng = random.Random(seed)
    issued: dict[str, dict[str, Any]] = {}
    committed_by_us: dict[str, int] = {}
    for _ in range(160):
        roll = rng.random()
        if roll < 0.45 or not issued:
            r = await api.post(
                f"/v1/coaches/{COACH}/reservations",
                json={
                    "feature": rng.choice(["checkin_draft", "trend_analysis"]),
                    "ttl_seconds": rng.choice([5, 60, 600]),
                },
            )
            assert r.status_code in (201, 429), r.text
            if r.status_code == 201:
                issued[r.json()["reservation_id"]] = r.json()
        elif roll < 0.85:
            rid = rng.choice(list(issued))
            action = rng.choice(["commit", "refund"])
            r = await api.post(f"/v1/reservations/{rid}/{action}")
            assert r.status_code in (200, 409), r.text
            if r.status_code == 200 and r.json()["status"] == "committed":
                committed_by_us[rid] = r.json()["cost"]
        else:
            clock.advance(rng.choice([1, 10, 70, 400]))

    events = await all_events(api, COACH, limit=7)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(len(events), 0, -1)), "every event once, newest first"
    assert events == await all_events(api, COACH, limit=500)

    used, held, states = replay(events)
    assert set(states) == set(issued), "exactly the reservations the API handed out"
    assert used == sum(committed_by_us.values())
    assert {r for r, s in states.items() if s == "committed"} == set(committed_by_us)
    for e in events:
        if e["kind"] == "expired":
            # An expiry is dated when the hold lapsed, whenever it was noticed.
            assert e["at"] == issued[e["reservation_id"]]["expires_at"]

    # The raw counters include holds that lapsed but were not yet noticed: exactly the
    # holds the log shows as still live.
    keys = period_keys(COACH, PERIOD)
    raw_used, raw_held = await backend.hmget(keys.account, ["used", "held"])
    assert (int(raw_used or 0), int(raw_held or 0)) == (used, held)

    # Any change on the coach notices lapsed holds; then the log and the usage agree.
    any_rid = next(iter(issued))
    assert (await api.post(f"/v1/reservations/{any_rid}/refund")).status_code in (200, 409)
    used, held, _ = replay(await all_events(api, COACH, limit=50))
    usage = (await api.get(f"/v1/coaches/{COACH}/usage")).json()
    assert (usage["used"], usage["held"]) == (used, held)


async def test_event_fields_and_order(api: httpx.AsyncClient, clock: FrozenClock) -> None:
    a = await api.post(f"/v1/coaches/{COACH}/reservations", json={"feature": "trend_analysis"})
    clock.advance(1)
    b = await api.post(
        f"/v1/coaches/{COACH}/reservations", json={"feature": "checkin_draft", "ttl_seconds": 5}
    )
    clock.advance(1)
    await api.post(f"/v1/reservations/{a.json()['reservation_id']}/commit")
    clock.advance(10)
    await api.post(f"/v1/reservations/{a.json()['reservation_id']}/commit")  # a repeat: no event
    r = await api.get(f"/v1/coaches/{COACH}/events")
    assert r.status_code == 200
    body = r.json()
    assert body["next_before"] is None
    b_id, a_id = b.json()["reservation_id"], a.json()["reservation_id"]
    assert body["events"] == [
        # Noticed by the repeated commit, dated when b lapsed, numbered when noticed.
        {
            "seq": 4,
            "at": "2099-11-14T12:00:06Z",
            "kind": "expired",
            "reservation_id": b_id,
            "feature": "checkin_draft",
            "cost": 1,
        },
        {
            "seq": 3,
            "at": "2099-11-14T12:00:02Z",
            "kind": "committed",
            "reservation_id": a_id,
            "feature": "trend_analysis",
            "cost": 3,
        },
        {
            "seq": 2,
            "at": "2099-11-14T12:00:01Z",
            "kind": "held",
            "reservation_id": b_id,
            "feature": "checkin_draft",
            "cost": 1,
        },
        {
            "seq": 1,
            "at": "2099-11-14T12:00:00Z",
            "kind": "held",
            "reservation_id": a_id,
            "feature": "trend_analysis",
            "cost": 3,
        },
    ]
    page = (await api.get(f"/v1/coaches/{COACH}/events", params={"limit": 2})).json()
    assert [e["seq"] for e in page["events"]] == [4, 3]
    assert page["next_before"] == 3
    page = (await api.get(f"/v1/coaches/{COACH}/events", params={"before": 3})).json()
    assert [e["seq"] for e in page["events"]] == [2, 1]
    assert page["next_before"] is None
    page = (await api.get(f"/v1/coaches/{COACH}/events", params={"before": 1})).json()
    assert page == {"events": [], "next_before": None}
    # A cursor past the newest event starts at the newest.
    page = (await api.get(f"/v1/coaches/{COACH}/events", params={"before": 99})).json()
    assert [e["seq"] for e in page["events"]] == [4, 3, 2, 1]


async def test_other_months_keep_their_own_log(api: httpx.AsyncClient, clock: FrozenClock) -> None:
    r = await api.post(f"/v1/coaches/{COACH}/reservations", json={"feature": "checkin_draft"})
    assert r.status_code == 201
    clock.set(clock.now.replace(month=12, day=2))
    now = await api.get(f"/v1/coaches/{COACH}/events")
    assert now.json() == {"events": [], "next_before": None}
    november = await api.get(f"/v1/coaches/{COACH}/events", params={"period": "2099-11"})
    assert [e["reservation_id"] for e in november.json()["events"]] == [r.json()["reservation_id"]]


async def test_reading_events_creates_no_keys(api: httpx.AsyncClient, backend: AnyRedis) -> None:
    before = await backend.dbsize()
    r = await api.get("/v1/coaches/never-seen/events", params={"period": "2099-10"})
    assert r.json() == {"events": [], "next_before": None}
    r = await api.get("/v1/coaches/never-seen/events")
    assert r.json() == {"events": [], "next_before": None}
    assert await backend.dbsize() == before


@pytest.mark.parametrize(
    ("path", "params", "code"),
    [
        ("/v1/coaches/{bad}/events", {}, "invalid_coach_id"),
        ("/v1/coaches/a%2Fb/events", {}, "invalid_coach_id"),
        ("/v1/coaches/ok/events", {"limit": "0"}, "invalid_request"),
        ("/v1/coaches/ok/events", {"limit": "501"}, "invalid_request"),
        ("/v1/coaches/ok/events", {"before": "0"}, "invalid_request"),
        ("/v1/coaches/ok/events", {"before": "x"}, "invalid_request"),
        ("/v1/coaches/ok/events", {"period": "2099-13"}, "invalid_request"),
        ("/v1/coaches/ok/events", {"period": "november"}, "invalid_request"),
    ],
)
async def test_bad_requests_are_422(
    api: httpx.AsyncClient, path: str, params: dict[str, str], code: str
) -> None:
    r = await api.get(path, params=params)
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == code


async def test_events_need_the_reader_scope(backend: AnyRedis, clock: FrozenClock) -> None:
    keys = {
        "reader-key-0123456789": [Scope.READER],
        "worker-key-0123456789": [Scope.WORKER],
        "admin-key-01234567890": [Scope.ADMIN],
    }
    app = create_app(Settings(api_keys=keys), redis=backend, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:
            url = f"/v1/coaches/{COACH}/events"
            assert (await client.get(url)).json()["code"] == "unauthorized"
            for key, status in [
                ("reader-key-0123456789", 200),
                ("admin-key-01234567890", 200),
                ("worker-key-0123456789", 403),
                ("wrong-key-0123456789", 401),
            ]:
                r = await client.get(url, headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == status, (key, r.text)


# --- /metrics after traffic ------------------------------------------------------------------


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from a /metrics body; 0 when the series does not exist yet."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def test_metrics_move_with_traffic(api: httpx.AsyncClient, clock: FrozenClock) -> None:
    before = (await api.get("/metrics")).text
    assert "credits_usage_streams_open 0.0" in before
    assert sample(before, "credits_held_in_flight") == 0

    async def reserve(feature: str, **body: int) -> httpx.Response:
        return await api.post(
            f"/v1/coaches/{COACH}/reservations", json={"feature": feature, **body}
        )

    a = (await reserve("trend_analysis")).json()["reservation_id"]
    await api.post(f"/v1/reservations/{a}/commit")
    b = (await reserve("checkin_draft")).json()["reservation_id"]
    await api.post(f"/v1/reservations/{b}/refund")
    await reserve("checkin_draft", ttl_seconds=5)
    clock.advance(10)
    live = 0
    while (r := await reserve("trend_analysis")).status_code == 201:
        live += 3
    assert r.status_code == 429

    text = (await api.get("/metrics")).text
    usage = (await api.get(f"/v1/coaches/{COACH}/usage")).json()
    assert usage["held"] == live == 45
    assert sample(text, "credits_held_in_flight") == live

    def res(feature: str, outcome: str) -> float:
        return sample(text, "credits_reservations_total", feature=feature, outcome=outcome)

    assert res("trend_analysis", "held") == 1 + live // 3
    assert res("trend_analysis", "committed") == 1
    assert res("checkin_draft", "held") == 2
    assert res("checkin_draft", "refunded") == 1
    assert res("trend_analysis", "exhausted") == 1
    assert sample(text, "credits_credits_total", kind="committed") == 3
    assert sample(text, "credits_credits_total", kind="refunded") == 1
    assert sample(text, "credits_credits_total", kind="expired") == 1
    assert sample(text, "credits_exhausted_refusals_total", feature="trend_analysis") == 1
    # One latency observation per reserve call: a, b, the lapsed one, the loop's.
    reserves = sample(text, "credits_redis_call_seconds_count", operation="reserve")
    assert reserves == 3 + live // 3 + 1
    assert sample(text, "credits_redis_call_seconds_count", operation="commit") == 1
