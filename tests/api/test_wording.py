"""Every API sentence of docs/wording.md is what the code writes in its case, and the
titles and notes come out of the real store and routes that way."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import fakeredis
import httpx
import pytest

from app import domain
from app.config import Settings
from app.domain import Period, Reservation, ReservationId, Status, Usage
from app.main import create_app
from tests.support.clock import FrozenClock
from tests.support.wording_doc import sentences

NOV = Period(2099, 11)
DEC = Period(2099, 12)
COSTS = {"checkin_draft": 1, "trend_analysis": 3}


def detail(
    feature: str,
    *,
    allowance: int = 50,
    used: int,
    held: int = 0,
    period: Period = NOV,
    wait: int | None = None,
) -> str:
    cost = COSTS[feature]
    return domain.exhausted_detail(
        feature=feature,
        cost=cost,
        allowance=allowance,
        used=used,
        held=held,
        period=period,
        hold_wait_seconds=wait,
    )


def title(feature: str, *, used: int, wait: int | None = None) -> str:
    return domain.exhausted_title(
        cost=COSTS[feature], allowance=50, used=used, hold_wait_seconds=wait
    )


def note(
    cost: int,
    *,
    used: int,
    expires_at: datetime,
    period: Period = NOV,
    as_of: Period | None = None,
) -> str | None:
    usage = Usage.of("coach-1", period, allowance=50, used=used, held=0, costs=COSTS)
    rid = ReservationId.new("coach-1", period)
    feature = "trend_analysis" if cost == 3 else "checkin_draft"
    reservation = Reservation(rid, feature, cost, Status.COMMITTED, expires_at, usage)
    reservation.as_of = as_of
    return reservation.note


MID_NOVEMBER = datetime(2099, 11, 14, 12, 5, tzinfo=UTC)

#: Each API sentence of the doc, and how the code comes to write it.
API_CASES: dict[str, Callable[[], str | None]] = {
    "AI credits exhausted": lambda: title("checkin_draft", used=50),
    "Not enough AI credits": lambda: title("trend_analysis", used=48),
    "AI credits tied up": lambda: title("trend_analysis", used=40, wait=90),
    "You've used all 50 AI credits for November. They refresh on December 1 at 00:00 UTC.": (
        lambda: detail("checkin_draft", used=50)
    ),
    "You've used your 1 AI credit for November. It refreshes on December 1 at 00:00 UTC.": (
        lambda: detail("checkin_draft", allowance=1, used=1)
    ),
    "There are no AI credits in your allowance for November. It renews on December 1 at "
    "00:00 UTC.": lambda: detail("checkin_draft", allowance=0, used=0),
    "You've used all 50 AI credits for December. They refresh on January 1 at 00:00 UTC.": (
        lambda: detail("checkin_draft", used=50, period=DEC)
    ),
    "Client trend analysis needs 3 credits and you have 2 left this month. Credits refresh "
    "on December 1 at 00:00 UTC.": lambda: detail("trend_analysis", used=48),
    "Client trend analysis needs 3 credits and you have 1 left this month. Credits refresh "
    "on December 1 at 00:00 UTC.": lambda: detail("trend_analysis", used=48, held=1),
    "Client trend analysis needs 3 credits and you have none left this month. Credits "
    "refresh on December 1 at 00:00 UTC.": lambda: detail("trend_analysis", used=48, held=2),
    "Check-in response draft needs 1 credit, and 1 of your credits is tied up in an AI "
    "action still in progress. It frees up within 45 seconds. Please try again then.": (
        lambda: detail("checkin_draft", used=49, held=1, wait=45)
    ),
    "Client trend analysis needs 3 credits, and 9 of your credits are tied up in AI actions "
    "still in progress. They start to free up within 2 minutes. Please try again then.": (
        lambda: detail("trend_analysis", used=40, held=9, wait=90)
    ),
    "Check-in response draft needs 1 credit, and 50 of your credits are tied up in AI "
    "actions still in progress. They start to free up within 1 minute. Please try again "
    "then.": lambda: detail("checkin_draft", used=0, held=50, wait=60),
    "Used 1 credit · 49 of 50 left this month": lambda: note(1, used=1, expires_at=MID_NOVEMBER),
    "Used 3 credits · 34 of 50 left this month": lambda: note(3, used=16, expires_at=MID_NOVEMBER),
    "Used 1 credit · 0 of 50 left this month": lambda: note(1, used=50, expires_at=MID_NOVEMBER),
    "Used 3 credits · 46 of 50 left for December": lambda: note(
        3,
        used=4,
        period=DEC,
        expires_at=datetime(2100, 1, 1, 0, 4, tzinfo=UTC),
        as_of=Period(2100, 1),
    ),
}


def test_every_api_sentence_in_the_doc_has_its_case_here() -> None:
    assert sorted(sentences("API")) == sorted(API_CASES)


@pytest.mark.parametrize("sentence", sorted(API_CASES))
def test_the_code_writes_the_documented_sentence(sentence: str) -> None:
    assert API_CASES[sentence]() == sentence


@pytest.mark.parametrize(
    ("allowance", "used"), [(0, 0), (1, 1), (2, 2), (50, 50), (1, 0), (2, 1), (50, 49), (50, 48)]
)
def test_exhausted_is_said_only_when_the_whole_allowance_is_used(allowance: int, used: int) -> None:
    used_all = used >= allowance
    for feature, cost in COSTS.items():
        for held, wait in ((0, None), (1, 30)):
            if not used_all and cost <= allowance - used and wait is None:
                continue  # it fits: no refusal to word
            words = (
                domain.exhausted_title(
                    cost=cost, allowance=allowance, used=used, hold_wait_seconds=wait
                )
                + " "
                + detail(feature, allowance=allowance, used=used, held=held, wait=wait)
            )
            assert ("exhausted" in words.lower()) == used_all, words
            for wrong in (" 1 credits", "1 AI credits", "1 of your credits are", " 0 left"):
                assert wrong not in words, words


# --- through the real routes ------------------------------------------------------------


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(datetime(2099, 11, 14, 12, 0, 0, tzinfo=UTC))


@pytest.fixture
async def api(clock: FrozenClock) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(), redis=fakeredis.FakeAsyncRedis(decode_responses=True), clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:
            yield client


async def hold(api: httpx.AsyncClient, feature: str, ttl: int | None = None) -> str:
    body: dict[str, object] = {"feature": feature}
    if ttl is not None:
        body["ttl_seconds"] = ttl
    resp = await api.post("/v1/coaches/coach-1/reservations", json=body)
    assert resp.status_code == 201, resp.text
    rid: str = resp.json()["reservation_id"]
    return rid


async def spend(api: httpx.AsyncClient, credits: int) -> None:
    for _ in range(credits):
        rid = await hold(api, "checkin_draft")
        assert (await api.post(f"/v1/reservations/{rid}/commit")).status_code == 200


async def refused(api: httpx.AsyncClient, feature: str) -> dict[str, object]:
    resp = await api.post("/v1/coaches/coach-1/reservations", json={"feature": feature})
    assert resp.status_code == 429, resp.text
    body: dict[str, object] = resp.json()
    assert body["code"] == "credits_exhausted"
    return body


async def test_a_reserve_past_the_allowance_is_titled_exhausted(api: httpx.AsyncClient) -> None:
    await spend(api, 50)
    body = await refused(api, "checkin_draft")
    assert body["title"] == "AI credits exhausted"
    assert body["detail"] in sentences("API detail")


async def test_a_reserve_with_too_few_left_is_not_titled_exhausted(
    api: httpx.AsyncClient,
) -> None:
    await spend(api, 48)
    body = await refused(api, "trend_analysis")
    assert body["title"] == "Not enough AI credits"
    assert body["remaining"] == 2
    assert body["detail"] in sentences("API detail")


async def test_a_reserve_held_up_by_running_actions_says_they_are_tied_up(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    await spend(api, 49)
    await hold(api, "checkin_draft", ttl=60)
    clock.advance(15)
    body = await refused(api, "checkin_draft")
    assert body["title"] == "AI credits tied up"
    assert body["detail"] == (
        "Check-in response draft needs 1 credit, and 1 of your credits is tied up in an AI "
        "action still in progress. It frees up within 45 seconds. Please try again then."
    )


def test_a_hold_reaching_past_its_month_committed_within_it_says_this_month() -> None:
    late = datetime(2100, 1, 1, 0, 4, tzinfo=UTC)
    assert note(3, used=4, period=DEC, expires_at=late, as_of=DEC) == (
        "Used 3 credits · 46 of 50 left this month"
    )


async def test_a_december_hold_committed_in_january_names_december(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    clock.set(datetime(2099, 12, 31, 23, 58, tzinfo=UTC))
    await spend(api, 1)
    rid = await hold(api, "trend_analysis", ttl=300)
    clock.set(datetime(2100, 1, 1, 0, 0, 4, tzinfo=UTC))
    committed = await api.post(f"/v1/reservations/{rid}/commit")
    assert committed.status_code == 200, committed.text
    assert committed.json()["note"] == "Used 3 credits · 46 of 50 left for December"
    january = (await api.get("/v1/coaches/coach-1/usage")).json()
    assert (january["period"], january["remaining"]) == ("2100-01", 50)


async def test_a_hold_settled_within_its_month_says_this_month(
    api: httpx.AsyncClient, clock: FrozenClock
) -> None:
    rid = await hold(api, "trend_analysis", ttl=300)
    clock.advance(20)
    committed = await api.post(f"/v1/reservations/{rid}/commit")
    assert committed.json()["note"] == "Used 3 credits · 47 of 50 left this month"
