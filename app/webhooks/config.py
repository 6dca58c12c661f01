"""``CREDITS_WEBHOOKS``: the endpoints threshold webhooks go to, checked at start-up.

A JSON list of ``{"url", "secret"}``: ``url`` http or https (loopback and private
addresses allowed: receivers often sit on a private network), ``secret`` in the
Standard Webhooks form ``whsec_<base64 of 24-64 bytes>``. An error says which entry,
by its position, never a secret or a url (a url may carry a token); the start-up names
the setting in front of it (``app.config.load_settings``).
"""

from __future__ import annotations

import binascii
import json
from base64 import b64decode
from dataclasses import dataclass, field
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

from pydantic import PlainSerializer, PlainValidator
from pydantic_settings import NoDecode

MAX_ENDPOINTS: Final = 20
MAX_URL_LENGTH: Final = 2048
#: Standard Webhooks: secrets of 24 to 64 bytes.
SECRET_BYTES: Final = range(24, 65)
SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - the scheme's prefix, not a secret


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    secret: str = field(repr=False)


def parse_endpoints(value: Any) -> tuple[Endpoint, ...]:
    """The endpoints from the setting's JSON text (or a list already parsed)."""
    if isinstance(value, tuple) and all(isinstance(e, Endpoint) for e in value):
        return value
    if value is None or value == "":
        return ()
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("not valid JSON") from None
    if not isinstance(value, list):
        raise ValueError('must be a JSON list of {"url", "secret"} objects')
    if len(value) > MAX_ENDPOINTS:
        raise ValueError(f"lists more than {MAX_ENDPOINTS} endpoints")
    endpoints = tuple(_endpoint(i, entry) for i, entry in enumerate(value, start=1))
    if len({e.url for e in endpoints}) != len(endpoints):
        raise ValueError("lists the same url twice")
    return endpoints


def _endpoint(position: int, entry: Any) -> Endpoint:
    where = f"entry {position}"
    if isinstance(entry, Endpoint):
        entry = {"url": entry.url, "secret": entry.secret}
    if not isinstance(entry, dict) or set(entry) != {"url", "secret"}:
        raise ValueError(f'{where} must be an object with exactly "url" and "secret"')
    url, secret = entry["url"], entry["secret"]
    if not isinstance(url, str) or not _is_http_url(url):
        raise ValueError(f"{where}: url must be an http or https URL with a host")
    if not isinstance(secret, str) or not _is_secret(secret):
        raise ValueError(
            f"{where}: secret must be {SECRET_PREFIX} followed by the base64 of "
            f"{SECRET_BYTES.start}-{SECRET_BYTES.stop - 1} random bytes"
        )
    return Endpoint(url, secret)


def _is_http_url(url: str) -> bool:
    # No whitespace: deliveries name their endpoint as "<url> <webhook-id>".
    if len(url) > MAX_URL_LENGTH or any(c.isspace() for c in url) or not url.isascii():
        return False
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _is_secret(secret: str) -> bool:
    if not secret.startswith(SECRET_PREFIX):
        return False
    try:
        raw = b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) in SECRET_BYTES


#: The settings field's type: read as raw text from the environment (no JSON decoding
#: by the settings source, whose error would not say what is wrong) and parsed here.
WebhookEndpoints = Annotated[
    tuple[Endpoint, ...],
    NoDecode,
    PlainValidator(parse_endpoints),
    PlainSerializer(lambda endpoints: [e.url for e in endpoints]),
]


def parse_schedule(value: Any) -> tuple[float, ...]:
    """The retry delays in seconds: a JSON list of 1-50 positive numbers."""
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("not valid JSON") from None
    if (
        not isinstance(value, list | tuple)
        or not 1 <= len(value) <= 50
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 86_400
            for v in value
        )
    ):
        raise ValueError(
            "must be a JSON list of 1-50 delays, each more than 0 and at most 86400 seconds"
        )
    return tuple(float(v) for v in value)


RetrySchedule = Annotated[tuple[float, ...], NoDecode, PlainValidator(parse_schedule)]

#: Seconds from one attempt to the next: the first retry 10 s after the first attempt,
#: then backing off to every 8 hours; the last delay repeats until the retry window ends.
DEFAULT_RETRY_SECONDS: Final = (10.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0)
