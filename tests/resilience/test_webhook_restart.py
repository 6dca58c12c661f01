"""A service process killed (SIGKILL) between a commit that crossed a threshold and the
webhook's delivery: the delivery is made after a restart, with the same webhook-id."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cluster import wait_for
from tests.support.redis import RedisProcess
from tests.support.service import ADMIN_KEY, WORKER_KEY, ServiceProcess
from tests.support.webhooks import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


@pytest.mark.real_redis
def test_a_service_killed_between_commit_and_delivery_delivers_after_restart(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.hold.set()  # the first attempt hangs: the kill lands before any answer
    env = {
        "CREDITS_WEBHOOKS": json.dumps([receiver.endpoint()]),
        "CREDITS_WEBHOOK_TIMEOUT_SECONDS": "1",
        "CREDITS_WEBHOOK_SWEEP_SECONDS": "0.2",
        "CREDITS_WEBHOOK_RETRY_SECONDS": "[0.5]",
    }
    worker = {"authorization": f"Bearer {WORKER_KEY}"}
    with RedisProcess(tmp_path) as redis:
        first = ServiceProcess(tmp_path, redis, env).start()
        try:
            for _ in range(12):
                held = httpx.post(
                    f"{first.url}/v1/coaches/coach-k/reservations",
                    json={"feature": "trend_analysis"},
                    headers=worker,
                    timeout=10,
                )
                rid = held.json()["reservation_id"]
                done = httpx.post(
                    f"{first.url}/v1/reservations/{rid}/commit", headers=worker, timeout=10
                )
                assert done.status_code == 200
            [attempt] = receiver.wait_for(lambda r: len(r) >= 1)
            assert first.proc is not None
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(timeout=10)
        finally:
            first.stop()
        assert receiver.answered == 0
        receiver.hold.clear()
        second = ServiceProcess(tmp_path, redis, env).start()
        try:
            got = receiver.wait_for(lambda r: len(r) >= 2)
            assert {r.webhook_id for r in got} == {attempt.webhook_id}
            assert all(r.verified for r in got)
            admin = {"authorization": f"Bearer {ADMIN_KEY}"}

            def delivered() -> list[Any]:
                url = f"{second.url}/v1/webhook-deliveries?status=delivered"
                found: list[Any] = httpx.get(url, headers=admin, timeout=10).json()["deliveries"]
                return found

            wait_for("the delivery recorded as delivered", lambda: bool(delivered()), 20)
            [done] = delivered()
            assert done["webhook_id"] == attempt.webhook_id
            assert done["attempts"] >= 2
        finally:
            second.stop()
