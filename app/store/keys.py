"""Every Redis key name the service uses, spelled once.

A coach's keys carry the hash tag ``{coach_id}`` (valid ids hold no braces, so the tag
is exactly the id): they share one Redis Cluster slot, and one script call can change
them atomically.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from binascii import crc_hqx
from typing import Final, NamedTuple

from redis.crc import key_slot

from app.domain import Period

PREFIX: Final = "credits"

#: Written once per data set with a random epoch and never expires: if it vanishes or
#: changes, Redis came back without the data it held. Not a coach key, so on a Redis
#: Cluster it lives on one primary only and watches only that node's data.
INSTANCE_KEY: Final = f"{PREFIX}:instance"

#: A short-lived key that /readyz writes to learn whether Redis accepts writes.
WRITE_PROBE_KEY: Final = f"{PREFIX}:write-probe"


class PeriodKeys(NamedTuple):
    """One coach's keys for one period (see docs/storage.md for what each holds): the
    account, the live holds, the event log, then the settled generations, newest first."""

    account: str
    holds: str
    events: str
    settled_0: str
    settled_1: str
    settled_2: str

    @property
    def settled(self) -> tuple[str, str, str]:
        return self.settled_0, self.settled_1, self.settled_2


def period_keys(coach_id: str, period: Period | str) -> PeriodKeys:
    """``period`` as a Period or already as its ``YYYY-MM`` text."""
    base = f"{PREFIX}:{{{coach_id}}}:{period}"
    return PeriodKeys(
        f"{base}:account",
        f"{base}:holds",
        f"{base}:events",
        f"{base}:settled:0",
        f"{base}:settled:1",
        f"{base}:settled:2",
    )


def allowance_key(coach_id: str) -> str:
    """The coach's own monthly allowance (a number), absent unless one is set. Not per
    period, and the one key of a coach that never expires while it is set."""
    return f"{PREFIX}:{{{coach_id}}}:allowance"


def grants_key(coach_id: str, period: Period | str) -> str:
    """One period's grants, oldest first (``replies.decode_grant``)."""
    return f"{PREFIX}:{{{coach_id}}}:{period}:grants"


def idempotency_keys(coach_id: str) -> tuple[str, str, str]:
    """The coach's idempotency records, in three generations, newest first."""
    base = f"{PREFIX}:{{{coach_id}}}:idem"
    return f"{base}:0", f"{base}:1", f"{base}:2"


def idempotency_digest(principal: str, idempotency_key: str) -> str:
    """Names an idempotency record within its coach's hashes: 72 bits of SHA-256 (a
    coach keeps at most 1,500 records, so a collision is a 1-in-10^16 event), so a
    caller's key never reaches Redis raw and every record is short."""
    digest = hashlib.sha256(f"{principal}\n{idempotency_key}".encode()).digest()[:9]
    return base64.urlsafe_b64encode(digest).decode()


def grant_idempotency_digest(principal: str, idempotency_key: str) -> str:
    """A grant's idempotency record, in the same hashes and scope as a reserve's (the
    caller's API key and the coach) but named apart, so the two never meet."""
    return idempotency_digest(f"grant\n{principal}", idempotency_key)


# --- threshold webhooks ------------------------------------------------------------
#
# A commit records its threshold webhooks in the same script call, so in the coach's
# slot: every slot has its own outbox, named with a hash tag that falls in that slot.
# The outbox keys start ``credits:outbox:`` (never ``credits:{``), so no coach's keys
# are mistaken for them.

SLOT_COUNT: Final = 16384


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """A hash tag for every Redis Cluster slot, by slot: the first hex numeral found
    whose CRC16 falls in it (about 315,000 tries, a fifth of a second, once a process)."""
    tags: list[str | None] = [None] * SLOT_COUNT
    left, n = SLOT_COUNT, 0
    while left:
        tag = format(n, "x")
        slot = crc_hqx(tag.encode(), 0) % SLOT_COUNT
        if tags[slot] is None:
            tags[slot] = tag
            left -= 1
        n += 1
    return tuple(t for t in tags if t is not None)


def coach_slot(coach_id: str) -> int:
    """The slot of every key of this coach (its hash tag is the id itself)."""
    return key_slot(coach_id.encode())


class OutboxKeys(NamedTuple):
    """One slot's outbox (see docs/storage.md)."""

    deliveries: str  # HASH  "<url> <webhook-id>" -> the delivery record (JSON)
    due: str  # ZSET  pending deliveries by when the next attempt is due (ms)
    log: str  # ZSET  every delivery kept, by when it was recorded (ms)
    failed: str  # ZSET  deliveries given up on, by when they were recorded (ms)


_outboxes: list[OutboxKeys | None] = [None] * SLOT_COUNT


def outbox_keys(slot: int) -> OutboxKeys:
    keys = _outboxes[slot]
    if keys is None:
        base = f"{PREFIX}:outbox:{{{slot_tags()[slot]}}}"
        keys = _outboxes[slot] = OutboxKeys(
            f"{base}:deliveries", f"{base}:due", f"{base}:log", f"{base}:failed"
        )
    return keys


def key_slot_of(key: str) -> int:
    """The slot of any key name (by its hash tag, as Redis Cluster computes it)."""
    return key_slot(key.encode())


#: Slots whose outbox has pending deliveries, scored by when the sweeper should look
#: there next (ms). Written after the commit by the process that made it; the sweeper's
#: pass over every slot repairs what a process that died in between left out.
OUTBOX_DUE_SLOTS: Final = f"{PREFIX}:outbox:due-slots"
#: Slots whose outbox holds deliveries, scored by the newest one's time (ms): where
#: ``GET /v1/webhook-deliveries`` looks.
OUTBOX_SLOTS: Final = f"{PREFIX}:outbox:slots"
#: The sweeper's lease: the one process that looks over the outboxes holds it.
OUTBOX_SWEEPER_LEASE: Final = f"{PREFIX}:outbox:sweeper"
