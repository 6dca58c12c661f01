"""How commands reach Redis: one server, or a Redis Cluster.

The topology is chosen once, by ``transport_for``; nothing above this module asks which
one it has. Both transports bound every operation by one deadline and map every failure
the same way:

    CreditsError
    └── BackendUnavailable   (503) Redis not reachable in time, gone mid-call, or
                             refusing writes (out of memory, read-only, failed
                             persistence); the refusal is remembered in
                             ``Transport.write_refusal`` until a write succeeds

Any other Redis error reply (NOSCRIPT included) reaches the caller unchanged.

The deadline: on one server, calls share writes (``shared_writes``), and each write's
timeout bounds every call on it; every other operation runs under ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, NoReturn, TypeVar

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from app.errors import BackendUnavailable, WriteRefused
from app.store.shared_writes import Coalescer, shared_write_client

log = logging.getLogger("credits.store")

AnyRedis = Redis | RedisCluster
T = TypeVar("T")
#: One Redis command: name and arguments.
Command = tuple[Any, ...]

#: Redis failures that mean "not reachable right now", as opposed to a bug.
UNAVAILABLE_ERRORS: Final = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.MasterDownError,
    redis_errors.SlotNotCoveredError,
    redis_errors.MaxConnectionsError,
    TimeoutError,
    OSError,
)

#: Error replies by which Redis refuses a write it would otherwise take.
REFUSALS: Final = ("OOM", "READONLY", "MISCONF")


class Transport:
    """Sends commands to Redis under the deadline and the failure mapping above."""

    #: Calls in flight at once for one ``call_all``; None: all of them.
    FAN_OUT: int | None = None

    def __init__(self, redis: AnyRedis, timeout_seconds: float) -> None:
        self.redis = redis
        self.timeout_seconds = timeout_seconds
        #: Redis's latest refusal of a write, as it worded it; None once writes succeed.
        self.write_refusal: str | None = None
        #: Told how many commands each shared write carries (a metric), where writes
        #: are shared.
        self.observe_write: Callable[[float], None] | None = None

    async def call(self, *command: Any) -> Any:
        """One command, e.g. an EVALSHA; a cluster routes it by its keys."""
        try:
            return await self._send(command)
        except Exception as exc:
            self._raise_mapped(exc)

    async def call_all(self, commands: Sequence[Command]) -> list[Any]:
        """Independent commands (reads) side by side: each one's reply, or the Redis
        error reply it met, in order. Only an unreachable Redis fails them all."""
        if self.FAN_OUT is None:
            sends = [self._send(c) for c in commands]
        else:
            limit = asyncio.Semaphore(self.FAN_OUT)

            async def bounded(command: Command) -> Any:
                async with limit:
                    return await self._send(command)

            sends = [bounded(c) for c in commands]
        replies = await asyncio.gather(*sends, return_exceptions=True)
        for reply in replies:
            if isinstance(reply, Exception) and not _is_reply(reply):
                self._raise_mapped(reply)
        return replies

    async def call_in_order(self, commands: Sequence[Command], preload: Sequence[str]) -> list[Any]:
        """Script calls in one round trip where the topology allows it; the calls on one
        coach run in the order given. ``preload`` are script sources loaded first, so no
        call meets NOSCRIPT."""
        return await self.guard(self._in_order(commands, preload))

    async def guard(self, operation: Awaitable[T]) -> T:
        """Any other Redis operation, under the deadline and the failure mapping."""
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return await operation
        except Exception as exc:
            self._raise_mapped(exc)

    async def drain(self) -> None:
        """Wait for this loop's calls in flight; before closing the client."""

    async def aclose(self) -> None:
        """Close the clients the transport made itself (not the one it was given)."""

    def _send(self, command: Command) -> Awaitable[Any]:
        return self._execute(command)

    async def _execute(self, command: Command) -> Any:
        async with asyncio.timeout(self.timeout_seconds):
            return await self.redis.execute_command(*command)

    async def _in_order(self, commands: Sequence[Command], preload: Sequence[str]) -> list[Any]:
        raise NotImplementedError

    def _raise_mapped(self, exc: Exception) -> NoReturn:
        mapped = self._mapped(exc)
        if mapped is exc:
            raise exc
        raise mapped from exc

    def _mapped(self, exc: Exception) -> Exception:
        """The error a caller sees for ``exc``."""
        if isinstance(exc, UNAVAILABLE_ERRORS):
            log.warning("redis unavailable: %s: %s", type(exc).__name__, exc)
            return BackendUnavailable()
        if _is_refusal(exc):
            message = str(exc)
            self.write_refusal = message
            log.warning("redis refused a write: %s", message)
            return WriteRefused(message.split(". script:", 1)[0])
        if isinstance(exc, AttributeError | TypeError) and _raised_by_redis_transport(exc):
            log.warning("redis connection torn down mid-call: %s: %s", type(exc).__name__, exc)
            return BackendUnavailable()
        return exc


