"""Every made-up reservation id is a 404 that changes nothing, against a real Redis:
periods 0000-00 to 9999-12 (month 00 and 13 too), over-long ids, non-canonical base64,
in the single calls and per item in a settle batch."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from app.config import Settings
from app.errors import ReservationNotFound
from app.main import create_app
from app.store import CreditStore
from tests.support.clock import FrozenClock
from tests.support.redis import RedisProcess

COACH = "coach-forged"
NOW = datetime(2099, 11, 14, 12, tzinfo=UTC)
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

pytestmark = pytest.mark.real_redis


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


coach_parts = st.one_of(
    st.just(b64(COACH.encode())),  # a real coach
    st.builds(lambda s: b64(s.encode()), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}")),
    st.text(alphabet=B64, min_size=1, max_size=200),  # non-canonical or not base64 at all
    st.builds(lambda s: b64(s.encode()), st.text(min_size=1, max_size=20)),  # invalid coaches
)
periods = st.builds(
    lambda y, m: f"{y:04d}{m:02d}", st.integers(0, 9999), st.integers(0, 13)
) | st.just("209911")
tokens = st.one_of(
    st.text(alphabet=B64, min_size=22, max_size=22),  # canonical or with spare bits set
    st.text(alphabet=B64, min_size=0, max_size=300),
)
#: Well-formed ids of the real coach's current period that name no reservation: these
#: reach the scripts.
unknown = st.builds(
    lambda raw: f"{b64(COACH.encode())}.209911.{b64(raw)}", st.binary(min_size=16, max_size=16)
)
forged = st.one_of(
    unknown,
    st.builds(lambda c, p, t: f"{c}.{p}.{t}", coach_parts, periods, tokens),
    st.text(min_size=1, max_size=600).filter(lambda s: "/" not in s),
)


@pytest.fixture
async def redis(redis_server: RedisProcess) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/6", decode_responses=True)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


async def everything(redis: Redis) -> dict[str, Any]:
    return {name: await redis.dump(name) async for name in redis.scan_iter(count=1000)}


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rid=forged)
@example(rid=f"{b64(COACH.encode())}.209911.{'A' * 22}")
@example(rid=f"{b64(COACH.encode())}.999912.{'A' * 22}")
@example(rid=f"{b64(COACH.encode())}.000000.{'A' * 22}")
@example(rid=f"{b64(COACH.encode())}.209913.{'A' * 22}")
@example(rid=f"{b64(COACH.encode())}.209911.{'A' * 21}B")  # spare bits set
@example(rid=f"{b64(COACH.encode())}=.209911.{'A' * 22}")
@example(rid=f"{b64(COACH.encode())}.209911.{'A' * 2000}")
async def test_a_made_up_id_is_not_found_and_changes_nothing(redis: Redis, rid: str) -> None:
    clock = FrozenClock(NOW)
    store = CreditStore(redis, clock=clock)
    # A coach with a hold that has lapsed and a settled one: any sweep or write shows.
    await store.check_instance()
    await store.reserve(COACH, "trend_analysis", ttl_seconds=5)
    done, _ = await store.reserve(COACH, "checkin_draft")
    await store.commit(str(done.reservation_id))
    clock.advance(60)
    before = await everything(redis)
    for call in (store.get_reservation, store.commit, store.refund):
        with pytest.raises(ReservationNotFound):
            await call(rid)
    outcomes = await store.settle_many([(rid, "commit"), (rid, "refund")])
    assert all(isinstance(o, ReservationNotFound) for o in outcomes), outcomes
    assert await everything(redis) == before
    app = create_app(Settings(), redis=redis, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as api:
            path = f"/v1/reservations/{quote(rid, safe='')}"
            for method, suffix in (("GET", ""), ("POST", "/commit"), ("POST", "/refund")):
                r = await api.request(method, path + suffix)
                # 405 where the id spells another route (GET /v1/reservations/batch).
                assert r.status_code in (404, 405), r.text
                if r.status_code == 404:
                    assert r.json()["code"] in ("reservation_not_found", "not_found")
            body = {"settlements": [{"reservation_id": rid, "action": "refund"}]}
            r = await api.post("/v1/reservations/settle", json=body)
            assert r.status_code in (200, 422), r.text  # 422: longer than an id can be
            if r.status_code == 200:
                (item,) = r.json()["results"]
                assert (item["status"], item["problem"]["code"]) == (404, "reservation_not_found")
    assert await everything(redis) == before
    await redis.flushdb()
