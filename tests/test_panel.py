"""The "AI Usage" settings panel in a real headless Chromium against the real service.

One uvicorn process (with API keys configured and a frozen clock, so the reset date is
known) talks to a private redis-server; each test sets up a coach through the HTTP API
and then drives the page the way a coach would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from app.main import create_app
from tests.redis_procs import RedisProcess, free_port

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

NOW = datetime(2099, 11, 14, 12, 0, 0, tzinfo=UTC)
NOW_ENV = "PANEL_TEST_NOW"
WORKER_KEY = "panel-test-worker-key-0123456789"
ADMIN_KEY = "panel-test-admin-key-0123456789"
ALLOWANCE = 50
RESET_LINE = "Resets December 1, 00:00 UTC"
#: UTC+14: formatting the reset in the browser's zone would read December 1, 14:00.
BROWSER_TZ = "Pacific/Kiritimati"

#: The panel's level palette (app/static/assets/panel.css), as computed by the browser.
LEVEL_RGB = {
    "green": "rgb(47, 133, 90)",
    "amber": "rgb(194, 124, 14)",
    "red": "rgb(197, 48, 48)",
}

CHECKIN_BUTTON = "Draft check-in response · 1 credit"
TRENDS_BUTTON = "Analyze client trends · 3 credits"

expect.set_options(timeout=10_000)


def frozen_app() -> FastAPI:
    """The service as ``app.main`` builds it, with time stopped at ``PANEL_TEST_NOW``."""
    now = datetime.fromisoformat(os.environ[NOW_ENV])
    return create_app(clock=lambda: now)


@dataclass
class Service:
    base_url: str
    client: httpx.Client

    def usage(self, coach_id: str) -> dict[str, Any]:
        resp = self.client.get(f"/v1/coaches/{coach_id}/usage")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def spend(self, coach_id: str, credits: int) -> None:
        """Commit actions until exactly ``credits`` are used, the largest cost first."""
        left = credits
        for feature, cost in (("trend_analysis", 3), ("checkin_draft", 1)):
            while left >= cost:
                held = self.client.post(
                    f"/v1/coaches/{coach_id}/reservations", json={"feature": feature}
                )
                assert held.status_code == 201, held.text
                rid = held.json()["reservation_id"]
                done = self.client.post(f"/v1/reservations/{rid}/commit")
                assert done.status_code == 200, done.text
                left -= cost
        assert self.usage(coach_id)["used"] == credits


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


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("panel")
    redis = RedisProcess(workdir).start()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITS_")}
    env |= {
        "CREDITS_REDIS_URL": redis.url,
        "CREDITS_API_KEYS": json.dumps({WORKER_KEY: ["worker"], ADMIN_KEY: ["admin"]}),
        NOW_ENV: NOW.isoformat(),
    }
    log = workdir / "uvicorn.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "tests.test_panel:frozen_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(base_url, proc, log)
        headers = {"Authorization": f"Bearer {WORKER_KEY}"}
        with httpx.Client(base_url=base_url, headers=headers, timeout=10) as client:
            yield Service(base_url, client)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        redis.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing; run scripts/ensure-chromium (.ci/run does)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page that fails the test on any dialog, script error or CSP violation."""
    context = browser.new_context(
        timezone_id=BROWSER_TZ, locale="en-US", viewport={"width": 720, "height": 640}
    )
    page = context.new_page()
    dialogs: list[str] = []
    errors: list[str] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    yield page
    context.close()
    assert dialogs == [], f"the panel must not pop up dialogs: {dialogs}"
    assert errors == [], errors


def open_panel(
    page: Page, service: Service, coach_id: str, *, key: str | None = WORKER_KEY
) -> None:
    url = f"{service.base_url}/settings/{coach_id}?delay_ms=20"
    if key is not None:
        url += f"#key={key}"
    page.goto(url)
    expect(page.locator("#panel")).to_have_attribute("data-ready", "true")


def wait_idle(page: Page) -> None:
    """The action finished and usage was re-read (the buttons come back last)."""
    expect(page.locator("#actions")).to_have_attribute("aria-busy", "false")
    for button in page.locator("#actions button").all():
        expect(button).to_be_enabled()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"panel-{name}.png"), full_page=True)


def fill_colour(page: Page) -> str:
    colour: str = page.locator("#usage-fill").evaluate("e => getComputedStyle(e).backgroundColor")
    return colour


