"""Helpers shared by the HTTP tests: problem checks and whole-database snapshots."""

from __future__ import annotations

from typing import Any

import httpx
from redis.asyncio.cluster import RedisCluster

from app.store import AnyRedis

PROBLEM_FIELDS = ("type", "title", "status", "detail", "code")


def assert_problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status and code; returns the body."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json"), resp.headers
    body: dict[str, Any] = resp.json()
    for field in PROBLEM_FIELDS:
        assert field in body, (field, body)
    assert body["status"] == status
    assert body["code"] == code, body
    assert isinstance(body["detail"], str)
    assert body["detail"].strip()
    assert isinstance(body["title"], str)
    assert body["title"].strip()
    return body


async def snapshot(redis: AnyRedis) -> dict[str, tuple[str, object, int]]:
    """Every key with its type, value and absolute expiry, to prove a request wrote nothing.

    The absolute expiry (not the remaining TTL) is compared so that time passing on a real
    server does not look like a change.
    """
    state: dict[str, tuple[str, object, int]] = {}
    if isinstance(redis, RedisCluster):
        # KEYS on a cluster client asks one node; the ledger is spread over all primaries.
        names = await redis.keys("*", target_nodes=RedisCluster.PRIMARIES)
    else:
        names = await redis.keys("*")
    for raw in names:
        key = raw.decode() if isinstance(raw, bytes) else raw
        kind = str(await redis.type(key))
        value: object
        if kind == "string":
            value = await redis.get(key)
        elif kind == "hash":
            value = await redis.hgetall(key)
        elif kind == "zset":
            value = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = await redis.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(await redis.smembers(key))
        else:
            value = None
        state[key] = (kind, value, int(await redis.pexpiretime(key)))
    return state
