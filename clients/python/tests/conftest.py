"""Offline tests of the SDK: both clients over ``httpx.MockTransport`` and the fake
service in ``fake_service``."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from ai_credits_client import CreditsClient, SyncCreditsClient
from fake_service import API_KEY, BASE_URL, FAST_RETRY, FakeService

# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def fake() -> FakeService:
    return FakeService()


@pytest.fixture
async def aclient(fake: FakeService) -> AsyncIterator[CreditsClient]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    async with http, CreditsClient(BASE_URL, api_key=API_KEY, retry=FAST_RETRY, http=http) as c:
        yield c


@pytest.fixture
def client(fake: FakeService) -> Iterator[SyncCreditsClient]:
    http = httpx.Client(transport=httpx.MockTransport(fake))
    with http, SyncCreditsClient(BASE_URL, api_key=API_KEY, retry=FAST_RETRY, http=http) as c:
        yield c


class Either:
    """Calls a method the same way on the async or the sync client."""

    def __init__(self, client: CreditsClient | SyncCreditsClient) -> None:
        self.client = client

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client, method)(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result


@pytest.fixture(params=["async", "sync"])
def either(
    request: pytest.FixtureRequest, aclient: CreditsClient, client: SyncCreditsClient
) -> Either:
    """Each test using it runs once per client: the same calls, the same outcomes."""
    return Either(aclient if request.param == "async" else client)
