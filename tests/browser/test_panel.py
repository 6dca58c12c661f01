"""The "AI Usage" settings panel in a real headless Chromium against the real service.

One uvicorn process (with API keys configured and a frozen clock, so the reset date is
known) talks to a private redis-server; each test sets up a coach through the HTTP API
and then drives the page the way a coach would. Screenshots of each state are saved
under tests/artifacts/.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
import pytest
from axe_playwright_python.sync_playwright import Axe
from fastapi import FastAPI
from playwright.sync_api import Browser, Page, Route, expect

from app.main import create_app
from tests.support.browser import ARTIFACTS, chromium, uvicorn_service
from tests.support.redis import RedisProcess
from tests.support.wording_doc import sentences

NOW = datetime(2099, 11, 14, 12, 0, 0, tzinfo=UTC)
NOW_ENV = "PANEL_TEST_NOW"
#: What the panel needs: worker (to run actions) and reader (the event log).
PANEL_KEY = "panel-test-panel-key-0123456789"
WORKER_KEY = "panel-test-worker-key-0123456789"
#: For what only an operator does (grants), around the panel.
ADMIN_KEY = "panel-test-admin-key-0123456789"
ALLOWANCE = 50
RESET_LINE = "Resets December 1, 00:00 UTC"
#: UTC+14: formatting the reset in the browser's zone would read December 1, 14:00.
BROWSER_TZ = "Pacific/Kiritimati"
DESKTOP = {"width": 720, "height": 640}
PHONE = {"width": 390, "height": 844}

#: The panel's level palette in the light theme (app/static/assets/panel.css).
LEVEL_RGB = {
    "green": "rgb(43, 122, 75)",
    "amber": "rgb(166, 95, 0)",
    "red": "rgb(196, 48, 43)",
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

    def hold(self, coach_id: str, feature: str) -> str:
        held = self.client.post(f"/v1/coaches/{coach_id}/reservations", json={"feature": feature})
        assert held.status_code == 201, held.text
        rid: str = held.json()["reservation_id"]
        return rid

    def settle(self, rid: str, action: Literal["commit", "refund"] = "commit") -> None:
        done = self.client.post(f"/v1/reservations/{rid}/{action}")
        assert done.status_code == 200, done.text

    def spend(self, coach_id: str, credits: int) -> None:
        """Commit actions until exactly ``credits`` are used, the largest cost first."""
        left = credits
        for feature, cost in (("trend_analysis", 3), ("checkin_draft", 1)):
            while left >= cost:
                self.settle(self.hold(coach_id, feature))
                left -= cost
        assert self.usage(coach_id)["used"] == credits


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("panel")
    redis = RedisProcess(workdir).start()
    env = {
        "CREDITS_REDIS_URL": redis.url,
        "CREDITS_API_KEYS": json.dumps(
            {PANEL_KEY: ["worker", "reader"], WORKER_KEY: ["worker"], ADMIN_KEY: ["admin"]}
        ),
        # Live updates within a fifth of a second, so the tests wait little for them.
        "CREDITS_STREAM_POLL_SECONDS": "0.2",
        NOW_ENV: NOW.isoformat(),
    }
    try:
        with uvicorn_service(
            workdir, "tests.browser.test_panel:frozen_app", env, factory=True
        ) as url:
            headers = {"Authorization": f"Bearer {PANEL_KEY}"}
            with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
                yield Service(url, client)
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as browser:
        yield browser


@dataclass
class PageSpec:
    scheme: Literal["light", "dark"] = "light"
    viewport: dict[str, int] | None = None


@pytest.fixture
def spec() -> PageSpec:
    return PageSpec()


@pytest.fixture
def page(browser: Browser, spec: PageSpec) -> Iterator[Page]:
    """A fresh page that fails the test on any dialog, script error or CSP violation."""
    context = browser.new_context(
        timezone_id=BROWSER_TZ,
        locale="en-US",
        viewport=spec.viewport or DESKTOP,  # type: ignore[arg-type]
        color_scheme=spec.scheme,
        reduced_motion="reduce",
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
    page: Page,
    service: Service,
    coach_id: str,
    *,
    key: str | None = PANEL_KEY,
    demo: bool = False,
    query: str = "",
) -> None:
    url = f"{service.base_url}/settings/{coach_id}?delay_ms=20{query}"
    if demo:
        url += "&demo=1"
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


def audit(page: Page, state: str) -> None:
    """axe-core over the page as it stands: no serious or critical violation."""
    results = Axe().run(page)
    ARTIFACTS.mkdir(exist_ok=True)
    results.save_to_file(ARTIFACTS / f"axe-{state}.json", violations_only=True)
    bad = [v for v in results.response["violations"] if v["impact"] in ("serious", "critical")]
    assert bad == [], results.generate_report()


def fill_colour(page: Page) -> str:
    colour: str = page.locator("#usage-fill").evaluate("e => getComputedStyle(e).backgroundColor")
    return colour


def assert_usage_shown(page: Page, used: int, level: str, level_text: str) -> None:
    bar = page.get_by_role("progressbar", name="AI credits used this month")
    expect(page.locator("#used-count")).to_have_text(f"{used} of {ALLOWANCE}")
    expect(page.locator("#used-label")).to_have_text("credits used this month")
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


def entries(page: Page) -> list[str]:
    """The history as read: each entry's title and amount."""
    rows = page.locator("#history-list li").evaluate_all(
        "items => items.map(li => li.querySelector('.entry-title').textContent + ' | ' + "
        "li.querySelector('.entry-amount').textContent)"
    )
    return [str(r) for r in rows]


