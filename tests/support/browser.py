"""Debian's Chromium driven by Playwright, and the service as a real uvicorn process for it
to talk to: shared by the panel and API reference tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.support import paths
from tests.support.redis import free_port
from tests.support.service import Uvicorn

ARTIFACTS = paths.ARTIFACTS
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


@contextmanager
def uvicorn_service(
    workdir: Path, app: str, env: dict[str, str], *, factory: bool = False
) -> Iterator[str]:
    """``app`` served by uvicorn on a free port with ``env``; yields its base URL once
    ``/readyz`` answers."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-access-log", *(["--factory"] if factory else [])]
    with Uvicorn(command, env, port, ready_path="/readyz", log_path=workdir / "uvicorn.log") as srv:
        yield srv.url
