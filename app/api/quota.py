"""The quota headers: the IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers,
structured-field syntax of drafts -09 to -12), built in one place.

Single reserve answers (201, 200, 429) and single usage reads carry them, always for the
current period; batch routes carry none. The quota unit is credits, so there is no
``qu`` parameter::

    RateLimit-Policy: "monthly";q=<allowance>;w=<seconds in the current month>
    RateLimit: "monthly";r=<remaining>;t=<seconds until resets_at>
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from app import domain
from app.domain import Period, Usage

POLICY: Final = "ratelimit-policy"
LIMIT: Final = "ratelimit"

#: A policy's text is the same for every answer of one allowance in one month, and a
#: month's ``resets_at`` the same for all of them: both worked out once. Bounded.
_POLICIES: dict[tuple[int, Period], str] = {}
_RESETS: dict[Period, datetime] = {}
_CACHE_MAX: Final = 1024


def quota_headers(
    allowance: int, remaining: int, period: Period, reset_seconds: int
) -> dict[str, str]:
    """The two fields for the current ``period``; ``reset_seconds`` is ``t``: the
    seconds until it resets, or on a 429 the answer's Retry-After."""
    policy = _POLICIES.get((allowance, period))
    if policy is None:
        if len(_POLICIES) >= _CACHE_MAX:
            _POLICIES.clear()
        policy = _POLICIES[(allowance, period)] = f'"monthly";q={allowance};w={period.seconds}'
    return {POLICY: policy, LIMIT: f'"monthly";r={remaining};t={reset_seconds}'}


def usage_quota_headers(usage: Usage, now: datetime) -> dict[str, str]:
    """The fields for ``usage``, a usage of the current period, read at ``now``."""
    period = usage.period
    resets_at = _RESETS.get(period)
    if resets_at is None:
        if len(_RESETS) >= _CACHE_MAX:
            _RESETS.clear()
        resets_at = _RESETS[period] = period.resets_at
    return quota_headers(
        usage.allowance, usage.remaining, period, domain.seconds_until(resets_at, now)
    )
