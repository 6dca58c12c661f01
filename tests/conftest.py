"""Shared fixtures: a frozen clock, the same store on fakeredis and on a real Redis, and
the HTTP app over either."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import fakeredis
import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app.config import Settings
from app.main import create_app
from app.store import AnyRedis, CreditStore
from tests.support.clock import FrozenClock
from tests.support.cluster import LocalCluster
from tests.support.redis import RedisProcess

pytest_plugins = ["tests.support.timeouts"]


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(datetime(2099, 11, 14, 12, 0, 0, tzinfo=UTC))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A private redis-server for the whole run; tests that break it use their own."""
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A local three-primary cluster, started only when a test asks for it."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(params=["fakeredis", "redis", "cluster"])
async def backend(
    request: pytest.FixtureRequest,
) -> AsyncIterator[AnyRedis]:
    """The same client interface over fakeredis (with Lua), a real Redis and a real
    Redis Cluster (FLUSHALL on a cluster client goes to every primary)."""
    client: AnyRedis
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(decode_responses=True)
    elif request.param == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        client = RedisCluster.from_url(cluster.live_seed_url(), decode_responses=True)
    else:
        server: RedisProcess = request.getfixturevalue("redis_server")
        client = Redis.from_url(server.url, decode_responses=True)
    await client.flushall()
    yield client
    await client.flushall()
    await client.aclose()


@pytest.fixture(params=["fakeredis", "redis"])
async def single_redis(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """One Redis server, fakeredis and a real one: for what does not depend on the
    topology (no cluster)."""
    client: Redis
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(decode_responses=True)
    else:
        server: RedisProcess = request.getfixturevalue("redis_server")
        client = Redis.from_url(server.url, decode_responses=True)
    await client.flushall()
    yield client
    await client.flushall()
    await client.aclose()


@pytest.fixture
def settings() -> Settings:
    return Settings()


@pytest.fixture
def store(backend: AnyRedis, clock: FrozenClock, settings: Settings) -> CreditStore:
    return CreditStore(
        backend,
        allowance=settings.monthly_allowance,
        feature_costs=settings.feature_costs,
        clock=clock,
    )


@pytest.fixture
async def api(
    backend: AnyRedis, clock: FrozenClock, settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the app, its lifespan running, on the parametrized backend."""
    app = create_app(settings, redis=backend, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:
            yield client
