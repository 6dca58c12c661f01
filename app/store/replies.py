"""The one reply shape every script answers, and the stored formats read outside Lua.

Every script answers ``{status, used, held, token, state, cost, expires_ms, feature,
extra, swept}`` (``get_events`` appends its baseline and its events after it); this
module is the one place that reads that shape. The stored formats are defined in
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


REPLY_LENGTH: Final = len(Reply._fields)
_tuple_new: Final = tuple.__new__


def decode_reply(raw: Sequence[Any]) -> Reply:
    """A script's reply as a Reply, whether the client decoded it to text or not."""
    if len(raw) == REPLY_LENGTH:
        status, used, held, token, state, cost, expires_ms, feature, extra, swept = raw
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
    )


class EventRow(NamedTuple):
    """One event-log entry. Stored as ``<kind><cost>|<at>|<code>|<token>`` (``kind`` one
    letter, as the record states; ``at`` ms after the period starts, in hex; ``code``
    the feature's code in its period); its number and the feature's name come beside it
    in the reply."""

    seq: int
    ms: int
    kind: str
    token: str
    feature: str
    cost: int


#: An event's one-letter kind in Redis and what the event log calls it.
KINDS: Final = {"h": "held", "c": "committed", "r": "refunded", "e": "expired"}

_EVENT: Final = re.compile(r"([a-z])([0-9]+)\|([0-9a-f]+)\|[^|]*\|(.*)")


def decode_event(seq: Any, row: Any, feature: Any, period_start_ms: int) -> EventRow:
    match = _EVENT.fullmatch(text(row))
    if match is None:
        raise ValueError(f"not an event row: {row!r}")
    kind, cost, at, token = match.groups()
    ms = period_start_ms + int(at, 16)
    return EventRow(int(seq), ms, KINDS[kind], token, text(feature), int(cost))


class Baseline(NamedTuple):
    """What the events trimmed off a period's log added up to: replaying the kept events
    on top of it gives the account's used and held."""

    used: int
    held: int


def decode_baseline(raw: Any) -> Baseline:
    used, held = text(raw).split("|")
    return Baseline(int(used), int(held))


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
