"""Processes a benchmark run starts and always stops: a private redis-server, uvicorn
servers, and the load tools (wrk, redis-benchmark)."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ensure_tool(binary: str, package: str) -> str:
    """The tool's path, installing Debian's package first when it is missing and we may."""
    path = shutil.which(binary)
    if path is not None:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"bench: {binary} not found; installing Debian's {package} package", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env)
        path = shutil.which(binary)
    if path is None:
        raise SystemExit(
            f"bench: {binary} is needed; install it with 'sudo apt-get install {package}'"
        )
    return path


class RedisServer:
    """A private redis-server on a free loopback port, without persistence."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def __enter__(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                ensure_tool("redis-server", "redis-server"),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("bench: private redis-server did not start")

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Uvicorn:
    """A uvicorn server (and its workers) in its own process group, stopped on exit."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int) -> None:
        self.argv = argv
        self.env = env
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Uvicorn:
        self.proc = subprocess.Popen(
            self.argv,
            env={**os.environ, **self.env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"bench: server exited:\n{self.log.read().decode()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=1) as resp:  # noqa: S310
                    if resp.status in (200, 404):
                        return self
            except OSError as exc:
                if getattr(exc, "code", None) == 404:  # the floor app has no /healthz
                    return self
                time.sleep(0.1)
        raise RuntimeError("bench: server did not answer in 30 s")

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


class CpuMeter:
    """CPU seconds used over a span by a process group (a server and its workers), one
    process (redis-server) and this process's waited-for children (wrk): who had the
    cores while a load ran."""

    def __init__(self, group: int, process: int) -> None:
        self.group = group
        self.process = process
        self.start = self._read()

    @staticmethod
    def _stat(pid: int) -> tuple[int, float] | None:
        """(process group, CPU seconds) of one live process."""
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = raw.rsplit(")", 1)[1].split()  # the name may hold spaces or ')'
        ticks = os.sysconf("SC_CLK_TCK")
        return int(fields[2]), (int(fields[11]) + int(fields[12])) / ticks

    def _read(self) -> tuple[float, float, float, float]:
        group = 0.0
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = self._stat(int(entry.name))
                if stat is not None and stat[0] == self.group:
                    group += stat[1]
        own = self._stat(self.process)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (
            group,
            own[1] if own else 0.0,
            children.ru_utime + children.ru_stime,
            time.monotonic(),
        )

    def shares(self) -> tuple[float, float, float]:
        """Cores used since the start, on average: (group, process, children)."""
        end = self._read()
        span = end[3] - self.start[3]
        return (
            (end[0] - self.start[0]) / span,
            (end[1] - self.start[1]) / span,
            (end[2] - self.start[2]) / span,
        )
