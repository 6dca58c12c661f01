"""The hot path stays lean: no worker-thread hop per request, commands packed in C."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import DataError

from app.config import Settings
from app.main import connect
from app.store import CreditStore
from app.store.shared_writes import PackedConnection
from tests.support.redis import RedisProcess


@pytest.fixture
def no_threads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records every attempt to run something in a worker thread (and refuses it)."""
    calls: list[Any] = []

    async def refuse(func: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(func)
        raise AssertionError(f"worker-thread hop for {func!r}")

    monkeypatch.setattr(anyio.to_thread, "run_sync", refuse)
    return calls


async def test_credit_routes_never_hop_to_a_thread(
    api: httpx.AsyncClient, no_threads: list[Any]
) -> None:
    made = await api.post("/v1/coaches/hot/reservations", json={"feature": "checkin_draft"})
    assert made.status_code == 201, made.text
    rid = made.json()["reservation_id"]
    assert (await api.get(f"/v1/reservations/{rid}")).status_code == 200
    assert (await api.post(f"/v1/reservations/{rid}/commit")).status_code == 200
    assert (await api.get("/v1/coaches/hot/usage")).status_code == 200
    batch = await api.post(
        "/v1/reservations/batch",
        json={"reservations": [{"coach_id": "hot", "feature": "checkin_draft"}]},
    )
    assert batch.status_code == 200
    assert no_threads == []


@pytest.mark.parametrize(
    "command",
    [
        ("EVALSHA", "a" * 40, 3, "credits:{c-1}:2026-11:account", b"raw", 1_764_000_000_000),
        ("SET", "k", "Used 3 credits · 34 of 50 left", -5, 0.1, 10**30),
        ("CONFIG GET", "maxmemory"),
        ("SET", "k", memoryview(b"view"), bytearray(b"array")),
    ],
)
def test_packed_connection_packs_like_redis_py(command: tuple[Any, ...]) -> None:
    expected = b"".join(Connection().pack_command(*command))
    assert b"".join(PackedConnection().pack_command(*command)) == expected


@pytest.mark.parametrize("bad", [True, None, [1]])
def test_packed_connection_refuses_what_redis_py_refuses(bad: object) -> None:
    with pytest.raises(DataError):
        PackedConnection().pack_command("SET", "k", bad)


def test_connect_packs_in_c_on_plain_tcp_only() -> None:
    plain = connect(Settings(redis_url="redis://127.0.0.1:1/0", allow_open=True))
    assert isinstance(plain, Redis)
    assert plain.connection_pool.connection_class is PackedConnection
    tls = connect(Settings(redis_url="rediss://127.0.0.1:1/0", allow_open=True))
    assert isinstance(tls, Redis)
    assert tls.connection_pool.connection_class is SSLConnection


@pytest.mark.real_redis
async def test_store_round_trips_over_packed_connections(redis_server: RedisProcess) -> None:
    client = connect(Settings(redis_url=redis_server.url, allow_open=True))
    try:
        await client.flushall()
        store = CreditStore(client)
        reservation, created = await store.reserve("packed", "trend_analysis", idempotency_key="é")
        assert created
        committed = await store.commit(str(reservation.reservation_id))
        assert committed.note == "Used 3 credits · 47 of 50 left this month"
        again, created = await store.reserve("packed", "trend_analysis", idempotency_key="é")
        assert not created
        assert again.reservation_id == reservation.reservation_id
    finally:
        await client.flushall()
        await client.aclose()


async def test_reserve_and_commit_skip_the_parameter_machinery(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A valid reserve and any commit are answered without resolving parameters; other
    requests still get the standard handling (and its exact error wording)."""
    import fastapi.routing

    solved: list[object] = []
    original = fastapi.routing.solve_dependencies  # type: ignore[attr-defined]

    async def counting(*args: Any, **kwargs: Any) -> Any:
        solved.append(kwargs.get("dependant"))
        return await original(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    made = await api.post(
        "/v1/coaches/fast/reservations",
        json={"feature": "checkin_draft"},
        headers={"Idempotency-Key": "fast-1"},
    )
    assert made.status_code == 201, made.text
    done = await api.post(f"/v1/reservations/{made.json()['reservation_id']}/commit")
    assert done.status_code == 200, done.text
    assert "·" in done.text  # non-ASCII stays as is
    assert solved == []
    bad = await api.post("/v1/coaches/fast/reservations", json={"feature": 3})
    assert bad.status_code == 422
    assert "body.feature: Input should be a valid string" in bad.json()["detail"]
    assert len(solved) == 1
