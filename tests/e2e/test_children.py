"""A test run or bench killed outright leaves none of the servers it started running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support import paths
from tests.support.redis import ping

STARTER = """
import json, sys, time
from pathlib import Path
from tests.support.redis import RedisProcess
from tests.support.service import ServiceProcess

redis = RedisProcess(Path(sys.argv[1])).start()
service = ServiceProcess(Path(sys.argv[1]), redis, workers=2).start()
print(json.dumps({"redis": redis.port, "uvicorn": service.port}), flush=True)
time.sleep(120)
"""


def gone(port: int, check: Callable[[int], bool], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not check(port):
            return True
        time.sleep(0.1)
    return False


def answers(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
    except httpx.TransportError:
        return False
    return True


@pytest.mark.real_redis
@pytest.mark.timeout(60)
def test_servers_stop_when_the_process_that_started_them_is_killed(tmp_path: Path) -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path)],
        cwd=paths.ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert starter.stdout is not None
        ports = json.loads(starter.stdout.readline())
        assert ping(ports["redis"])
        assert answers(ports["uvicorn"])
        os.kill(starter.pid, signal.SIGKILL)  # no finally, no atexit: only the kernel
        starter.wait(timeout=10)
        assert gone(ports["redis"], ping), "redis-server outlived the process that started it"
        assert gone(ports["uvicorn"], answers), "uvicorn outlived the process that started it"
    finally:
        starter.kill()
        starter.wait()
