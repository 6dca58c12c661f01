"""Dashboard feeds: a coach's event log, and a live usage stream (Server-Sent Events).

The stream polls rather than having the scripts ``PUBLISH``:

* The scripts stay what they are, pure ledger changes on one coach's slot. A publish
  from inside them would be fire-and-forget anyway (a subscriber that was reconnecting
  misses it), so a subscriber would still need to read the usage to catch up.
* Pub/sub on Redis Cluster is broadcast to every node (or, with sharded pub/sub, needs
  one more connection per shard); reading coaches' usage is ordinary single-slot reads
  that work unchanged on a single Redis and on a cluster.
* Holds that lapse change the usage without any script running, so a push design would
  still need a timer to notice them; a poll sees them on its next tick.

The streams of a process are read together (``app.api.streams``): one batched read per
poll interval (``CREDITS_STREAM_POLL_SECONDS``, default 1 s) for all of them, one read
per coach however many streams watch it. The cost is latency of up to one interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Final, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from app import domain
from app.api import paths  # noqa: F401  (registers the {coach_id:coach_id} path type)
from app.api.deps import AnyScope, Reader, StoreDep
from app.api.openapi import problems
from app.api.schemas import EXAMPLE_RESERVATION_ID
from app.api.streams import UsageStreams, Watch, usage_text
from app.domain import Period
from app.errors import InvalidRequest
from app.store import Event, EventPage

log = logging.getLogger("credits.api")

router = APIRouter()

#: Sent with the first event: how long a browser's EventSource waits to reconnect.
RECONNECT_MS: Final = 2000


Seq = Annotated[int, Field(ge=1)]
At = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class ReservationEventOut(BaseModel):
    seq: Seq
    at: At
    kind: Literal["held", "committed", "refunded", "expired"]
    reservation_id: str
    feature: str
    cost: Annotated[int, Field(ge=1)]


class ExtendedEventOut(BaseModel):
    seq: Seq
    at: At
    kind: Literal["extended"]
    reservation_id: str
    expires_at: At = Field(description="The hold's new expiry.")


class GrantedEventOut(BaseModel):
    seq: Seq
    at: At
    kind: Literal["granted"]
    grant_id: str
    credits: int = Field(description="Added to the period's allowance; negative removed them.")
    reason: str


class AllowanceChangedEventOut(BaseModel):
    seq: Seq
    at: At
    kind: Literal["allowance_changed"]
    monthly_allowance: int | None = Field(
        description="The coach's own monthly allowance from now on; null: deleted, back "
        "to the configured one."
    )


#: The fields after ``kind`` depend on it.
EventOut = Annotated[
    ReservationEventOut | ExtendedEventOut | GrantedEventOut | AllowanceChangedEventOut,
    Field(discriminator="kind"),
]


class EventsOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "events": [
                        {
                            "seq": 42,
                            "at": "2026-11-14T12:00:41Z",
                            "kind": "committed",
                            "reservation_id": EXAMPLE_RESERVATION_ID,
                            "feature": "trend_analysis",
                            "cost": 3,
                        },
                        {
                            "seq": 41,
                            "at": "2026-11-14T12:00:30Z",
                            "kind": "extended",
                            "reservation_id": EXAMPLE_RESERVATION_ID,
                            "expires_at": "2026-11-14T12:05:30Z",
                        },
                        {
                            "seq": 40,
                            "at": "2026-11-14T12:00:02Z",
                            "kind": "held",
                            "reservation_id": EXAMPLE_RESERVATION_ID,
                            "feature": "trend_analysis",
                            "cost": 3,
                        },
                        {
                            "seq": 39,
                            "at": "2026-11-14T09:30:00Z",
                            "kind": "granted",
                            "grant_id": "nq3Xw0sE1kq0bP6w8T0M7A",
                            "credits": 5,
                            "reason": "Goodwill after the outage of November 12",
                        },
                        {
                            "seq": 38,
                            "at": "2026-11-14T09:29:00Z",
                            "kind": "allowance_changed",
                            "monthly_allowance": 200,
                        },
                    ],
                    # Null on the last page.
                    "next_before": 38,
                }
            ]
        }
    )

    events: list[EventOut]
    next_before: int | None = Field(
        description="Pass as before for the next page; null at the end."
    )


def event_json(e: Event) -> dict[str, object]:
    """One event with the fields of its kind."""
    head: dict[str, object] = {"seq": e.seq, "at": domain.iso_z(e.at), "kind": e.kind}
    if e.kind == "granted":
        return {**head, "grant_id": e.grant_id, "credits": e.credits, "reason": e.reason}
    if e.kind == "allowance_changed":
        return {**head, "monthly_allowance": e.monthly_allowance}
    if e.kind == "extended" and e.expires_at is not None:
        expires_at = domain.iso_z(e.expires_at)
        return {**head, "reservation_id": str(e.reservation_id), "expires_at": expires_at}
    return {**head, "reservation_id": str(e.reservation_id), "feature": e.feature, "cost": e.cost}


def events_json(page: EventPage) -> dict[str, object]:
    return {"events": [event_json(e) for e in page.events], "next_before": page.next_before}


@router.get(
    "/v1/coaches/{coach_id:coach_id}/events",
    response_model=EventsOut,
    responses=problems("invalid_coach_id", "invalid_request", "not_found", "backend_unavailable"),
    tags=["usage"],
    summary="The coach's event log for one month, newest first",
    description=(
        "Every hold, commit, refund, expiry and extension, every grant and every change "
        "of the coach's monthly allowance, each numbered by `seq` (consecutive per coach "
        "and month); the fields after `kind` depend on it. Pages go backwards in time: "
        "pass `next_before` as `before` to get the next page; it is null on the last one. "
        "An expiry is logged when the service notices the lapsed hold (on the coach's next "
        "change), with `at` set to the moment the hold lapsed. The log keeps the newest "
        "events of the month (CREDITS_EVENTS_MAX)."
    ),
)
async def list_events(
    coach_id: str,
    store: StoreDep,
    _: Reader,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    before: Annotated[
        int | None, Query(ge=1, description="Only events older than this seq")
    ] = None,
    period: Annotated[
        str | None, Query(description="YYYY-MM (UTC); the current month when omitted")
    ] = None,
) -> JSONResponse:
    chosen: Period | None = None
    if period is not None:
        try:
            chosen = Period.parse(period)
        except ValueError:
            raise InvalidRequest("period must be a month written YYYY-MM, e.g. 2026-11.") from None
    page = await store.events(coach_id, period=chosen, before=before, limit=limit)
    return JSONResponse(events_json(page))


# --- live usage ---------------------------------------------------------------------------


def _sse(event: str, data: str, *, retry_ms: int | None = None) -> str:
    retry = f"retry: {retry_ms}\n" if retry_ms is not None else ""
    return f"{retry}event: {event}\ndata: {data}\n\n"


class UsageStreamResponse(StreamingResponse):
    """A stream that gives its slot back however it ends, even if it never starts."""

    def __init__(self, streams: UsageStreams, watch: Watch, heartbeat: float) -> None:
        super().__init__(
            _feed(watch, heartbeat),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self.streams = streams
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.streams.close(self.watch)


async def _feed(watch: Watch, heartbeat: float) -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    last_write = loop.time()
    yield _sse("usage", watch.sent, retry_ms=RECONNECT_MS)
    # Bounded lifetime: a deploy can drain, and EventSource reconnects by itself.
    while (now := loop.time()) < watch.ends_at:
        quiet_for = now - last_write
        if quiet_for >= heartbeat:
            last_write = now
            yield ": keep-alive\n\n"
            continue
        try:
            async with asyncio.timeout(min(heartbeat - quiet_for, watch.ends_at - now)):
                changed = await watch.next_change()
        except TimeoutError:
            continue
        last_write = loop.time()
        yield _sse("usage", changed)


@router.get(
    "/v1/coaches/{coach_id:coach_id}/usage/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {
                "text/event-stream": {
                    # One event, as OpenAPI 3.1 describes a stream's items.
                    "schema": {
                        "type": "object",
                        "properties": {
                            "event": {"const": "usage"},
                            "data": {
                                "type": "string",
                                "contentMediaType": "application/json",
                                "contentSchema": {"$ref": "#/components/schemas/UsageOut"},
                            },
                            "retry": {"type": "integer", "minimum": 0},
                        },
                        "required": ["event", "data"],
                    },
                    "example": {
                        "event": "usage",
                        "retry": RECONNECT_MS,
                        "data": (
                            '{"coach_id":"coach-42","period":"2026-11","allowance":50,'
                            '"used":13,"held":3,"remaining":34,"percent_used":26,'
                            '"level":"green","resets_at":"2026-12-01T00:00:00Z","features":[]}'
                        ),
                    },
                }
            },
            "description": (
                "`event: usage` with the usage object (as GET usage) as `data`: one at "
                "once, then one whenever it changes; `: keep-alive` comments in between."
            ),
        },
        **problems("invalid_coach_id", "not_found", "too_many_streams", "backend_unavailable"),
    },
    tags=["usage"],
    summary="Live usage as Server-Sent Events",
)
async def stream_usage(
    coach_id: str, request: Request, store: StoreDep, _: AnyScope
) -> StreamingResponse:
    streams: UsageStreams = request.app.state.streams
    watch = streams.open(coach_id)
    try:
        # Read once before answering: a bad coach id or an unreachable Redis is a
        # problem response with its status, not a 200 stream that dies at once.
        watch.sent = usage_text(await store.usage(coach_id))
    except BaseException:
        streams.close(watch)
        raise
    heartbeat = float(request.app.state.settings.stream_heartbeat_seconds)
    return UsageStreamResponse(streams, watch, heartbeat)
