"""The real service for end-to-end tests: uvicorn in a subprocess on a private Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.redis_procs import RedisProcess, free_port

WORKER_KEY = "worker-key-for-tests-0001"
READER_KEY = "reader-key-for-tests-0001"
ADMIN_KEY = "admin-key-for-tests-00001"


class ServiceProcess:
    """``uvicorn app.main:app`` on a free loopback port, ready once ``/readyz`` says so."""

    def __init__(self, workdir: Path, redis: RedisProcess, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.redis = redis
        self.port = free_port()
        self.env = {
            "CREDITS_REDIS_URL": redis.url,
            "CREDITS_API_KEYS": json.dumps(
                {WORKER_KEY: ["worker"], READER_KEY: ["reader"], ADMIN_KEY: ["admin"]}
            ),
            **(env or {}),
        }
        self.log_path = workdir / f"uvicorn-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--no-access-log",
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the service did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
