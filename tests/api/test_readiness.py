"""``/readyz``: ready while Redis answers, with what every instance shares (open mode,
Redis refusing writes) listed in ``warnings`` rather than taken out of rotation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import httpx
import pytest
from fastapi import FastAPI
from redis import exceptions as redis_errors

from app.config import Scope, Settings
from app.main import create_app

KEY = "worker-key-0123456789abcdef"
REFUSAL = "Redis refused the write: OOM command not allowed when used memory > 'maxmemory'."


@pytest.fixture
async def app() -> AsyncIterator[FastAPI]:
    app = create_app(
        Settings(api_keys={KEY: [Scope.WORKER]}),
        redis=fakeredis.FakeAsyncRedis(decode_responses=True),
    )
    async with app.router.lifespan_context(app):
        yield app


async def ready(app: FastAPI) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:
        resp = await client.get("/readyz")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert body["status"] == "ready"
    return body


async def test_a_write_refusal_is_listed_while_it_lasts(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = app.state.store

    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise redis_errors.OutOfMemoryError(REFUSAL)

    # /readyz probes writes: while Redis refuses them it stays 200 and says so.
    with monkeypatch.context() as patched:
        patched.setattr(store.redis, "set", refuse)
        refusing = await ready(app)
    assert store.write_refusal == REFUSAL
    assert [w for w in refusing["warnings"] if REFUSAL in w] == [f"REDIS REFUSES WRITES: {REFUSAL}"]
    # Accepting writes again clears it.
    assert not [w for w in (await ready(app))["warnings"] if "REFUSES" in w]
    assert store.write_refusal is None


async def test_with_keys_and_the_front_serving_only_the_embedded_redis_is_a_warning(
    app: FastAPI,
) -> None:
    body = await ready(app)
    assert body["auth"] == "keys"
    assert body["fast_path"] is True
    assert [w.split(":")[0] for w in body["warnings"]] == ["EMBEDDED REDIS"]
