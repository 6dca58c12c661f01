"""The floor: the least an HTTP credit check can do in Python. One POST endpoint parses a
small JSON body and runs one EVALSHA of a minimal check-and-increment script through a
shared redis.asyncio client. Whatever this service does beyond that is its overhead.

Run as ``uvicorn bench.floor_app:app`` with ``BENCH_REDIS_URL`` set.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from redis.asyncio import BlockingConnectionPool, Redis

#: Check-and-increment: add the cost unless it would pass the allowance.
MINIMAL_SCRIPT: Final = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local cost, allowance = tonumber(ARGV[1]), tonumber(ARGV[2])
if used + cost > allowance then
  return {0, used}
end
return {1, redis.call('INCRBY', KEYS[1], cost)}
"""


class Body(BaseModel):
    feature: str


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    pool = BlockingConnectionPool.from_url(
        os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
        decode_responses=True,
        max_connections=64,
    )
    client = Redis(connection_pool=pool)
    app.state.redis = client
    app.state.sha = await client.script_load(MINIMAL_SCRIPT)
    yield
    await client.aclose()


app = FastAPI(lifespan=lifespan)


@app.post("/v1/coaches/{coach_id}/reservations", status_code=201)
async def reserve(coach_id: str, body: Body) -> JSONResponse:
    redis: Redis = app.state.redis
    ok, used = await redis.evalsha(app.state.sha, 1, f"floor:{{{coach_id}}}", 1, 50)
    if not ok:
        return JSONResponse({"coach_id": coach_id, "used": used}, status_code=429)
    return JSONResponse({"coach_id": coach_id, "feature": body.feature, "used": used}, 201)
