"""Every Redis key name the service uses, spelled once.

A coach's keys carry the hash tag ``{coach_id}`` (valid ids hold no braces, so the tag
is exactly the id): they share one Redis Cluster slot, and one script call can change
them atomically.
"""

from __future__ import annotations

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
    """One coach's keys for one period (see docs/storage.md for what each holds)."""

    account: str
    holds: str
    events: str


def period_keys(coach_id: str, period: Period | str) -> PeriodKeys:
    """``period`` as a Period or already as its ``YYYY-MM`` text."""
    base = f"{PREFIX}:{{{coach_id}}}:{period}"
    return PeriodKeys(f"{base}:account", f"{base}:holds", f"{base}:events")


def allowance_key(coach_id: str) -> str:
    """The coach's own monthly allowance (a number), absent unless one is set. Not per
    period, and the one key of a coach that never expires while it is set."""
    return f"{PREFIX}:{{{coach_id}}}:allowance"


def grants_key(coach_id: str, period: Period | str) -> str:
    """One period's grants, oldest first (see ``replies.decode_grant``)."""
    return f"{PREFIX}:{{{coach_id}}}:{period}:grants"


def idempotency_key_name(coach_id: str, principal: str, idempotency_key: str) -> str:
    # Hashed: a caller's key never appears raw in a key name (no braces, no size games).
    digest = hashlib.sha256(f"{principal}\n{idempotency_key}".encode()).hexdigest()[:40]
    return f"{PREFIX}:{{{coach_id}}}:idem:{digest}"


def grant_idempotency_key_name(coach_id: str, principal: str, idempotency_key: str) -> str:
    """A grant's idempotency record: the same scope as a reserve's (the caller's API key
    and the coach, hashed), in a namespace of its own, so the two never meet."""
    digest = hashlib.sha256(f"{principal}\n{idempotency_key}".encode()).hexdigest()[:40]
    return f"{PREFIX}:{{{coach_id}}}:grant-idem:{digest}"