# --- the default view ----------------------------------------------------------------------


@pytest.mark.real_redis
@pytest.mark.parametrize(
    ("used", "level", "level_text"),
    [(13, "green", "On track"), (36, "amber", "Running low"), (46, "red", "Almost out")],
)
def test_the_default_view_is_ai_usage_with_nothing_of_a_test_harness(
    page: Page, service: Service, used: int, level: str, level_text: str
) -> None:
    coach = f"panel-level-{used}"
    service.spend(coach, used)
    assert service.usage(coach)["level"] == level

    open_panel(page, service, coach)

    assert_usage_shown(page, used, level, level_text)
    expect(page.locator("#remaining")).to_have_text(f"{ALLOWANCE - used} credits left")
    expect(page.locator("#held")).to_have_text("")
    expect(page.get_by_role("heading", name="This month")).to_be_visible()
    expect(page.locator("#history-summary")).to_contain_text("analyses")
    # Demo controls belong to the coaching app's screens, not to Settings.
    expect(page.locator("#demo")).to_be_hidden()
    expect(page.get_by_role("button", name=re.compile("credit"))).to_have_count(0)
    expect(page.get_by_role("switch")).to_have_count(0)
    # The key is kept in memory only, not left in the address bar or history.
    assert "key=" not in page.url
    screenshot(page, f"default-{level}")
    if level == "amber":
        audit(page, "default")


def lines_of(page: Page, selector: str) -> list[int]:
    """How many lines each matching element's text takes."""
    counts = page.locator(selector).evaluate_all(
        """els => els.map(el => {
            const range = document.createRange();
            range.selectNodeContents(el);
            const tops = new Set([...range.getClientRects()].map(r => Math.round(r.top)));
            return tops.size;
        })"""
    )
    return [int(c) for c in counts]


@pytest.mark.real_redis
@pytest.mark.parametrize(
    "spec",
    [
        PageSpec("dark", DESKTOP),
        PageSpec("light", PHONE),
        PageSpec("dark", PHONE),
    ],
    ids=["dark-desktop", "light-phone", "dark-phone"],
)
def test_dark_theme_and_phone_width_keep_every_line_whole(
    page: Page, service: Service, spec: PageSpec
) -> None:
    coach = "panel-layout"
    if service.usage(coach)["used"] == 0:
        service.spend(coach, 37)
        service.hold(coach, "trend_analysis")
    open_panel(page, service, coach, demo=True)
    expect(page.locator("#held")).to_have_text("3 on hold for actions in progress")
    expect(page.locator("#actions button")).to_have_count(2)

    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert (background == "rgb(15, 19, 24)") == (spec.scheme == "dark"), background
    width = (spec.viewport or DESKTOP)["width"]
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    # Labels and figures never break; sentences may, without leaving a word alone.
    for selector in (
        "h1",
        "#used-count",
        "#used-label",
        "#level-text",
        "#remaining",
        "#held",
        "#resets",
        "#history-summary",
        ".entry-title",
        ".entry-amount",
        ".entry-when",
        ".action",
        ".switch span",
    ):
        assert set(lines_of(page, selector)) == {1}, selector
    # The figure and the level share the first line, whatever the width.
    tops = page.locator("#used-count, #level-text").evaluate_all(
        "els => els.map(e => e.getBoundingClientRect().top)"
    )
    assert abs(tops[0] - tops[1]) < 12, tops
    name = f"{spec.scheme}-{'phone' if width < 500 else 'desktop'}"
    screenshot(page, name)
    audit(page, name)


