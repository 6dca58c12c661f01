"""Batch endpoints: many reservations or settlements in one request, each item on its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from app.config import Scope, Settings
from app.errors import CreditsError, CreditsExhausted
from app.main import create_app
from app.store import AnyRedis, CreditStore, ReserveItem
from tests.support.clock import FrozenClock
from tests.support.redis import RedisProcess

RESERVE = "/v1/reservations/batch"
SETTLE = "/v1/reservations/settle"


def results(resp: httpx.Response) -> list[dict[str, Any]]:
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert list(body) == ["results"]
    out: list[dict[str, Any]] = body["results"]
    return out


def item_problem(result: dict[str, Any], status: int, code: str) -> dict[str, Any]:
    assert result["status"] == status, result
    assert "reservation" not in result
    problem: dict[str, Any] = result["problem"]
    assert problem["status"] == status
    assert problem["code"] == code
    assert problem["type"] == f"/problems/{code}"
    assert problem["title"].strip()
    assert problem["detail"].strip()
    return problem


def item_reservation(result: dict[str, Any], status: int) -> dict[str, Any]:
    assert result["status"] == status, result
    assert "problem" not in result
    reservation: dict[str, Any] = result["reservation"]
    return reservation


async def usage(api: httpx.AsyncClient, coach_id: str) -> dict[str, Any]:
    resp = await api.get(f"/v1/coaches/{coach_id}/usage")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def coach_keys(redis: AnyRedis) -> list[str]:
    """Keys of any coach (the ``{coach}`` hash-tagged ones), sorted."""
    return sorted(str(k) for k in await redis.keys("credits:{*"))


async def test_mixed_items_succeed_and_fail_alone_in_request_order(api: httpx.AsyncClient) -> None:
    items: list[dict[str, Any]] = [
        {"coach_id": "coach-a", "feature": "checkin_draft"},
        {"coach_id": "bad id!", "feature": "checkin_draft"},
        {"coach_id": "coach-b", "feature": "no_such_feature"},
        {"coach_id": "coach-b", "feature": "trend_analysis", "ttl_seconds": 60},
        {"coach_id": "coach-c", "feature": "checkin_draft", "ttl_seconds": 0},
        {"coach_id": "coach-c", "feature": "checkin_draft", "idempotency_key": "tab\there"},
        {"coach_id": "{coach-d}", "feature": "checkin_draft"},
        {"coach_id": "coach-c", "feature": "checkin_draft", "ttl_seconds": 3600},
    ]
    out = results(await api.post(RESERVE, json={"reservations": items}))
    assert len(out) == len(items)

    first = item_reservation(out[0], 201)
    assert (first["coach_id"], first["feature"], first["cost"]) == ("coach-a", "checkin_draft", 1)
    assert first["status"] == "held"
    item_problem(out[1], 422, "invalid_coach_id")
    item_problem(out[2], 422, "unknown_feature")
    fourth = item_reservation(out[3], 201)
    assert (fourth["coach_id"], fourth["cost"]) == ("coach-b", 3)
    assert fourth["expires_at"] == "2099-11-14T12:01:00Z"
    item_problem(out[4], 422, "invalid_request")
    item_problem(out[5], 422, "invalid_request")
    item_problem(out[6], 422, "invalid_coach_id")
    last = item_reservation(out[7], 201)
    assert last["expires_at"] == "2099-11-14T13:00:00Z"

    # Failed items held nothing; successful ones held exactly their cost.
    assert (await usage(api, "coach-a"))["held"] == 1
    assert (await usage(api, "coach-b"))["held"] == 3
    assert (await usage(api, "coach-c"))["held"] == 1


async def test_batch_reservations_read_back_like_single_ones(api: httpx.AsyncClient) -> None:
    out = results(
        await api.post(
            RESERVE, json={"reservations": [{"coach_id": "c1", "feature": "trend_analysis"}]}
        )
    )
    made = item_reservation(out[0], 201)
    fetched = await api.get(f"/v1/reservations/{made['reservation_id']}")
    assert fetched.status_code == 200
    assert fetched.json() == made


async def test_exhaustion_mid_batch_holds_exactly_what_fits(api: httpx.AsyncClient) -> None:
    # 50 credits fit 16 trend analyses (48); the other coach is untouched by the first.
    items = [{"coach_id": "busy", "feature": "trend_analysis"} for _ in range(20)]
    items.insert(10, {"coach_id": "other", "feature": "trend_analysis"})
    out = results(await api.post(RESERVE, json={"reservations": items}))

    busy = [r for i, r in enumerate(out) if i != 10]
    assert [r["status"] for r in busy] == [201] * 16 + [429] * 4
    assert item_reservation(out[10], 201)["coach_id"] == "other"
    held_after = [item_reservation(r, 201)["usage"]["held"] for r in busy[:16]]
    assert held_after == list(range(3, 49, 3))
    ids = {item_reservation(r, 201)["reservation_id"] for r in busy[:16]}
    assert len(ids) == 16
    for r in busy[16:]:
        problem = item_problem(r, 429, "credits_exhausted")
        assert problem["feature"] == "trend_analysis"
        assert problem["cost"] == 3
        assert problem["remaining"] == 2
        assert problem["resets_at"] == "2099-12-01T00:00:00Z"
        # Tied up in holds of 300 s: the first frees up in 300 s.
        assert problem["retry_after"] == 300

    assert (await usage(api, "busy"))["held"] == 48
    # The single-item route, in the same state, answers the very same problem.
    single = await api.post("/v1/coaches/busy/reservations", json={"feature": "trend_analysis"})
    assert single.status_code == 429
    expected = dict(busy[-1]["problem"])
    assert str(expected.pop("retry_after")) == single.headers["Retry-After"]
    assert single.json() == expected


async def test_idempotency_keys_inside_a_batch(api: httpx.AsyncClient) -> None:
    items: list[dict[str, Any]] = [
        {"coach_id": "idem", "feature": "trend_analysis", "idempotency_key": "job-1"},
        {"coach_id": "idem", "feature": "trend_analysis", "idempotency_key": "job-1"},
        {"coach_id": "idem", "feature": "checkin_draft", "idempotency_key": "job-1"},
        {"coach_id": "idem-2", "feature": "checkin_draft", "idempotency_key": "job-1"},
    ]
    out = results(await api.post(RESERVE, json={"reservations": items}))
    first = item_reservation(out[0], 201)
    replay = item_reservation(out[1], 200)
    assert replay["reservation_id"] == first["reservation_id"]
    item_problem(out[2], 422, "idempotency_key_reused")
    # Keys are scoped to the coach: the same key for another coach is a new hold.
    assert item_reservation(out[3], 201)["coach_id"] == "idem-2"
    assert (await usage(api, "idem"))["held"] == 3

    # The batch field and the single route's header share one scope.
    single = await api.post(
        "/v1/coaches/idem/reservations",
        json={"feature": "trend_analysis"},
        headers={"Idempotency-Key": "job-1"},
    )
    assert single.status_code == 200
    assert single.json()["reservation_id"] == first["reservation_id"]
    again = results(await api.post(RESERVE, json={"reservations": items[:1]}))
    assert item_reservation(again[0], 200)["reservation_id"] == first["reservation_id"]
    assert (await usage(api, "idem"))["held"] == 3


async def reserve_ids(api: httpx.AsyncClient, coach_id: str, features: list[str]) -> list[str]:
    out = results(
        await api.post(
            RESERVE,
            json={"reservations": [{"coach_id": coach_id, "feature": f} for f in features]},
        )
    )
    return [item_reservation(r, 201)["reservation_id"] for r in out]


async def test_settle_commit_refund_unknown_and_conflicts(api: httpx.AsyncClient) -> None:
    r1, r2, r3 = await reserve_ids(
        api, "settler", ["trend_analysis", "trend_analysis", "checkin_draft"]
    )
    made_up = r1[:-4] + ("AAAA" if not r1.endswith("AAAA") else "QQQQ")
    settlements = [
        {"reservation_id": r1, "action": "commit"},
        {"reservation_id": r2, "action": "refund"},
        {"reservation_id": "not-an-id", "action": "commit"},
        {"reservation_id": made_up, "action": "refund"},
        {"reservation_id": r1, "action": "refund"},
        {"reservation_id": r2, "action": "commit"},
        {"reservation_id": r1, "action": "commit"},
        {"reservation_id": r2, "action": "refund"},
        {"reservation_id": r3, "action": "commit"},
    ]
    out = results(await api.post(SETTLE, json={"settlements": settlements}))
    assert len(out) == len(settlements)

    committed = item_reservation(out[0], 200)
    assert (committed["reservation_id"], committed["status"]) == (r1, "committed")
    assert committed["note"] == "Used 3 credits · 43 of 50 left this month"
    refunded = item_reservation(out[1], 200)
    assert (refunded["reservation_id"], refunded["status"]) == (r2, "refunded")
    assert "note" not in refunded
    item_problem(out[2], 404, "reservation_not_found")
    item_problem(out[3], 404, "reservation_not_found")
    item_problem(out[4], 409, "reservation_committed")
    item_problem(out[5], 409, "reservation_refunded")
    assert item_reservation(out[6], 200)["status"] == "committed"
    assert item_reservation(out[7], 200)["status"] == "refunded"
    last = item_reservation(out[8], 200)
    assert last["note"] == "Used 1 credit · 46 of 50 left this month"

    after = await usage(api, "settler")
    assert (after["used"], after["held"], after["remaining"]) == (4, 0, 46)


async def test_settle_after_expiry(api: httpx.AsyncClient, clock: FrozenClock) -> None:
    r1, r2 = await reserve_ids(api, "late", ["checkin_draft", "trend_analysis"])
    clock.advance(301)
    out = results(
        await api.post(
            SETTLE,
            json={
                "settlements": [
                    {"reservation_id": r1, "action": "commit"},
                    {"reservation_id": r2, "action": "refund"},
                ]
            },
        )
    )
    item_problem(out[0], 409, "reservation_expired")
    assert item_reservation(out[1], 200)["status"] == "expired"
    after = await usage(api, "late")
    assert (after["used"], after["held"]) == (0, 0)


async def test_full_batch_of_500_and_the_limits(api: httpx.AsyncClient) -> None:
    items = [{"coach_id": f"bulk-{i}", "feature": "checkin_draft"} for i in range(500)]
    out = results(await api.post(RESERVE, json={"reservations": items}))
    assert [r["status"] for r in out] == [201] * 500
    assert [r["reservation"]["coach_id"] for r in out] == [i["coach_id"] for i in items]

    settlements = [
        {"reservation_id": r["reservation"]["reservation_id"], "action": "commit"} for r in out
    ]
    settled = results(await api.post(SETTLE, json={"settlements": settlements}))
    assert [r["status"] for r in settled] == [200] * 500
    assert [r["reservation"]["coach_id"] for r in settled] == [i["coach_id"] for i in items]

    for path, field, item in (
        (RESERVE, "reservations", items[0]),
        (SETTLE, "settlements", settlements[0]),
    ):
        for count in (0, 501):
            resp = await api.post(path, json={field: [item] * count})
            assert resp.status_code == 422, (path, count)
            assert resp.json()["code"] == "invalid_request"
    # 501 items were refused whole: none of them held anything.
    assert (await usage(api, "bulk-0"))["used"] == 1
    assert (await usage(api, "bulk-0"))["held"] == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (RESERVE, {}),
        (RESERVE, {"reservations": "coach-1"}),
        (RESERVE, {"reservations": [{"coach_id": "c"}]}),
        (RESERVE, {"reservations": [{"coach_id": "c", "feature": "checkin_draft", "x": 1}]}),
        (RESERVE, {"reservations": [{"coach_id": "c", "feature": "checkin_draft"}], "y": 1}),
        (RESERVE, {"reservations": [{"coach_id": 7, "feature": "checkin_draft"}]}),
        (RESERVE, {"reservations": [{"coach_id": "c", "feature": "x", "ttl_seconds": "9"}]}),
        (SETTLE, {"settlements": [{"reservation_id": "x", "action": "cancel"}]}),
        (SETTLE, {"settlements": [{"reservation_id": "x"}]}),
        (SETTLE, {"reservations": []}),
    ],
)
async def test_malformed_envelope_is_422_and_touches_nothing(
    api: httpx.AsyncClient, backend: AnyRedis, path: str, body: dict[str, Any]
) -> None:
    before = await coach_keys(backend)
    resp = await api.post(path, json=body)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["code"] == "invalid_request"
    assert await coach_keys(backend) == before


async def test_batch_endpoints_need_the_worker_scope(backend: AnyRedis, clock: FrozenClock) -> None:
    keys = {
        "worker-key-0123456789": [Scope.WORKER],
        "reader-key-0123456789": [Scope.READER],
        "admin-key-01234567890": [Scope.ADMIN],
    }
    app = create_app(Settings(api_keys=keys), redis=backend, clock=clock)
    reserve_body = {"reservations": [{"coach_id": "scoped", "feature": "checkin_draft"}]}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:

            def auth(key: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {key}"}

            for path, body in (
                (RESERVE, reserve_body),
                (SETTLE, {"settlements": [{"reservation_id": "x", "action": "commit"}]}),
            ):
                missing = await client.post(path, json=body)
                assert missing.status_code == 401
                assert missing.json()["code"] == "unauthorized"
                wrong = await client.post(path, json=body, headers=auth("nope-0123456789abc"))
                assert wrong.status_code == 401
                reader = await client.post(path, json=body, headers=auth("reader-key-0123456789"))
                assert reader.status_code == 403
                assert reader.json()["code"] == "forbidden"
            assert await coach_keys(backend) == []

            out = results(
                await client.post(RESERVE, json=reserve_body, headers=auth("worker-key-0123456789"))
            )
            rid = item_reservation(out[0], 201)["reservation_id"]
            settled = results(
                await client.post(
                    SETTLE,
                    json={"settlements": [{"reservation_id": rid, "action": "commit"}]},
                    headers=auth("admin-key-01234567890"),
                )
            )
            assert item_reservation(settled[0], 200)["status"] == "committed"


async def test_openapi_documents_batch_results_and_problems(api: httpx.AsyncClient) -> None:
    spec = (await api.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    for path, out in ((RESERVE, "BatchReserveOut"), (SETTLE, "SettleOut")):
        op = spec["paths"][path]["post"]
        ok = op["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok["$ref"].endswith(f"/{out}")
        for status in ("401", "403", "413", "422", "503"):
            assert "application/problem+json" in op["responses"][status]["content"]
    result = schemas["BatchReserveResultOut"]["properties"]
    assert set(result) == {"status", "reservation", "problem"}
    assert set(result["status"]["enum"]) == {200, 201, 422, 429}
    assert set(schemas["SettleResultOut"]["properties"]["status"]["enum"]) == {200, 404, 409}


@pytest.fixture
async def doomed_redis(tmp_path: Path) -> AsyncIterator[tuple[RedisProcess, Redis]]:
    server = RedisProcess(tmp_path).start()
    client = Redis.from_url(server.url, decode_responses=True, socket_timeout=1)
    try:
        yield server, client
    finally:
        await client.aclose()
        server.stop()


@pytest.mark.real_redis
async def test_unreachable_redis_fails_the_whole_batch_with_503(
    doomed_redis: tuple[RedisProcess, Redis], clock: FrozenClock
) -> None:
    server, client = doomed_redis
    app = create_app(Settings(), redis=client, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as api:
            rid = (await reserve_ids(api, "gone", ["checkin_draft"]))[0]
            server.stop(kill=True)
            for path, body in (
                (RESERVE, {"reservations": [{"coach_id": "gone", "feature": "checkin_draft"}]}),
                (SETTLE, {"settlements": [{"reservation_id": rid, "action": "commit"}]}),
            ):
                resp = await api.post(path, json=body)
                assert resp.status_code == 503, resp.text
                assert resp.json()["code"] == "backend_unavailable"
                assert "Retry-After" in resp.headers
            server.start()
            # Recovers by itself: scripts are loaded again by the pipeline.
            settled = results(
                await api.post(
                    SETTLE, json={"settlements": [{"reservation_id": rid, "action": "commit"}]}
                )
            )
            item_problem(settled[0], 404, "reservation_not_found")


@pytest.mark.real_redis
async def test_batch_survives_a_script_flush_before_it_runs(
    redis_server: RedisProcess, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls that meet NOSCRIPT never ran: each runs once more, and only once in all."""
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        await client.flushall()
        store = CreditStore(client, clock=clock)
        await store.ensure_scripts()
        await client.script_flush()

        async def skip_loading(self: Pipeline) -> None:
            return None

        # As if the flush landed between the pipeline's script check and its commands.
        monkeypatch.setattr(Pipeline, "load_scripts", skip_loading)
        items = [ReserveItem("flushed", "trend_analysis") for _ in range(18)]
        outcomes = await store.reserve_many(items)
        held = [o for o in outcomes if not isinstance(o, CreditsError)]
        assert len(held) == 16
        assert all(isinstance(o, CreditsExhausted) for o in outcomes[16:])
        assert (await store.usage("flushed")).held == 48

        settled = await store.settle_many([(str(r.reservation_id), "commit") for r, _ in held])
        assert all(not isinstance(o, CreditsError) for o in settled)
        after = await store.usage("flushed")
        assert (after.used, after.held) == (48, 0)
    finally:
        await client.flushall()
        await client.aclose()
