"""The ASGI app: settings, Redis client, store and routes wired together in a lifespan."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

from fastapi import FastAPI
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.types import ASGIApp

from app.api import openapi, panel, problems
from app.api.deps import KeyRing
from app.api.events import router as events_router
from app.api.hot import with_front
from app.api.limits import BodySizeLimit
from app.api.operators import router as operators_router
from app.api.routes import router
from app.api.streams import UsageStreams
from app.api.webhooks import router as webhooks_router
from app.config import Settings, load_settings
from app.errors import BackendUnavailable
from app.metrics import Metrics
from app.store import AnyRedis, Clock, CreditStore, utc_now
from app.store.shared_writes import shared_write_client
from app.webhooks.runtime import Webhooks

log = logging.getLogger("credits")


class WaitingRedisCluster(RedisCluster):
    """A cluster client whose callers wait for a free connection, as with the
    single-node BlockingConnectionPool, instead of failing at once: the plain cluster
    client raises MaxConnectionsError (a 503) as soon as one node's pool is in use.

    Each command holds one permit and uses at most one connection per node; a slot-map
    reload may take one more, hence one permit fewer than connections. The wait counts
    against the store's bound on every Redis call."""

    permits: asyncio.Semaphore

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.permits:
            return await super().execute_command(*args, **kwargs)


class CreditsAPI(FastAPI):
    """The app, with reserve and commit answered in front of its middleware stack
    wherever that gives the same answers (see ``app.api.hot``)."""

    def build_middleware_stack(self) -> ASGIApp:
        return with_front(self, super().build_middleware_stack())


#: The embedded store cannot be away, only slow: its Lua runs in Python, about 2 ms per
#: batch item, so a full batch would outlive the usual deadline on a slow machine.
EMBEDDED_TIMEOUT_SECONDS: Final = 30.0


def op_timeout_seconds(settings: Settings, client: AnyRedis) -> float:
    """The deadline of one whole Redis operation. One Redis has no socket read timeout
    (see ``connect``), so the operation is bounded by the configured timeout itself; a
    cluster client bounds each connect and read by it, and the operation (which may
    refresh the slot map first) by 2.5 times it. An in-process fakeredis, the embedded
    store or one a host or test hands over, takes ``EMBEDDED_TIMEOUT_SECONDS``."""
    fakeredis = sys.modules.get("fakeredis")  # not imported: no client can be one
    if fakeredis is not None and isinstance(client, fakeredis.FakeAsyncRedis):
        return EMBEDDED_TIMEOUT_SECONDS
    if settings.redis_cluster:
        return settings.redis_timeout_seconds * 2.5
    return settings.redis_timeout_seconds


def connect(settings: Settings) -> AnyRedis:
    """A client with bounded waits everywhere and no automatic command retries: a
    reserve retried blindly after a timeout could hold twice, so retries are the
    caller's, with an Idempotency-Key."""
    timeout = settings.redis_timeout_seconds
    if settings.redis_url is None:
        import fakeredis

        client: Redis = fakeredis.FakeAsyncRedis(decode_responses=True)
        return client
    if settings.redis_cluster:
        # No command retries here either. A failed call (a dead primary, CLUSTERDOWN
        # during a failover) makes the client reload the slot map before its next call,
        # so the first call after a failover is a fast 503 and the ones after it reach
        # the promoted replica; MOVED and ASK redirects are followed without a retry.
        cluster = WaitingRedisCluster.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=settings.redis_max_connections + 1,
            retry=Retry(NoBackoff(), 0),
        )
        assert isinstance(cluster, WaitingRedisCluster)
        cluster.permits = asyncio.Semaphore(settings.redis_max_connections)
        return cluster
    return shared_write_client(
        url=settings.redis_url,
        timeout_seconds=timeout,
        max_connections=settings.redis_max_connections,
    )


#: Container allocations (less deallocations) between two young-generation collections.
#: With dozens of requests in flight, the default 700 collected every few requests, and
#: promoted what those requests held to the old generations, whose full collections
#: then stalled every request for tens of milliseconds.
YOUNG_GENERATION_THRESHOLD: Final = 5000

_heap_settled = False


def settle_heap() -> None:
    """Once per process, as the production app starts serving: what exists by now
    (modules, the app, its routes and models) lives as long as the process, so it is
    moved out of the cycle collector's sight (``gc.freeze``), and the young generation
    is collected less often.
    Under load the collector had cost about a tenth of a request's CPU, in pauses of up
    to 80 ms; with this, a few per cent of that."""
    global _heap_settled
    if _heap_settled:
        return
    _heap_settled = True
    gc.collect()  # garbage left by start-up is freed, not frozen
    gc.freeze()
    young, *older = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_GENERATION_THRESHOLD), *older)


def create_app(
    settings: Settings | None = None,
    *,
    redis: AnyRedis | None = None,
    clock: Clock = utc_now,
    tune_gc: bool = False,
) -> FastAPI:
    """The app. ``tune_gc`` changes the process's garbage collection as it starts serving
    (``settle_heap``): for the process that serves it alone, never for a host or a test."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis if redis is not None else connect(settings)
        app.state.store = CreditStore(
            client,
            allowance=settings.monthly_allowance,
            feature_costs=settings.feature_costs,
            default_ttl_seconds=settings.reservation_ttl_seconds,
            release_batch=settings.release_batch,
            events_max=settings.events_max,
            op_timeout_seconds=op_timeout_seconds(settings, client),
            clock=clock,
            metrics=app.state.metrics,
        )
        app.state.streams = UsageStreams(
            app.state.store,
            app.state.metrics,
            poll_seconds=settings.stream_poll_seconds,
            lifetime_seconds=settings.stream_max_seconds,
            max_streams=settings.streams_max,
        )
        if settings.embedded:
            log.warning(
                "EMBEDDED REDIS: CREDITS_REDIS_URL is not set, so credits live in this "
                "process only and vanish when it stops. For trying out; run one process."
            )
        if settings.open_mode:
            log.warning(
                "OPEN MODE: CREDITS_API_KEYS is not set, so every caller may spend and read "
                "credits without a key. Never run like this outside a laptop."
            )
        try:
            await app.state.store.ensure_scripts()
        except BackendUnavailable:
            log.warning("redis is not reachable at start-up; serving 503 until it is")
        app.state.webhooks = Webhooks(app.state.store, settings, app.state.metrics)
        await app.state.webhooks.start()
        if tune_gc:
            settle_heap()
        try:
            yield
        finally:
            await app.state.webhooks.stop()
            await app.state.streams.aclose()
            await app.state.store.drain()
            await app.state.store.aclose()
            if redis is None:
                await client.aclose()

    app = CreditsAPI(
        title="AI credits",
        version="1.0.0",
        summary="Monthly AI credits for coaches: reserve, commit on success, refund on failure.",
        lifespan=lifespan,
        # Served by app.api.openapi from assets shipped in a package: no CDN.
        docs_url=None,
        redoc_url=None,
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.settings = settings
    app.state.fast_path_warning = None
    app.state.keyring = KeyRing({k: list(v) for k, v in settings.api_keys.items()})
    app.state.metrics = Metrics()
    problems.install(app)
    app.include_router(router)
    app.include_router(events_router)
    app.include_router(webhooks_router)
    app.include_router(operators_router)
    panel.install(app)
    openapi.install(app)
    app.add_middleware(BodySizeLimit)
    return app


#: What ``uvicorn app.main:app`` serves: the one process that owns its heap.
app = create_app(tune_gc=True)
