"""A coach's own allowance, grants and extended holds over HTTP, on fakeredis, a real
Redis and a Redis Cluster: what each changes, what each logs, what each refuses (and
that a refusal changes nothing)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from app.domain import KEY_GRACE_SECONDS, Period, ReservationId, to_ms
from app.store import AnyRedis, CreditStore, period_keys
from app.store.keys import allowance_key, grants_key
from tests.support.clock import FrozenClock
from tests.support.http import assert_problem, snapshot

COACH = "coach-ops-1"
NOV = Period(2099, 11)


def iso(instant: datetime) -> str:
    return instant.strftime("%Y-%m-%dT%H:%M:%SZ")


async def reserve(
    api: httpx.AsyncClient, feature: str = "checkin_draft", coach: str = COACH, **body: Any
) -> dict[str, Any]:
    resp = await api.post(f"/v1/coaches/{coach}/reservations", json={"feature": feature, **body})
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


async def usage(api: httpx.AsyncClient, coach: str = COACH) -> dict[str, Any]:
    resp = await api.get(f"/v1/coaches/{coach}/usage")
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


async def events(api: httpx.AsyncClient, coach: str = COACH, **params: str) -> list[Any]:
    resp = await api.get(f"/v1/coaches/{coach}/events", params={"limit": "500", **params})
    assert resp.status_code == 200, resp.text
    out: list[Any] = resp.json()["events"]
    return out


async def set_allowance(api: httpx.AsyncClient, value: int, coach: str = COACH) -> dict[str, Any]:
    resp = await api.put(f"/v1/coaches/{coach}/allowance", json={"monthly_allowance": value})
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


async def grant(
    api: httpx.AsyncClient, credits: int, reason: str = "goodwill", coach: str = COACH, **kw: Any
) -> httpx.Response:
    return await api.post(
        f"/v1/coaches/{coach}/grants", json={"credits": credits, "reason": reason}, **kw
    )


async def commit(api: httpx.AsyncClient, rid: str) -> None:
    assert (await api.post(f"/v1/reservations/{rid}/commit")).status_code == 200


async def spend(api: httpx.AsyncClient, credits: int, coach: str = COACH) -> None:
    for _ in range(credits):
        await commit(api, (await reserve(api, coach=coach))["reservation_id"])


# --- a coach's own allowance ---------------------------------------------------------------


async def test_a_coach_s_own_allowance_applies_now_and_every_month_until_deleted(
    api: httpx.AsyncClient, backend: AnyRedis, clock: FrozenClock
) -> None:
    await spend(api, 3)
    u = await set_allowance(api, 200)
    assert (u["allowance"], u["base_allowance"], u["granted"]) == (200, 200, 0)
    assert (u["used"], u["remaining"], u["percent_used"]) == (3, 197, 1)
    # The one key of a coach that never expires while it is set.
    assert await backend.get(allowance_key(COACH)) == "200"
    assert await backend.pttl(allowance_key(COACH)) == -1

    clock.set(datetime(2100, 2, 3, tzinfo=UTC))  # months later: still the coach's own
    u = await usage(api)
    assert (u["period"], u["allowance"], u["used"]) == ("2100-02", 200, 0)

    u = (await api.delete(f"/v1/coaches/{COACH}/allowance")).json()
    assert (u["allowance"], u["base_allowance"]) == (50, 50)
    assert await backend.exists(allowance_key(COACH)) == 0


async def test_a_coach_without_an_allowance_of_its_own_has_no_key_for_it(
    api: httpx.AsyncClient, backend: AnyRedis
) -> None:
    await spend(api, 1)
    before = await snapshot(backend)
    assert allowance_key(COACH) not in before
    # Deleting what is not there changes nothing and logs nothing.
    resp = await api.delete(f"/v1/coaches/{COACH}/allowance")
    assert resp.status_code == 200
    assert resp.json()["base_allowance"] == 50
    resp = await api.delete("/v1/coaches/never-seen/allowance")
    assert resp.status_code == 200
    assert await snapshot(backend) == before


async def test_lowering_the_allowance_below_used_takes_nothing_back(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    await spend(api, 10)
    u = await set_allowance(api, 4)
    assert (u["allowance"], u["used"], u["remaining"], u["percent_used"], u["level"]) == (
        4,
        10,
        0,
        100,
        "red",
    )
    assert not any(f["available"] for f in u["features"])
    resp = await api.post(f"/v1/coaches/{COACH}/reservations", json={"feature": "checkin_draft"})
    problem = assert_problem(resp, 429, "credits_exhausted")
    assert problem["remaining"] == 0
    assert "You've used all 4 AI credits for November" in problem["detail"]
    assert (await usage(api))["used"] == 10
    # Next month the coach starts fresh at its own allowance.
    clock.set(datetime(2099, 12, 1, tzinfo=UTC))
    u = await usage(api)
    assert (u["allowance"], u["used"], u["remaining"]) == (4, 0, 4)


async def test_allowance_changes_are_logged_once_in_the_period_they_were_made(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    await set_allowance(api, 200)
    clock.advance(1)
    await set_allowance(api, 200)  # the same value: nothing changes, nothing is logged
    await set_allowance(api, 0)
    clock.advance(1)
    assert (await api.delete(f"/v1/coaches/{COACH}/allowance")).status_code == 200
    assert await events(api) == [
        {
            "seq": 3,
            "at": "2099-11-14T12:00:02Z",
            "kind": "allowance_changed",
            "monthly_allowance": None,
        },
        {
            "seq": 2,
            "at": "2099-11-14T12:00:01Z",
            "kind": "allowance_changed",
            "monthly_allowance": 0,
        },
        {
            "seq": 1,
            "at": "2099-11-14T12:00:00Z",
            "kind": "allowance_changed",
            "monthly_allowance": 200,
        },
    ]
    clock.set(datetime(2099, 12, 2, tzinfo=UTC))
    assert await events(api) == []


@pytest.mark.parametrize(
    "body",
    [
        {"monthly_allowance": -1},
        {"monthly_allowance": 1_000_001},
        {"monthly_allowance": 10.5},
        {"monthly_allowance": "10"},
        {"monthly_allowance": True},
        {"monthly_allowance": None},
        {},
        {"monthly_allowance": 10, "extra": 1},
        [10],
    ],
)
async def test_a_bad_allowance_is_422_and_changes_nothing(
    api: httpx.AsyncClient, backend: AnyRedis, body: object
) -> None:
    await set_allowance(api, 80)
    before = await snapshot(backend)
    resp = await api.put(f"/v1/coaches/{COACH}/allowance", json=body)
    assert_problem(resp, 422, "invalid_request")
    assert await snapshot(backend) == before


async def test_the_allowance_limits_are_accepted(api: httpx.AsyncClient) -> None:
    assert (await set_allowance(api, 0))["allowance"] == 0
    assert (await set_allowance(api, 1_000_000))["remaining"] == 1_000_000


@pytest.mark.parametrize("coach", ["%7Bbad%7D", "a%2Fb", "-x", "a" * 129])
async def test_a_bad_coach_id_is_422_on_every_operator_route(
    api: httpx.AsyncClient, backend: AnyRedis, coach: str
) -> None:
    before = await snapshot(backend)
    for method, body in (("PUT", {"monthly_allowance": 5}), ("DELETE", None)):
        resp = await api.request(method, f"/v1/coaches/{coach}/allowance", json=body)
        assert_problem(resp, 422, "invalid_coach_id")
    assert_problem(await grant(api, 5, coach=coach), 422, "invalid_coach_id")
    assert_problem(await api.get(f"/v1/coaches/{coach}/grants"), 422, "invalid_coach_id")
    assert await snapshot(backend) == before


# --- grants --------------------------------------------------------------------------------


async def test_a_grant_raises_this_period_s_allowance_and_ends_with_it(
    api: httpx.AsyncClient, backend: AnyRedis, clock: FrozenClock
) -> None:
    await spend(api, 13)
    resp = await grant(api, 5, "Goodwill after the outage")
    assert resp.status_code == 201, resp.text
    g = resp.json()
    assert set(g) == {"grant_id", "coach_id", "period", "credits", "reason", "granted_at", "usage"}
    assert (g["coach_id"], g["period"], g["credits"]) == (COACH, "2099-11", 5)
    assert (g["reason"], g["granted_at"]) == ("Goodwill after the outage", "2099-11-14T12:00:00Z")
    assert len(g["grant_id"]) == 22
    u = g["usage"]
    assert (u["allowance"], u["base_allowance"], u["granted"]) == (55, 50, 5)
    assert (u["used"], u["remaining"], u["percent_used"]) == (13, 42, 23)
    assert (await usage(api))["allowance"] == 55
    # The grants key lives and dies with the period's other keys.
    keys = period_keys(COACH, NOV)
    expiry = await backend.pexpiretime(keys.account)
    assert expiry == to_ms(NOV.resets_at + timedelta(seconds=KEY_GRACE_SECONDS))
    assert await backend.pexpiretime(grants_key(COACH, NOV)) == expiry

    clock.set(datetime(2099, 12, 1, tzinfo=UTC))
    u = await usage(api)
    assert (u["allowance"], u["granted"], u["used"]) == (50, 0, 0)


async def test_grants_are_listed_oldest_first_per_period(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    ids = []
    for credits, reason in ((5, "outage"), (-2, "a | b, ünïcode ✓"), (1_000_000, "pro trial")):
        resp = await grant(api, credits, reason)
        assert resp.status_code == 201, resp.text
        ids.append(resp.json()["grant_id"])
        clock.advance(60)
    listed = (await api.get(f"/v1/coaches/{COACH}/grants")).json()["grants"]
    assert [g["grant_id"] for g in listed] == ids
    assert [g["reason"] for g in listed] == ["outage", "a | b, ünïcode ✓", "pro trial"]
    assert [g["granted_at"] for g in listed] == [
        "2099-11-14T12:00:00Z",
        "2099-11-14T12:01:00Z",
        "2099-11-14T12:02:00Z",
    ]
    assert all(g["usage"]["granted"] == 1_000_003 for g in listed)
    # Logged as it was made, the reason as given.
    logged = [e for e in await events(api) if e["kind"] == "granted"]
    assert logged[::-1] == [
        {
            "seq": i + 1,
            "at": g["granted_at"],
            "kind": "granted",
            "grant_id": g["grant_id"],
            "credits": g["credits"],
            "reason": g["reason"],
        }
        for i, g in enumerate(listed)
    ]
    clock.set(datetime(2099, 12, 5, tzinfo=UTC))
    assert (await api.get(f"/v1/coaches/{COACH}/grants")).json() == {"grants": []}
    november = (await api.get(f"/v1/coaches/{COACH}/grants", params={"period": "2099-11"})).json()
    assert [g["grant_id"] for g in november["grants"]] == ids


async def test_reading_grants_creates_no_keys(api: httpx.AsyncClient, backend: AnyRedis) -> None:
    before = await snapshot(backend)
    for params in ({}, {"period": "2099-10"}):
        resp = await api.get("/v1/coaches/never-seen/grants", params=params)
        assert resp.json() == {"grants": []}
    assert await snapshot(backend) == before


async def test_a_negative_grant_may_not_take_remaining_below_zero(
    api: httpx.AsyncClient, backend: AnyRedis
) -> None:
    await spend(api, 40)
    await reserve(api, "trend_analysis")  # 3 held: 7 remain
    before = await snapshot(backend)
    problem = assert_problem(await grant(api, -8), 409, "grant_exceeds_remaining")
    assert problem["remaining"] == 7
    assert "only 7 remain" in problem["detail"]
    assert await snapshot(backend) == before
    resp = await grant(api, -7)
    assert resp.status_code == 201, resp.text
    u = resp.json()["usage"]
    assert (u["allowance"], u["granted"], u["remaining"], u["used"], u["held"]) == (
        43,
        -7,
        0,
        40,
        3,
    )
    assert_problem(await grant(api, -1), 409, "grant_exceeds_remaining")


async def test_a_negative_grant_counts_lapsed_holds_as_free(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    for _ in range(10):
        await reserve(api, "trend_analysis", ttl_seconds=10)  # 30 held, lapsing together
    clock.advance(11)
    resp = await grant(api, -50)
    assert resp.status_code == 201, resp.text
    assert resp.json()["usage"]["remaining"] == 0


async def test_a_lowered_allowance_can_leave_the_effective_one_at_zero_never_below(
    api: httpx.AsyncClient,
) -> None:
    assert (await grant(api, -40)).status_code == 201
    u = await set_allowance(api, 10)
    assert (u["allowance"], u["base_allowance"], u["granted"], u["remaining"]) == (0, 10, -40, 0)
    assert (u["percent_used"], u["level"]) == (100, "red")


async def test_a_coach_gets_at_most_one_hundred_grants_a_period(
    api: httpx.AsyncClient, backend: AnyRedis, clock: FrozenClock
) -> None:
    for _ in range(100):
        assert (await grant(api, 1)).status_code == 201
    before = await snapshot(backend)
    problem = assert_problem(await grant(api, 1), 409, "grant_limit")
    assert "at most 100 grants" in problem["detail"]
    assert await snapshot(backend) == before
    assert (await usage(api))["allowance"] == 150
    clock.set(datetime(2099, 12, 1, tzinfo=UTC))
    assert (await grant(api, 1)).status_code == 201


async def test_a_replayed_grant_key_returns_the_same_grant_and_grants_once(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    # Late on the month's last day: a replay after midnight is within the record's 24 hours.
    clock.set(datetime(2099, 11, 30, 20, 0, tzinfo=UTC))
    key = {"Idempotency-Key": "support-ticket-812"}
    first = await grant(api, 5, "outage", headers=key)
    assert first.status_code == 201
    clock.advance(30)
    again = await grant(api, 5, "outage", headers=key)
    assert again.status_code == 200
    assert again.json()["grant_id"] == first.json()["grant_id"]
    assert again.json()["granted_at"] == first.json()["granted_at"]
    assert again.json()["usage"]["granted"] == 5
    reused = await grant(api, 6, "outage", headers=key)
    assert_problem(reused, 422, "idempotency_key_reused")
    assert_problem(await grant(api, 5, "other", headers=key), 422, "idempotency_key_reused")
    # Another coach, the same key: its own grant.
    other = await grant(api, 5, "outage", coach="coach-ops-2", headers=key)
    assert other.status_code == 201
    # A reserve's key never meets a grant's.
    resp = await api.post(
        f"/v1/coaches/{COACH}/reservations", json={"feature": "checkin_draft"}, headers=key
    )
    assert resp.status_code == 201
    assert len((await api.get(f"/v1/coaches/{COACH}/grants")).json()["grants"]) == 1

    # Replayed after the month ended: the grant as made in November, nothing granted now.
    clock.set(datetime(2099, 12, 1, 0, 0, 5, tzinfo=UTC))
    late = await grant(api, 5, "outage", headers=key)
    assert late.status_code == 200
    assert (late.json()["grant_id"], late.json()["period"]) == (first.json()["grant_id"], "2099-11")
    assert (await usage(api))["granted"] == 0
    # A day after it was made the record is gone: the same key grants afresh.
    clock.set(datetime(2099, 12, 1, 20, 0, 1, tzinfo=UTC))
    assert (await grant(api, 5, "outage", headers=key)).status_code == 201
    assert (await usage(api))["granted"] == 5


@pytest.mark.parametrize(
    "body",
    [
        {"credits": 0, "reason": "nothing"},
        {"credits": 1_000_001, "reason": "too many"},
        {"credits": -1_000_001, "reason": "too many"},
        {"credits": 1.5, "reason": "half"},
        {"credits": "5", "reason": "text"},
        {"credits": True, "reason": "bool"},
        {"credits": 5, "reason": ""},
        {"credits": 5, "reason": "x" * 201},
        {"credits": 5, "reason": 5},
        {"credits": 5},
        {"reason": "no credits"},
        {"credits": 5, "reason": "ok", "extra": True},
    ],
)
async def test_a_bad_grant_is_422_and_changes_nothing(
    api: httpx.AsyncClient, backend: AnyRedis, body: dict[str, object]
) -> None:
    await spend(api, 1)
    before = await snapshot(backend)
    resp = await api.post(f"/v1/coaches/{COACH}/grants", json=body)
    assert_problem(resp, 422, "invalid_request")
    assert await snapshot(backend) == before


async def test_grant_limits_and_key_rules(api: httpx.AsyncClient, backend: AnyRedis) -> None:
    assert (await grant(api, 1_000_000, "x" * 200)).status_code == 201
    assert (await grant(api, -1_000_000, "y")).status_code == 201
    before = await snapshot(backend)
    for bad in ("", "x" * 256, "caf\xe9".encode("latin-1")):
        resp = await grant(api, 1, headers={"Idempotency-Key": bad})
        assert_problem(resp, 422, "invalid_request")
    for period in ("2099-13", "nov", "2099-1"):
        resp = await api.get(f"/v1/coaches/{COACH}/grants", params={"period": period})
        assert_problem(resp, 422, "invalid_request")
    assert await snapshot(backend) == before


async def test_grant_keys_are_scoped_to_the_calling_api_key(store: CreditStore) -> None:
    a, a_new = await store.grant(COACH, 3, "goodwill", idempotency_key="t-1", principal="key-a")
    b, b_new = await store.grant(COACH, 3, "goodwill", idempotency_key="t-1", principal="key-b")
    again, again_new = await store.grant(
        COACH, 3, "goodwill", idempotency_key="t-1", principal="key-a"
    )
    assert (a_new, b_new, again_new) == (True, True, False)
    assert a.grant_id != b.grant_id
    assert again.grant_id == a.grant_id
    assert again.usage.granted == 6


# --- extend ---------------------------------------------------------------------------------


async def test_an_extended_hold_lives_until_its_new_expiry(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    r = await reserve(api, "trend_analysis", ttl_seconds=60)
    rid = r["reservation_id"]
    clock.advance(50)
    resp = await api.post(f"/v1/reservations/{rid}/extend", json={"ttl_seconds": 600})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["status"], body["expires_at"]) == ("held", iso(clock.now + timedelta(seconds=600)))
    assert body["usage"]["held"] == 3
    clock.advance(500)  # long past the first expiry
    assert (await usage(api))["held"] == 3
    assert (await api.get(f"/v1/reservations/{rid}")).json()["status"] == "held"
    await commit(api, rid)
    logged = await events(api)
    assert [e["kind"] for e in logged] == ["committed", "extended", "held"]
    assert logged[1] == {
        "seq": 2,
        "at": "2099-11-14T12:00:50Z",
        "kind": "extended",
        "reservation_id": rid,
        "expires_at": body["expires_at"],
    }


async def test_an_extension_may_shorten_a_hold(api: httpx.AsyncClient, clock: FrozenClock) -> None:
    a = (await reserve(api, "trend_analysis", ttl_seconds=3600))["reservation_id"]
    await reserve(api, "checkin_draft", ttl_seconds=3600)
    resp = await api.post(f"/v1/reservations/{a}/extend", json={"ttl_seconds": 5})
    assert resp.status_code == 200
    clock.advance(6)
    # The earlier expiry is noticed: reads and the next change free its credits.
    assert (await usage(api))["held"] == 1
    await reserve(api)
    assert (await api.get(f"/v1/reservations/{a}")).json()["status"] == "expired"
    assert [e["kind"] for e in await events(api)][:2] == ["held", "expired"]


async def test_extending_the_earliest_hold_moves_the_next_expiry_check(
    api: httpx.AsyncClient, backend: AnyRedis, clock: FrozenClock
) -> None:
    a = (await reserve(api, ttl_seconds=60))["reservation_id"]
    b = await reserve(api, ttl_seconds=120)
    keys = period_keys(COACH, NOV)
    assert await backend.hget(keys.account, "next") == str(to_ms(clock.now) + 60_000)
    await api.post(f"/v1/reservations/{a}/extend", json={"ttl_seconds": 600})
    assert await backend.hget(keys.account, "next") == str(to_ms(clock.now) + 120_000)
    clock.advance(121)
    await reserve(api)  # releases b, which lapsed; a stays held
    assert (await api.get(f"/v1/reservations/{b['reservation_id']}")).json()["status"] == "expired"
    assert (await usage(api))["held"] == 2


async def test_a_bad_extend_body_is_422_before_the_reservation_is_looked_at(
    api: httpx.AsyncClient, backend: AnyRedis
) -> None:
    rid = (await reserve(api))["reservation_id"]
    made_up = str(ReservationId.new(COACH, NOV))
    before = await snapshot(backend)
    for body in (
        {},
        {"ttl_seconds": 0},
        {"ttl_seconds": 3601},
        {"ttl_seconds": "60"},
        {"ttl_seconds": 1.5},
        {"ttl_seconds": True},
        {"ttl_seconds": 60, "x": 1},
        None,
    ):
        for target in (rid, made_up, "nope"):
            resp = await api.post(f"/v1/reservations/{target}/extend", json=body)
            assert_problem(resp, 422, "invalid_request")
    assert await snapshot(backend) == before


async def test_extending_an_unknown_reservation_is_404_without_side_effect(
    api: httpx.AsyncClient, backend: AnyRedis
) -> None:
    await reserve(api)
    before = await snapshot(backend)
    for rid in (str(ReservationId.new(COACH, NOV)), "nope", str(ReservationId.new("other", NOV))):
        resp = await api.post(f"/v1/reservations/{rid}/extend", json={"ttl_seconds": 60})
        assert_problem(resp, 404, "reservation_not_found")
    assert await snapshot(backend) == before


async def test_settled_holds_cannot_be_extended(
    api: httpx.AsyncClient, backend: AnyRedis, clock: FrozenClock
) -> None:
    committed = (await reserve(api))["reservation_id"]
    await commit(api, committed)
    refunded = (await reserve(api))["reservation_id"]
    assert (await api.post(f"/v1/reservations/{refunded}/refund")).status_code == 200
    before = await snapshot(backend)
    for rid, code in ((committed, "reservation_committed"), (refunded, "reservation_refunded")):
        resp = await api.post(f"/v1/reservations/{rid}/extend", json={"ttl_seconds": 60})
        assert "extend" in assert_problem(resp, 409, code)["detail"]
    assert await snapshot(backend) == before


async def test_a_lapsed_hold_stays_expired_and_the_log_says_so(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    rid = (await reserve(api, ttl_seconds=30))["reservation_id"]
    clock.advance(30)  # exactly at its expiry: it has lapsed
    resp = await api.post(f"/v1/reservations/{rid}/extend", json={"ttl_seconds": 600})
    assert_problem(resp, 409, "reservation_expired")
    resp = await api.post(f"/v1/reservations/{rid}/extend", json={"ttl_seconds": 600})
    assert_problem(resp, 409, "reservation_expired")
    assert [e["kind"] for e in await events(api)] == ["expired", "held"]
    assert (await usage(api))["held"] == 0


async def test_a_hold_a_millisecond_from_lapsing_is_extended(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    rid = (await reserve(api, ttl_seconds=30))["reservation_id"]
    clock.advance(29.999)
    resp = await api.post(f"/v1/reservations/{rid}/extend", json={"ttl_seconds": 30})
    assert resp.status_code == 200
    clock.advance(0.001)
    assert (await api.get(f"/v1/reservations/{rid}")).json()["status"] == "held"
    assert [e["kind"] for e in await events(api)] == ["extended", "held"]


async def test_concurrent_extends_and_settlements_settle_once(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    rids = [(await reserve(api, ttl_seconds=5))["reservation_id"] for _ in range(20)]
    clock.advance(4)
    calls = []
    for rid in rids:
        calls += [
            api.post(f"/v1/reservations/{rid}/extend", json={"ttl_seconds": 60}),
            api.post(f"/v1/reservations/{rid}/commit"),
            api.post(f"/v1/reservations/{rid}/extend", json={"ttl_seconds": 60}),
        ]
    answers = await asyncio.gather(*calls)
    assert {a.status_code for a in answers} <= {200, 409}
    assert all(a.json()["code"] == "reservation_committed" for a in answers if a.status_code == 409)
    logged = await events(api)
    settled = [e for e in logged if e["kind"] in ("committed", "refunded", "expired")]
    assert sorted(e["reservation_id"] for e in settled) == sorted(rids)
    assert (await usage(api))["used"] == 20


async def test_no_hold_outlives_its_month_by_more_than_an_hour(
    api: httpx.AsyncClient, backend: AnyRedis, clock: FrozenClock
) -> None:
    clock.set(datetime(2099, 11, 30, 23, 30, tzinfo=UTC))
    rid = (await reserve(api, "trend_analysis", ttl_seconds=3600))["reservation_id"]
    clock.set(datetime(2099, 12, 1, 0, 0, 0, tzinfo=UTC))
    resp = await api.post(f"/v1/reservations/{rid}/extend", json={"ttl_seconds": 3600})
    assert resp.status_code == 200  # exactly to the limit
    assert resp.json()["expires_at"] == "2099-12-01T01:00:00Z"
    clock.advance(1)
    before = await snapshot(backend)
    resp = await api.post(f"/v1/reservations/{rid}/extend", json={"ttl_seconds": 3600})
    problem = assert_problem(resp, 409, "extension_limit")
    assert problem["latest_expires_at"] == "2099-12-01T01:00:00Z"
    assert await snapshot(backend) == before
    # Settled at the last moment, in December, and charged to November.
    clock.set(datetime(2099, 12, 1, 0, 59, 59, tzinfo=UTC))
    done = (await api.post(f"/v1/reservations/{rid}/commit")).json()
    assert (done["status"], done["period"], done["usage"]["used"]) == ("committed", "2099-11", 3)
    # The period's keys outlive the limit by far more than a settling margin.
    limit = datetime(2099, 12, 1, 1, tzinfo=UTC)
    keys = period_keys(COACH, NOV)
    for key in (keys.account, keys.events):  # the holds went with the last hold
        assert await backend.pexpiretime(key) >= to_ms(limit + timedelta(hours=24))


# --- the log reconciles ----------------------------------------------------------------------


async def test_replaying_the_log_reproduces_used_held_and_granted(
    api: httpx.AsyncClient, backend: AnyRedis, clock: FrozenClock
) -> None:
    import random

    rng = random.Random(7)
    rids: list[str] = []
    for _ in range(200):
        roll = rng.random()
        if roll < 0.35 or not rids:
            resp = await api.post(
                f"/v1/coaches/{COACH}/reservations",
                json={
                    "feature": rng.choice(["checkin_draft", "trend_analysis"]),
                    "ttl_seconds": rng.choice([5, 60, 600]),
                },
            )
            if resp.status_code == 201:
                rids.append(resp.json()["reservation_id"])
        elif roll < 0.6:
            rid = rng.choice(rids)
            await api.post(f"/v1/reservations/{rid}/{rng.choice(['commit', 'refund'])}")
        elif roll < 0.72:
            rid = rng.choice(rids)
            await api.post(
                f"/v1/reservations/{rid}/extend", json={"ttl_seconds": rng.choice([1, 30, 900])}
            )
        elif roll < 0.82:
            await grant(api, rng.choice([-5, -1, 2, 7]))
        elif roll < 0.88:
            if rng.random() < 0.5:
                await set_allowance(api, rng.choice([0, 20, 60]))
            else:
                await api.delete(f"/v1/coaches/{COACH}/allowance")
        else:
            clock.advance(rng.choice([1, 10, 70, 400]))
    logged = sorted(await events(api), key=lambda e: e["seq"])
    assert [e["seq"] for e in logged] == list(range(1, len(logged) + 1))
    state: dict[str, str] = {}
    cost: dict[str, int] = {}
    granted = 0
    for e in logged:
        if e["kind"] == "granted":
            granted += e["credits"]
        elif e["kind"] == "held":
            state[e["reservation_id"]], cost[e["reservation_id"]] = "held", e["cost"]
        elif e["kind"] == "extended":
            assert state[e["reservation_id"]] == "held"
        elif e["kind"] != "allowance_changed":
            assert state[e["reservation_id"]] == "held"
            state[e["reservation_id"]] = e["kind"]
    assert {k for e in logged for k in [e["kind"]]} >= {"granted", "extended", "allowance_changed"}
    used = sum(cost[r] for r, s in state.items() if s == "committed")
    held = sum(cost[r] for r, s in state.items() if s == "held")
    raw = await backend.hmget(period_keys(COACH, NOV).account, ["used", "held", "granted"])
    assert [int(v or 0) for v in raw] == [used, held, granted]


# --- the schema ------------------------------------------------------------------------------


async def test_the_schema_documents_every_operator_route_with_examples(
    api: httpx.AsyncClient,
) -> None:
    spec = (await api.get("/openapi.json")).json()
    paths, models = spec["paths"], spec["components"]["schemas"]
    want = {
        ("/v1/coaches/{coach_id}/allowance", "put"): ({"200", "401", "403", "422", "503"}, "200"),
        ("/v1/coaches/{coach_id}/allowance", "delete"): ({"200", "401", "403", "503"}, "200"),
        ("/v1/coaches/{coach_id}/grants", "post"): ({"201", "200", "409", "422", "503"}, "201"),
        ("/v1/coaches/{coach_id}/grants", "get"): ({"200", "401", "403", "422", "503"}, "200"),
        ("/v1/reservations/{reservation_id}/extend", "post"): ({"200", "404", "409", "422"}, "200"),
    }
    for (path, method), (statuses, ok) in want.items():
        operation = paths[path][method]
        assert statuses <= set(operation["responses"]), (path, method)
        # Examples live with the schemas: the answer's, and the request body's.
        answer = operation["responses"][ok]["content"]["application/json"]["schema"]["$ref"]
        assert models[answer.rsplit("/", 1)[1]]["examples"], (path, method)
        if method in ("put", "post"):
            body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert models[body.rsplit("/", 1)[1]]["examples"], (path, method)
    problems = {
        ("/v1/coaches/{coach_id}/grants", "post"): {"grant_exceeds_remaining", "grant_limit"},
        ("/v1/reservations/{reservation_id}/extend", "post"): {
            "reservation_committed",
            "reservation_refunded",
            "reservation_expired",
            "extension_limit",
        },
    }
    for (path, method), codes in problems.items():
        conflict = paths[path][method]["responses"]["409"]["content"]["application/problem+json"]
        assert {e["value"]["code"] for e in conflict["examples"].values()} == codes
