"""Reserve and commit answered in front of the middleware stack and the router.

The standard way to a credit route passes six middlewares, a router that tries every
route in turn, FastAPI's parameter machinery and a ``Request`` with its exception
wrappers; for a reserve or commit that was most of the CPU the request costs.
``HotRoutes`` sits outside all of it and answers the common case itself, with the answer
the route builds (``reserve_answer`` and ``commit_answer`` in ``app.api.routes``): a POST
to one of the two paths, with a Content-Length within the body limit, and for a reserve
a JSON body that validates. Everything else (another path or method, a body that needs
an error, a chunked body) goes the standard way untouched, so the OpenAPI schema, the
error wording and their order stay as they were.

Whether the front may stand in for the stack is decided from the app's configuration
when the stack is built (``front_refusal``); two things only requests show (a root path,
FastAPI's OpenTelemetry observing the request) are checked per request. Either way the
service says once, in its log and in ``/readyz``, that reserve and commit go the slow way.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from enum import Enum
from typing import Final, Literal, TypeVar

from fastapi import FastAPI
from fastapi.telemetry import get_telemetry_data
from pydantic import ValidationError
from starlette.datastructures import State
from starlette.requests import Request
from starlette.routing import NoMatchFound, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import routes
from app.api.answers import Answer
from app.api.deps import WORKER_ACCESS
from app.api.limits import MAX_BODY_BYTES, BodySizeLimit
from app.api.problems import on_credits_error, on_unexpected
from app.api.schemas import ReserveRequest
from app.errors import CreditsError

log = logging.getLogger("credits.api")

_RESERVE, _RESERVE_FORMAT, _RESERVE_PARAMS = compile_path(routes.RESERVE_PATH)
_COMMIT, _COMMIT_FORMAT, _COMMIT_PARAMS = compile_path(routes.COMMIT_PATH)

_JSON: Final = b"application/json"

#: Reasons found per request.
UNDER_ROOT_PATH: Final = "requests arrive under a root path (a mount or --root-path)"
OBSERVED: Final = (
    "FastAPI's OpenTelemetry instrumentation observes requests (the standard way names "
    "each span's route)"
)

#: The names of the two routes the front stands in for.
_NAMES: Final = frozenset({"reserve", "commit"})

T = TypeVar("T")


def front_refusal(app: FastAPI) -> str | None:
    """Why ``HotRoutes`` would not give the answers of ``app``'s own stack, or None when
    it would: the stack it skips must be the one it stands in for."""
    if app.debug:
        return "debug mode is on (its 500s carry a traceback)"
    installed: list[object] = [m.cls for m in app.user_middleware]
    others = [cls for cls in installed if cls is not BodySizeLimit]
    if others:
        names = ", ".join(getattr(cls, "__name__", repr(cls)) for cls in others)
        return f"other middleware is installed ({names}), which the front would skip"
    if [(m.args, m.kwargs) for m in app.user_middleware] != [((), {})]:
        return "the request body limit is not the service's own"
    hot_routes = [r for r in routes.router.routes if getattr(r, "name", None) in _NAMES]
    limits = [app, routes.router, *hot_routes]
    if any(getattr(o, "max_body_size", None) is not None for o in limits):
        return "another request body limit (max_body_size) is configured"
    handlers = app.exception_handlers
    if (
        handlers.get(CreditsError) is not on_credits_error
        or handlers.get(Exception) is not on_unexpected
    ):
        return "the error handlers are not the service's own"
    if app.root_path:
        return UNDER_ROOT_PATH
    if not (
        _routed(app, "reserve", _RESERVE_FORMAT, coach_id="c")
        and _routed(app, "commit", _COMMIT_FORMAT, reservation_id="r")
    ):
        return "reserve and commit are not at their own paths (mounted under a prefix?)"
    return None


def _routed(app: FastAPI, name: str, path_format: str, **params: str) -> bool:
    try:
        return app.url_path_for(name, **params) == path_format.format(**params)
    except NoMatchFound:
        return False


def with_front(app: FastAPI, standard: ASGIApp) -> ASGIApp:
    """``standard`` with the front ahead of it where that gives the same answers."""
    reason = front_refusal(app)
    app.state.fast_path_warning = None
    if reason is None:
        return HotRoutes(standard, app.state)
    stand_aside(app.state, reason)
    return standard


def stand_aside(state: State, reason: str) -> None:
    """Say in the log, and in ``/readyz`` from now on, that reserve and commit take the
    standard way, and why."""
    state.fast_path_warning = (
        "FAST PATH OFF: reserve and commit take the standard way, at several times the "
        f"CPU per request, because {reason}."
    )
    log.warning(state.fast_path_warning)


class HotRoutes:
    def __init__(self, app: ASGIApp, state: State) -> None:
        #: The standard stack, which answers whatever the front does not.
        self.app = app
        self.state = state
        self._noted: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and self._alone(scope):
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
        await self.app(scope, receive, send)

    def _alone(self, scope: Scope) -> bool:
        """Whether this request is the app's alone: not under a root path (where the
        paths carry a prefix) and not observed by FastAPI's own instrumentation."""
        if scope.get("root_path"):
            self._note(UNDER_ROOT_PATH)
            return False
        if get_telemetry_data() is not None:
            self._note(OBSERVED)
            return False
        return True

    def _note(self, reason: str) -> None:
        if reason not in self._noted:
            self._noted.add(reason)
            stand_aside(self.state, reason)

    async def _reserve(self, scope: Scope, receive: Receive, send: Send, coach_id: str) -> None:
        headers = _first_values(scope)
        if headers.get(b"content-type") != _JSON or not _within_limit(headers):
            await self.app(scope, receive, send)
            return
        raw, messages = await _read_body(receive)
        if raw is None:
            await self.app(scope, _replay(messages, receive), send)
            return
        try:
            body = ReserveRequest.model_validate_json(raw)
        except ValidationError:  # the standard way words the 422
            await self.app(scope, _replay(messages, receive), send)
            return
        answer = await _answered(
            scope,
            receive,
            send,
            self._held(_RESERVE_PARAMS["coach_id"].convert(coach_id), body, headers),
        )
        if answer is not _ANSWERED:
            await answer.send(send)

    async def _held(
        self, coach_id: str, body: ReserveRequest, headers: dict[bytes, bytes]
    ) -> Answer:
        # The route's order: the key is checked once the body is known to be JSON.
        principal = WORKER_ACCESS.admit(self.state.keyring, _text(headers.get(b"authorization")))
        return await routes.reserve_answer(
            self.state.store, coach_id, body, principal, _text(headers.get(b"idempotency-key"))
        )

    async def _commit(
        self, scope: Scope, receive: Receive, send: Send, reservation_id: str
    ) -> None:
        headers = _first_values(scope)
        if not _within_limit(headers):
            await self.app(scope, receive, send)
            return
        answer = await _answered(
            scope,
            receive,
            send,
            self._committed(_COMMIT_PARAMS["reservation_id"].convert(reservation_id), headers),
        )
        if answer is not _ANSWERED:
            await answer.send(send)

    async def _committed(self, reservation_id: str, headers: dict[bytes, bytes]) -> Answer:
        WORKER_ACCESS.admit(self.state.keyring, _text(headers.get(b"authorization")))
        return await routes.commit_answer(self.state.store, reservation_id)


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
    were anything but body chunks (a disconnect), which the standard way answers.

    A body limit wrapped around the app from outside limits these reads too."""
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
