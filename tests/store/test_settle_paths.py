"""settle.lua's common path, written out without the helper set, against the general
path it shortcuts: step by step over random reserves, settlements, extensions, clock
moves, allowance changes and grants, both answer the same and leave the same bytes in
Redis (every key, value and expiry)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis

from app.errors import CreditsError
from app.store import CreditStore
from app.store.batch import SettleAction
from app.store.scripts import load_script_source
from app.webhooks.outbox import Outbox
from tests.support.clock import FrozenClock
from tests.support.http import snapshot
from tests.support.redis import RedisProcess

SETTLE = load_script_source("settle")
START, END = SETTLE.index("-- >>> common path"), SETTLE.index("-- <<< common path")
#: settle.lua with its common path taken out: every call goes the general way.
GENERAL_ONLY = SETTLE[:START] + SETTLE[END:]

COSTS = {"checkin_draft": 1, "trend_analysis": 3, "summary": 2, "plan": 5}
COACHES = ("coach-a", "coach-b")


@dataclass
class Clients:
    store: Redis  # decodes replies, as the service's client does
    raw: Any  # a client that keeps bytes, for DUMP and RESTORE
    real: bool
    paths: dict[str, int] = field(default_factory=lambda: {"common": 0, "general": 0})


@pytest.fixture(params=["fakeredis", "redis"])
async def clients(request: pytest.FixtureRequest) -> AsyncIterator[Clients]:
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()
        made = Clients(
            fakeredis.FakeAsyncRedis(server=server, decode_responses=True),
            fakeredis.FakeAsyncRedis(server=server),
            real=False,
        )
    else:
        redis: RedisProcess = request.getfixturevalue("redis_server")
        made = Clients(
            Redis.from_url(redis.url, decode_responses=True), Redis.from_url(redis.url), real=True
        )
    await made.raw.flushall()
    yield made
    await made.raw.flushall()
    await made.store.aclose()
    await made.raw.aclose()


async def dump(raw: Any) -> list[tuple[bytes, bytes, int]]:
    return [(k, await raw.dump(k), await raw.pexpiretime(k)) for k in await raw.keys("*")]


async def restore(raw: Any, saved: list[tuple[bytes, bytes, int]]) -> None:
    await raw.flushall()
    for key, value, expires_at in saved:
        await raw.restore(key, 0, value)
        if expires_at > 0:
            await raw.pexpireat(key, expires_at)


async def hmget_calls(c: Clients) -> int:
    if not c.real:
        return 0
    stats = await c.raw.info("commandstats")
    return int(stats.get("cmdstat_hmget", {}).get("calls", 0))


async def settle_both_ways(c: Clients, store: CreditStore, rid: str, action: SettleAction) -> None:
    """The settlement through settle.lua as shipped and, from the same state, through
    the general path alone: the same reply and the same keyspace after."""
    command = store._settle_call(rid, action).command  # the store's exact KEYS and ARGV
    numkeys, keys_and_args = command[2], command[3:]
    saved = await dump(c.raw)
    before = await hmget_calls(c)
    shipped = await c.store.eval(SETTLE, numkeys, *keys_and_args)
    # The common path reads the account once; the general path after it reads it again.
    if c.real:
        taken = "common" if await hmget_calls(c) - before == 1 else "general"
        c.paths[taken] += 1
    after_shipped = await snapshot(c.store)
    await restore(c.raw, saved)
    general = await c.store.eval(GENERAL_ONLY, numkeys, *keys_and_args)
    assert shipped == general, (action, shipped, general)
    assert await snapshot(c.store) == after_shipped, (action, shipped)


@pytest.mark.real_redis
@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", range(4))
async def test_the_common_path_answers_and_writes_what_the_general_path_does(
    clients: Clients, seed: int
) -> None:
    rng = random.Random(seed)
    clock = FrozenClock(datetime(2099, 11, 30, 23, 30, tzinfo=UTC))
    # A short log, so that settlements also trim it into the baseline.
    store = CreditStore(clients.store, feature_costs=COSTS, events_max=7, clock=clock)
    if seed % 2:  # threshold webhooks configured: commits past 70 % go the general way
        store.outbox = Outbox(store, ["http://127.0.0.1:9/hook"], keep=50)
    ids: list[str] = []
    open_ids: list[str] = []  # not settled yet: most settlements take one of these
    settles = 0
    for _ in range(400):
        coach = rng.choice(COACHES)
        step = rng.random()
        try:
            if step < 0.35:
                ttl = rng.choice((1, 30, 300, 3600))
                held, _ = await store.reserve(coach, rng.choice(list(COSTS)), ttl_seconds=ttl)
                ids.append(str(held.reservation_id))
                open_ids.append(ids[-1])
            elif step < 0.75 and ids:
                action: SettleAction = "commit" if rng.random() < 0.7 else "refund"
                if open_ids and rng.random() < 0.8:
                    rid = open_ids.pop(rng.randrange(len(open_ids)))
                else:
                    rid = rng.choice(ids)  # settled, lapsed or live: a replay, a conflict...
                settles += 1
                await settle_both_ways(clients, store, rid, action)
            elif step < 0.8 and ids:
                await store.extend(rng.choice(ids), rng.choice((1, 60, 600)))
            elif step < 0.9:
                clock.advance(rng.choice((1, 20, 200, 900)))
            elif step < 0.95:
                await store.set_allowance(coach, rng.choice((None, 8, 30, 200)))
            else:
                await store.grant(coach, rng.choice((-2, 3, 10)), "support")
        except CreditsError:
            pass  # refusals (exhausted, too late to extend...) are part of the walk
    assert settles > 100
    if clients.real:
        # Both paths were compared often: a walk that never took one would prove nothing.
        assert clients.paths["common"] >= 30, clients.paths
        assert clients.paths["general"] >= 30, clients.paths