# --- contrast: text by axe; the bar, its track and the switch by WCAG's formula here --------


def _channel(value: float) -> float:
    c = value / 255
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def luminance(css: str) -> float:
    match = re.fullmatch(r"rgba?\((\d+), (\d+), (\d+)(?:, ([\d.]+))?\)", css)
    assert match is not None, css
    assert match[4] is None or float(match[4]) == 1.0, f"{css}: only opaque colours"
    r, g, b = (_channel(float(match[i])) for i in (1, 2, 3))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    """WCAG 2.2 contrast ratio of two CSS colours."""
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_the_contrast_function_matches_wcag_reference_values() -> None:
    assert contrast("rgb(0, 0, 0)", "rgb(255, 255, 255)") == pytest.approx(21.0)
    assert contrast("rgb(119, 119, 119)", "rgb(255, 255, 255)") == pytest.approx(4.48, abs=0.01)
    assert contrast("rgb(255, 0, 0)", "rgb(255, 255, 255)") == pytest.approx(4.0, abs=0.01)
    # The shades that failed before: amber on its track, the off switch on the card.
    assert contrast("rgb(194, 124, 14)", "rgb(232, 236, 241)") < 3
    assert contrast("rgb(203, 210, 217)", "rgb(255, 255, 255)") < 3


COLOURS_JS = """() => {
  const style = (el, pseudo) => getComputedStyle(el, pseudo);
  const bar = document.getElementById('usage-bar');
  const card = bar.closest('.card');
  const switchInput = document.getElementById('simulate-failure');
  const out = {card: style(card).backgroundColor, track: style(bar).backgroundColor,
               edge: style(bar).borderTopColor, levels: {}, text: {}};
  for (const level of ['green', 'amber', 'red']) {
    bar.className = 'bar level-' + level;
    document.getElementById('level-text').className = 'level level-' + level;
    out.levels[level] = {fill: style(document.getElementById('usage-fill')).backgroundColor,
                         text: style(document.getElementById('level-text')).color};
  }
  for (const checked of [false, true]) {
    switchInput.checked = checked;
    out[checked ? 'switchOn' : 'switchOff'] = {
      track: style(switchInput).backgroundColor,
      knob: style(switchInput, '::after').backgroundColor};
  }
  switchInput.checked = false;
  const demoCard = switchInput.closest('.card');
  out.demoCard = style(demoCard).backgroundColor;
  out.focus = style(document.querySelector('.action')).borderTopColor;
  for (const sel of ['h1', '.lead', '#remaining', '#resets', '.entry-when', '.hint', '.action']) {
    out.text[sel] = style(document.querySelector(sel)).color;
  }
  return out;
}"""


@pytest.mark.real_redis
def test_bar_track_and_switch_contrast_at_least_3_to_1_in_both_themes(
    page: Page, service: Service
) -> None:
    coach = "panel-contrast"
    service.spend(coach, 48)
    open_panel(page, service, coach, demo=True)
    expect(page.locator("#hint-trend_analysis")).to_have_text("needs 3 · 2 left")
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        c = page.evaluate(COLOURS_JS)
        assert contrast(c["edge"], c["card"]) >= 3, (scheme, "track edge on card")
        for level, shades in c["levels"].items():
            assert contrast(shades["fill"], c["track"]) >= 3, (scheme, level, "fill on track")
            assert contrast(shades["fill"], c["card"]) >= 3, (scheme, level, "fill on card")
            assert contrast(shades["text"], c["card"]) >= 4.5, (scheme, level, "level text")
        for state in ("switchOff", "switchOn"):
            assert contrast(c[state]["track"], c["demoCard"]) >= 3, (scheme, state, "on card")
            assert contrast(c[state]["knob"], c[state]["track"]) >= 3, (scheme, state, "knob")
        assert contrast(c["focus"], c["demoCard"]) >= 3, (scheme, "button edge and focus ring")
        for selector, colour in c["text"].items():
            assert contrast(colour, c["card"]) >= 4.5, (scheme, selector)


