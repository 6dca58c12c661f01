"""Dashboard feeds: a coach's event log, and a live usage stream (Server-Sent Events).

The stream polls a per-coach change token rather than having the scripts ``PUBLISH``:

* The scripts stay what they are, pure ledger changes on one coach's slot. A publish
  from inside them would be fire-and-forget anyway (a subscriber that was reconnecting
  misses it), so a subscriber would still need to read the usage to catch up.
* Pub/sub on Redis Cluster is broadcast to every node (or, with sharded pub/sub, needs
  one more connection per shard); polling one coach's keys is an ordinary single-slot
  read that works unchanged on a single Redis and on a cluster.
* A subscriber needs no dedicated Redis connection: each poll borrows a pooled one for
  one cheap read-only script call (two hash fields and the lapsed part of a sorted set).
* Holds that lapse change the usage without any script running, so a push design would
  still need a timer to notice them; a poll sees them on its next tick.

The change token is the usage as the dashboard shows it (used and held, with lapsed
holds no longer held, in the current period): an event is sent only when that differs
from the last one sent, so a reserve-and-refund between two polls sends nothing.
The cost is latency of up to one poll interval and one Redis call per subscriber per
interval (``CREDITS_STREAM_POLL_SECONDS``, default 1 s).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Final, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from app import domain
from app.api import paths  # noqa: F401  (registers the {coach_id:coach_id} path type)
from app.api.deps import AnyScope, Reader, StoreDep
from app.api.problems import PROBLEM_JSON
from app.api.schemas import ProblemOut, usage_json
from app.domain import Period
from app.errors import BackendUnavailable, InvalidRequest
from app.store import Event, EventPage

log = logging.getLogger("credits.api")

router = APIRouter()


#: Sent with the first event: how long a browser's EventSource waits to reconnect.
RECONNECT_MS: Final = 2000


class ReservationEventOut(BaseModel):
    seq: int
    at: str
    kind: Literal["held", "committed", "refunded", "expired"]
    reservation_id: str
    feature: str
    cost: int


class ExtendedEventOut(BaseModel):
    seq: int
    at: str
    kind: Literal["extended"]
    reservation_id: str
    expires_at: str = Field(description="The hold's new expiry.")


class GrantedEventOut(BaseModel):
    seq: int
    at: str
    kind: Literal["granted"]
    grant_id: str
    credits: int
    reason: str


class AllowanceChangedEventOut(BaseModel):
    seq: int
    at: str
    kind: Literal["allowance_changed"]
    monthly_allowance: int | None = Field(
        description="The coach's own monthly allowance from now on; null: deleted, back "
        "to the configured one."
    )


EventOut = Annotated[
    ReservationEventOut | ExtendedEventOut | GrantedEventOut | AllowanceChangedEventOut,
    Field(discriminator="kind"),
]


class EventsOut(BaseModel):
    events: list[EventOut]
    next_before: int | None


def _problems(*statuses: int) -> dict[int | str, dict[str, object]]:
    return {s: {"model": ProblemOut, "content": {PROBLEM_JSON: {}}} for s in statuses}


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
    responses=_problems(401, 403, 422, 503),
    tags=["usage"],
    summary="The coach's event log for one month, newest first",
    description=(
        "Every hold, commit, refund, expiry and extension, every grant and every change "
        "of the coach's monthly allowance, each numbered by `seq` (consecutive per "
        "coach and month). Pages go backwards in time: pass `next_before` as `before` "
        "to get the next page; it is null on the last one. An expiry is logged when the "
        "service notices the lapsed hold (on the coach's next change), with `at` set to "
        "the moment the hold lapsed. The log keeps the newest events of the month "
        "(CREDITS_EVENTS_MAX)."
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


@router.get(
    "/v1/coaches/{coach_id:coach_id}/usage/stream",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": (
                "`event: usage` with the usage object (as GET usage) as `data`: one at "
                "once, then one whenever it changes; `: keep-alive` comments in between."
            ),
        },
        **_problems(401, 403, 422, 503),
    },
    tags=["usage"],
    summary="Live usage as Server-Sent Events",
)
async def stream_usage(
    coach_id: str, request: Request, store: StoreDep, _: AnyScope
) -> StreamingResponse:
    # Read once before answering: a bad coach id or an unreachable Redis is a problem
    # response with its status, not a 200 stream that dies at once.
    first = await store.usage(coach_id)
    settings = request.app.state.settings
    metrics = request.app.state.metrics
    poll = float(settings.stream_poll_seconds)
    heartbeat = float(settings.stream_heartbeat_seconds)
    lifetime = float(settings.stream_max_seconds)

    async def feed() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        started = last_write = loop.time()
        last = json.dumps(usage_json(first), separators=(",", ":"))
        metrics.streams_open.inc()
        try:
            yield _sse("usage", last, retry_ms=RECONNECT_MS)
            # Bounded lifetime: a deploy can drain, and EventSource reconnects by itself.
            while loop.time() - started < lifetime:
                await asyncio.sleep(poll)
                try:
                    current = json.dumps(
                        usage_json(await store.usage(coach_id)), separators=(",", ":")
                    )
                except BackendUnavailable:
                    # Keep the stream: the dashboard keeps its last figures meanwhile.
                    current = last
                now = loop.time()
                if current != last:
                    last, last_write = current, now
                    yield _sse("usage", current)
                elif now - last_write >= heartbeat:
                    last_write = now
                    yield ": keep-alive\n\n"
        finally:
            metrics.streams_open.dec()

    return StreamingResponse(
        feed(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