def assert_usage_shown(page: Page, used: int, level: str, level_text: str) -> None:
    bar = page.get_by_role("progressbar", name="AI credits used this month")
    expect(page.locator("#used-count")).to_have_text(f"{used} of {ALLOWANCE}")
    expect(bar).to_have_attribute("aria-valuenow", str(used))
    expect(bar).to_have_attribute("aria-valuemin", "0")
    expect(bar).to_have_attribute("aria-valuemax", str(ALLOWANCE))
    expect(bar).to_have_attribute(
        "aria-valuetext", f"{used} of {ALLOWANCE} credits used, {level_text.lower()}"
    )
    expect(bar).to_have_class(f"bar level-{level}")
    expect(page.locator("#level-text")).to_have_text(level_text)
    assert fill_colour(page) == LEVEL_RGB[level]
    width = page.locator("#usage-fill").evaluate("e => e.style.width")
    assert width == f"{used * 100 // ALLOWANCE}%"
    expect(page.locator("#resets")).to_have_text(RESET_LINE)


@pytest.mark.real_redis
def test_the_panel_shows_the_effective_allowance(page: Page, service: Service) -> None:
    coach = "panel-granted"
    service.spend(coach, 13)
    granted = service.client.post(
        f"/v1/coaches/{coach}/grants",
        json={"credits": 5, "reason": "goodwill"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert granted.status_code == 201, granted.text

    open_panel(page, service, coach)

    expect(page.locator("#used-count")).to_have_text("13 of 55")
    expect(page.locator("#remaining")).to_have_text("42 credits left")
    bar = page.get_by_role("progressbar", name="AI credits used this month")
    expect(bar).to_have_attribute("aria-valuemax", "55")


@pytest.mark.real_redis
@pytest.mark.parametrize(
    ("used", "level", "level_text"),
    [(13, "green", "On track"), (36, "amber", "Running low"), (46, "red", "Almost out")],
)
def test_usage_levels(page: Page, service: Service, used: int, level: str, level_text: str) -> None:
    coach = f"panel-level-{used}"
    service.spend(coach, used)
    assert service.usage(coach)["level"] == level

    open_panel(page, service, coach)

    assert_usage_shown(page, used, level, level_text)
    left = ALLOWANCE - used
    expect(page.locator("#remaining")).to_have_text(f"{left} credits left")
    expect(page.locator("#actions button")).to_have_text([CHECKIN_BUTTON, TRENDS_BUTTON])
    # The key is kept in memory only, not left in the address bar or history.
    assert "key=" not in page.url
    screenshot(page, level)


@pytest.mark.real_redis
def test_successful_action_shows_note_and_updates_usage(page: Page, service: Service) -> None:
    coach = "panel-success"
    service.spend(coach, 31)
    open_panel(page, service, coach)
    assert_usage_shown(page, 31, "green", "On track")

    page.get_by_role("button", name=TRENDS_BUTTON).click()

    results = page.locator("#results li")
    expect(results).to_have_count(1)
    expect(results.first).to_contain_text("Client trend analysis")
    expect(results.first.locator(".result-note")).to_have_text(
        "Used 3 credits · 16 of 50 left this month"
    )
    wait_idle(page)
    # Usage is re-read after every action: two more check-ins carry the bar into amber.
    assert_usage_shown(page, 34, "green", "On track")
    page.get_by_role("button", name=CHECKIN_BUTTON).click()
    expect(results).to_have_count(2)
    expect(results.first.locator(".result-note")).to_have_text(
        "Used 1 credit · 15 of 50 left this month"
    )
    wait_idle(page)
    assert_usage_shown(page, 35, "green", "On track")
    page.get_by_role("button", name=CHECKIN_BUTTON).click()
    expect(results).to_have_count(3)
    wait_idle(page)
    assert_usage_shown(page, 36, "amber", "Running low")

    server = service.usage(coach)
    assert (server["used"], server["held"]) == (36, 0)
    expect(page.locator("#notice")).to_be_hidden()
    screenshot(page, "success")


@pytest.mark.real_redis
def test_failed_action_charges_nothing(page: Page, service: Service) -> None:
    coach = "panel-failure"
    service.spend(coach, 13)
    open_panel(page, service, coach)

    page.get_by_role("switch", name="Simulate failure").check()
    page.get_by_role("button", name=TRENDS_BUTTON).click()

    result = page.locator("#results li")
    expect(result).to_have_count(1)
    expect(result.first).to_have_attribute("data-outcome", "refunded")
    expect(result.first.locator(".result-note")).to_have_text(
        "The AI action didn't finish, so nothing was charged."
    )
    wait_idle(page)
    assert_usage_shown(page, 13, "green", "On track")
    expect(page.locator("#remaining")).to_have_text("37 credits left")
    server = service.usage(coach)
    assert (server["used"], server["held"], server["remaining"]) == (13, 0, 37)
    screenshot(page, "failure")


@pytest.mark.real_redis
def test_running_action_shows_its_hold(page: Page, service: Service) -> None:
    coach = "panel-in-progress"
    service.spend(coach, 13)
    page.goto(f"{service.base_url}/settings/{coach}?delay_ms=10000#key={WORKER_KEY}")
    expect(page.locator("#panel")).to_have_attribute("data-ready", "true")

    page.get_by_role("button", name=TRENDS_BUTTON).click()

    expect(page.locator("#remaining")).to_have_text(
        "34 credits left · 3 in use by actions in progress"
    )
    expect(page.locator("#actions")).to_have_attribute("aria-busy", "true")
    for label in (CHECKIN_BUTTON, TRENDS_BUTTON):
        expect(page.get_by_role("button", name=label)).to_be_disabled()
    expect(page.locator("#activity")).to_have_text("Working on it: client trend analysis…")
    server = service.usage(coach)
    assert (server["used"], server["held"]) == (13, 3)


@pytest.mark.real_redis
def test_exhausted_shows_calm_inline_message(page: Page, service: Service) -> None:
    coach = "panel-exhausted"
    service.spend(coach, 49)
    open_panel(page, service, coach)

    # An earlier result on the page, which running out must leave alone.
    page.get_by_role("button", name=CHECKIN_BUTTON).click()
    results = page.locator("#results")
    expect(results.locator("li .result-note")).to_have_text(
        ["Used 1 credit · 0 of 50 left this month"]
    )
    wait_idle(page)
    assert_usage_shown(page, 50, "red", "All used")
    before = results.inner_html()

    refused = service.client.post(
        f"/v1/coaches/{coach}/reservations", json={"feature": "trend_analysis"}
    )
    assert refused.status_code == 429
    detail = refused.json()["detail"]
    assert "December 1" in detail

    for name in (TRENDS_BUTTON, CHECKIN_BUTTON):
        page.get_by_role("button", name=name).click()
        wait_idle(page)
        notice = page.locator("#notice")
        expect(notice).to_be_visible()
        expect(notice).to_have_text(detail)
        expect(notice).to_have_attribute("role", "status")
        for label in (CHECKIN_BUTTON, TRENDS_BUTTON):
            expect(page.get_by_role("button", name=label)).to_be_visible()
        assert results.inner_html() == before
        assert_usage_shown(page, 50, "red", "All used")

    assert page.get_by_role("alert").count() == 0
    server = service.usage(coach)
    assert (server["used"], server["held"]) == (50, 0)
    screenshot(page, "exhausted")


@pytest.mark.real_redis
def test_button_costs_come_from_the_features_api(page: Page, service: Service) -> None:
    def other_costs(route: Route) -> None:
        features = [
            {"feature": "checkin_draft", "cost": 2, "label": "Check-in response draft"},
            {"feature": "trend_analysis", "cost": 5, "label": "Client trend analysis"},
            {"feature": "session_summary", "cost": 1, "label": "Session summary"},
        ]
        route.fulfill(json={"features": features})

    page.route("**/v1/features", other_costs)
    open_panel(page, service, "panel-costs")

    expect(page.locator("#actions button")).to_have_text(
        [
            "Draft check-in response · 2 credits",
            "Analyze client trends · 5 credits",
            "Session summary · 1 credit",
        ]
    )


@pytest.mark.real_redis
def test_without_a_key_the_panel_explains_calmly(page: Page, service: Service) -> None:
    open_panel(page, service, "panel-no-key", key=None)

    expect(page.locator("#panel-message")).to_contain_text("needs an API key")
    expect(page.locator("#usage")).to_be_hidden()
    expect(page.locator("#actions button")).to_have_count(0)
    screenshot(page, "no-key")


@pytest.mark.real_redis
def test_invalid_coach_id_gets_a_readable_422_page(service: Service) -> None:
    resp = httpx.get(f"{service.base_url}/settings/not%20a%20coach")
    assert resp.status_code == 422
    assert resp.headers["content-type"].startswith("text/html")
    assert "doesn't point to a coach" in resp.text
    assert "not a coach" not in resp.text

    ok = httpx.get(f"{service.base_url}/settings/coach.one@example")
    assert ok.status_code == 200
    assert 'data-coach-id="coach.one@example"' in ok.text
    assert "script-src 'self'" in ok.headers["content-security-policy"]
    assert ok.headers["referrer-policy"] == "no-referrer"
