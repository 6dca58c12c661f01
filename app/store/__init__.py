"""The ledger in Redis, one concern a module:

- ``keys``: every key name, spelled once;
- ``replies``: the scripts' one reply shape and the stored formats read outside Lua;
- ``scripts``: the Lua sources, loading them, noticing a Redis that lost its data;
- ``transport``: how commands reach one server or a cluster, under one deadline and
  one failure mapping (``shared_writes``: one server's calls sharing writes);
- ``ledger``: ``CreditStore``, the operations;
- ``batch``: what the batch operations share.
"""

from app.store.batch import ReserveItem, SettleAction
from app.store.keys import (
    INSTANCE_KEY,
    PeriodKeys,
    idempotency_digest,
    idempotency_keys,
    period_keys,
)
from app.store.ledger import Clock, CreditStore, Event, EventPage, utc_now
from app.store.replies import Baseline, Reply, StoredRecord, decode_record, decode_reply
from app.store.scripts import SCRIPT_NAMES, load_script_source
from app.store.transport import AnyRedis, Transport

__all__ = [
    "INSTANCE_KEY",
    "SCRIPT_NAMES",
    "AnyRedis",
    "Baseline",
    "Clock",
    "CreditStore",
    "Event",
    "EventPage",
    "PeriodKeys",
    "Reply",
    "ReserveItem",
    "SettleAction",
    "StoredRecord",
    "Transport",
    "decode_record",
    "decode_reply",
    "idempotency_digest",
    "idempotency_keys",
    "load_script_source",
    "period_keys",
    "utc_now",
]
