"""What the service answers, as frozen dataclasses read from its JSON."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = [
    "Event",
    "EventPage",
    "Feature",
    "FeatureAvailability",
    "Grant",
    "Reservation",
    "Usage",
    "parse_time",
]


def parse_time(text: str) -> datetime:
    """An RFC 3339 instant as the service writes it (``2026-12-01T00:00:00Z``)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class Feature:
    feature: str
    cost: int
    label: str

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Feature:
        return cls(feature=body["feature"], cost=body["cost"], label=body["label"])


@dataclass(frozen=True, slots=True)
class FeatureAvailability:
    feature: str
    cost: int
    available: bool


@dataclass(frozen=True, slots=True)
class Usage:
    """A coach's month. ``allowance`` = ``base_allowance`` + ``granted``."""

    coach_id: str
    period: str
    allowance: int
    base_allowance: int
    granted: int
    used: int
    held: int
    remaining: int
    percent_used: int
    level: str
    resets_at: datetime
    features: tuple[FeatureAvailability, ...]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Usage:
        return cls(
            coach_id=body["coach_id"],
            period=body["period"],
            allowance=body["allowance"],
            # A service without per-coach allowances and grants leaves these out.
            base_allowance=body.get("base_allowance", body["allowance"]),
            granted=body.get("granted", 0),
            used=body["used"],
            held=body["held"],
            remaining=body["remaining"],
            percent_used=body["percent_used"],
            level=body["level"],
            resets_at=parse_time(body["resets_at"]),
            features=tuple(
                FeatureAvailability(f["feature"], f["cost"], f["available"])
                for f in body["features"]
            ),
        )


@dataclass(frozen=True, slots=True)
class Reservation:
    """A hold on credits; ``note`` is set once committed."""

    reservation_id: str
    coach_id: str
    feature: str
    cost: int
    status: str
    period: str
    expires_at: datetime
    usage: Usage
    note: str | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Reservation:
        return cls(
            reservation_id=body["reservation_id"],
            coach_id=body["coach_id"],
            feature=body["feature"],
            cost=body["cost"],
            status=body["status"],
            period=body["period"],
            expires_at=parse_time(body["expires_at"]),
            usage=Usage.from_json(body["usage"]),
            note=body.get("note"),
        )


@dataclass(frozen=True, slots=True)
class Grant:
    """Credits added to (or, when negative, taken from) one period's allowance."""

    grant_id: str
    coach_id: str
    period: str
    credits: int
    reason: str
    granted_at: datetime
    usage: Usage | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Grant:
        usage = body.get("usage")
        return cls(
            grant_id=body["grant_id"],
            coach_id=body["coach_id"],
            period=body["period"],
            credits=body["credits"],
            reason=body["reason"],
            granted_at=parse_time(body["granted_at"]),
            usage=Usage.from_json(usage) if usage is not None else None,
        )


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a coach's event log.

    ``fields`` is the entry as sent, with what its ``kind`` adds: ``feature`` and
    ``cost`` for a hold and its settlement, ``grant_id``, ``credits`` and ``reason`` for
    ``granted``, ``monthly_allowance`` for ``allowance_changed``, ``expires_at`` for
    ``extended``.
    """

    seq: int
    at: datetime
    kind: str
    reservation_id: str | None
    fields: Mapping[str, Any]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Event:
        return cls(
            seq=body["seq"],
            at=parse_time(body["at"]),
            kind=body["kind"],
            reservation_id=body.get("reservation_id"),
            fields=dict(body),
        )


@dataclass(frozen=True, slots=True)
class EventPage:
    """Newest first; pass ``next_before`` as ``before`` for the next page (``None``: last)."""

    events: tuple[Event, ...]
    next_before: int | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> EventPage:
        return cls(
            events=tuple(Event.from_json(e) for e in body["events"]),
            next_before=body.get("next_before"),
        )
