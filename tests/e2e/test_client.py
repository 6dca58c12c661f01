"""The worker SDK against the real service: uvicorn in a subprocess on a private Redis."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest
from ai_credits_client import (
    CreditsClient,
    CreditsExhausted,
    Forbidden,
    InvalidRequest,
    NotFound,
    ReservationConflict,
    RetryPolicy,
    SyncCreditsClient,
    Unauthorized,
    Unavailable,
)

from app.domain import Period
from tests.support.redis import RedisProcess, free_port
from tests.support.service import READER_KEY, WORKER_KEY, ServiceProcess

FAST_RETRY = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.1)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    workdir = tmp_path_factory.mktemp("client-service")
    with RedisProcess(workdir) as redis:
        proc = ServiceProcess(workdir, redis).start()
        try:
            yield proc
        finally:
            proc.stop()


@pytest.fixture
async def credits(service: ServiceProcess) -> AsyncIterator[CreditsClient]:
    async with CreditsClient(service.url, api_key=WORKER_KEY, retry=FAST_RETRY) as client:
        yield client


@pytest.fixture
async def reader(service: ServiceProcess) -> AsyncIterator[CreditsClient]:
    async with CreditsClient(service.url, api_key=READER_KEY, retry=FAST_RETRY) as client:
        yield client


def new_coach() -> str:
    return f"coach-{uuid.uuid4().hex[:12]}"


async def test_a_block_that_succeeds_is_committed(credits: CreditsClient) -> None:
    coach = new_coach()
    async with credits.hold(coach, "trend_analysis") as hold:
        assert hold.reservation.status == "held"
        assert (await credits.usage(coach)).held == 3
    assert hold.committed
    assert hold.note == "Used 3 credits · 47 of 50 left this month"
    assert hold.reservation.status == "committed"
    usage = await credits.usage(coach)
    assert (usage.used, usage.held, usage.remaining) == (3, 0, 47)


async def test_a_block_longer_than_its_hold_keeps_it_alive_and_is_charged_once(
    credits: CreditsClient, service: ServiceProcess
) -> None:
    """The hold's TTL is 2 s and the block runs 5 s: the client extends it against the
    real service meanwhile, so it is committed, not lapsed, and charged once."""
    coach = new_coach()
    async with credits.hold(coach, "trend_analysis", ttl_seconds=2) as hold:
        await asyncio.sleep(5)
        assert (await credits.usage(coach)).held == 3  # still held, past two TTLs
    assert hold.committed
    usage = await credits.usage(coach)
    assert (usage.used, usage.held) == (3, 0)
    async with CreditsClient(service.url, api_key=READER_KEY, retry=FAST_RETRY) as reader:
        page = await reader.events(coach)
    assert [e.kind for e in page.events].count("extended") >= 2


def test_the_sync_client_keeps_a_long_block_s_hold_alive(service: ServiceProcess) -> None:
    coach = new_coach()
    with SyncCreditsClient(service.url, api_key=WORKER_KEY, retry=FAST_RETRY) as client:
        with client.hold(coach, "checkin_draft", ttl_seconds=2) as hold:
            time.sleep(4)
        assert hold.committed
        usage = client.usage(coach)
        assert (usage.used, usage.held) == (1, 0)


async def test_a_block_that_raises_is_refunded(credits: CreditsClient) -> None:
    coach = new_coach()
    with pytest.raises(ValueError, match="model failed"):
        async with credits.hold(coach, "trend_analysis") as hold:
            raise ValueError("model failed")
    assert (await credits.get_reservation(hold.reservation_id)).status == "refunded"
    usage = await credits.usage(coach)
    assert (usage.used, usage.held) == (0, 0)


async def test_a_cancelled_block_is_refunded(credits: CreditsClient) -> None:
    coach = new_coach()
    entered = asyncio.Event()
    holds: list[str] = []

    async def worker() -> None:
        async with credits.hold(coach, "checkin_draft") as hold:
            holds.append(hold.reservation_id)
            entered.set()
            await asyncio.Event().wait()  # an AI call that never returns

    task = asyncio.create_task(worker())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await credits.get_reservation(holds[0])).status == "refunded"
    assert (await credits.usage(coach)).held == 0


async def test_a_block_past_its_timeout_is_refunded(credits: CreditsClient) -> None:
    coach = new_coach()
    with pytest.raises(TimeoutError):
        async with credits.hold(coach, "trend_analysis", timeout=0.2) as hold:
            await asyncio.Event().wait()
    assert (await credits.get_reservation(hold.reservation_id)).status == "refunded"
    usage = await credits.usage(coach)
    assert (usage.used, usage.held) == (0, 0)


async def test_exhausted_credits_raise_with_the_details(credits: CreditsClient) -> None:
    coach = new_coach()
    for _ in range(16):
        async with credits.hold(coach, "trend_analysis"):
            pass
    with pytest.raises(CreditsExhausted) as caught:
        async with credits.hold(coach, "trend_analysis"):
            pytest.fail("the block must not run without credits")
    err = caught.value
    now = datetime.now(UTC)
    resets_at = Period.containing(now).resets_at
    assert (err.status, err.code) == (429, "credits_exhausted")
    assert (err.feature, err.cost, err.remaining) == ("trend_analysis", 3, 2)
    assert err.resets_at == resets_at
    assert "needs 3 credits and you have 2 left" in err.detail
    assert err.retry_after is not None
    assert 0 < err.retry_after <= (resets_at - now).total_seconds() + 1
    # One credit still fits; the refusal held nothing.
    async with credits.hold(coach, "checkin_draft") as hold:
        pass
    assert hold.note == "Used 1 credit · 1 of 50 left this month"


async def test_errors_map_to_the_hierarchy(service: ServiceProcess, credits: CreditsClient) -> None:
    coach = new_coach()
    reservation = await credits.reserve(coach, "checkin_draft")
    await credits.refund(reservation.reservation_id)
    with pytest.raises(ReservationConflict) as conflict:
        await credits.commit(reservation.reservation_id)
    assert conflict.value.code == "reservation_refunded"
    assert (await credits.refund(reservation.reservation_id)).status == "refunded"

    with pytest.raises(NotFound):
        await credits.get_reservation("not-a-reservation")
    with pytest.raises(InvalidRequest) as invalid:
        await credits.reserve(coach, "poetry")
    assert invalid.value.code == "unknown_feature"

    async with CreditsClient(service.url, retry=FAST_RETRY) as anonymous:
        with pytest.raises(Unauthorized):
            await anonymous.usage(coach)
    async with CreditsClient(service.url, api_key=READER_KEY, retry=FAST_RETRY) as reader:
        with pytest.raises(Forbidden):
            await reader.reserve(coach, "checkin_draft")
    usage = await credits.usage(coach)
    assert (usage.used, usage.held) == (0, 0)


async def test_an_unreachable_service_is_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    policy = RetryPolicy(attempts=3, base_delay=0.01, max_delay=0.02)
    async with CreditsClient(url, api_key=WORKER_KEY, retry=policy) as client:
        with pytest.raises(Unavailable):
            await client.usage("coach-1")
    with (
        SyncCreditsClient(url, api_key=WORKER_KEY, retry=policy) as sync_client,
        pytest.raises(Unavailable),
    ):
        sync_client.usage("coach-1")


def test_the_sync_client_commits_and_refunds(service: ServiceProcess) -> None:
    coach = new_coach()
    with SyncCreditsClient(service.url, api_key=WORKER_KEY, retry=FAST_RETRY) as client:
        with client.hold(coach, "trend_analysis") as hold:
            assert client.usage(coach).held == 3
        assert hold.note == "Used 3 credits · 47 of 50 left this month"
        with pytest.raises(RuntimeError), client.hold(coach, "checkin_draft") as failed:
            raise RuntimeError("model failed")
        assert client.get_reservation(failed.reservation_id).status == "refunded"
        usage = client.usage(coach)
        assert (usage.used, usage.held) == (3, 0)


def test_the_sync_client_reads_features_and_the_event_log(service: ServiceProcess) -> None:
    coach = new_coach()
    with (
        SyncCreditsClient(service.url, api_key=WORKER_KEY, retry=FAST_RETRY) as worker,
        SyncCreditsClient(service.url, api_key=READER_KEY, retry=FAST_RETRY) as reader,
    ):
        assert [(f.feature, f.cost) for f in reader.features()] == [
            ("checkin_draft", 1),
            ("trend_analysis", 3),
        ]
        with worker.hold(coach, "checkin_draft") as hold:
            pass
        page = reader.events(coach, limit=1)
        assert [(e.kind, e.reservation_id) for e in page.events] == [
            ("committed", hold.reservation_id)
        ]
        assert page.next_before is not None
        rest = reader.events(coach, before=page.next_before)
        assert [e.kind for e in rest.events] == ["held"]
        assert rest.next_before is None


# --- a connection that drops after the service answered a reserve ----------------------------


class DroppingProxy:
    """Forwards TCP to the service, but the first reserve's answer never reaches the
    client: the connection is reset right after the service has sent it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.armed = True
        self.dropped = 0
        self.reserve_keys: list[str] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aenter__(self) -> DroppingProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        drop = asyncio.Event()

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if data.startswith(b"POST /v1/coaches/") and b"/reservations " in data:
                    key = re.search(rb"idempotency-key: *([^\r\n]+)", data, re.IGNORECASE)
                    self.reserve_keys.append(key[1].decode() if key else "")
                    if self.armed:
                        self.armed = False
                        drop.set()
                up_w.write(data)
                await up_w.drain()
            up_w.close()

        async def downstream() -> None:
            while data := await up_r.read(65536):
                if drop.is_set():
                    # The service has answered, so the hold exists; the client never hears.
                    self.dropped += 1
                    client_w.transport.abort()
                    up_w.close()
                    return
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)


async def test_a_dropped_connection_mid_reserve_does_not_double_hold(
    service: ServiceProcess, reader: CreditsClient
) -> None:
    coach = new_coach()
    async with (
        DroppingProxy(service.port) as proxy,
        CreditsClient(proxy.url, api_key=WORKER_KEY, retry=FAST_RETRY) as client,
        client.hold(coach, "trend_analysis") as hold,
    ):
        pass
    assert proxy.dropped == 1
    assert len(proxy.reserve_keys) == 2, "the reserve was sent again after the drop"
    assert proxy.reserve_keys[0] == proxy.reserve_keys[1] != ""
    assert hold.note == "Used 3 credits · 47 of 50 left this month"

    usage = await reader.usage(coach)
    assert (usage.used, usage.held) == (3, 0)
    page = await reader.events(coach)
    kinds = sorted((e.kind, e.reservation_id) for e in page.events)
    assert kinds == [("committed", hold.reservation_id), ("held", hold.reservation_id)]


def test_service_log_has_no_tracebacks(service: ServiceProcess) -> None:
    # Runs last in this module: nothing above made the service fail inside.
    assert "Traceback" not in service.log()
