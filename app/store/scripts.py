"""The Lua scripts: their sources (shipped in the package as ``app.lua``), loading them
into Redis, and noticing when Redis came back without its data.

Each operation is one file in ``lua/`` with the shared helpers of ``_common.lua`` in
front of it; every script starts with a header naming its KEYS, ARGV and reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from redis import exceptions as redis_errors

from app.errors import WriteRefused
from app.metrics import Metrics
from app.store.keys import INSTANCE_KEY
from app.store.transport import Transport

log = logging.getLogger("credits.store")

SCRIPT_NAMES: Final = (
    "reserve",
    "settle",
    "move",
    "get_reservation",
    "get_usage",
    "get_events",
    "extend",
    "set_allowance",
    "grant",
    "get_grants",
    "outbox_claim",
    "outbox_finish",
)
LUA: Final = resources.files("app.lua")


def load_script_source(name: str) -> str:
    """An operation's Lua source with the shared helpers in front of it."""
    common = LUA.joinpath("_common.lua").read_text()
    return f"{common}\n{LUA.joinpath(f'{name}.lua').read_text()}"


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str


def _script(name: str) -> Script:
    source = load_script_source(name)
    return Script(name, source, hashlib.sha1(source.encode()).hexdigest())  # noqa: S324 - Redis names scripts by SHA1


class Scripts:
    """The scripts by name, kept loaded in Redis."""

    def __init__(self, transport: Transport, metrics: Metrics) -> None:
        self.transport = transport
        self.metrics = metrics
        self.by_name: dict[str, Script] = {name: _script(name) for name in SCRIPT_NAMES}
        self.by_sha: dict[str, Script] = {s.sha: s for s in self.by_name.values()}
        #: The data-set epoch last seen in INSTANCE_KEY; None until the first check.
        self.instance_epoch: str | None = None
        # Serialises reloads, so a burst of NOSCRIPT replies loads (and counts) each once.
        self._reload_lock = asyncio.Lock()

    def __getitem__(self, name: str) -> Script:
        return self.by_name[name]

    async def ensure_loaded(self) -> None:
        """Load any script Redis has forgotten (a restart, a flush, a new primary), and
        check whether it forgot the data too."""
        redis = self.transport.redis

        async def load() -> None:
            async with self._reload_lock:
                scripts = list(self.by_name.values())
                exists = await redis.script_exists(*(s.sha for s in scripts))
                present = _all_nodes_agree(exists, len(scripts))
                for script, ok in zip(scripts, present, strict=True):
                    if not ok:
                        await redis.script_load(script.source)
                        self.metrics.scripts_reloaded.inc()

        await self.transport.guard(load())
        await self.check_instance()

    async def check_instance(self) -> bool:
        """Compare the data-set epoch in Redis with the one seen last; False (with a
        metric and a warning) when Redis came back without its data.

        Runs at start-up, on /readyz and after NOSCRIPT, never per request. The first
        check of a process only learns the epoch: an empty Redis then is a new one.
        """
        redis = self.transport.redis

        async def read_or_create() -> Any:
            seen = await redis.get(INSTANCE_KEY)
            if seen is None:
                # NX: when processes race, the first epoch written wins for all of them.
                await redis.set(INSTANCE_KEY, secrets.token_hex(16), nx=True)
                seen = await redis.get(INSTANCE_KEY)
            return seen

        try:
            raw = await self.transport.guard(read_or_create())
        except redis_errors.ResponseError as exc:
            log.warning("could not check the redis data-set epoch: %s", exc)
            return True
        except WriteRefused as exc:
            # Redis refusing the epoch's SET: the watch is best effort, serving is not.
            log.warning("could not check the redis data-set epoch: %s", exc)
            return True
        seen = raw.decode() if isinstance(raw, bytes) else raw
        lost = self.instance_epoch is not None and seen != self.instance_epoch
        if lost:
            self.metrics.state_lost.inc()
            log.warning(
                "REDIS STATE LOST: the data-set epoch changed from %s to %s (restart "
                "without persistence, FLUSHALL or failover to an empty node); credits "
                "used and held before now are forgotten and coaches start fresh",
                self.instance_epoch,
                seen,
            )
        self.instance_epoch = seen
        return not lost


def _all_nodes_agree(exists: Any, count: int) -> list[bool]:
    """``SCRIPT EXISTS`` answers a list, or on a cluster a list per node: a script is
    present only where every node has it."""
    if isinstance(exists, dict):
        per_node = list(exists.values())
        return [all(bool(node[i]) for node in per_node) for i in range(count)]
    return [bool(x) for x in exists]