# --- live ------------------------------------------------------------------------------------


@pytest.mark.real_redis
def test_a_reserve_made_outside_the_page_shows_up_live(page: Page, service: Service) -> None:
    coach = "panel-live"
    service.spend(coach, 3)
    open_panel(page, service, coach)
    expect(page.locator("#panel")).to_have_attribute("data-live", "stream")
    expect(page.locator("#history-summary")).to_have_text("1 analysis")

    rid = service.hold(coach, "checkin_draft")  # another tab, or a worker

    expect(page.locator("#held")).to_have_text("1 on hold for an action in progress")
    expect(page.locator("#remaining")).to_have_text("46 credits left")
    service.settle(rid)
    expect(page.locator("#used-count")).to_have_text("4 of 50")
    expect(page.locator("#held")).to_have_text("")
    expect(page.locator("#history-summary")).to_have_text("1 draft · 1 analysis")
    assert entries(page)[0] == "Check-in response draft | 1 credit"
    screenshot(page, "live")


@pytest.mark.real_redis
def test_a_refused_stream_falls_back_to_polling(page: Page, service: Service) -> None:
    coach = "panel-polling"
    service.spend(coach, 1)
    refused: list[str] = []

    def too_many_streams(route: Route) -> None:
        refused.append(route.request.headers.get("authorization", ""))
        route.fulfill(
            status=429,
            headers={"Retry-After": "30", "Content-Type": "application/problem+json"},
            body=json.dumps({"code": "too_many_streams", "status": 429}),
        )

    page.route("**/usage/stream", too_many_streams)
    open_panel(page, service, coach, query="&poll_ms=300")
    expect(page.locator("#panel")).to_have_attribute("data-live", "polling")
    # fetch, unlike EventSource, sends the key with the stream request.
    assert refused == [f"Bearer {PANEL_KEY}"]

    service.hold(coach, "trend_analysis")

    expect(page.locator("#held")).to_have_text("3 on hold for actions in progress")
    expect(page.locator("#remaining")).to_have_text("46 credits left")
    screenshot(page, "polling")


# --- history -------------------------------------------------------------------------------


@pytest.mark.real_redis
def test_history_pages_through_the_month_newest_first(page: Page, service: Service) -> None:
    coach = "panel-history"
    for _ in range(12):
        service.settle(service.hold(coach, "checkin_draft"))
    service.settle(service.hold(coach, "trend_analysis"))
    service.settle(service.hold(coach, "checkin_draft"), "refund")
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url) if "/events?" in r.url else None)

    open_panel(page, service, coach)

    expect(page.locator("#history-summary")).to_have_text("12 drafts · 1 analysis")
    expect(page.locator("#history-list li")).to_have_count(10)
    first = entries(page)
    assert first[:3] == [
        "Check-in response draft | Not charged",
        "Client trend analysis | 3 credits",
        "Check-in response draft | 1 credit",
    ]
    expect(page.locator("#history-list li").first.locator(".entry-when")).to_have_text(
        "Nov 14, 12:00 UTC · didn't finish"
    )
    more = page.get_by_role("button", name="Show earlier")
    expect(more).to_be_visible()
    screenshot(page, "history-first-page")

    more.click()

    expect(page.locator("#history-list li")).to_have_count(14)
    expect(more).to_be_hidden()
    assert entries(page)[:10] == first
    assert entries(page)[10:] == ["Check-in response draft | 1 credit"] * 4
    paged = [u for u in requested if "before=" in u and "limit=20" in u]
    assert len(paged) == 1, requested
    screenshot(page, "history-all")


# --- ?demo=1: the coaching app's actions around the panel ----------------------------------


