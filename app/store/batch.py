"""What the batch operations share: their items, the per-item checks the single routes
make in their schemas, and pairing each item with its own outcome."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from app import domain
from app.errors import CreditsError, InvalidRequest
from app.store.replies import Reply

SettleAction = Literal["commit", "refund"]

P = TypeVar("P")
R = TypeVar("R")
Out = TypeVar("Out")


@dataclass(frozen=True, slots=True)
class ReserveItem:
    """One reservation of a batch."""

    coach_id: str
    feature: str
    ttl_seconds: int | None = None
    idempotency_key: str | None = None


def check_item(item: ReserveItem) -> None:
    """What the single-item route checks in its schema and headers, checked per item so
    that one bad item fails alone."""
    ttl = item.ttl_seconds
    if ttl is not None and not domain.MIN_TTL_SECONDS <= ttl <= domain.MAX_TTL_SECONDS:
        raise InvalidRequest(
            f"ttl_seconds must be between {domain.MIN_TTL_SECONDS} and {domain.MAX_TTL_SECONDS}."
        )
    key = item.idempotency_key
    if key is not None and not domain.is_valid_idempotency_key(key):
        raise InvalidRequest("idempotency_key must be 1-255 printable ASCII characters.")


def prepare(items: Sequence[P], make: Callable[[P], R]) -> list[R | CreditsError]:
    """Each item's prepared call, or the error that stopped it (it then fails alone)."""
    prepared: list[R | CreditsError] = []
    for item in items:
        try:
            prepared.append(make(item))
        except CreditsError as exc:
            prepared.append(exc)
    return prepared


def sent(prepared: Sequence[R | CreditsError]) -> list[R]:
    return [p for p in prepared if not isinstance(p, CreditsError)]


async def outcomes(
    prepared: Sequence[R | CreditsError],
    replies: Iterator[Reply],
    read: Callable[[R, Reply], Awaitable[Out]],
) -> list[Out | CreditsError]:
    """Each item's outcome in request order: its early error, or its reply read."""
    results: list[Out | CreditsError] = []
    for p in prepared:
        if isinstance(p, CreditsError):
            results.append(p)
            continue
        try:
            results.append(await read(p, next(replies)))
        except CreditsError as exc:
            results.append(exc)
    return results
