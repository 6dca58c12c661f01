"""uvicorn servers in subprocesses, for end-to-end tests and the bench: the service on a
private Redis, or any ASGI app (the bench's floor, a webhook receiver)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from tests.support import paths
from tests.support.children import tied_to_starter
from tests.support.redis import RedisProcess, free_port

WORKER_KEY = "worker-key-for-tests-0001"
READER_KEY = "reader-key-for-tests-0001"
ADMIN_KEY = "admin-key-for-tests-00001"


class Uvicorn:
    """A uvicorn server (and its workers) in its own process group, run from the checkout
    (or ``cwd``) with ``env`` over the caller's environment less its ``CREDITS_``
    settings, ready once ``ready_path`` answers 200 (any answer, with ``ready_path=None``)."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        port: int,
        *,
        ready_path: str | None = "/healthz",
        log_path: Path | None = None,
        cwd: Path = paths.ROOT,
    ) -> None:
        self.argv = argv
        self.cwd = cwd
        self.env = env
        self.port = port
        self.ready_path = ready_path
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="uvicorn-")) / "uvicorn.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    base = url

    def start(self, timeout: float = 30.0) -> Uvicorn:
        with self.log_path.open("wb") as log:
            inherited = {k: v for k, v in os.environ.items() if not k.startswith("CREDITS_")}
            self.proc = subprocess.Popen(
                tied_to_starter(self.argv),
                cwd=self.cwd,
                env={**inherited, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited:\n{self.log()[-3000:]}")
            try:
                answer = httpx.get(f"{self.url}{self.ready_path or '/'}", timeout=1)
                if self.ready_path is None or answer.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"uvicorn was not ready in {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Uvicorn:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ServiceProcess(Uvicorn):
    """``uvicorn app.main:app`` on a free loopback port with bearer keys for each scope,
    ready once ``/readyz`` says so."""

    def __init__(
        self,
        workdir: Path,
        redis: RedisProcess,
        env: dict[str, str] | None = None,
        *,
        workers: int = 1,
    ):
        port = free_port()
        super().__init__(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--no-access-log",
            ],
            {
                "CREDITS_REDIS_URL": redis.url,
                "CREDITS_API_KEYS": json.dumps(
                    {WORKER_KEY: ["worker"], READER_KEY: ["reader"], ADMIN_KEY: ["admin"]}
                ),
                **(env or {}),
            },
            port,
            ready_path="/readyz",
            log_path=workdir / f"uvicorn-{port}.log",
        )
        self.workdir = workdir
        self.redis = redis

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        super().start(timeout)
        return self
