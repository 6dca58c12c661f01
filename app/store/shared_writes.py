"""Redis commands made in one event-loop turn, sent in one write; commands packed in C.

This is the one module that uses redis-py's connection-level API (lending a pooled
connection, packing commands, reading replies one by one); tests/store/test_shared_writes.py
fails loudly if that API moves.

Under load many tasks call Redis at once, each paying a pool checkout, a write, a wait
for its own reply and the event-loop turns in between. A ``Coalescer`` collects the
commands issued while the loop is busy and, when the turn ends, writes them together on
one pooled connection and hands each caller its own reply as it is read (replies come
back in order). The caller still awaits only its own command; an error reply (say
NOSCRIPT) reaches only the caller whose command earned it.

Only for one plain Redis server: a Redis Cluster routes by key, so its calls go one by
one. Nothing here knows the scripts or the keys.

``timeout_seconds`` bounds each write and the reading of all its replies: it is the
deadline of every call that goes out on the write, which needs no timer of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

import hiredis
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

#: Commands per write at most: a larger burst goes out as several writes on several
#: connections, so one batch never keeps Redis busy for long.
MAX_BATCH: Final = 256


class Coalescer:
    """Batches the commands one event loop sends to one Redis client."""

    __slots__ = ("_pending", "_sending", "loop", "observe", "redis", "timeout_seconds")

    def __init__(
        self,
        redis: Redis,
        loop: asyncio.AbstractEventLoop,
        timeout_seconds: float,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.redis = redis
        self.loop = loop
        self.timeout_seconds = timeout_seconds
        #: Told how many commands each write carries (a metric).
        self.observe = observe
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        # Writes in flight, kept so they are not collected mid-way and can be awaited.
        self._sending: set[asyncio.Task[None]] = set()

    def call(self, *command: Any) -> asyncio.Future[Any]:
        """Queue one command; the future gets its reply, or the error it met."""
        future: asyncio.Future[Any] = self.loop.create_future()
        if not self._pending:
            self.loop.call_soon(self._flush)
        self._pending.append((command, future))
        return future

    def _flush(self) -> None:
        # A caller that gave up before its command left (cancelled, timed out) is
        # dropped here: its command is never sent.
        pending = [item for item in self._pending if not item[1].done()]
        self._pending = []
        for start in range(0, len(pending), MAX_BATCH):
            batch = pending[start : start + MAX_BATCH]
            if self.observe is not None:
                self.observe(len(batch))
            task = self.loop.create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        answered = 0
        try:
            async with asyncio.timeout(self.timeout_seconds):
                pool = self.redis.connection_pool
                connection = await pool.get_connection()  # type: ignore[no-untyped-call]
                try:
                    await connection.send_packed_command(
                        connection.pack_commands([command for command, _ in batch]),
                        check_health=False,
                    )
                    for _, future in batch:
                        try:
                            reply = await connection.read_response()
                        except redis_errors.ResponseError as exc:
                            # An error reply is read in full: the connection stays in step.
                            if not future.done():
                                future.set_exception(exc)
                        else:
                            if not future.done():
                                future.set_result(reply)
                        answered += 1
                except BaseException:
                    # Replies may be left unread: the connection is out of step for good.
                    # (redis-py drops it itself on a failed read; this covers the rest.)
                    await connection.disconnect(nowait=True)
                    raise
                finally:
                    await pool.release(connection)
        except TimeoutError:
            _fail(batch[answered:], redis_errors.TimeoutError("Timeout reading from Redis"))
        except asyncio.CancelledError:
            _fail(batch[answered:], redis_errors.ConnectionError("Redis call abandoned"))
            raise
        except Exception as exc:  # each caller maps what it gets to its own error
            _fail(batch[answered:], exc)

    async def drain(self) -> None:
        """Wait for the writes in flight (and the ones queued now) to finish."""
        if self._pending:
            self._flush()
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


def _fail(items: list[tuple[tuple[Any, ...], asyncio.Future[Any]]], exc: BaseException) -> None:
    for _, future in items:
        if not future.done():
            future.set_exception(exc)


class PackedConnection(Connection):
    """A plain TCP connection whose commands hiredis packs, byte for byte as redis-py
    would (redis-py's asyncio connection packs in Python: with fourteen arguments per
    reserve that was a quarter of a batch's CPU). Anything hiredis does not take
    (memoryviews, multi-word command names, bad types) goes redis-py's own way."""

    def pack_command(self, *args: Any) -> list[bytes]:
        head = args[0]
        if isinstance(head, str) and " " not in head:
            try:
                return [hiredis.pack_command(args)]
            except TypeError:
                pass
        return super().pack_command(*args)


def shared_write_client(
    *, timeout_seconds: float, max_connections: int, url: str | None = None, **settings: Any
) -> Redis:
    """A client for one Redis server, set up for shared writes: bounded waits, no
    automatic command retries (a reserve retried blindly after a timeout could hold
    twice, so retries are the caller's, with an Idempotency-Key), commands packed in C."""
    options: dict[str, Any] = {
        "decode_responses": True,
        # No per-read timeout: each whole operation (pool wait, connect and replies
        # together) has one deadline, cheaper than redis-py's timer around every reply
        # (a batch reads one reply per item) and just as prompt.
        "socket_timeout": None,
        "socket_connect_timeout": timeout_seconds,
        "max_connections": max_connections,
        "timeout": timeout_seconds,
        "retry": Retry(NoBackoff(), 0),
        # With maintenance notifications on (the default under RESP3), the pool skips its
        # check for a closed socket before lending a connection, so the first call after
        # a Redis restart went out on a dead connection and was answered 503.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        **settings,
    }
    pool = (
        BlockingConnectionPool.from_url(url, **options)
        if url is not None
        else BlockingConnectionPool(**options)
    )
    if pool.connection_class is Connection:  # plain TCP (TLS and sockets keep theirs)
        pool.connection_class = PackedConnection
    return Redis(connection_pool=pool)