@pytest.mark.real_redis
def test_a_cost_that_no_longer_fits_gets_a_quiet_hint_and_still_answers_calmly(
    page: Page, service: Service
) -> None:
    coach = "panel-hint"
    service.spend(coach, 49)
    open_panel(page, service, coach, demo=True)
    notice = page.locator("#notice")
    # The live region is in the page, empty and announced, before anything happens.
    expect(notice).to_have_attribute("aria-live", "polite")
    expect(notice).to_have_text("")
    trends = page.get_by_role("button", name=TRENDS_BUTTON)
    checkin = page.get_by_role("button", name=CHECKIN_BUTTON)
    expect(page.locator("#hint-trend_analysis")).to_have_text("needs 3 · 1 left")
    expect(page.locator("#hint-checkin_draft")).to_have_text("")
    expect(trends).to_have_accessible_description("needs 3 · 1 left")
    expect(trends).to_be_enabled()
    screenshot(page, "hint")

    trends.click()
    wait_idle(page)

    detail = (
        "Client trend analysis needs 3 credits and you have 1 left this month. "
        "Credits refresh on December 1 at 00:00 UTC."
    )
    expect(notice).to_have_text(detail)
    expect(trends).to_have_attribute("aria-describedby", "hint-trend_analysis notice")
    expect(trends).to_have_accessible_description(f"needs 3 · 1 left {detail}")
    expect(checkin).not_to_have_attribute("aria-describedby", re.compile("notice"))
    assert service.usage(coach)["held"] == 0
    screenshot(page, "hint-notice")
    audit(page, "hint-notice")


@pytest.mark.real_redis
def test_a_successful_action_shows_its_note_and_moves_the_bar(page: Page, service: Service) -> None:
    coach = "panel-success"
    service.spend(coach, 31)
    open_panel(page, service, coach, demo=True)
    assert_usage_shown(page, 31, "green", "On track")

    page.get_by_role("button", name=TRENDS_BUTTON).click()

    results = page.locator("#results li")
    expect(results).to_have_count(1)
    expect(results.first).to_contain_text("Client trend analysis")
    expect(results.first.locator(".result-note")).to_have_text(
        "Used 3 credits · 16 of 50 left this month"
    )
    wait_idle(page)
    assert_usage_shown(page, 34, "green", "On track")
    page.get_by_role("button", name=CHECKIN_BUTTON).click()
    expect(results).to_have_count(2)
    expect(results.first.locator(".result-note")).to_have_text(
        "Used 1 credit · 15 of 50 left this month"
    )
    wait_idle(page)
    page.get_by_role("button", name=CHECKIN_BUTTON).click()
    expect(results).to_have_count(3)
    wait_idle(page)
    assert_usage_shown(page, 36, "amber", "Running low")

    server = service.usage(coach)
    assert (server["used"], server["held"]) == (36, 0)
    expect(page.locator("#notice")).to_have_text("")
    expect(page.locator("#history-list li").first).to_contain_text("Check-in response draft")
    screenshot(page, "success")


@pytest.mark.real_redis
def test_a_failed_action_charges_nothing(page: Page, service: Service) -> None:
    coach = "panel-failure"
    service.spend(coach, 13)
    open_panel(page, service, coach, demo=True)

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
    expect(page.locator("#history-list li").first).to_have_text(re.compile("Not charged"))
    screenshot(page, "failure")


@pytest.mark.real_redis
def test_a_running_action_shows_its_hold(page: Page, service: Service) -> None:
    coach = "panel-in-progress"
    service.spend(coach, 13)
    page.goto(f"{service.base_url}/settings/{coach}?demo=1&delay_ms=10000#key={PANEL_KEY}")
    expect(page.locator("#panel")).to_have_attribute("data-ready", "true")

    page.get_by_role("button", name=TRENDS_BUTTON).click()

    expect(page.locator("#remaining")).to_have_text("34 credits left")
    expect(page.locator("#held")).to_have_text("3 on hold for actions in progress")
    expect(page.locator("#actions")).to_have_attribute("aria-busy", "true")
    for label in (CHECKIN_BUTTON, TRENDS_BUTTON):
        expect(page.get_by_role("button", name=label)).to_be_disabled()
    expect(page.locator("#activity")).to_have_text("Working on it: client trend analysis…")
    server = service.usage(coach)
    assert (server["used"], server["held"]) == (13, 3)


