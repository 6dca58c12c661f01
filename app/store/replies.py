"""The one reply shape every script answers, and the stored formats read outside Lua.

Every script answers ``{status, used, held, token, state, cost, expires_ms, feature,
extra, swept, monthly, granted}`` (``get_events`` appends its baseline and its events
after it, ``get_grants`` its grants); this module is the one place that reads that
shape. The stored formats are defined in
``lua/_common.lua``; this module reads the same ones.
"""

from __future__ import annotations

import re
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
    base_allowance: int
    granted: int


REPLY_LENGTH: Final = len(Reply._fields)
_tuple_new: Final = tuple.__new__


def decode_reply(raw: Sequence[Any]) -> Reply:
    """A script's reply as a Reply, whether the client decoded it to text or not."""
    if len(raw) == REPLY_LENGTH:
        (status, used, held, token, state, cost, expires_ms, feature, extra, swept) = raw[:10]
        monthly, granted = raw[10], raw[11]
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
            and type(monthly) is int
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
    """One event-log entry. Stored as ``<kind><n>|<at>|...`` (``kind`` one letter, ``at``
    ms after the period starts, in hex), the rest by kind:

    ===========================================  ========================================
    ``h`` held, ``c`` committed, ``r`` refunded,  ``<kind><cost>|<at>|<code>|<token>``
    ``e`` expired (as the record states)
    ``x`` extended                                ``x<cost>|<at>|<code>|<token>|<expires>``
    ``g`` granted                                 ``g<credits>|<at>|<i>`` (the grant is
                                                  row ``i`` of the period's grants)
    ``a`` allowance_changed                       ``a<monthly allowance>|<at>`` (none once
                                                  deleted)
    ===========================================  ========================================

    Its number and its detail (the feature's name, or the grant's row) come beside it in
    the reply. Fields a kind does not have keep their defaults here.
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


#: An event's one-letter kind in Redis and what the event log calls it.
KINDS: Final = {
    "h": "held",
    "c": "committed",
    "r": "refunded",
    "e": "expired",
    "x": "extended",
    "g": "granted",
    "a": "allowance_changed",
}

_EVENT: Final = re.compile(r"([a-z])(-?[0-9]*)\|([0-9a-f]+)(?:\|(.*))?", re.S)


def decode_event(seq: Any, row: Any, detail: Any, period_start_ms: int) -> EventRow:
    """``detail``: what the reply gives beside the row (the feature's name for a
    reservation's event, the grant's row for a granted one)."""
    raw = text(row)
    match = _EVENT.fullmatch(raw)
    if match is None or match[1] not in KINDS:
        raise ValueError(f"not an event row: {row!r}")
    letter, n, at, rest = match.groups()
    kind, number, ms = KINDS[letter], int(seq), period_start_ms + int(at, 16)
    if letter == "g":
        grant = decode_grant(detail, period_start_ms)
        credits = int(n)
        return EventRow(
            number, ms, kind, grant_id=grant.grant_id, credits=credits, reason=grant.reason
        )
    if letter == "a":
        return EventRow(number, ms, kind, monthly_allowance=int(n) if n else None)
    _code, token, *expires = (rest or "").split("|")
    if letter == "x":
        expires_ms = period_start_ms + int(expires[0], 16)
        return EventRow(number, ms, kind, token, text(detail), int(n), expires_ms=expires_ms)
    return EventRow(number, ms, kind, token, text(detail), int(n))


class Baseline(NamedTuple):
    """What the events trimmed off a period's log added up to: replaying the kept events
    on top of it gives the account's used, held and granted."""

    used: int
    held: int
    granted: int


def decode_baseline(raw: Any) -> Baseline:
    used, held, granted = text(raw).split("|")
    return Baseline(int(used), int(held), int(granted))


class GrantRow(NamedTuple):
    """One grant as stored: ``<grant_id>|<at>|<credits>|<reason>`` (``at`` ms after the
    period starts, in hex; the reason last, the one field that may hold a ``|``)."""

    grant_id: str
    ms: int
    credits: int
    reason: str


def decode_grant(raw: Any, period_start_ms: int) -> GrantRow:
    grant_id, at, credits, reason = text(raw).split("|", 3)
    return GrantRow(grant_id, period_start_ms + int(at, 16), int(credits), reason)


class StoredRecord(NamedTuple):
    """A reservation's record as stored: ``<state><cost>|<expires>|<code>`` (``expires``
    ms after the period starts, in hex), followed by ``|<seq>`` (the event that settled
    it) while a settled record is in the account."""

    state: str
    cost: int
    expires_ms: int
    code: str


_RECORD: Final = re.compile(r"([a-z])([0-9]+)\|([0-9a-f]+)\|([^|]*)(?:\|[0-9]+)?")


def decode_record(raw: Any, period_start_ms: int) -> StoredRecord:
    match = _RECORD.fullmatch(text(raw))
    if match is None:
        raise ValueError(f"not a reservation record: {raw!r}")
    state, cost, expires, code = match.groups()
    return StoredRecord(state, int(cost), period_start_ms + int(expires, 16), code)


def ms_after(start_ms: int, ms: int) -> str:
    """A time as records and events store it: ms after ``start_ms``, in hex."""
    return f"{ms - start_ms:x}"


def text(v: Any) -> str:
    if type(v) is str:
        return v
    return v.decode() if isinstance(v, bytes) else str(v)
