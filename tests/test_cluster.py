"""The service on a real Redis Cluster: three primaries with a replica each."""

from __future__ import annotations

import fakeredis
import pytest
from redis.asyncio.connection import Connection

from app.errors import BackendUnavailable
from app.store import CreditStore
from tests.conftest import FrozenClock


async def test_a_connection_torn_down_under_a_call_is_unavailable_not_a_crash(
    clock: FrozenClock,
) -> None:
    """During a failover the cluster client closes every connection on CLUSTERDOWN,
    also ones other tasks are about to write on; redis-py then raises AttributeError
    from its socket code. That is Redis being unavailable, not a server error."""
    store = CreditStore(fakeredis.FakeAsyncRedis(decode_responses=True), clock=clock)
    torn = Connection()  # its writer is gone, as after a concurrent disconnect
    with pytest.raises(BackendUnavailable) as caught:
        await store._guard(torn._send_packed_command([b"PING\r\n"]))
    assert isinstance(caught.value.__cause__, AttributeError)

    async def our_own_bug() -> None:
        raise AttributeError("a bug of ours stays a bug")

    with pytest.raises(AttributeError, match="bug of ours"):
        await store._guard(our_own_bug())
