"""Reserve and commit answered in front of the middleware stack and the router.

The standard way to a credit route passes six middlewares, a router that tries every
route in turn, and a ``Request`` with its exception wrappers; for a reserve or commit
that was a large share of the CPU the request costs. ``HotRoutes`` sits outside all of
it and answers the common case itself, with the same status, headers and body that the
standard way gives (``app.api.routes`` builds both answers): a POST to one of the two
paths, with a Content-Length within the body limit, and for a reserve a JSON body that
validates. Everything else (another path or method, a body that needs an error, a
chunked body, a request the app's own settings treat specially) goes the standard way
untouched, so the OpenAPI schema, the error wording and their order stay as they were.
"""

from __future__ import annotations

from collections.abc import Awaitable
from enum import Enum
from typing import Final, Literal, TypeVar

from starlette.applications import Starlette
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY
from starlette.requests import Request
from starlette.routing import NoMatchFound, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.limits import MAX_BODY_BYTES, BodySizeLimit
from app.api.problems import on_credits_error, on_unexpected
from app.api.quota import RawHeader
from app.api.routes import COMMIT_PATH, RESERVE_PATH, commit_reply, reserve_reply
from app.errors import CreditsError

_RESERVE, _RESERVE_FORMAT, _RESERVE_PARAMS = compile_path(RESERVE_PATH)
_COMMIT, _COMMIT_FORMAT, _COMMIT_PARAMS = compile_path(COMMIT_PATH)

#: Set by FastAPI's request telemetry and its own body limit: with either, the standard
#: way answers, so spans and limits see every request as before.
_STANDARD_ONLY: Final = ("fastapi.telemetry", MAX_BODY_SIZE_SCOPE_KEY)

_JSON: Final = b"application/json"

T = TypeVar("T")


def can_front(app: Starlette) -> bool:
    """Whether ``HotRoutes`` gives the answers of ``app``'s own stack: the stack it
    skips must be the one it stands in for. Not in debug mode (whose 500s carry a
    traceback), not with other middleware (which would be skipped) or another body
    limit, only with the problem handlers it calls itself, and only while the two
    routes are where it looks for them (not mounted under a prefix, say)."""
    handlers = app.exception_handlers
    middleware: list[object] = [(m.cls, m.args, m.kwargs) for m in app.user_middleware]
    return (
        not app.debug
        and middleware == [(BodySizeLimit, (), {})]
        and handlers.get(CreditsError) is on_credits_error
        and handlers.get(Exception) is on_unexpected
        and _routed(app, "reserve", _RESERVE_FORMAT, coach_id="c")
        and _routed(app, "commit", _COMMIT_FORMAT, reservation_id="r")
    )


def _routed(app: Starlette, name: str, path_format: str, **params: str) -> bool:
    try:
        return app.url_path_for(name, **params) == path_format.format(**params)
    except NoMatchFound:
        return False


class HotRoutes:
    def __init__(self, app: Starlette, standard: ASGIApp) -> None:
        self.app = app
        self.standard = standard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and not scope.get("root_path")
            and _STANDARD_ONLY[0] not in scope
            and _STANDARD_ONLY[1] not in scope
        ):
            path: str = scope["path"]
            if path.endswith("/commit"):
                match = _COMMIT.match(path)
                if match is not None:
                    await self._commit(scope, receive, send, match["reservation_id"])
                    return
            elif path.endswith("/reservations"):
                match = _RESERVE.match(path)
                if match is not None:
                    await self._reserve(scope, receive, send, match["coach_id"])
                    return
        await self.standard(scope, receive, send)

    async def _reserve(self, scope: Scope, receive: Receive, send: Send, coach_id: str) -> None:
        headers = _first_values(scope)
        if headers.get(b"content-type") != _JSON or not _within_limit(headers):
            await self.standard(scope, receive, send)
            return
        raw, messages = await _read_body(receive)
        if raw is None:
            await self.standard(scope, _replay(messages, receive), send)
            return
        reply = await _answered(
            scope,
            receive,
            send,
            reserve_reply(
                self.app.state,
                _RESERVE_PARAMS["coach_id"].convert(coach_id),
                raw,
                _text(headers.get(b"authorization")),
                _text(headers.get(b"idempotency-key")),
            ),
        )
        if reply is _ANSWERED:
            return
        if reply is None:  # a body the schema refuses: the standard way words the 422
            await self.standard(scope, _replay(messages, receive), send)
            return
        await _send_json(send, *reply)

    async def _commit(
        self, scope: Scope, receive: Receive, send: Send, reservation_id: str
    ) -> None:
        headers = _first_values(scope)
        if not _within_limit(headers):
            await self.standard(scope, receive, send)
            return
        body = await _answered(
            scope,
            receive,
            send,
            commit_reply(
                self.app.state,
                _COMMIT_PARAMS["reservation_id"].convert(reservation_id),
                _text(headers.get(b"authorization")),
            ),
        )
        if body is _ANSWERED:
            return
        await _send_json(send, 200, body)


class _Answered(Enum):
    ANSWERED = "answered"


#: What ``_answered`` gives once it has sent the answer itself.
_ANSWERED: Final = _Answered.ANSWERED


async def _answered(
    scope: Scope, receive: Receive, send: Send, pending: Awaitable[T]
) -> T | Literal[_Answered.ANSWERED]:
    """``pending``'s result, or ``_ANSWERED`` once a domain error has been answered as
    the standard way answers it. Any other failure is answered 500 and raised again,
    as ServerErrorMiddleware does."""
    try:
        return await pending
    except CreditsError as exc:
        response = await on_credits_error(Request(scope, receive), exc)
    except Exception as exc:
        failure = await on_unexpected(Request(scope, receive), exc)
        await failure(scope, receive, send)
        raise
    await response(scope, receive, send)
    return _ANSWERED


def _first_values(scope: Scope) -> dict[bytes, bytes]:
    """Each header's first value, as ``request.headers.get`` reads it."""
    return dict(reversed([*scope["headers"]]))


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _within_limit(headers: dict[bytes, bytes]) -> bool:
    """A Content-Length that ``BodySizeLimit`` lets through without reading the body."""
    declared = headers.get(b"content-length")
    if declared is None:
        return False
    try:
        return int(declared) <= MAX_BODY_BYTES
    except ValueError:
        return False


async def _read_body(receive: Receive) -> tuple[bytes | None, list[Message]]:
    """The whole body and the messages it came in; None for the body when the messages
    were anything but body chunks (a disconnect), which the standard way answers."""
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return None, messages
        if not message.get("more_body", False):
            break
    if len(messages) == 1:
        return messages[0].get("body", b""), messages
    return b"".join(m.get("body", b"") for m in messages), messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` as if nothing had been read yet."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


async def _send_json(
    send: Send, status: int, body: bytes, headers: list[RawHeader] | None = None
) -> None:
    # The two messages ``app.api.fast.json_response`` sends, built directly.
    length = (b"content-length", str(len(body)).encode("latin-1"))
    raw = (
        [*headers, length, (b"content-type", _JSON)]
        if headers
        else [length, (b"content-type", _JSON)]
    )
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
