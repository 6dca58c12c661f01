"""The HTTP API as callers see it: every route, field, status and problem code of the
contract, on fakeredis and on a real Redis, with a frozen clock."""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.domain import Period, ReservationId
from app.store import AnyRedis
from tests.support.clock import FrozenClock
from tests.support.http import assert_problem, snapshot

COACH = "coach-1"
DEC_1 = datetime(2099, 12, 1, tzinfo=UTC)
RESERVATION_FIELDS = {
    "reservation_id",
    "coach_id",
    "feature",
    "cost",
    "status",
    "period",
    "expires_at",
    "usage",
}
USAGE_FIELDS = {
    "coach_id",
    "period",
    "allowance",
    "base_allowance",
    "granted",
    "used",
    "held",
    "remaining",
    "percent_used",
    "level",
    "resets_at",
    "features",
}


def iso(instant: datetime) -> str:
    return instant.strftime("%Y-%m-%dT%H:%M:%SZ")


def seconds_to(later: datetime, clock: FrozenClock) -> int:
    return int((later - clock.now).total_seconds())


async def reserve(
    api: httpx.AsyncClient,
    coach: str = COACH,
    feature: str = "checkin_draft",
    *,
    ttl: int | None = None,
    key: str | None = None,
) -> httpx.Response:
    body: dict[str, object] = {"feature": feature}
    if ttl is not None:
        body["ttl_seconds"] = ttl
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await api.post(f"/v1/coaches/{coach}/reservations", json=body, headers=headers)


