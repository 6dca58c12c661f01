"""What a coach costs in Redis memory: two months of use, the ordinary and the abusive,
and the bytes a coach's keys take (``MEMORY USAGE``, every key of the coach). The bench
reports them; the tests hold them to the bounds the service promises."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from app.errors import CreditsError
from app.store import AnyRedis, CreditStore, ReserveItem

#: Moves a frozen clock on by that many seconds.
Advance = Callable[[float], Any]


async def coach_bytes(redis: AnyRedis, coach_id: str) -> dict[str, int]:
    """``MEMORY USAGE`` of every key of the coach (found with SCAN), every element
    counted (``SAMPLES 0``), by key name."""
    sizes: dict[str, int] = {}
    async for name in redis.scan_iter(match=f"credits:{{{coach_id}}}:*", count=1000):
        key = name.decode() if isinstance(name, bytes) else str(name)
        sizes[key] = int(await redis.memory_usage(key, samples=0) or 0)
    return sizes


async def ordinary_month(
    store: CreditStore, coach_id: str, advance: Advance, *, with_keys: bool
) -> None:
    """A month of ordinary use with the default allowance of 50: 50 actions spread over
    the month, one in ten a trend analysis, four in five committed, the others refunded;
    the last commit uses the fiftieth credit. ``with_keys``: each carries an
    Idempotency-Key."""
    for i in range(50):
        feature = "trend_analysis" if i % 10 == 0 else "checkin_draft"
        key = f"draft-{coach_id}-{i}" if with_keys else None
        reservation, _ = await store.reserve(coach_id, feature, idempotency_key=key)
        advance(40)
        rid = str(reservation.reservation_id)
        await (store.refund(rid) if i % 5 == 1 else store.commit(rid))
        advance(timedelta(hours=13).total_seconds())


async def abusive_loop(
    store: CreditStore, coach_id: str, *, cycles: int, with_keys: bool, batch: int = 500
) -> None:
    """``cycles`` reserve-and-refund cycles on one coach through the batch calls, as
    fast as they go (the store needs an allowance of at least ``batch``)."""
    done = 0
    while done < cycles:
        n = min(batch, cycles - done)
        items = [
            ReserveItem(coach_id, "checkin_draft", None, f"k-{done + i}" if with_keys else None)
            for i in range(n)
        ]
        outcomes = await store.reserve_many(items)
        held = [str(o[0].reservation_id) for o in outcomes if not isinstance(o, CreditsError)]
        assert len(held) == n, [o for o in outcomes if isinstance(o, CreditsError)][:1]
        settled = await store.settle_many([(rid, "refund") for rid in held])
        assert not [o for o in settled if isinstance(o, CreditsError)]
        done += n
