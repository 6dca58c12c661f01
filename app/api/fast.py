"""Credit routes answered without FastAPI's per-request parameter machinery.

Resolving a route's parameters and dependencies (and validating its body through the
generic path) was the largest share of the CPU a reserve or commit costs. A route that
registers a fast handler keeps its declared signature, so the OpenAPI schema and the
standard handling are unchanged; the fast handler serves the requests it can answer
exactly as the standard one would, and hands every other request (a body it cannot
validate, an unusual content type) to the standard handler, so errors keep their
exact wording and order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import orjson
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

#: Answers a request, or returns None to leave it to the standard handler.
FastHandler = Callable[[Request], Awaitable[Response | None]]

_FAST: dict[Callable[..., Any], FastHandler] = {}


E = TypeVar("E", bound=Callable[..., Any])


def served_by(handler: FastHandler) -> Callable[[E], E]:
    """Mark an endpoint as answered by ``handler`` first; applied below the route
    decorator, so the route sees the mark when it is built."""

    def mark(endpoint: E) -> E:
        _FAST[endpoint] = handler
        return endpoint

    return mark


class FastRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        standard = super().get_route_handler()
        fast = _FAST.get(self.endpoint)
        if fast is None:
            return standard

        async def handle(request: Request) -> Response:
            response = await fast(request)
            return response if response is not None else await standard(request)

        return handle


class FastJSONResponse(JSONResponse):
    """The same JSON as ``JSONResponse`` (compact, non-ASCII kept as UTF-8), encoded in C."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def json_response(
    status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    """A ``FastJSONResponse`` for JSON already encoded: the same status, headers and body.
    ``headers`` are raw ASGI pairs, sent first, as ``FastJSONResponse(..., headers=...)``
    would send them."""
    response = Response(body, status_code=status, media_type="application/json")
    if headers:
        response.raw_headers = [*headers, *response.raw_headers]
    return response


def header(request: Request, name: bytes) -> str | None:
    """The first value of a header as Starlette's ``request.headers.get`` reads it
    (ASGI header names are lower case), without building the headers mapping."""
    for key, value in request.scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
