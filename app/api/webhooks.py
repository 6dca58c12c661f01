"""``GET /v1/webhook-deliveries``: what became of threshold webhooks (admin)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app import domain
from app.api.deps import Principal, require
from app.api.openapi import problems
from app.config import Scope
from app.webhooks.outbox import Delivery, DeliveryStatus, Outbox

router = APIRouter()

Admin = Annotated[Principal, Depends(require(Scope.ADMIN))]


class DeliveryOut(BaseModel):
    webhook_id: Annotated[str, Field(examples=["msg_2026-11_90_coach-42"])]
    type: Literal["usage.threshold_crossed"]
    url: Annotated[str, Field(examples=["https://hooks.example.com/credits"])]
    attempts: Annotated[int, Field(description="Attempts begun so far.")]
    status: DeliveryStatus
    last_error: str | None = Field(description="What went wrong on the latest failed attempt.")
    next_attempt_at: str | None = Field(
        description="When the next attempt is due (while pending), else null.",
        examples=["2026-11-14T12:00:30Z"],
    )


class DeliveriesOut(BaseModel):
    # One pending delivery: the schema generator drops the nulls a finished one has.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "deliveries": [
                        {
                            "webhook_id": "msg_2026-11_90_coach-42",
                            "type": "usage.threshold_crossed",
                            "url": "https://hooks.example.com/credits",
                            "attempts": 3,
                            "status": "pending",
                            "last_error": "HTTP 503",
                            "next_attempt_at": "2026-11-14T12:02:41.200Z",
                        }
                    ]
                }
            ]
        }
    )

    deliveries: list[DeliveryOut]


def delivery_json(d: Delivery) -> dict[str, object]:
    return {
        "webhook_id": d.webhook_id,
        "type": "usage.threshold_crossed",
        "url": d.url,
        "attempts": d.attempts,
        "status": d.status,
        "last_error": d.last_error,
        "next_attempt_at": (
            None if d.next_attempt_at is None else domain.iso_z(domain.from_ms(d.next_attempt_at))
        ),
    }


@router.get(
    "/v1/webhook-deliveries",
    response_model=DeliveriesOut,
    responses=problems("invalid_request", "backend_unavailable"),
    tags=["operations"],
    summary="Threshold webhook deliveries, newest first",
    description=(
        "One delivery per endpoint and threshold crossed, kept 7 days: `pending` while "
        "it is being tried (every attempt carries the same `webhook_id`), `delivered` "
        "once the endpoint answered 2xx, `failed` when it was given up after the retry "
        "window (24 hours by default)."
    ),
)
async def list_deliveries(
    request: Request,
    _: Admin,
    status: DeliveryStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> JSONResponse:
    outbox: Outbox = request.app.state.webhooks.outbox
    found = await outbox.deliveries(status, limit)
    return JSONResponse({"deliveries": [delivery_json(d) for d in found]})
