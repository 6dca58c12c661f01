"""For threshold webhook tests: a real receiver (a small ASGI app under uvicorn on a free
loopback port, in a thread of the test process) that verifies every request's Standard
Webhooks signature with the reference library and answers as the test tells it to, and
a helper that spends a coach's credits commit by commit."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.types import Receive, Scope, Send

from app.store import CreditStore
from tests.support.redis import free_port


async def spend(store: CreditStore, coach: str, credits: int) -> None:
    """Commits actions that cost ``credits`` in all, one by one."""
    while credits > 0:
        feature = "trend_analysis" if credits >= 3 else "checkin_draft"
        reservation, _ = await store.reserve(coach, feature)
        await store.commit(str(reservation.reservation_id))
        credits -= reservation.cost


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class Received:
    webhook_id: str
    timestamp: int
    verified: bool
    body: dict[str, Any]
    path: str
    #: When it arrived (seconds since epoch).
    at: float


class Receiver:
    """Collects what it is sent. ``status`` is what it answers; while ``hold`` is set,
    a request waits (up to ``hold_seconds``) before its answer."""

    def __init__(self, secret: str | None = None) -> None:
        self.secret = secret or new_secret()
        self.port = free_port()
        self.status = 200
        self.hold = threading.Event()
        self.hold_seconds = 30.0
        self.received: list[Received] = []
        #: Requests answered so far (a held request is received, not yet answered).
        self.answered = 0
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def endpoint(self) -> dict[str, str]:
        return {"url": self.url, "secret": self.secret}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        try:
            Webhook(self.secret).verify(raw, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        item = Received(
            headers.get("webhook-id", ""),
            int(headers.get("webhook-timestamp", "0")),
            verified,
            json.loads(raw or b"{}"),
            scope["path"],
            time.time(),
        )
        with self._lock:
            self.received.append(item)
            status = self.status
        # ``hold`` is set and cleared from the test's thread: looked at, not awaited.
        deadline = time.monotonic() + self.hold_seconds
        while self.hold.is_set():
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        with self._lock:
            self.answered += 1

    def answer(self, status: int) -> None:
        with self._lock:
            self.status = status

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def wait_for(
        self, check: Callable[[list[Received]], bool], timeout: float = 20.0
    ) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.snapshot()
            if check(got):
                return got
            time.sleep(0.02)
        raise TimeoutError(f"the receiver did not get what was expected: {self.snapshot()}")

    async def arrival(
        self, check: Callable[[list[Received]], bool], within: float = 20.0
    ) -> list[Received]:
        """``wait_for`` for a test whose event loop runs the service meanwhile."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            got = self.snapshot()
            if check(got):
                return got
            await asyncio.sleep(0.02)
        raise TimeoutError(f"the receiver did not get what was expected: {self.snapshot()}")

    def start(self) -> Receiver:
        config = uvicorn.Config(
            self, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the webhook receiver did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.hold.clear()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = None