async def held(api: httpx.AsyncClient, coach: str = COACH, **kw: Any) -> dict[str, Any]:
    resp = await reserve(api, coach, **kw)
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def spend(api: httpx.AsyncClient, credits: int, coach: str = COACH) -> None:
    """Commit reservations worth exactly ``credits``."""
    for _ in range(credits // 3):
        rid = (await held(api, coach, feature="trend_analysis"))["reservation_id"]
        assert (await api.post(f"/v1/reservations/{rid}/commit")).status_code == 200
    for _ in range(credits % 3):
        rid = (await held(api, coach, feature="checkin_draft"))["reservation_id"]
        assert (await api.post(f"/v1/reservations/{rid}/commit")).status_code == 200


async def usage(api: httpx.AsyncClient, coach: str = COACH) -> dict[str, Any]:
    resp = await api.get(f"/v1/coaches/{coach}/usage")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


# --- features ----------------------------------------------------------------------


async def test_features_lists_costs_and_labels(api: httpx.AsyncClient) -> None:
    resp = await api.get("/v1/features")
    assert resp.status_code == 200
    assert resp.json() == {
        "features": [
            {"feature": "checkin_draft", "cost": 1, "label": "Check-in response draft"},
            {"feature": "trend_analysis", "cost": 3, "label": "Client trend analysis"},
        ]
    }


# --- reserve -------------------------------------------------------------------------


async def test_reserve_returns_every_field(api: httpx.AsyncClient, clock: FrozenClock) -> None:
    resp = await reserve(api, feature="trend_analysis")
    assert resp.status_code == 201
    assert resp.headers["content-type"] == "application/json"
    r = resp.json()
    assert set(r) == RESERVATION_FIELDS  # no note before a commit
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", r["reservation_id"])
    assert r["coach_id"] == COACH
    assert r["feature"] == "trend_analysis"
    assert r["cost"] == 3
    assert r["status"] == "held"
    assert r["period"] == "2099-11"
    assert r["expires_at"] == iso(clock.now + timedelta(seconds=300))
    u = r["usage"]
    assert set(u) == USAGE_FIELDS
    assert u == {
        "coach_id": COACH,
        "period": "2099-11",
        "allowance": 50,
        "base_allowance": 50,
        "granted": 0,
        "used": 0,
        "held": 3,
        "remaining": 47,
        "percent_used": 0,
        "level": "green",
        "resets_at": "2099-12-01T00:00:00Z",
        "features": [
            {"feature": "checkin_draft", "cost": 1, "available": True},
            {"feature": "trend_analysis", "cost": 3, "available": True},
        ],
    }
    again = (await reserve(api, feature="trend_analysis")).json()
    assert again["reservation_id"] != r["reservation_id"]
    assert again["usage"]["held"] == 6


async def test_reserve_honours_ttl(api: httpx.AsyncClient, clock: FrozenClock) -> None:
    for ttl in (1, 45, 3600):
        r = await held(api, ttl=ttl)
        assert r["expires_at"] == iso(clock.now + timedelta(seconds=ttl))
        rid = r["reservation_id"]
        clock.advance(ttl - 1)
        assert (await api.get(f"/v1/reservations/{rid}")).json()["status"] == "held"
        clock.advance(1)
        after = (await api.get(f"/v1/reservations/{rid}")).json()
        assert after["status"] == "expired", ttl
        assert after["usage"]["held"] == 0


async def test_idempotent_replay_returns_same_reservation(api: httpx.AsyncClient) -> None:
    first = await reserve(api, feature="trend_analysis", key="job-42")
    assert first.status_code == 201
    replay = await reserve(api, feature="trend_analysis", key="job-42")
    assert replay.status_code == 200
    assert replay.json() == first.json()
    assert replay.json()["usage"]["held"] == 3
    assert (await usage(api))["held"] == 3

    # A replay reports the reservation as it is now, and still never holds again.
    rid = first.json()["reservation_id"]
    assert (await api.post(f"/v1/reservations/{rid}/commit")).status_code == 200
    late = await reserve(api, feature="trend_analysis", key="job-42")
    assert late.status_code == 200
    assert late.json()["reservation_id"] == rid
    assert late.json()["status"] == "committed"
    assert (await usage(api))["used"] == 3
    assert (await usage(api))["held"] == 0


async def test_replay_after_expiry_reports_expired_and_holds_nothing(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    first = await reserve(api, feature="trend_analysis", ttl=10, key="slow-job")
    assert first.status_code == 201
    clock.advance(10)
    replay = await reserve(api, feature="trend_analysis", ttl=10, key="slow-job")
    assert replay.status_code == 200
    assert replay.json()["reservation_id"] == first.json()["reservation_id"]
    assert replay.json()["status"] == "expired"
    assert replay.json()["usage"]["held"] == 0
    assert (await usage(api))["remaining"] == 50


async def test_idempotency_key_is_scoped_to_the_coach(api: httpx.AsyncClient) -> None:
    a = await reserve(api, "coach-a", key="same")
    b = await reserve(api, "coach-b", key="same")
    assert a.status_code == b.status_code == 201
    assert a.json()["reservation_id"] != b.json()["reservation_id"]


async def test_idempotency_key_reused_for_other_feature(
    api: httpx.AsyncClient, backend: AnyRedis
) -> None:
    assert (await reserve(api, feature="checkin_draft", key="k-1")).status_code == 201
    before = await snapshot(backend)
    resp = await reserve(api, feature="trend_analysis", key="k-1")
    assert_problem(resp, 422, "idempotency_key_reused")
    assert await snapshot(backend) == before


async def test_longest_idempotency_key_is_accepted(api: httpx.AsyncClient) -> None:
    visible = "".join(chr(c) for c in range(0x21, 0x7F))
    key = f"{visible} {visible} {visible}"[:255]  # every printable character, space too
    assert len(key) == 255
    assert key[-1] != " "
    assert (await reserve(api, key=key)).status_code == 201
    assert (await reserve(api, key=key)).status_code == 200


# --- get, commit, refund ----------------------------------------------------------------


async def test_get_reservation(api: httpx.AsyncClient) -> None:
    r = await held(api, feature="trend_analysis")
    resp = await api.get(f"/v1/reservations/{r['reservation_id']}")
    assert resp.status_code == 200
    assert resp.json() == r


async def test_commit_charges_and_says_what_is_left(api: httpx.AsyncClient) -> None:
    r = await held(api, feature="trend_analysis")
    resp = await api.post(f"/v1/reservations/{r['reservation_id']}/commit")
    assert resp.status_code == 200
    c = resp.json()
    assert set(c) == RESERVATION_FIELDS | {"note"}
    assert c["status"] == "committed"
    assert c["note"] == "Used 3 credits · 47 of 50 left this month"
    assert {k: c[k] for k in ("reservation_id", "coach_id", "feature", "cost", "period")} == {
        k: r[k] for k in ("reservation_id", "coach_id", "feature", "cost", "period")
    }
    assert (c["usage"]["used"], c["usage"]["held"], c["usage"]["remaining"]) == (3, 0, 47)

    again = await api.post(f"/v1/reservations/{r['reservation_id']}/commit")
    assert again.status_code == 200
    assert again.json() == c
    assert (await usage(api))["used"] == 3

    fetched = (await api.get(f"/v1/reservations/{r['reservation_id']}")).json()
    assert fetched["status"] == "committed"
    assert fetched["note"] == c["note"]


async def test_commit_note_singular(api: httpx.AsyncClient) -> None:
    r = await held(api, feature="checkin_draft")
    c = (await api.post(f"/v1/reservations/{r['reservation_id']}/commit")).json()
    assert c["note"] == "Used 1 credit · 49 of 50 left this month"


async def test_refund_returns_credits_and_repeats(api: httpx.AsyncClient) -> None:
    r = await held(api, feature="trend_analysis")
    resp = await api.post(f"/v1/reservations/{r['reservation_id']}/refund")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "refunded"
    assert "note" not in body
    assert (body["usage"]["used"], body["usage"]["held"], body["usage"]["remaining"]) == (0, 0, 50)
    again = await api.post(f"/v1/reservations/{r['reservation_id']}/refund")
    assert again.status_code == 200
    assert again.json() == body
    assert (await usage(api))["remaining"] == 50


async def test_refund_of_expired_hold_says_expired(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    r = await held(api, feature="trend_analysis", ttl=10)
    clock.advance(11)
    resp = await api.post(f"/v1/reservations/{r['reservation_id']}/refund")
    assert resp.status_code == 200
    assert resp.json()["status"] == "expired"
    assert resp.json()["usage"]["held"] == 0
    again = await api.post(f"/v1/reservations/{r['reservation_id']}/refund")
    assert again.status_code == 200
    assert again.json()["status"] == "expired"


async def test_commit_of_expired_hold_is_conflict(
    api: httpx.AsyncClient, clock: FrozenClock, backend: AnyRedis
) -> None:
    r = await held(api, feature="trend_analysis", ttl=10)
    clock.advance(10)
    assert_problem(
        await api.post(f"/v1/reservations/{r['reservation_id']}/commit"),
        409,
        "reservation_expired",
    )
    before = await snapshot(backend)
    assert_problem(
        await api.post(f"/v1/reservations/{r['reservation_id']}/commit"),
        409,
        "reservation_expired",
    )
    assert await snapshot(backend) == before
    assert (await usage(api))["used"] == 0
    assert (await usage(api))["remaining"] == 50


async def test_commit_after_refund_is_conflict(api: httpx.AsyncClient, backend: AnyRedis) -> None:
    r = await held(api, feature="trend_analysis")
    assert (await api.post(f"/v1/reservations/{r['reservation_id']}/refund")).status_code == 200
    before = await snapshot(backend)
    resp = await api.post(f"/v1/reservations/{r['reservation_id']}/commit")
    assert_problem(resp, 409, "reservation_refunded")
    assert await snapshot(backend) == before


async def test_refund_after_commit_is_conflict(api: httpx.AsyncClient, backend: AnyRedis) -> None:
    r = await held(api, feature="trend_analysis")
    assert (await api.post(f"/v1/reservations/{r['reservation_id']}/commit")).status_code == 200
    before = await snapshot(backend)
    resp = await api.post(f"/v1/reservations/{r['reservation_id']}/refund")
    assert_problem(resp, 409, "reservation_committed")
    assert await snapshot(backend) == before
    assert (await usage(api))["used"] == 3


def _alter(text: str, index: int) -> str:
    swapped = "B" if text[index] == "A" else "A"
    return text[:index] + swapped + text[index + 1 :]


async def test_unknown_reservation_ids_are_404_without_side_effect(
    api: httpx.AsyncClient, backend: AnyRedis
) -> None:
    real = (await held(api, feature="trend_analysis"))["reservation_id"]
    coach_part, period_part, token = real.split(".")
    made_up = [
        f"{coach_part}.{period_part}.{_alter(token, 5)}",  # one char of the token
        f"{_alter(coach_part, 0)}.{period_part}.{token}",  # one char of the coach
        f"{coach_part}.209910.{token}",  # another period
        f"{coach_part}.{period_part}.{token[:-2]}",  # truncated
        f"{coach_part}.{period_part}.{token}x",  # extended
        str(ReservationId.new("ghost-coach", Period(2099, 11))),  # well formed, nobody
        str(ReservationId.new(COACH, Period(2099, 11))),  # right coach, unknown token
        secrets.token_urlsafe(24),
        "nope",
        "a.b.c",
        "x" * 300,
    ]
    before = await snapshot(backend)
    assert before
    for rid in made_up:
        assert rid != real
        assert_problem(await api.get(f"/v1/reservations/{rid}"), 404, "reservation_not_found")
        for action in ("commit", "refund"):
            resp = await api.post(f"/v1/reservations/{rid}/{action}")
            assert_problem(resp, 404, "reservation_not_found")
    assert await snapshot(backend) == before
    assert (await api.get(f"/v1/reservations/{real}")).json()["status"] == "held"


# --- usage -----------------------------------------------------------------------------


async def test_unseen_coach_reads_untouched_and_creates_nothing(
    api: httpx.AsyncClient, backend: AnyRedis
) -> None:
    await spend(api, 3, coach="someone-else")
    before = await snapshot(backend)
    u = await usage(api, "never.seen_before:x@y-1")
    assert await snapshot(backend) == before
    assert u == {
        "coach_id": "never.seen_before:x@y-1",
        "period": "2099-11",
        "allowance": 50,
        "base_allowance": 50,
        "granted": 0,
        "used": 0,
        "held": 0,
        "remaining": 50,
        "percent_used": 0,
        "level": "green",
        "resets_at": "2099-12-01T00:00:00Z",
        "features": [
            {"feature": "checkin_draft", "cost": 1, "available": True},
            {"feature": "trend_analysis", "cost": 3, "available": True},
        ],
    }


async def test_usage_levels_at_the_thresholds(api: httpx.AsyncClient) -> None:
    seen: list[tuple[int, int, str]] = []
    for step in (35, 1, 9, 1):
        await spend(api, step)
        u = await usage(api)
        seen.append((u["used"], u["percent_used"], u["level"]))
        assert u["remaining"] == 50 - u["used"]
        assert u["resets_at"] == "2099-12-01T00:00:00Z"
    assert seen == [(35, 70, "green"), (36, 72, "amber"), (45, 90, "amber"), (46, 92, "red")]


async def test_usage_features_available_by_remaining(api: httpx.AsyncClient) -> None:
    await spend(api, 47)
    feats = {f["feature"]: f["available"] for f in (await usage(api))["features"]}
    assert feats == {"checkin_draft": True, "trend_analysis": True}
    await held(api, feature="checkin_draft")  # a hold counts against remaining too
    u = await usage(api)
    assert (u["used"], u["held"], u["remaining"]) == (47, 1, 2)
    feats = {f["feature"]: f["available"] for f in u["features"]}
    assert feats == {"checkin_draft": True, "trend_analysis": False}
    await spend(api, 2)
    feats = {f["feature"]: f["available"] for f in (await usage(api))["features"]}
    assert feats == {"checkin_draft": False, "trend_analysis": False}


@pytest.mark.parametrize("settings", [Settings(monthly_allowance=30)], ids=["allowance30"])
async def test_percent_used_rounds_down(api: httpx.AsyncClient) -> None:
    percents = []
    for _ in range(3):
        await spend(api, 1)
        percents.append((await usage(api))["percent_used"])
    assert percents == [3, 6, 10]  # 3.33, 6.67, 10.0


# --- exhausted ----------------------------------------------------------------------------


async def test_exhausted_when_all_used(
    api: httpx.AsyncClient, clock: FrozenClock, backend: AnyRedis
) -> None:
    await spend(api, 50)
    before = await snapshot(backend)
    resp = await reserve(api, feature="checkin_draft")
    body = assert_problem(resp, 429, "credits_exhausted")
    assert resp.headers["Retry-After"] == str(seconds_to(DEC_1, clock))
    assert body["feature"] == "checkin_draft"
    assert body["cost"] == 1
    assert body["remaining"] == 0
    assert body["resets_at"] == "2099-12-01T00:00:00Z"
    assert body["detail"] == (
        "You've used all 50 AI credits for November. They refresh on December 1 at 00:00 UTC."
    )
    assert await snapshot(backend) == before
    u = await usage(api)
    assert (u["used"], u["held"], u["level"], u["percent_used"]) == (50, 0, "red", 100)


async def test_exhausted_when_too_few_left(api: httpx.AsyncClient, clock: FrozenClock) -> None:
    await spend(api, 48)
    clock.advance(hours=5)
    resp = await reserve(api, feature="trend_analysis")
    body = assert_problem(resp, 429, "credits_exhausted")
    assert resp.headers["Retry-After"] == str(seconds_to(DEC_1, clock))
    assert (body["feature"], body["cost"], body["remaining"]) == ("trend_analysis", 3, 2)
    assert body["detail"] == (
        "Client trend analysis needs 3 credits and you have 2 left this month. "
        "Credits refresh on December 1 at 00:00 UTC."
    )
    # What still fits is still allowed.
    assert (await reserve(api, feature="checkin_draft")).status_code == 201


async def test_exhausted_only_by_holds_waits_for_first_hold(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    await spend(api, 45)
    await held(api, feature="checkin_draft", ttl=600)
    await held(api, feature="trend_analysis", ttl=120)
    await held(api, feature="checkin_draft", ttl=900)
    clock.advance(30)
    resp = await reserve(api, feature="checkin_draft")
    body = assert_problem(resp, 429, "credits_exhausted")
    assert resp.headers["Retry-After"] == "90"
    assert body["remaining"] == 0
    assert "tied up" in body["detail"]
    assert "in progress" in body["detail"]
    assert "refresh on" not in body["detail"]
    clock.advance(90)
    assert (await reserve(api, feature="checkin_draft")).status_code == 201


# --- batch usage -----------------------------------------------------------------------------


async def test_batch_usage_in_request_order(api: httpx.AsyncClient) -> None:
    ids = [f"c-{i:04d}" for i in range(1000)]
    ids.reverse()  # order is the caller's, not sorted
    await spend(api, 3, coach="c-0500")
    await held(api, "c-0007", feature="checkin_draft")
    resp = await api.post("/v1/usage/batch", json={"coach_ids": ids})
    assert resp.status_code == 200
    items = resp.json()["items"]
    assert [i["coach_id"] for i in items] == ids
    assert all(set(i) == USAGE_FIELDS for i in items)
    by_id = {i["coach_id"]: i for i in items}
    assert (by_id["c-0500"]["used"], by_id["c-0500"]["held"]) == (3, 0)
    assert (by_id["c-0007"]["used"], by_id["c-0007"]["held"]) == (0, 1)
    assert by_id["c-0001"] == await usage(api, "c-0001")

    one = await api.post("/v1/usage/batch", json={"coach_ids": ["c-0500"]})
    assert one.status_code == 200
    assert one.json() == {"items": [by_id["c-0500"]]}

    repeated = await api.post("/v1/usage/batch", json={"coach_ids": ["c-0007", "x", "c-0007"]})
    assert [i["coach_id"] for i in repeated.json()["items"]] == ["c-0007", "x", "c-0007"]


BAD_BATCHES: dict[str, tuple[object, str]] = {
    "empty": ({"coach_ids": []}, "invalid_request"),
    "1001 ids": ({"coach_ids": [f"c{i}" for i in range(1001)]}, "invalid_request"),
    "space": ({"coach_ids": ["ok", "not ok"]}, "invalid_coach_id"),
    "braces": ({"coach_ids": ["ok", "{braced}"]}, "invalid_coach_id"),
    "empty id": ({"coach_ids": ["ok", ""]}, "invalid_coach_id"),
    "not a list": ({"coach_ids": "c1"}, "invalid_request"),
    "not strings": ({"coach_ids": [1]}, "invalid_request"),
    "missing": ({}, "invalid_request"),
    "extra field": ({"coach_ids": ["c1"], "extra": 1}, "invalid_request"),
    "not an object": (["c1"], "invalid_request"),
}


async def test_batch_usage_rejects(api: httpx.AsyncClient, backend: AnyRedis, seeded: str) -> None:
    before = await snapshot(backend)
    for name, (payload, code) in BAD_BATCHES.items():
        resp = await api.post("/v1/usage/batch", json=payload)
        assert resp.status_code == 422, name
        assert_problem(resp, 422, code)
    assert await snapshot(backend) == before


# --- bad input changes nothing -------------------------------------------------------------

BAD_COACH_IDS = [
    "%7Bcoach%7D",  # braces
    "coach%20one",  # space
    "x" * 129,  # too long
    "co%C3%A9ch",  # non-ASCII
    "-coach",  # leading '-'
    ".coach",  # leading '.'
    "coach%00",  # NUL
    "coach%7F",  # DEL
    "coach%25",  # a literal percent sign
]


@pytest.fixture
async def seeded(api: httpx.AsyncClient, backend: AnyRedis) -> str:
    """Some state in Redis, so that "nothing changed" compares something."""
    await spend(api, 4)
    rid = str((await held(api, feature="trend_analysis", key="seed"))["reservation_id"])
    state = await snapshot(backend)
    assert any(kind == "hash" for kind, _, _ in state.values())
    assert any(kind == "string" for kind, _, _ in state.values())  # the idempotency record
    return rid


async def test_invalid_coach_ids(api: httpx.AsyncClient, backend: AnyRedis, seeded: str) -> None:
    before = await snapshot(backend)
    for coach in BAD_COACH_IDS:
        resp = await api.post(
            f"/v1/coaches/{coach}/reservations", json={"feature": "checkin_draft"}
        )
        assert resp.status_code == 422, coach
        assert_problem(resp, 422, "invalid_coach_id")
        resp = await api.get(f"/v1/coaches/{coach}/usage")
        assert resp.status_code == 422, coach
        assert_problem(resp, 422, "invalid_coach_id")
    assert await snapshot(backend) == before


async def test_longest_coach_id_is_valid(api: httpx.AsyncClient) -> None:
    coach = "a" + "b:c@d.e_f-" * 11 + "z" * 17
    assert len(coach) == 128
    assert (await reserve(api, coach)).status_code == 201
    assert (await usage(api, coach))["held"] == 1


def _json(text: str) -> tuple[bytes, dict[str, str]]:
    return text.encode(), {"content-type": "application/json"}


BAD_RESERVES: dict[str, tuple[bytes, dict[str, str], str]] = {
    "unknown-feature": (*_json('{"feature":"image_generation"}'), "unknown_feature"),
    "empty-feature": (*_json('{"feature":""}'), "invalid_request"),
    "ttl-0": (*_json('{"feature":"checkin_draft","ttl_seconds":0}'), "invalid_request"),
    "ttl-3601": (*_json('{"feature":"checkin_draft","ttl_seconds":3601}'), "invalid_request"),
    "ttl-string": (*_json('{"feature":"checkin_draft","ttl_seconds":"5"}'), "invalid_request"),
    "ttl-float": (*_json('{"feature":"checkin_draft","ttl_seconds":5.5}'), "invalid_request"),
    "ttl-bool": (*_json('{"feature":"checkin_draft","ttl_seconds":true}'), "invalid_request"),
    "ttl-negative": (*_json('{"feature":"checkin_draft","ttl_seconds":-1}'), "invalid_request"),
    "extra-field": (*_json('{"feature":"checkin_draft","extra":1}'), "invalid_request"),
    "truncated-json": (*_json('{"feature":"checkin_draft"'), "invalid_request"),
    "malformed-json": (*_json("{bad json}"), "invalid_request"),
    "json-array": (*_json('["checkin_draft"]'), "invalid_request"),
    "json-string": (*_json('"checkin_draft"'), "invalid_request"),
    "json-null": (*_json("null"), "invalid_request"),
    "missing-feature": (*_json("{}"), "invalid_request"),
    "feature-number": (*_json('{"feature":3}'), "invalid_request"),
    "empty-body": (b"", {"content-type": "application/json"}, "invalid_request"),
    "not-json": (b"feature=checkin_draft", {"content-type": "text/plain"}, "invalid_request"),
    "idem-256": (b'{"feature":"checkin_draft"}', {"Idempotency-Key": "k" * 256}, "invalid_request"),
    "idem-tab": (
        b'{"feature":"checkin_draft"}',
        {"Idempotency-Key": "tab\there"},
        "invalid_request",
    ),
    "idem-del": (b'{"feature":"checkin_draft"}', {"Idempotency-Key": "del\x7f"}, "invalid_request"),
    "idem-empty": (b'{"feature":"checkin_draft"}', {"Idempotency-Key": ""}, "invalid_request"),
}


async def test_bad_reserve_requests(api: httpx.AsyncClient, backend: AnyRedis, seeded: str) -> None:
    before = await snapshot(backend)
    for name, (content, headers, code) in BAD_RESERVES.items():
        resp = await api.post(f"/v1/coaches/{COACH}/reservations", content=content, headers=headers)
        assert resp.status_code == 422, name
        assert_problem(resp, 422, code)
    assert await snapshot(backend) == before


async def test_idempotency_key_non_ascii_is_rejected(
    api: httpx.AsyncClient, backend: AnyRedis, seeded: str
) -> None:
    before = await snapshot(backend)
    resp = await api.post(
        f"/v1/coaches/{COACH}/reservations",
        json={"feature": "checkin_draft"},
        headers=[(b"Idempotency-Key", "clé".encode())],
    )
    assert_problem(resp, 422, "invalid_request")
    assert await snapshot(backend) == before


LIMIT = 256 * 1024


def _padded(size: int) -> bytes:
    body = b'{"feature":"checkin_draft"}'
    return body + b" " * (size - len(body))


async def test_body_at_the_limit_is_accepted(api: httpx.AsyncClient) -> None:
    resp = await api.post(
        f"/v1/coaches/{COACH}/reservations",
        content=_padded(LIMIT),
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 201, resp.text


async def test_body_over_the_limit_with_length(
    api: httpx.AsyncClient, backend: AnyRedis, seeded: str
) -> None:
    before = await snapshot(backend)
    resp = await api.post(
        f"/v1/coaches/{COACH}/reservations",
        content=_padded(LIMIT + 1),
        headers={"content-type": "application/json"},
    )
    assert_problem(resp, 413, "payload_too_large")
    resp = await api.post("/v1/usage/batch", json={"coach_ids": ["c" * 120] * 3000})
    assert_problem(resp, 413, "payload_too_large")
    assert await snapshot(backend) == before


async def test_body_over_the_limit_chunked(
    api: httpx.AsyncClient, backend: AnyRedis, seeded: str
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"feature":"checkin_draft"'
        for _ in range(LIMIT // 4096 + 1):
            yield b" " * 4096
        yield b"}"

    before = await snapshot(backend)
    resp = await api.post(
        f"/v1/coaches/{COACH}/reservations",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert "content-length" not in resp.request.headers
    assert resp.request.headers["transfer-encoding"] == "chunked"
    assert_problem(resp, 413, "payload_too_large")
    assert await snapshot(backend) == before


async def test_small_chunked_body_is_accepted(api: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"feature":'
        yield b'"trend_analysis"}'

    resp = await api.post(
        f"/v1/coaches/{COACH}/reservations",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["cost"] == 3


async def test_unknown_path_and_method(api: httpx.AsyncClient) -> None:
    assert_problem(await api.get("/v1/nothing-here"), 404, "not_found")
    assert_problem(await api.get("/"), 404, "not_found")
    assert_problem(await api.delete("/v1/features"), 405, "method_not_allowed")


# --- operations --------------------------------------------------------------------------


async def test_healthz(api: httpx.AsyncClient) -> None:
    resp = await api.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


async def test_readyz_warns_about_open_mode(api: httpx.AsyncClient) -> None:
    resp = await api.get("/readyz")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ready"
    assert body["auth"] == "open"
    assert any("OPEN MODE" in w for w in body["warnings"])


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_reservations(api: httpx.AsyncClient, clock: FrozenClock) -> None:
    for _ in range(2):
        await held(api, feature="trend_analysis")
    await spend(api, 3)
    r = await held(api, feature="checkin_draft")
    await api.post(f"/v1/reservations/{r['reservation_id']}/refund")
    await spend(api, 41)
    clock.advance(301)  # the two trend holds lapse
    assert (await reserve(api, feature="trend_analysis")).status_code == 201
    await held(api, feature="trend_analysis")
    assert (await reserve(api, feature="trend_analysis")).status_code == 429

    resp = await api.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    samples = _samples(resp.text)

    def count(feature: str, outcome: str) -> float:
        key = (
            "credits_reservations_total",
            (("feature", feature), ("outcome", outcome)),
        )
        return samples.get(key, 0.0)

    # trend: 2 lapsed, 1 + 13 committed by spend(3) and spend(41), then 2 held, 1 refused
    assert count("trend_analysis", "held") == 2 + 1 + 13 + 2
    assert count("trend_analysis", "committed") == 14
    assert count("trend_analysis", "exhausted") == 1
    assert count("checkin_draft", "held") == 1 + 2
    assert count("checkin_draft", "committed") == 2
    assert count("checkin_draft", "refunded") == 1
    assert samples[("credits_exhausted_refusals_total", (("feature", "trend_analysis"),))] == 1
    assert samples[("credits_credits_total", (("kind", "committed"),))] == 44
    assert samples[("credits_credits_total", (("kind", "expired"),))] == 6


async def test_openapi_lists_every_route(api: httpx.AsyncClient) -> None:
    resp = await api.get("/openapi.json")
    assert resp.status_code == 200
    paths = resp.json()["paths"]
    routes = {(path, method) for path, ops in paths.items() for method in ops}
    assert routes >= {
        ("/v1/features", "get"),
        ("/v1/coaches/{coach_id}/reservations", "post"),
        ("/v1/reservations/{reservation_id}", "get"),
        ("/v1/reservations/{reservation_id}/commit", "post"),
        ("/v1/reservations/{reservation_id}/refund", "post"),
        ("/v1/coaches/{coach_id}/usage", "get"),
        ("/v1/usage/batch", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    }
    reserve_op = paths["/v1/coaches/{coach_id}/reservations"]["post"]
    assert {"201", "200", "422", "429"} <= set(reserve_op["responses"])


# --- month boundary --------------------------------------------------------------------------


async def test_hold_made_before_midnight_is_charged_to_its_month(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    clock.set(datetime(2099, 11, 30, 23, 59, 50, tzinfo=UTC))
    r = await held(api, feature="trend_analysis", ttl=60)
    assert r["period"] == "2099-11"
    clock.advance(20)  # 2099-12-01 00:00:10
    resp = await api.post(f"/v1/reservations/{r['reservation_id']}/commit")
    assert resp.status_code == 200
    c = resp.json()
    assert c["period"] == "2099-11"
    assert c["status"] == "committed"
    assert (c["usage"]["period"], c["usage"]["used"]) == ("2099-11", 3)
    assert c["usage"]["resets_at"] == "2099-12-01T00:00:00Z"
    # Committed in December: the note says which month its figures are for.
    assert c["note"] == "Used 3 credits · 47 of 50 left for November"
    december = await usage(api)
    assert (december["period"], december["used"], december["held"]) == ("2099-12", 0, 0)
    assert december["resets_at"] == "2100-01-01T00:00:00Z"