class SharedWrites:
    """The shared writes to one Redis server: a coalescer per event loop the store is
    used on (tests and some hosts run more than one), the one used last found first."""

    def __init__(self, redis: Redis, timeout_seconds: float, transport: Transport) -> None:
        self.redis = redis
        self.timeout_seconds = timeout_seconds
        self.transport = transport
        self._by_loop: dict[asyncio.AbstractEventLoop, Coalescer] = {}
        self._last: Coalescer | None = None

    def coalescer(self) -> Coalescer:
        """This event loop's coalescer, made on first use."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last.loop is loop:
            return last
        found = self._by_loop.get(loop)
        if found is None:
            for gone in [old for old in self._by_loop if old.is_closed()]:
                del self._by_loop[gone]
            found = self._by_loop[loop] = Coalescer(
                self.redis, loop, self.timeout_seconds, self.transport.observe_write
            )
        self._last = found
        return found

    async def drain(self) -> None:
        coalescer = self._by_loop.get(asyncio.get_running_loop())
        if coalescer is not None:
            await coalescer.drain()


class SingleServerTransport(Transport):
    """One Redis server: the calls one event loop makes in one turn share a write."""

    def __init__(self, redis: Redis, timeout_seconds: float, *, coalesce: bool = True) -> None:
        super().__init__(redis, timeout_seconds)
        self.single = redis
        self.coalesce = coalesce
        self.shared = SharedWrites(redis, timeout_seconds, self)

    def coalescer(self) -> Coalescer:
        return self.shared.coalescer()

    async def call(self, *command: Any) -> Any:
        # The hot path: the shared write's future is awaited directly, one coroutine.
        try:
            if self.coalesce:
                return await self.coalescer().call(*command)
            return await self._execute(command)
        except Exception as exc:
            self._raise_mapped(exc)

    def _send(self, command: Command) -> Awaitable[Any]:
        if self.coalesce:
            return self.coalescer().call(*command)
        return self._execute(command)

    async def drain(self) -> None:
        await self.shared.drain()

    async def _in_order(self, commands: Sequence[Command], preload: Sequence[str]) -> list[Any]:
        # One MULTI/EXEC that loads the scripts it runs: no SCRIPT FLUSH can land between
        # two calls, so none meets NOSCRIPT. Re-running a call that had, after later calls
        # on its coach had run, would break the order (a refund could beat its commit).
        async with self.single.pipeline(transaction=True) as pipe:
            for source in preload:
                pipe.script_load(source)
            for command in commands:
                pipe.execute_command(*command)
            raw = list(await pipe.execute(raise_on_error=False))[len(preload) :]
        for reply in raw:
            if isinstance(reply, Exception):
                raise reply
        return raw


class ClusterTransport(Transport):
    """A Redis Cluster: each call goes to the primary of its keys' slot.

    The calls of one loop turn share writes here too, grouped per node by the cluster
    client's slot map, each node's on a pooled connection of a client of its own. A MOVED
    or ASK answer means the call never ran: it goes through the cluster client, which
    follows the redirect and refreshes its map. After a node failed (the call may have
    run: it is not sent again), calls go through the cluster client until one succeeds,
    which lets the client find the promoted replica."""

    #: Calls that go through the cluster client take a connection each: the bound keeps
    #: one large batch from holding them all.
    FAN_OUT = 64

    def __init__(
        self, redis: RedisCluster, timeout_seconds: float, *, coalesce: bool = True
    ) -> None:
        super().__init__(redis, timeout_seconds)
        self.cluster = redis
        self.coalesce = coalesce
        self._nodes: dict[str, SharedWrites] = {}
        # Through the cluster client until it has a slot map, and after a node failed.
        self._rerouting = True

    async def call(self, *command: Any) -> Any:
        try:
            # Script calls share writes (their first key names the node); any other
            # command goes through the cluster client, which finds its keys itself.
            if self.coalesce and not self._rerouting and command[0] in _SCRIPTS and command[2]:
                try:
                    return await self._node_of(command[3]).coalescer().call(*command)
                except redis_errors.AskError:  # MOVED too: the call never ran
                    pass
                except UNAVAILABLE_ERRORS:
                    self._rerouting = True
                    raise
            reply = await self._execute(command)
            self._rerouting = False
            return reply
        except Exception as exc:
            self._raise_mapped(exc)

    def _send(self, command: Command) -> Awaitable[Any]:
        return self.call(*command)

    def _node_of(self, key: str) -> SharedWrites:
        node = self.cluster.get_node_from_key(key)
        assert node is not None  # a primary, or SlotNotCoveredError
        shared = self._nodes.get(node.name)
        if shared is None:
            settings = self.cluster.get_connection_kwargs()
            client = shared_write_client(
                host=node.host,
                port=node.port,
                timeout_seconds=self.timeout_seconds,
                max_connections=NODE_CONNECTIONS,
                **{k: v for k, v in settings.items() if k in _NODE_SETTINGS},
            )
            shared = self._nodes[node.name] = SharedWrites(client, self.timeout_seconds, self)
        return shared

    async def drain(self) -> None:
        for shared in list(self._nodes.values()):
            await shared.drain()

    async def aclose(self) -> None:
        await self.drain()
        for shared in self._nodes.values():
            await shared.redis.aclose()
        self._nodes.clear()

    async def _in_order(self, commands: Sequence[Command], preload: Sequence[str]) -> list[Any]:
        # Cluster pipelines cannot load scripts: one sequential lane per coach (the hash
        # tag of its first key) keeps each coach's order, lanes run side by side.
        for source in preload:
            await self.cluster.script_load(source)  # every primary
        lanes: dict[str, list[int]] = {}
        for i, command in enumerate(commands):
            first_key = str(command[3])
            lanes.setdefault(first_key.split("}", 1)[0], []).append(i)
        results: list[Any] = [None] * len(commands)
        sem = asyncio.Semaphore(self.FAN_OUT)

        async def lane(indexes: list[int]) -> None:
            async with sem:
                for i in indexes:
                    results[i] = await self.call(*commands[i])

        await asyncio.gather(*(lane(ix) for ix in lanes.values()))
        return results


#: The commands that share writes on a cluster: ``(name, sha or source, numkeys, key...)``.
_SCRIPTS: Final = frozenset({"EVALSHA", "EVAL"})
#: Connections per node for the shared writes: one write carries many calls.
NODE_CONNECTIONS: Final = 16
#: What a node's client takes over from the cluster client's settings.
_NODE_SETTINGS: Final = frozenset(
    {
        "username",
        "password",
        "credential_provider",
        "client_name",
        "decode_responses",
        "encoding",
        "encoding_errors",
        "socket_connect_timeout",
        "socket_keepalive",
        "socket_keepalive_options",
        "connection_class",
        *(
            f"ssl_{name}"
            for name in (
                "keyfile",
                "certfile",
                "cert_reqs",
                "ca_certs",
                "ca_data",
                "check_hostname",
            )
        ),
    }
)


def transport_for(redis: AnyRedis, timeout_seconds: float, *, coalesce: bool = True) -> Transport:
    """The transport for a client's topology: the one place that asks."""
    if isinstance(redis, RedisCluster):
        return ClusterTransport(redis, timeout_seconds, coalesce=coalesce)
    return SingleServerTransport(redis, timeout_seconds, coalesce=coalesce)


def _is_refusal(exc: BaseException) -> bool:
    return isinstance(exc, redis_errors.OutOfMemoryError | redis_errors.ReadOnlyError) or (
        isinstance(exc, redis_errors.ResponseError) and str(exc).startswith(REFUSALS)
    )


def _is_reply(exc: BaseException) -> bool:
    """An error Redis replied with that is the caller's to handle (NOSCRIPT, say)."""
    return (
        isinstance(exc, redis_errors.ResponseError)
        and not isinstance(exc, UNAVAILABLE_ERRORS)
        and not _is_refusal(exc)
    )


def _raised_by_redis_transport(exc: BaseException) -> bool:
    """Whether an AttributeError/TypeError came out of redis-py's or asyncio's socket
    code. The asyncio client can write on a connection that another task has just torn
    down (a cluster client closes every connection on CLUSTERDOWN during a failover) and
    then raises these instead of ConnectionError; our own bugs must still surface."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return isinstance(module, str) and module.startswith(("redis.", "asyncio."))
