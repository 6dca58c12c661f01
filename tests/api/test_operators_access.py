"""Who may set allowances, grant credits, list grants and extend holds: every refusal is
401 or 403 and changes nothing."""

from __future__ import annotations

import httpx
import pytest
from redis.asyncio import Redis

from tests.api.test_auth import ADMIN, BAD_CREDENTIALS, COACH, READER, WORKER, bearer

# The keyed app over one Redis server (fakeredis and a real one), as a fixture.
from tests.api.test_auth import client as client
from tests.support.http import assert_problem, snapshot


async def _reservation(client: httpx.AsyncClient) -> str:
    resp = await client.post(
        f"/v1/coaches/{COACH}/reservations",
        json={"feature": "checkin_draft"},
        headers=bearer(ADMIN),
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["reservation_id"])


def _requests(rid: str) -> dict[str, tuple[str, str, object]]:
    """Every operator route, with a request that would succeed given the scope."""
    return {
        "set allowance": ("PUT", f"/v1/coaches/{COACH}/allowance", {"monthly_allowance": 70}),
        "delete allowance": ("DELETE", f"/v1/coaches/{COACH}/allowance", None),
        "grant": ("POST", f"/v1/coaches/{COACH}/grants", {"credits": 2, "reason": "goodwill"}),
        "list grants": ("GET", f"/v1/coaches/{COACH}/grants", None),
        "extend": ("POST", f"/v1/reservations/{rid}/extend", {"ttl_seconds": 60}),
    }


ALLOWED: dict[str, set[str]] = {
    WORKER: {"extend"},
    READER: {"list grants"},
    ADMIN: {"set allowance", "delete allowance", "grant", "list grants", "extend"},
}


async def test_without_a_valid_key_every_operator_route_is_401(
    client: httpx.AsyncClient, single_redis: Redis
) -> None:
    rid = await _reservation(client)
    before = await snapshot(single_redis)
    for name, headers in BAD_CREDENTIALS.items():
        for route, (method, path, body) in _requests(rid).items():
            resp = await client.request(method, path, json=body, headers=headers)
            assert_problem(resp, 401, "unauthorized")
            assert resp.headers["WWW-Authenticate"].startswith("Bearer"), (name, route)
    assert await snapshot(single_redis) == before


async def test_a_bad_key_is_401_even_with_a_bad_body(client: httpx.AsyncClient) -> None:
    for method, path, body in (
        ("PUT", f"/v1/coaches/{COACH}/allowance", {"monthly_allowance": -1}),
        ("POST", f"/v1/coaches/{COACH}/grants", {"credits": 0}),
        ("POST", "/v1/reservations/nope/extend", {"ttl_seconds": 0}),
    ):
        assert_problem(await client.request(method, path, json=body), 401, "unauthorized")


@pytest.mark.parametrize("key", [WORKER, READER, ADMIN], ids=["worker", "reader", "admin"])
async def test_operator_scopes(client: httpx.AsyncClient, single_redis: Redis, key: str) -> None:
    for route in _requests("x"):
        rid = await _reservation(client)
        method, path, body = _requests(rid)[route]
        before = await snapshot(single_redis)
        resp = await client.request(method, path, json=body, headers=bearer(key))
        if route in ALLOWED[key]:
            assert resp.status_code in (200, 201), (route, resp.text)
        else:
            assert_problem(resp, 403, "forbidden")
            assert await snapshot(single_redis) == before, route


async def test_a_forbidden_caller_learns_nothing_about_its_body(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        f"/v1/coaches/{COACH}/grants", json={"credits": 0}, headers=bearer(WORKER)
    )
    assert_problem(resp, 403, "forbidden")
    assert "admin" in resp.json()["detail"]
