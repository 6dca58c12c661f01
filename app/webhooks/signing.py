"""One attempt's body and headers, signed per Standard Webhooks when it is sent.

The body is the same on every attempt (it describes the commit that crossed the
threshold); the signature covers the time of sending, so a retry is signed afresh and
receivers that refuse timestamps older than five minutes still take it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from typing import Final

import orjson
from standardwebhooks import Webhook

from app import domain
from app.api.schemas import usage_json
from app.domain import Period, Usage

EVENT_TYPE: Final = "usage.threshold_crossed"


def body(
    *,
    threshold: int,
    coach_id: str,
    period: str,
    recorded_at_ms: int,
    base_allowance: int,
    granted: int,
    used: int,
    held: int,
    feature_costs: dict[str, int],
) -> bytes:
    """``{"type", "timestamp", "data": {"threshold", "coach_id", "period", "usage"}}``,
    the usage as the commit left it, rendered as the API renders usage."""
    usage = Usage.of(
        coach_id,
        Period.parse(period),
        allowance=base_allowance,
        used=used,
        held=held,
        costs=feature_costs,
        granted=granted,
    )
    return orjson.dumps(
        {
            "type": EVENT_TYPE,
            "timestamp": domain.iso_z(domain.from_ms(recorded_at_ms)),
            "data": {
                "threshold": threshold,
                "coach_id": coach_id,
                "period": period,
                "usage": usage_json(usage),
            },
        }
    )


@cache
def _signer(secret: str) -> Webhook:
    return Webhook(secret)


def headers(webhook_id: str, payload: bytes, secret: str, sent_at: float) -> dict[str, str]:
    """The request headers of one attempt, signed for ``sent_at`` (seconds since epoch)."""
    timestamp = int(sent_at)
    signature = _signer(secret).sign(
        webhook_id, datetime.fromtimestamp(timestamp, UTC), payload.decode()
    )
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }
