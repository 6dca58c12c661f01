"""Reserve and commit answered in front of the router (``app.api.hot``) give exactly the
answers of the standard way: the same request sequence, sent as raw ASGI messages to an
app with the front dispatch and to one without it, gets the same messages back. Where
the front cannot stand in, the service says so in its log and in ``/readyz``. And the
reply encoder's shortcuts read as the general formatting does."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import fakeredis
import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import domain
from app.api import problems, schemas
from app.api.deps import KeyRing
from app.api.hot import OBSERVED, UNDER_ROOT_PATH, HotRoutes, front_refusal
from app.api.limits import BodySizeLimit
from app.api.routes import router
from app.config import Scope as KeyScope
from app.config import Settings
from app.domain import Period
from app.errors import Unauthorized
from app.main import CreditsAPI, create_app
from app.store import CreditStore
from tests.support.clock import FrozenClock

WORKER = "worker-key-0123456789abcdef"
READER = "reader-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"
JSON = {"content-type": "application/json"}


@dataclass
class Call:
    path: str
    body: bytes | list[bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    key: str | None = WORKER
    #: Headers as sent: None gives a Content-Length for the body (absent when chunked).
    raw: list[tuple[bytes, bytes]] | None = None
    disconnect_first: bool = False
    root_path: str = ""

    def scope(self) -> Scope:
        if self.raw is not None:
            headers = self.raw
        else:
            headers = [(b"host", b"credits")]
            if self.key is not None:
                headers.append((b"authorization", f"Bearer {self.key}".encode()))
            headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in self.headers.items()]
            if isinstance(self.body, bytes):
                headers.append((b"content-length", str(len(self.body)).encode()))
            else:
                headers.append((b"transfer-encoding", b"chunked"))
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 50000),
            "scheme": "http",
            "method": self.method,
            "root_path": self.root_path,
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "headers": headers,
            "state": {},
        }

    def receive(self) -> Receive:
        chunks = [self.body] if isinstance(self.body, bytes) else self.body
        messages: list[Message] = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]
        if self.disconnect_first:
            messages = []

        async def receive() -> Message:
            if messages:
                return messages.pop(0)
            return {"type": "http.disconnect"}

        return receive


async def answer(app: ASGIApp, call: Call) -> tuple[list[Message], str | None]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    raised = None
    try:
        await app(call.scope(), call.receive(), send)
    except Exception as exc:  # compared too: the front must raise what the app raises
        raised = f"{type(exc).__name__}: {exc}"
    return sent, raised


_ID = re.compile(rb"[A-Za-z0-9_-]+\.[0-9]{6}\.[A-Za-z0-9_-]{22}")


def normalized(sent: list[Message]) -> list[Message]:
    """The messages with reservation ids (random) replaced."""
    return [
        {**m, "body": _ID.sub(b"<id>", m["body"])} if m["type"] == "http.response.body" else m
        for m in sent
    ]


def calls(rid: Callable[[int], str]) -> Iterator[Call]:
    """A sequence of requests; ``rid(n)`` is the id the n-th 201 reply carried."""
    ok = b'{"feature":"checkin_draft"}'
    reserve = "/v1/coaches/coach-1/reservations"
    yield from [
        Call(reserve, ok, JSON),
        Call(reserve, b'{"feature":"trend_analysis","ttl_seconds":60}', JSON),
        Call(reserve, ok, {**JSON, "Idempotency-Key": "same-1"}),
        Call(reserve, ok, {**JSON, "Idempotency-Key": "same-1"}),  # replay: 200
        Call(reserve, b'{"feature":"trend_analysis"}', {**JSON, "Idempotency-Key": "same-1"}),
        Call(reserve, ok, {**JSON, "Idempotency-Key": "caf\xe9"}),
        Call(reserve, ok, {**JSON, "Idempotency-Key": ""}),
        Call(reserve, ok, JSON, key=None),
        Call(reserve, ok, JSON, key="not-a-key"),
        Call(reserve, ok, JSON, key=READER),
        Call(reserve, ok, JSON, key=ADMIN),
        Call(reserve, ok, {**JSON, "Authorization": "Basic abc"}, key=None),
        Call(reserve, ok, {**JSON, "Authorization": "Bearer  "}, key=None),
        Call(reserve, b"{", JSON),
        Call(reserve, b"{", JSON, key=None),
        Call(reserve, b'{"feature":3}', JSON),
        Call(reserve, b'{"feature":"checkin_draft","x":1}', JSON),
        Call(reserve, b'{"feature":"checkin_draft","ttl_seconds":0}', JSON),
        Call(reserve, b'{"feature":"checkin_draft","ttl_seconds":true}', JSON),
        Call(reserve, b"", JSON),
        Call(reserve, b"\xff\xfe", JSON),
        Call(reserve, b'{"feature":"nope"}', JSON),
        Call(reserve, ok, {"content-type": "application/json; charset=utf-8"}),
        Call(reserve, ok, {"content-type": "text/plain"}),
        Call(reserve, ok),
        Call(reserve, [b'{"feature":', b'"checkin_draft"}'], JSON),  # chunked
        Call(reserve, ok, JSON, disconnect_first=True),
        Call(reserve, ok, JSON, root_path="/api"),
        Call(
            reserve,
            ok,
            raw=[(b"content-type", b"application/json"), (b"content-length", b"999999")],
        ),
        Call(
            reserve,
            ok,
            raw=[
                (b"content-type", b"application/json"),
                (b"content-type", b"text/plain"),
                (b"authorization", f"Bearer {WORKER}".encode()),
                (b"authorization", b"Bearer nope"),
                (b"content-length", b"27"),
                (b"content-length", b"5"),
            ],
        ),
        Call(reserve, ok, raw=[(b"content-type", b"application/json"), (b"content-length", b"x")]),
        Call("/v1/coaches/-bad/reservations", ok, JSON),
        Call("/v1/coaches/a/b/reservations", ok, JSON),
        Call("/v1/coaches/a\n/reservations", ok, JSON),
        Call("/v1/coaches/coach-1/reservations\n", ok, JSON),
        Call("/v1/coaches//reservations", ok, JSON),
        Call("/v1/coaches/coach-1/reservations", ok, JSON, method="GET"),
        Call("/v1/coaches/coach-1/reservations/", ok, JSON),
        *[Call("/v1/coaches/full/reservations", ok, JSON) for _ in range(51)],  # then 429
    ]
    # Built once the reserves above have run, so that their ids are known.
    yield from [
        Call(f"/v1/reservations/{rid(0)}/commit"),
        Call(f"/v1/reservations/{rid(0)}/commit"),  # a repeat
        Call(f"/v1/reservations/{rid(1)}/commit", b"{}", JSON),
        Call(f"/v1/reservations/{rid(2)}/commit", key=None),
        Call(f"/v1/reservations/{rid(2)}/commit", key=READER),
        Call(f"/v1/reservations/{rid(2)}/commit", [b"a", b"b"]),  # chunked
        Call(f"/v1/reservations/{rid(2)}/commit", raw=[(b"content-length", b"300000")]),
        Call(f"/v1/reservations/{rid(2)}/commit", root_path="/api"),
        Call(f"/v1/reservations/{rid(2)}/refund"),
        Call(f"/v1/reservations/{rid(2)}/commit"),  # refunded: 409
        Call("/v1/reservations/nope/commit"),
        Call("/v1/reservations/batch/commit"),
        Call("/v1/reservations/a/b/commit"),
        Call("/v1/reservations//commit"),
        Call("/v1/reservations/x/commit\n"),
        Call(f"/v1/reservations/{rid(3)}/commit", method="PUT"),
        Call(f"/v1/reservations/{rid(3)}"),  # 405 with its Allow list
    ]


@dataclass
class Served:
    """What one app answered to the whole sequence, and how often the front handed a
    request to the standard way."""

    answers: list[tuple[list[Message], str | None]]
    handed_on: int


async def serve(front: bool, sequence: Callable[[Callable[[int], str]], Iterator[Call]]) -> Served:
    settings = Settings(
        api_keys={WORKER: [KeyScope.WORKER], READER: [KeyScope.READER], ADMIN: [KeyScope.ADMIN]}
    )
    clock = FrozenClock(datetime(2099, 11, 14, 12, 0, 0, tzinfo=UTC))
    app = create_app(settings, redis=fakeredis.FakeAsyncRedis(decode_responses=True), clock=clock)
    stack = app.build_middleware_stack()
    assert isinstance(stack, HotRoutes)
    standard = stack.app
    handed_on = 0

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal handed_on
        handed_on += 1
        await standard(scope, receive, send)

    stack.app = counted
    app.middleware_stack = stack if front else counted
    ids: list[str] = []
    answers = []
    async with app.router.lifespan_context(app):
        for call in sequence(lambda n: ids[n] if n < len(ids) else "unknown"):
            sent, raised = await answer(app, call)
            answers.append((normalized(sent), raised))
            if sent and sent[0].get("status") == 201:
                body = b"".join(m["body"] for m in sent if m["type"] == "http.response.body")
                ids.append(json.loads(body)["reservation_id"])
    return Served(answers, handed_on)


async def test_front_answers_exactly_as_the_standard_way() -> None:
    front = await serve(True, calls)
    standard = await serve(False, calls)
    sent = list(calls(lambda n: "x"))
    assert len(front.answers) == len(standard.answers) == len(sent)
    for call, got, want in zip(sent, front.answers, standard.answers, strict=True):
        assert got == want, call
    statuses = {a[0][0]["status"] for a in standard.answers if a[0]}
    assert {200, 201, 401, 403, 404, 405, 409, 413, 422, 429} <= statuses


async def test_front_serves_the_common_requests_itself() -> None:
    def common(rid: Callable[[int], str]) -> Iterator[Call]:
        yield Call("/v1/coaches/c-1/reservations", b'{"feature":"checkin_draft"}', JSON)
        yield Call("/v1/coaches/c-1/reservations", b'{"feature":"nope"}', JSON)  # 422
        yield Call("/v1/coaches/c-1/reservations", b'{"feature":"checkin_draft"}', JSON, key=None)
        yield Call(f"/v1/reservations/{rid(0)}/commit")
        yield Call(f"/v1/reservations/{rid(0)}/commit")  # a repeat: 200 again
        yield Call(f"/v1/reservations/{rid(0)}/refund")  # committed: 409, the standard way
        yield Call("/v1/reservations/nope/commit")  # 404

    served = await serve(True, common)
    assert [a[0][0]["status"] for a in served.answers] == [201, 422, 401, 200, 200, 409, 404]
    assert served.handed_on == 1


async def test_unexpected_errors_are_answered_and_raised_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(CreditStore, "reserve", broken)
    monkeypatch.setattr(CreditStore, "commit", broken)

    def failing(rid: Callable[[int], str]) -> Iterator[Call]:
        yield Call("/v1/coaches/c-1/reservations", b'{"feature":"checkin_draft"}', JSON)
        yield Call("/v1/reservations/nope/commit")

    front = await serve(True, failing)
    assert front.answers == (await serve(False, failing)).answers
    assert front.handed_on == 0
    for sent, raised in front.answers:
        assert sent[0]["status"] == 500
        assert raised == "RuntimeError: boom"


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, timezone(timedelta(0)), timezone(timedelta(hours=-5))]),
    )
)
def test_reply_instants_read_as_iso_z(instant: datetime) -> None:
    assert schemas._iso_z(instant) == domain.iso_z(instant)


def test_reply_periods_read_as_before() -> None:
    for year, month in [(2026, 11), (2026, 12), (1970, 1), (9998, 12)]:
        period = Period(year, month)
        assert schemas._period_texts(period) == (str(period), domain.iso_z(period.resets_at))


def refused(app: FastAPI) -> str:
    """Why the front stands aside for ``app``; the standard stack is what serves it."""
    reason = front_refusal(app)
    assert reason is not None
    assert not isinstance(app.build_middleware_stack(), HotRoutes)
    return reason


def test_front_stands_aside_where_it_would_answer_otherwise() -> None:
    assert front_refusal(create_app(Settings())) is None
    assert isinstance(create_app(Settings()).build_middleware_stack(), HotRoutes)
    gzip = create_app(Settings())
    gzip.add_middleware(GZipMiddleware)  # would be skipped
    assert "GZipMiddleware" in refused(gzip)
    debug = create_app(Settings())
    debug.debug = True  # 500s with a traceback
    assert "debug" in refused(debug)
    handler = create_app(Settings())
    handler.add_exception_handler(Exception, lambda request, exc: Response(status_code=500))
    assert "error handlers" in refused(handler)
    limited = create_app(Settings())
    limited.max_body_size = 1024  # FastAPI's own limit, with its own 413
    assert "max_body_size" in refused(limited)
    rooted = create_app(Settings())
    rooted.root_path = "/api"
    assert refused(rooted) == UNDER_ROOT_PATH
    prefixed = CreditsAPI()
    problems.install(prefixed)
    prefixed.include_router(router, prefix="/api")
    prefixed.add_middleware(BodySizeLimit)
    assert prefixed.url_path_for("reserve", coach_id="c") == "/api/v1/coaches/c/reservations"
    assert "paths" in refused(prefixed)


@asynccontextmanager
async def client_of(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:
            yield client


def fast_path_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "FAST PATH OFF" in r.getMessage()
    ]


async def test_another_middleware_is_reported_and_answers_stay_right(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(api_keys={WORKER: [KeyScope.WORKER]})
    app = create_app(settings, redis=fakeredis.FakeAsyncRedis(decode_responses=True))
    app.add_middleware(CORSMiddleware, allow_origins=["https://coach.example"])
    worker = {"Authorization": f"Bearer {WORKER}", "Origin": "https://coach.example"}
    with caplog.at_level(logging.WARNING):
        async with client_of(app) as client:
            ready = await client.get("/readyz")
            made = await client.post(
                "/v1/coaches/c-1/reservations", json={"feature": "trend_analysis"}, headers=worker
            )
            done = await client.post(
                f"/v1/reservations/{made.json()['reservation_id']}/commit", headers=worker
            )
            refused = await client.post(
                "/v1/coaches/c-1/reservations", json={"feature": "trend_analysis"}
            )
    assert ready.status_code == 200
    assert ready.json()["fast_path"] is False
    [warning] = [w for w in ready.json()["warnings"] if "FAST PATH OFF" in w]
    assert "CORSMiddleware" in warning
    assert fast_path_warnings(caplog) == [warning]
    # The standard way answered, through the middleware the front would have skipped.
    assert made.status_code == 201, made.text
    assert made.headers["access-control-allow-origin"] == "https://coach.example"
    assert done.status_code == 200, done.text
    assert done.json()["note"] == "Used 3 credits · 47 of 50 left this month"
    assert done.headers["access-control-allow-origin"] == "https://coach.example"
    assert refused.status_code == 401
    assert refused.json()["code"] == "unauthorized"


async def test_the_front_says_nothing_while_it_serves(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(), redis=fakeredis.FakeAsyncRedis(decode_responses=True))
    with caplog.at_level(logging.WARNING):
        async with client_of(app) as client:
            made = await client.post("/v1/coaches/c-1/reservations", json={"feature": "x"})
            ready = (await client.get("/readyz")).json()
    assert made.status_code == 422
    assert ready["fast_path"] is True
    assert not [w for w in ready["warnings"] if "FAST PATH" in w]
    assert fast_path_warnings(caplog) == []


async def test_requests_under_a_root_path_are_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(Settings(), redis=fakeredis.FakeAsyncRedis(decode_responses=True))
    with caplog.at_level(logging.WARNING):
        async with app.router.lifespan_context(app):
            for _ in range(3):
                call = Call("/api/v1/coaches/c-1/reservations", b'{"feature":"x"}', JSON)
                call.root_path = "/api"
                sent, raised = await answer(app, call)
                assert raised is None
                assert sent[0]["status"] == 422  # answered the standard way
            ready, _ = await answer(app, Call("/readyz", method="GET", key=None))
    body = json.loads(b"".join(m["body"] for m in ready if m["type"] == "http.response.body"))
    assert body["fast_path"] is False
    assert [w for w in body["warnings"] if "FAST PATH OFF" in w] == fast_path_warnings(caplog)
    assert UNDER_ROOT_PATH in fast_path_warnings(caplog)[0]


#: Run in a process of its own: an OpenTelemetry tracer provider, once set, is global.
_OBSERVED_APP = """
import asyncio, json, fakeredis, httpx
from opentelemetry import trace

class Provider(trace.TracerProvider):
    def get_tracer(self, *args, **kwargs):
        return trace.NoOpTracer()

trace.set_tracer_provider(Provider())
from app.config import Settings
from app.main import create_app

async def main():
    app = create_app(Settings(), redis=fakeredis.FakeAsyncRedis(decode_responses=True))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as c:
            made = await c.post("/v1/coaches/c-1/reservations", json={"feature": "checkin_draft"})
            ready = await c.get("/readyz")
    print(json.dumps({"made": made.status_code, "ready": ready.json()}))

asyncio.run(main())
"""


def test_requests_that_fastapi_observes_take_the_standard_way(tmp_path: Path) -> None:
    """FastAPI's OpenTelemetry gives each span the route that the standard way matched,
    so the front stands aside for an observed request. It learns that through
    ``fastapi.telemetry.get_telemetry_data``: this fails when that stops telling."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CREDITS_", "OTEL_"))}
    done = subprocess.run(
        [sys.executable, "-c", _OBSERVED_APP],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["made"] == 201
    assert result["ready"]["fast_path"] is False
    assert any(OBSERVED in w for w in result["ready"]["warnings"])
    assert "FAST PATH OFF" in done.stderr


def test_admitted_keys_are_remembered_and_only_those() -> None:
    ring = KeyRing({WORKER: [KeyScope.WORKER], READER: [KeyScope.READER]})
    first = ring.authenticate(f"Bearer {WORKER}")
    assert ring.authenticate(f"bearer  {WORKER} ") == first
    assert ring.authenticate(f"Bearer {READER}").scopes == {KeyScope.READER}
    for refused in (f"Bearer {WORKER}x", f"Bearer {WORKER[:-1]}", "Bearer nope", f"Basic {WORKER}"):
        with pytest.raises(Unauthorized):
            ring.authenticate(refused)
    assert len(ring._admitted) == 2
