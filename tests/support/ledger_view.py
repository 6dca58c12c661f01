"""What a coach's keys hold, read through the store's own decoders: for tests that check
the stored state beside what the store answers."""

from __future__ import annotations

from app import domain
from app.domain import Period
from app.store import AnyRedis, CreditStore, Event, StoredRecord, decode_record, period_keys


async def logged_events(store: CreditStore, coach_id: str, period: Period) -> list[Event]:
    """Every event the period's log keeps, newest first."""
    events: list[Event] = []
    before: int | None = None
    while True:
        page = await store.events(coach_id, period=period, before=before, limit=500)
        events.extend(page.events)
        if page.next_before is None:
            return events
        before = page.next_before


async def stored_records(redis: AnyRedis, coach_id: str, period: Period) -> dict[str, StoredRecord]:
    """Every reservation record the period keeps, by token: the account's and the
    settled generations'."""
    keys = period_keys(coach_id, period)
    start = domain.to_ms(period.starts_at)
    found: dict[str, StoredRecord] = {}
    for name in reversed(keys.settled):
        for token, raw in (await redis.hgetall(name)).items():
            found[_text(token)] = decode_record(raw, start)
    for field, raw in (await redis.hgetall(keys.account)).items():
        if _text(field).startswith("r:"):
            found[_text(field)[2:]] = decode_record(raw, start)
    return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
