"""Request dependencies: the store, and bearer-key access with scopes."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.openapi.models import HTTPBearer
from fastapi.security.base import SecurityBase

from app.config import Scope
from app.errors import Forbidden, Unauthorized
from app.metrics import Metrics
from app.store import CreditStore


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: ``key_id`` is a stable, non-secret fingerprint of the API key."""

    key_id: str
    scopes: frozenset[Scope]


OPEN_PRINCIPAL = Principal("open", frozenset(Scope))


class KeyRing:
    """Bearer keys compared in constant time: every configured key is checked, always,
    for a key not admitted before.

    A key once admitted is remembered, so that its next requests skip the hashing and
    the comparisons. Only keys that matched a configured one are kept, so there are at
    most as many as are configured, and looking one up tells a caller nothing the
    answer does not: a dict compares its keyed hash first, and the text only when the
    hash is the same."""

    def __init__(self, keys: dict[str, list[Scope]]) -> None:
        self._entries = [
            (hashlib.sha256(k.encode()).digest(), frozenset(s)) for k, s in keys.items()
        ]
        self._admitted: dict[str, Principal] = {}

    @property
    def open(self) -> bool:
        return not self._entries

    def authenticate(self, authorization: str | None) -> Principal:
        if self.open:
            return OPEN_PRINCIPAL
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Send an API key as 'Authorization: Bearer <key>'.")
        admitted = self._admitted.get(token)
        if admitted is not None:
            return admitted
        presented = hashlib.sha256(token.encode()).digest()
        found: frozenset[Scope] | None = None
        for digest, scopes in self._entries:
            if hmac.compare_digest(digest, presented):
                found = scopes
        if found is None:
            raise Unauthorized("This API key is not valid.")
        principal = self._admitted[token] = Principal(presented.hex()[:16], found)
        return principal


# Dependencies are async on purpose: FastAPI runs a plain ``def`` dependency in a worker
# thread, a hop per dependency per request that costs more than the work inside.
async def get_store(request: Request) -> CreditStore:
    return store_of(request)


def store_of(request: Request) -> CreditStore:
    store: CreditStore = request.app.state.store
    return store


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


#: The bearer scheme's name in the OpenAPI document.
BEARER_SCHEME = "bearerAuth"


class Access(SecurityBase):
    """A dependency that admits keys holding any of its scopes (admin always passes).

    ``admit`` is the check itself, for routes that read the header without FastAPI's
    parameter machinery (see ``app.api.hot``). As a ``SecurityBase`` it is documented
    as the bearer scheme on every route that depends on it, with its scopes."""

    def __init__(self, *scopes: Scope) -> None:
        self.allowed = frozenset((*scopes, Scope.ADMIN))
        self.names = " or ".join(s.value for s in scopes)
        self.scopes = [s.value for s in scopes]
        self.model = HTTPBearer(description="An API key from CREDITS_API_KEYS.")
        self.scheme_name = BEARER_SCHEME

    def admit(self, keyring: KeyRing, authorization: str | None) -> Principal:
        if keyring.open:  # open mode: nothing to compare, every scope is held
            return OPEN_PRINCIPAL
        principal = keyring.authenticate(authorization)
        if not principal.scopes & self.allowed:
            raise Forbidden(f"This API key lacks the {self.names} scope needed here.")
        return principal

    async def __call__(self, request: Request) -> Principal:
        return self.admit(request.app.state.keyring, request.headers.get("authorization"))


def require(*scopes: Scope) -> Access:
    """A dependency that admits keys holding any of ``scopes`` (admin always passes)."""
    return Access(*scopes)


def guarded(access: Access) -> Any:
    """``access`` as a route parameter's dependency, its scopes in the OpenAPI document."""
    return Security(access, scopes=access.scopes)


WORKER_ACCESS = require(Scope.WORKER)

StoreDep = Annotated[CreditStore, Depends(get_store)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
Worker = Annotated[Principal, guarded(WORKER_ACCESS)]
Reader = Annotated[Principal, guarded(require(Scope.READER))]
AnyScope = Annotated[Principal, guarded(require(Scope.WORKER, Scope.READER))]
