"""Bearer keys and scopes over HTTP: who may call what, and that refusals change nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis

from app.config import Scope, Settings
from app.domain import Period, ReservationId
from app.main import create_app
from tests.support.clock import FrozenClock
from tests.support.http import assert_problem, snapshot

WORKER = "worker-key-0123456789abcdef"
READER = "reader-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
WORKER_2 = "second-worker-key-0123456789"
COACH = "coach-7"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def client(single_redis: Redis, clock: FrozenClock) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        api_keys={
            WORKER: [Scope.WORKER],
            WORKER_2: [Scope.WORKER],
            READER: [Scope.READER],
            ADMIN: [Scope.ADMIN],
        }
    )
    app = create_app(settings, redis=single_redis, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as c:
            yield c


async def _reservation(client: httpx.AsyncClient, key: str = WORKER) -> str:
    resp = await client.post(
        f"/v1/coaches/{COACH}/reservations",
        json={"feature": "trend_analysis"},
        headers=bearer(key),
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["reservation_id"])


def _requests(rid: str) -> dict[str, tuple[str, str, dict[str, object] | None]]:
    """Every key-protected route, with a request that would succeed given the scope."""
    return {
        "features": ("GET", "/v1/features", None),
        "reserve": ("POST", f"/v1/coaches/{COACH}/reservations", {"feature": "checkin_draft"}),
        "get": ("GET", f"/v1/reservations/{rid}", None),
        "commit": ("POST", f"/v1/reservations/{rid}/commit", None),
        "refund": ("POST", f"/v1/reservations/{rid}/refund", None),
        "usage": ("GET", f"/v1/coaches/{COACH}/usage", None),
        "batch": ("POST", "/v1/usage/batch", {"coach_ids": [COACH, "other"]}),
    }


BAD_CREDENTIALS: dict[str, dict[str, str]] = {
    "missing": {},
    "wrong key": bearer("not-a-configured-key-at-all"),
    "prefix of a key": bearer(WORKER[:-1]),
    "key with a suffix": bearer(WORKER + "x"),
    "wrong scheme": {"Authorization": f"Basic {WORKER}"},
    "no scheme": {"Authorization": WORKER},
    "empty bearer": {"Authorization": "Bearer "},
    "key in another header": {"X-Api-Key": WORKER},
}


async def test_without_a_valid_key_every_route_is_401(
    client: httpx.AsyncClient, single_redis: Redis
) -> None:
    rid = await _reservation(client)
    before = await snapshot(single_redis)
    assert before
    for name, headers in BAD_CREDENTIALS.items():
        for route, (method, path, body) in _requests(rid).items():
            resp = await client.request(method, path, json=body, headers=headers)
            assert resp.status_code == 401, (name, route, resp.text)
            assert_problem(resp, 401, "unauthorized")
            assert resp.headers["WWW-Authenticate"].startswith("Bearer"), (name, route)
    assert await snapshot(single_redis) == before


async def test_a_bad_key_is_401_even_with_a_bad_body(client: httpx.AsyncClient) -> None:
    # Authentication comes first: an anonymous caller learns nothing about validation.
    resp = await client.post(
        "/v1/coaches/%7Bbad%7D/reservations", json={"feature": "nope"}, headers={}
    )
    assert_problem(resp, 401, "unauthorized")


ALLOWED: dict[str, set[str]] = {
    WORKER: {"features", "reserve", "get", "commit", "refund", "usage"},
    READER: {"features", "usage", "batch"},
    ADMIN: {"features", "reserve", "get", "commit", "refund", "usage", "batch"},
}


@pytest.mark.parametrize("key", [WORKER, READER, ADMIN], ids=["worker", "reader", "admin"])
async def test_scopes(client: httpx.AsyncClient, single_redis: Redis, key: str) -> None:
    for route in _requests("x"):
        # A fresh hold for each route, so a commit and a refund each find one to settle.
        rid = await _reservation(client, ADMIN)
        method, path, body = _requests(rid)[route]
        before = await snapshot(single_redis)
        resp = await client.request(method, path, json=body, headers=bearer(key))
        if route in ALLOWED[key]:
            assert resp.status_code in (200, 201), (route, resp.text)
        else:
            assert resp.status_code == 403, (route, resp.text)
            assert_problem(resp, 403, "forbidden")
            assert await snapshot(single_redis) == before, route


async def test_operations_routes_need_no_key(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/metrics")).status_code == 200
    resp = await client.get("/readyz")
    assert resp.status_code == 200
    body = resp.json()
    assert body["auth"] == "keys"
    assert not any("OPEN MODE" in w for w in body["warnings"])


async def test_idempotency_keys_are_scoped_to_the_api_key(client: httpx.AsyncClient) -> None:
    async def reserve(key: str) -> httpx.Response:
        return await client.post(
            f"/v1/coaches/{COACH}/reservations",
            json={"feature": "trend_analysis"},
            headers={**bearer(key), "Idempotency-Key": "job-1"},
        )

    a = await reserve(WORKER)
    b = await reserve(ADMIN)
    c = await reserve(WORKER_2)
    assert (a.status_code, b.status_code, c.status_code) == (201, 201, 201)
    ids = {r.json()["reservation_id"] for r in (a, b, c)}
    assert len(ids) == 3
    assert c.json()["usage"]["held"] == 9

    # Each caller's replay finds its own reservation.
    again = await reserve(WORKER)
    assert again.status_code == 200
    assert again.json()["reservation_id"] == a.json()["reservation_id"]
    again = await reserve(ADMIN)
    assert again.status_code == 200
    assert again.json()["reservation_id"] == b.json()["reservation_id"]
    usage = await client.get(f"/v1/coaches/{COACH}/usage", headers=bearer(READER))
    assert usage.json()["held"] == 9


async def test_any_worker_may_settle_any_reservation(client: httpx.AsyncClient) -> None:
    # The reservation id is the capability: keys are scopes, not owners.
    rid = await _reservation(client, WORKER)
    resp = await client.post(f"/v1/reservations/{rid}/commit", headers=bearer(WORKER_2))
    assert resp.status_code == 200
    assert resp.json()["status"] == "committed"


async def test_unknown_reservation_with_a_key_is_404_and_without_is_401(
    client: httpx.AsyncClient,
) -> None:
    rid = str(ReservationId.new("ghost", Period(2099, 11)))
    assert_problem(
        await client.get(f"/v1/reservations/{rid}", headers=bearer(WORKER)),
        404,
        "reservation_not_found",
    )
    assert_problem(await client.get(f"/v1/reservations/{rid}"), 401, "unauthorized")