@pytest.mark.real_redis
def test_exhausted_credits_give_a_calm_inline_notice_and_keep_the_buttons(
    page: Page, service: Service
) -> None:
    coach = "panel-exhausted"
    service.spend(coach, 49)
    open_panel(page, service, coach, demo=True)

    # An earlier result on the page, which running out must leave alone.
    page.get_by_role("button", name=CHECKIN_BUTTON).click()
    results = page.locator("#results")
    expect(results.locator("li .result-note")).to_have_text(
        ["Used 1 credit · 0 of 50 left this month"]
    )
    wait_idle(page)
    assert_usage_shown(page, 50, "red", "All used")
    expect(page.locator("#hint-checkin_draft")).to_have_text("needs 1 · 0 left")
    expect(page.locator("#hint-trend_analysis")).to_have_text("needs 3 · 0 left")
    before = results.inner_html()

    refused = service.client.post(
        f"/v1/coaches/{coach}/reservations", json={"feature": "trend_analysis"}
    )
    assert refused.status_code == 429
    assert refused.json()["title"] == "AI credits exhausted"
    detail = refused.json()["detail"]
    assert detail == (
        "You've used all 50 AI credits for November. They refresh on December 1 at 00:00 UTC."
    )

    for name in (TRENDS_BUTTON, CHECKIN_BUTTON):
        page.get_by_role("button", name=name).click()
        wait_idle(page)
        notice = page.locator("#notice")
        expect(notice).to_be_visible()
        expect(notice).to_have_text(detail)
        expect(notice).to_have_attribute("role", "status")
        expect(page.get_by_role("button", name=name)).to_have_attribute(
            "aria-describedby", re.compile(r"\bnotice\b")
        )
        for label in (CHECKIN_BUTTON, TRENDS_BUTTON):
            expect(page.get_by_role("button", name=label)).to_be_visible()
        assert results.inner_html() == before
        assert_usage_shown(page, 50, "red", "All used")

    assert page.get_by_role("alert").count() == 0
    server = service.usage(coach)
    assert (server["used"], server["held"]) == (50, 0)
    screenshot(page, "exhausted")
    audit(page, "exhausted")


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
    open_panel(page, service, "panel-costs", demo=True)

    expect(page.locator("#actions button")).to_have_text(
        [
            "Draft check-in response · 2 credits",
            "Analyze client trends · 5 credits",
            "Session summary · 1 credit",
        ]
    )


# --- what the panel reads: effective allowance, the year of the reset, keys --------------


@pytest.mark.real_redis
def test_a_real_grant_shows_in_the_panel(page: Page, service: Service) -> None:
    coach = "panel-granted-for-real"
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
    expect(page.locator("#usage-bar")).to_have_attribute("aria-valuemax", "55")


@pytest.mark.real_redis
def test_the_effective_allowance_and_a_reset_next_year_are_shown(
    page: Page, service: Service
) -> None:
    december = {
        "coach_id": "panel-granted",
        "period": "2099-12",
        "allowance": 55,
        "base_allowance": 50,
        "granted": 5,
        "used": 13,
        "held": 0,
        "remaining": 42,
        "percent_used": 23,
        "level": "green",
        "resets_at": "2100-01-01T00:00:00Z",
        "features": [
            {"feature": "checkin_draft", "cost": 1, "available": True},
            {"feature": "trend_analysis", "cost": 3, "available": True},
        ],
    }
    page.route("**/usage", lambda route: route.fulfill(json=december))
    page.route(
        "**/usage/stream",
        lambda route: route.fulfill(
            body=f"retry: 60000\nevent: usage\ndata: {json.dumps(december)}\n\n",
            headers={"Content-Type": "text/event-stream"},
        ),
    )
    open_panel(page, service, "panel-granted")

    expect(page.locator("#used-count")).to_have_text("13 of 55")
    expect(page.locator("#remaining")).to_have_text("42 credits left")
    expect(page.locator("#usage-bar")).to_have_attribute("aria-valuemax", "55")
    expect(page.locator("#resets")).to_have_text("Resets January 1, 2100, 00:00 UTC")
    screenshot(page, "granted-december")


@pytest.mark.real_redis
def test_without_a_key_the_panel_explains_calmly(page: Page, service: Service) -> None:
    open_panel(page, service, "panel-no-key", key=None)

    expect(page.locator("#panel-message")).to_contain_text("needs an API key")
    expect(page.locator("#usage")).to_be_hidden()
    expect(page.locator("#history")).to_be_hidden()
    screenshot(page, "no-key")


@pytest.mark.real_redis
def test_a_key_without_the_reader_scope_is_told_what_the_panel_needs(
    page: Page, service: Service
) -> None:
    open_panel(page, service, "panel-worker-only", key=WORKER_KEY)

    expect(page.locator("#used-count")).to_have_text("0 of 50")
    expect(page.locator("#history-message")).to_contain_text("worker and reader scopes")


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


# --- every panel sentence of docs/wording.md, from the panel's own wording module ----------

