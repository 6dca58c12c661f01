"""What each call sends, and what it reads back: both clients, offline."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
from ai_credits_client import (
    EventPage,
    Feature,
    Grant,
    Reservation,
    Usage,
)
from conftest import Either
from fake_service import API_KEY, FakeService


def body(request: httpx.Request) -> object:
    return json.loads(request.content) if request.content else None


async def test_every_call_carries_the_api_key_and_asks_for_json(
    either: Either, fake: FakeService
) -> None:
    await either("usage", "coach-1")
    sent = fake.requests[-1]
    assert sent.headers["Authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["Accept"] == "application/json"
    assert sent.headers["User-Agent"].startswith("ai-credits-client")


async def test_features_are_read_with_their_labels(either: Either, fake: FakeService) -> None:
    features = await either("features")
    assert features == (
        Feature("checkin_draft", 1, "Checkin_Draft"),
        Feature("trend_analysis", 3, "Trend_Analysis"),
    )
    assert [f"{r.method} {r.url.path}" for r in fake.requests] == ["GET /v1/features"]


async def test_reserve_sends_the_feature_the_ttl_and_the_given_key(
    either: Either, fake: FakeService
) -> None:
    reservation = await either(
        "reserve", "coach-1", "trend_analysis", ttl_seconds=60, idempotency_key="job-7"
    )
    sent = fake.requests[-1]
    assert (sent.method, sent.url.path) == ("POST", "/v1/coaches/coach-1/reservations")
    assert body(sent) == {"feature": "trend_analysis", "ttl_seconds": 60}
    assert sent.headers["Idempotency-Key"] == "job-7"
    assert isinstance(reservation, Reservation)
    assert (reservation.status, reservation.cost, reservation.usage.held) == ("held", 3, 3)


async def test_a_reserve_without_a_key_gets_a_fresh_one_each_time(
    either: Either, fake: FakeService
) -> None:
    await either("reserve", "coach-1", "checkin_draft")
    await either("reserve", "coach-1", "checkin_draft")
    keys = [r.headers["Idempotency-Key"] for r in fake.sent("POST .*/reservations")]
    assert len(set(keys)) == 2
    assert all(len(k) >= 32 for k in keys)
    assert body(fake.requests[-1]) == {"feature": "checkin_draft"}


async def test_settling_reading_and_extending_address_the_reservation(
    either: Either, fake: FakeService
) -> None:
    held = await either("reserve", "coach-1", "checkin_draft")
    rid = held.reservation_id
    extended = await either("extend", rid, 600)
    assert body(fake.requests[-1]) == {"ttl_seconds": 600}
    assert extended.expires_at > held.expires_at
    assert (await either("get_reservation", rid)).status == "held"
    committed = await either("commit", rid)
    assert (committed.status, committed.note) == (
        "committed",
        "Used 1 credits · 49 of 50 left this month",
    )
    assert [f"{r.method} {r.url.path}" for r in fake.requests[1:]] == [
        f"POST /v1/reservations/{rid}/extend",
        f"GET /v1/reservations/{rid}",
        f"POST /v1/reservations/{rid}/commit",
    ]
    other = await either("reserve", "coach-1", "checkin_draft")
    assert (await either("refund", other.reservation_id)).status == "refunded"
    assert fake.requests[-1].url.path == f"/v1/reservations/{other.reservation_id}/refund"


async def test_usage_reads_the_effective_allowance(either: Either, fake: FakeService) -> None:
    await either("grant", "coach-1", 5, "outage on the 3rd")
    usage = await either("usage", "coach-1")
    assert isinstance(usage, Usage)
    assert (usage.allowance, usage.base_allowance, usage.granted) == (55, 50, 5)
    assert (usage.used, usage.held, usage.remaining, usage.level) == (0, 0, 55, "green")
    assert usage.resets_at == datetime(2099, 12, 1, tzinfo=UTC)
    assert [(f.feature, f.available) for f in usage.features] == [
        ("checkin_draft", True),
        ("trend_analysis", True),
    ]


def test_usage_from_a_service_without_grants_reads_the_allowance_as_base() -> None:
    usage = Usage.from_json(
        {
            "coach_id": "c",
            "period": "2099-11",
            "allowance": 50,
            "used": 1,
            "held": 0,
            "remaining": 49,
            "percent_used": 2,
            "level": "green",
            "resets_at": "2099-12-01T00:00:00Z",
            "features": [],
        }
    )
    assert (usage.base_allowance, usage.granted) == (50, 0)


async def test_grant_posts_credits_and_reason_under_one_key(
    either: Either, fake: FakeService
) -> None:
    grant = await either("grant", "coach-1", -2, "double charge", idempotency_key="ticket-9")
    sent = fake.requests[-1]
    assert (sent.method, sent.url.path) == ("POST", "/v1/coaches/coach-1/grants")
    assert body(sent) == {"credits": -2, "reason": "double charge"}
    assert sent.headers["Idempotency-Key"] == "ticket-9"
    assert isinstance(grant, Grant)
    assert (grant.credits, grant.reason, grant.period) == (-2, "double charge", "2099-11")
    assert grant.usage is not None
    assert grant.usage.allowance == 48
    replay = await either("grant", "coach-1", -2, "double charge", idempotency_key="ticket-9")
    assert replay.grant_id == grant.grant_id
    assert (await either("usage", "coach-1")).granted == -2


async def test_a_grant_without_a_key_gets_a_fresh_one_each_time(
    either: Either, fake: FakeService
) -> None:
    await either("grant", "coach-1", 1, "goodwill")
    await either("grant", "coach-1", 1, "goodwill")
    keys = {r.headers["Idempotency-Key"] for r in fake.sent("POST .*/grants")}
    assert len(keys) == 2


async def test_grants_lists_the_current_or_a_given_period(
    either: Either, fake: FakeService
) -> None:
    first = await either("grant", "coach-1", 5, "outage")
    second = await either("grant", "coach-1", 2, "birthday")
    listed = await either("grants", "coach-1")
    assert [g.grant_id for g in listed] == [first.grant_id, second.grant_id]
    assert "period" not in fake.requests[-1].url.params
    await either("grants", "coach-1", period="2099-10")
    assert fake.requests[-1].url.params["period"] == "2099-10"


async def test_allowance_is_set_with_put_and_removed_with_delete(
    either: Either, fake: FakeService
) -> None:
    usage = await either("set_allowance", "coach-1", 200)
    sent = fake.requests[-1]
    assert (sent.method, sent.url.path) == ("PUT", "/v1/coaches/coach-1/allowance")
    assert body(sent) == {"monthly_allowance": 200}
    assert (usage.allowance, usage.base_allowance) == (200, 200)
    usage = await either("delete_allowance", "coach-1")
    sent = fake.requests[-1]
    assert (sent.method, sent.url.path, sent.content) == (
        "DELETE",
        "/v1/coaches/coach-1/allowance",
        b"",
    )
    assert usage.allowance == 50


async def test_events_page_backwards_with_before_and_a_period(
    either: Either, fake: FakeService
) -> None:
    held = await either("reserve", "coach-1", "checkin_draft")
    await either("commit", held.reservation_id)
    await either("grant", "coach-1", 1, "goodwill")
    page = await either("events", "coach-1", limit=2)
    assert isinstance(page, EventPage)
    assert fake.requests[-1].url.params["limit"] == "2"
    assert [e.kind for e in page.events] == ["granted", "committed"]
    assert page.events[0].reservation_id is None
    assert page.events[0].fields["credits"] == 1
    assert page.events[1].reservation_id == held.reservation_id
    assert page.next_before == page.events[1].seq
    rest = await either("events", "coach-1", before=page.next_before, period="2099-11")
    assert dict(fake.requests[-1].url.params) == {
        "limit": "100",
        "before": str(page.next_before),
        "period": "2099-11",
    }
    assert [e.kind for e in rest.events] == ["held"]
    assert rest.next_before is None


async def test_path_segments_are_sent_quoted_whole(either: Either, fake: FakeService) -> None:
    usage = await either("usage", "a/b {x}")
    assert usage.coach_id == "a/b {x}"
    assert fake.requests[-1].url.raw_path == b"/v1/coaches/a%2Fb%20%7Bx%7D/usage"
