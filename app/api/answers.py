"""Answers as bytes: a status, raw headers and an encoded body, built once and sent either
by the standard route (as a Starlette response) or by the front in ``app.api.hot``
(as the two ASGI messages that response would send)."""

from __future__ import annotations

from typing import Any, Final, NamedTuple

import orjson
from starlette.responses import JSONResponse, Response
from starlette.types import Send

_JSON_TYPE: Final = (b"content-type", b"application/json")


class Answer(NamedTuple):
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def response(self) -> Response:
        """This answer as a route returns it."""
        response = Response(self.body, status_code=self.status)
        response.raw_headers = list(self.headers)
        return response

    async def send(self, send: Send) -> None:
        """This answer sent as ``response()`` sends it, without building the response."""
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


def json_answer(status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> Answer:
    """JSON already encoded, with the headers ``JSONResponse`` gives it, after ``extra``
    (raw header pairs) where there are some."""
    length = (b"content-length", str(len(body)).encode("latin-1"))
    if extra:
        return Answer(status, [*extra, length, _JSON_TYPE], body)
    return Answer(status, [length, _JSON_TYPE], body)


class FastJSONResponse(JSONResponse):
    """The same JSON as ``JSONResponse`` (compact, non-ASCII kept as UTF-8), encoded in C."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)
