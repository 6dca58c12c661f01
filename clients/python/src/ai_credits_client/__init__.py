"""Worker SDK for the AI credits service: hold credits around an AI action.

::

    async with CreditsClient("http://credits:8000", api_key=KEY) as credits:
        async with credits.hold(coach_id, "trend_analysis", timeout=30) as hold:
            draft = await generate(...)         # the AI action
        print(hold.note)                        # "Used 3 credits · 47 of 50 left this month"

The hold reserves on entry, keeps itself alive while the block runs, commits when the
block finishes, and refunds when the block raises, is cancelled or runs past
``timeout``; ``hold.refund()`` discards output that finished but is unusable.
:class:`SyncCreditsClient` has the same methods for synchronous workers.

Dropped connections and 502/503/504 are retried with backoff, honouring
``Retry-After``, for the calls that cannot apply twice (see :mod:`ai_credits_client.core`);
every error is a :class:`CreditsClientError` (the tree is in
:mod:`ai_credits_client.errors`). Needs only ``httpx``.
"""

from ai_credits_client._async import AsyncHold, CreditsClient
from ai_credits_client._sync import SyncCreditsClient, SyncHold
from ai_credits_client.core import RetryPolicy
from ai_credits_client.errors import (
    Conflict,
    CreditsClientError,
    CreditsExhausted,
    ExtensionLimit,
    Forbidden,
    GrantRefused,
    InvalidRequest,
    NotFound,
    ReservationConflict,
    Unauthorized,
    Unavailable,
)
from ai_credits_client.holds import Hold
from ai_credits_client.models import (
    Event,
    EventPage,
    Feature,
    FeatureAvailability,
    Grant,
    Reservation,
    Usage,
)

__all__ = [
    "AsyncHold",
    "Conflict",
    "CreditsClient",
    "CreditsClientError",
    "CreditsExhausted",
    "Event",
    "EventPage",
    "ExtensionLimit",
    "Feature",
    "FeatureAvailability",
    "Forbidden",
    "Grant",
    "GrantRefused",
    "Hold",
    "InvalidRequest",
    "NotFound",
    "Reservation",
    "ReservationConflict",
    "RetryPolicy",
    "SyncCreditsClient",
    "SyncHold",
    "Unauthorized",
    "Unavailable",
    "Usage",
]
