"""The request hot path stays on the event loop: no worker-thread hop per request."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
import httpx
import pytest


@pytest.fixture
def no_threads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records every attempt to run something in a worker thread (and refuses it)."""
    calls: list[Any] = []

    async def refuse(func: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(func)
        raise AssertionError(f"worker-thread hop for {func!r}")

    monkeypatch.setattr(anyio.to_thread, "run_sync", refuse)
    return calls


async def test_credit_routes_never_hop_to_a_thread(
    api: httpx.AsyncClient, no_threads: list[Any]
) -> None:
    made = await api.post("/v1/coaches/hot/reservations", json={"feature": "checkin_draft"})
    assert made.status_code == 201, made.text
    rid = made.json()["reservation_id"]
    assert (await api.get(f"/v1/reservations/{rid}")).status_code == 200
    assert (await api.post(f"/v1/reservations/{rid}/commit")).status_code == 200
    assert (await api.get("/v1/coaches/hot/usage")).status_code == 200
    batch = await api.post(
        "/v1/reservations/batch",
        json={"reservations": [{"coach_id": "hot", "feature": "checkin_draft"}]},
    )
    assert batch.status_code == 200
    assert no_threads == []
