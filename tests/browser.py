"""Debian's Chromium driven by Playwright, and the service as a real uvicorn process for it
to talk to: shared by the panel and API reference tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.redis_procs import free_port

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's chromium (scripts/ensure-chromium installs it); Playwright never downloads one."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing; run scripts/ensure-chromium (.ci/run does)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def _wait_ready(base_url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited: {log.read_text()}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the service did not become ready: {log.read_text()}")


@contextmanager
def uvicorn_service(
    workdir: Path, app: str, env: dict[str, str], *, factory: bool = False
) -> Iterator[str]:
    """``app`` served by uvicorn on a free port with ``env`` over a clean environment (no
    ``CREDITS_`` variables of the caller's); yields its base URL once it is ready."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CREDITS_")}
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-access-log", *(["--factory"] if factory else [])]
    log = workdir / "uvicorn.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=clean | env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        _wait_ready(base_url, proc, log)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
