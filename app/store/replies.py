"""The one reply shape every script answers, and the event-log row format.

Every script answers ``{status, used, held, token, state, cost, expires_ms, feature,
extra, swept}`` (``get_events`` appends event rows after it); this module is the one
place that reads that shape.
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
    """One event-log entry as stored: ``<seq>|<ms>|<kind>|<token>|<feature>|<cost>``."""

    seq: int
    ms: int
    kind: str
    token: str
    feature: str
    cost: int


def decode_event(raw: Any) -> EventRow:
    seq, ms, kind, token, feature, cost = text(raw).split("|")
    return EventRow(int(seq), int(ms), kind, token, feature, int(cost))


def text(v: Any) -> str:
    if type(v) is str:
        return v
    return v.decode() if isinstance(v, bytes) else str(v)
