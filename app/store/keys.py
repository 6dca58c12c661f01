"""Every Redis key name the service uses, spelled once.

A coach's keys carry the hash tag ``{coach_id}`` (valid ids hold no braces, so the tag
is exactly the id): they share one Redis Cluster slot, and one script call can change
them atomically.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final, NamedTuple

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
