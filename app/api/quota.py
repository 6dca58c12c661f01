"""The quota headers: the IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers,
structured-field syntax of drafts -09 to -12), built in one place.

Single reserve answers (201, 200, 429) and single usage reads carry them, always for the
current period; batch routes carry none. The quota unit is credits, so there is no
``qu`` parameter::

    RateLimit-Policy: "monthly";q=<allowance>;w=<seconds in the current month>
    RateLimit: "monthly";r=<remaining>;t=<seconds until resets_at>

They are built as raw ASGI header pairs (lower-case names, bytes), as the front dispatch
sends them, on every reserve: ``headers_dict`` gives them to Starlette responses.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, NamedTuple

from app.domain import Period, Usage

RawHeader = tuple[bytes, bytes]

POLICY: Final = b"ratelimit-policy"
LIMIT: Final = b"ratelimit"


class _Month(NamedTuple):
    """What every answer of one allowance in one month shares, worked out once."""

    period: Period
    allowance: int
    policy: bytes
    resets_s: int


_MONTHS: dict[tuple[int, Period], _Month] = {}
_MONTHS_MAX: Final = 1024
#: The month used last: most answers are for the same month and allowance as the one
#: before, and the store hands out one Period object per month, so an identity check
#: finds it without hashing.
_last: _Month | None = None


def _month(allowance: int, period: Period) -> _Month:
    global _last
    last = _last
    if last is not None and last.period is period and last.allowance == allowance:
        return last
    month = _MONTHS.get((allowance, period))
    if month is None:
        if len(_MONTHS) >= _MONTHS_MAX:
            _MONTHS.clear()
        policy = b'"monthly";q=%d;w=%d' % (allowance, period.seconds)
        resets_s = int(period.resets_at.timestamp())
        month = _MONTHS[(allowance, period)] = _Month(period, allowance, policy, resets_s)
    _last = month
    return month


def quota_headers(
    allowance: int, remaining: int, period: Period, reset_seconds: int
) -> list[RawHeader]:
    """The two fields for the current ``period``; ``reset_seconds`` is ``t``: the
    seconds until it resets, or on a 429 the answer's Retry-After."""
    policy = _month(allowance, period).policy
    return [(POLICY, policy), (LIMIT, b'"monthly";r=%d;t=%d' % (remaining, reset_seconds))]


def usage_quota_headers(usage: Usage, now: datetime) -> list[RawHeader]:
    """The fields for ``usage``, a usage of the current period, read at ``now``."""
    month = _month(usage.allowance, usage.period)
    # domain.seconds_until in whole seconds: resets_at is on a second, so the seconds
    # until it, rounded up, are its second less now's (rounded down), at least 1.
    t = month.resets_s - int(now.timestamp())
    limit = b'"monthly";r=%d;t=%d' % (usage.remaining, t if t > 1 else 1)
    return [(POLICY, month.policy), (LIMIT, limit)]


def headers_dict(headers: list[RawHeader]) -> dict[str, str]:
    """The pairs as a Starlette response takes them."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
