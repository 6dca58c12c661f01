"""The one reply shape every script answers, and the event-log row format.

Every script answers ``{status, used, held, token, state, cost, expires_ms, feature,
extra, swept, base, granted}`` (``get_events`` and ``get_grants`` append rows after it);
this module is the one place that reads that shape, and the rows' formats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, NamedTuple

from app.domain import Status

#: A record's one-letter state in Redis and what it means.
STATES: Final = {
    "h": Status.HELD,
    "c": Status.COMMITTED,
    "r": Status.REFUNDED,
    "e": Status.EXPIRED,
}


class Reply(NamedTuple):
    status: str
    used: int
    held: int
    token: str
    state: str
    cost: int
    expires_ms: int
    feature: str
    extra: str
    swept: int
    #: The coach's monthly allowance (its own, else the configured one) and the period's
    #: grants: the effective allowance is made of them (``domain.effective_allowance``).
    base: int
    granted: int


REPLY_LENGTH: Final = len(Reply._fields)
_tuple_new: Final = tuple.__new__


def decode_reply(raw: Sequence[Any]) -> Reply:
    """A script's reply as a Reply, whether the client decoded it to text or not."""
    if len(raw) == REPLY_LENGTH:
        status, used, held, token, state, cost, expires_ms, feature, extra, swept, base, granted = (
            raw
        )
        # The service's clients decode replies already: then every field has its type
        # and the reply is taken as it is.
        if (
            type(status) is str
            and type(used) is int
            and type(held) is int
            and type(token) is str
            and type(state) is str
            and type(cost) is int
            and type(expires_ms) is int
            and type(feature) is str
            and type(extra) is str
            and type(swept) is int
            and type(base) is int
            and type(granted) is int
        ):
            return _tuple_new(Reply, raw)
    return Reply(
        text(raw[0]),
        int(raw[1]),
        int(raw[2]),
        text(raw[3]),
        text(raw[4]),
        int(raw[5]),
        int(raw[6]),
        text(raw[7]),
        text(raw[8]),
        int(raw[9]),
        int(raw[10]),
        int(raw[11]),
    )


class EventRow(NamedTuple):
    """One event-log entry as stored: ``<seq>|<ms>|<kind>|`` and three fields by kind:

    ==========================================  ======================================
    ``held``, ``committed``, ``refunded``,      ``<token>|<feature>|<cost>``
    ``expired``
    ``extended``                                ``<token>|<feature>|<expires_ms>``
    ``granted``                                 ``<grant_id>|<credits>|<reason>``
    ``allowance_changed``                       ``||<monthly allowance>`` (empty once
                                                deleted)
    ==========================================  ======================================

    The reason comes last: it is the one field that may hold a ``|``. Fields a kind does
    not have keep their defaults here.
    """

    seq: int
    ms: int
    kind: str
    token: str = ""
    feature: str = ""
    cost: int = 0
    expires_ms: int = 0
    grant_id: str = ""
    credits: int = 0
    reason: str = ""
    monthly_allowance: int | None = None


def decode_event(raw: Any) -> EventRow:
    seq_text, ms_text, kind, a, b, c = text(raw).split("|", 5)
    seq, ms = int(seq_text), int(ms_text)
    if kind == "granted":
        return EventRow(seq, ms, kind, grant_id=a, credits=int(b), reason=c)
    if kind == "allowance_changed":
        return EventRow(seq, ms, kind, monthly_allowance=int(c) if c else None)
    if kind == "extended":
        return EventRow(seq, ms, kind, token=a, feature=b, expires_ms=int(c))
    return EventRow(seq, ms, kind, token=a, feature=b, cost=int(c))


class GrantRow(NamedTuple):
    """One grant as stored: ``<grant_id>|<ms>|<credits>|<reason>`` (the reason last)."""

    grant_id: str
    ms: int
    credits: int
    reason: str


def decode_grant(raw: Any) -> GrantRow:
    grant_id, ms, credits, reason = text(raw).split("|", 3)
    return GrantRow(grant_id, int(ms), int(credits), reason)


def text(v: Any) -> str:
    if type(v) is str:
        return v
    return v.decode() if isinstance(v, bytes) else str(v)
