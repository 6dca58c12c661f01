"""The load tools a benchmark run needs (wrk, redis-benchmark) and who used the cores;
redis-server and uvicorn are started as the tests start them (tests.support)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


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