PANEL_CASES: dict[str, str] = {
    "On track": "w.levelText({used: 13, allowance: 50, level: 'green'})",
    "Running low": "w.levelText({used: 36, allowance: 50, level: 'amber'})",
    "Almost out": "w.levelText({used: 46, allowance: 50, level: 'red'})",
    "All used": "w.levelText({used: 50, allowance: 50, level: 'red'})",
    "No credits": "w.levelText({used: 0, allowance: 0, level: 'red'})",
    "credits used this month": "w.usedLabel(50)",
    "credit used this month": "w.usedLabel(1)",
    "13 of 50 credits used, on track": "w.barText({used: 13, allowance: 50, level: 'green'})",
    "37 credits left": "w.leftLine(37)",
    "1 credit left": "w.leftLine(1)",
    "1 on hold for an action in progress": "w.heldLine(1)",
    "3 on hold for actions in progress": "w.heldLine(3)",
    "Resets December 1, 00:00 UTC": "w.resetLine('2099-12-01T00:00:00Z', 2099)",
    "Resets January 1, 2100, 00:00 UTC": "w.resetLine('2100-01-01T00:00:00Z', 2099)",
    "12 drafts · 3 analyses": (
        "w.summaryLine([{feature: 'trend_analysis', label: 'Client trend analysis', count: 3},"
        " {feature: 'checkin_draft', label: 'Check-in response draft', count: 12}])"
    ),
    "1 draft · 1 analysis": (
        "w.summaryLine([{feature: 'checkin_draft', label: 'x', count: 1},"
        " {feature: 'trend_analysis', label: 'y', count: 1}])"
    ),
    "Session summary × 2": (
        "w.summaryLine([{feature: 'session_summary', label: 'Session summary', count: 2}])"
    ),
    "No AI actions yet this month.": "w.summaryLine([])",
    "1 credit": "w.historyEntry({kind: 'committed', feature: 'checkin_draft', cost: 1}, String)"
    ".amount",
    "3 credits": "w.historyEntry({kind: 'committed', feature: 'trend_analysis', cost: 3}, String)"
    ".amount",
    "Not charged": "w.historyEntry({kind: 'expired', feature: 'checkin_draft', cost: 1}, String)"
    ".amount",
    "didn't finish": "w.historyEntry({kind: 'refunded', feature: 'x', cost: 1}, String).why",
    "timed out": "w.historyEntry({kind: 'expired', feature: 'x', cost: 1}, String).why",
    "Nov 14, 09:05 UTC": "w.historyTime('2099-11-14T09:05:59Z')",
    "+5 credits": "w.historyEntry({kind: 'granted', credits: 5}, String).amount",
    "−1 credit": "w.historyEntry({kind: 'granted', credits: -1}, String).amount",
    "Draft check-in response · 1 credit": "w.buttonLabel({feature: 'checkin_draft', cost: 1})",
    "Analyze client trends · 3 credits": "w.buttonLabel({feature: 'trend_analysis', cost: 3})",
    "needs 3 · 1 left": "w.hintText(3, 1)",
    "Working on it: client trend analysis…": "w.workingText('Client trend analysis')",
    "The AI action didn't finish, so nothing was charged.": "w.TEXT.refunded",
    "Loading your AI credits…": "document.getElementById('panel-message').textContent",
    "This panel needs an API key with the worker and reader scopes. Open it from the coaching "
    "app, or for local testing add #key=<your key> to the address.": "w.TEXT.needsKey",
    "We couldn't reach the credits service. Please try again in a moment.": "w.TEXT.unreachable",
}


def test_every_panel_sentence_in_the_doc_has_its_case_here() -> None:
    assert sorted(sentences("Panel")) == sorted(PANEL_CASES)


@pytest.mark.real_redis
def test_the_panel_writes_each_documented_sentence(page: Page, service: Service) -> None:
    # The page as served, before its script has replaced the loading line.
    page.route(
        "**/static/panel.js",
        lambda route: route.fulfill(body="", content_type="text/javascript"),
    )
    page.goto(f"{service.base_url}/settings/panel-wording")
    expressions = "[" + ", ".join(PANEL_CASES.values()) + "]"
    written = page.evaluate(
        "async () => { const w = await import(new URL('../static/wording.js', location.href));"
        f" return {expressions}; }}"
    )
    assert dict(zip(PANEL_CASES, written, strict=True)) == {s: s for s in PANEL_CASES}
