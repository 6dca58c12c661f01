"""Pure credit rules: periods, levels, money math, messages and reservation ids.

Nothing here talks to Redis or HTTP, so every rule is testable with a frozen clock.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Final

MAX_TTL_SECONDS: Final = 3600
MIN_TTL_SECONDS: Final = 1
DEFAULT_TTL_SECONDS: Final = 300

#: A hold, extended or not, never lives past ``resets_at`` plus this.
HOLD_OVERHANG_SECONDS: Final = 3600

#: Period keys live this long past ``resets_at``: longer than the longest hold, extended
#: to the limit (an hour past ``resets_at``), plus a day to settle it; longer than an
#: idempotency record (so a replay never finds a record whose reservation is gone); and
#: well inside 40 days.
KEY_GRACE_SECONDS: Final = 48 * 3600

#: A coach's own monthly allowance, when set: 0 to this.
MAX_MONTHLY_ALLOWANCE: Final = 1_000_000
#: One grant adds or removes at most this many credits (and never none).
MAX_GRANT_CREDITS: Final = 1_000_000
#: Grants per coach and period.
MAX_GRANTS_PER_PERIOD: Final = 100
MAX_GRANT_REASON_CHARS: Final = 200

#: Idempotency records are kept this long, or until 1,000 newer ones exist for the coach.
IDEMPOTENCY_TTL_SECONDS: Final = 24 * 3600

COACH_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
IDEMPOTENCY_KEY_RE: Final = re.compile(r"[\x20-\x7e]{1,255}")

FEATURE_LABELS: Final[dict[str, str]] = {
    "checkin_draft": "Check-in response draft",
    "trend_analysis": "Client trend analysis",
}


class Level(StrEnum):
    GREEN = "green"
    AMBER = "amber"
    RED = "red"


class Status(StrEnum):
    HELD = "held"
    COMMITTED = "committed"
    REFUNDED = "refunded"
    EXPIRED = "expired"


def is_valid_coach_id(coach_id: str) -> bool:
    return COACH_ID_RE.fullmatch(coach_id) is not None


def is_valid_idempotency_key(key: str) -> bool:
    return IDEMPOTENCY_KEY_RE.fullmatch(key) is not None


def feature_label(feature: str) -> str:
    return FEATURE_LABELS.get(feature, feature.replace("_", " ").capitalize())


# --- periods -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Period:
    """A UTC calendar month."""

    year: int
    month: int

    @classmethod
    def containing(cls, instant: datetime) -> Period:
        utc = instant.astimezone(UTC)
        return cls(utc.year, utc.month)

    @classmethod
    def parse(cls, text: str) -> Period:
        # ASCII digits only: int() also reads other scripts, and one period needs one id.
        match = re.fullmatch(r"([0-9]{4})-([0-9]{2})", text)
        if match is None:
            raise ValueError(f"not a period: {text!r}")
        year, month = int(match[1]), int(match[2])
        if not 1 <= month <= 12 or year < 1970:
            raise ValueError(f"not a period: {text!r}")
        return cls(year, month)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"

    @property
    def starts_at(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=UTC)

    @property
    def next(self) -> Period:
        return Period(self.year + 1, 1) if self.month == 12 else Period(self.year, self.month + 1)

    @property
    def resets_at(self) -> datetime:
        return self.next.starts_at

    @property
    def keys_expire_at(self) -> datetime:
        return self.resets_at + timedelta(seconds=KEY_GRACE_SECONDS)

    @property
    def month_name(self) -> str:
        return self.starts_at.strftime("%B")

    @property
    def seconds(self) -> int:
        """How many seconds the month has."""
        return int((self.resets_at - self.starts_at).total_seconds())

    @property
    def holds_end_at(self) -> datetime:
        """No hold of this period, extended or not, lives past this instant."""
        return self.resets_at + timedelta(seconds=HOLD_OVERHANG_SECONDS)


def to_ms(instant: datetime) -> int:
    return int(instant.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def iso_z(instant: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, second precision unless there are milliseconds."""
    utc = instant.astimezone(UTC)
    if utc.microsecond:
        return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def human_reset(resets_at: datetime) -> str:
    """``December 1 at 00:00 UTC``: always the next reset, so the year goes without saying."""
    return f"{resets_at:%B} {resets_at.day} at {resets_at:%H:%M} UTC"


def seconds_until(later: datetime, now: datetime) -> int:
    """Whole seconds, rounded up, at least 1: a client that waits this long is past it."""
    delta = (later - now).total_seconds()
    return max(1, int(-(-delta // 1)))


# --- money math ----------------------------------------------------------------


def effective_allowance(base_allowance: int, granted: int) -> int:
    """The period's allowance: the coach's monthly one plus this period's grants, never
    below 0 (a lowered monthly allowance can leave negative grants larger than it)."""
    return max(0, base_allowance + granted)


def remaining(allowance: int, used: int, held: int) -> int:
    return max(0, allowance - used - held)


def percent_used(used: int, allowance: int) -> int:
    if allowance <= 0:
        return 100
    return min(100, used * 100 // allowance)


def level(used: int, allowance: int) -> Level:
    # Integer comparison avoids float surprises exactly at 70 % and 90 %.
    if allowance <= 0 or used * 100 > allowance * 90:
        return Level.RED
    if used * 100 > allowance * 70:
        return Level.AMBER
    return Level.GREEN


def credits_word(n: int) -> str:
    return "credit" if n == 1 else "credits"


def commit_note(cost: int, remaining_after: int, allowance: int, month: str | None = None) -> str:
    """``Used 3 credits · 34 of 50 left this month``; with ``month``, the figures are said
    to be that month's (``46 of 50 left for December``)."""
    where = "this month" if month is None else f"for {month}"
    return f"Used {cost} {credits_word(cost)} · {remaining_after} of {allowance} left {where}"


class Shortfall(StrEnum):
    """Why a reserve did not fit."""

    #: Everything in the allowance is used: the only case worded "exhausted".
    ALL_USED = "all_used"
    #: Credits remain, but fewer than the cost.
    TOO_FEW = "too_few"
    #: It would fit but for holds of actions still running, the first lapsing soon.
    TIED_UP = "tied_up"


def shortfall(*, cost: int, allowance: int, used: int, hold_wait_seconds: int | None) -> Shortfall:
    if used >= allowance:
        return Shortfall.ALL_USED
    if allowance - used >= cost and hold_wait_seconds is not None:
        return Shortfall.TIED_UP
    return Shortfall.TOO_FEW


_SHORTFALL_TITLES: Final = {
    Shortfall.ALL_USED: "AI credits exhausted",
    Shortfall.TOO_FEW: "Not enough AI credits",
    Shortfall.TIED_UP: "AI credits tied up",
}


def exhausted_title(*, cost: int, allowance: int, used: int, hold_wait_seconds: int | None) -> str:
    """The problem title of a reserve that does not fit; "exhausted" only when all is used."""
    kind = shortfall(cost=cost, allowance=allowance, used=used, hold_wait_seconds=hold_wait_seconds)
    return _SHORTFALL_TITLES[kind]


def exhausted_detail(
    *,
    feature: str,
    cost: int,
    allowance: int,
    used: int,
    held: int,
    period: Period,
    hold_wait_seconds: int | None,
) -> str:
    """The calm sentence a coach reads when an action does not fit.

    Three cases (``Shortfall``): everything used; some left but not enough; enough in
    principle but tied up in actions still running (``hold_wait_seconds`` is when the
    first frees up). Each is worded for one and for many.
    """
    when = human_reset(period.resets_at)
    needs = f"{feature_label(feature)} needs {cost} {credits_word(cost)}"
    kind = shortfall(cost=cost, allowance=allowance, used=used, hold_wait_seconds=hold_wait_seconds)
    if kind is Shortfall.TIED_UP:
        assert hold_wait_seconds is not None
        within = _human_duration(hold_wait_seconds)
        if held == 1:  # costs are whole credits, so one held credit is one action
            return (
                f"{needs}, and 1 of your credits is tied up in an AI action still in "
                f"progress. It frees up within {within}. Please try again then."
            )
        return (
            f"{needs}, and {held} of your credits are tied up in AI actions still in "
            f"progress. They start to free up within {within}. Please try again then."
        )
    if kind is Shortfall.ALL_USED:
        month = period.month_name
        if allowance == 0:
            return f"There are no AI credits in your allowance for {month}. It renews on {when}."
        if allowance == 1:
            return f"You've used your 1 AI credit for {month}. It refreshes on {when}."
        return f"You've used all {allowance} AI credits for {month}. They refresh on {when}."
    left = remaining(allowance, used, held)
    have = "none" if left == 0 else str(left)
    return f"{needs} and you have {have} left this month. Credits refresh on {when}."


def _human_duration(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} {'second' if seconds == 1 else 'seconds'}"
    minutes = -(-seconds // 60)
    if minutes % 60 == 0:
        hours = minutes // 60
        return f"{hours} {'hour' if hours == 1 else 'hours'}"
    return f"{minutes} {'minute' if minutes == 1 else 'minutes'}"


# --- reservation ids -------------------------------------------------------------

_TOKEN_BYTES: Final = 16  # 128 random bits
#: The whole id in one match (``[0-9]`` is ASCII only): 16 bytes are 22 base64url
#: characters unpadded, and no part holds a dot, so it splits into exactly three parts.
_ID_RE: Final = re.compile(r"([A-Za-z0-9_-]+)\.([0-9]{4})([0-9]{2})\.([A-Za-z0-9_-]{22})")


@dataclass(frozen=True, slots=True)
class ReservationId:
    """``<b64url(coach_id)>.<YYYYMM>.<b64url(16 random bytes)>``.

    The coach and period say which keys to open; the random token names the hold.
    Anything that does not decode to a valid coach, period and token is simply unknown.
    """

    coach_id: str
    period: Period
    token: str
    #: The text form, made once: ids are written out on every reservation.
    text: str = dataclasses.field(compare=False, repr=False)

    @classmethod
    def of(cls, coach_id: str, period: Period, token: str) -> ReservationId:
        encoded = _b64encode(coach_id.encode())
        return cls(
            coach_id, period, token, f"{encoded}.{period.year:04d}{period.month:02d}.{token}"
        )

    @classmethod
    def new(cls, coach_id: str, period: Period) -> ReservationId:
        return cls.of(coach_id, period, _b64encode(secrets.token_bytes(_TOKEN_BYTES)))

    @classmethod
    def parse(cls, text: str) -> ReservationId | None:
        match = _ID_RE.fullmatch(text) if len(text) <= 256 else None
        if match is None:
            return None
        raw_coach, raw_year, raw_month, token = match.groups()
        year, month = int(raw_year), int(raw_month)
        # 9999-12 would reset in year 10000, which no date can hold.
        if not 1 <= month <= 12 or not 1970 <= year <= 9998:
            return None
        # Reject non-canonical encodings so one hold has exactly one id. Any 22 characters
        # of the alphabet decode to 16 bytes and 4 spare bits, which only the last
        # character holds: the encoding is the canonical one exactly when they are zero.
        if token[-1] not in _CANONICAL_TOKEN_ENDS:
            return None
        try:
            # The pattern admits only the alphabet; a length that cannot be base64 fails.
            coach_id = _b64decode_alphabet(raw_coach)
            coach = coach_id.decode("ascii")
        except (ValueError, UnicodeDecodeError):
            return None
        if not is_valid_coach_id(coach) or _b64encode(coach_id) != raw_coach:
            return None
        # Canonical in every part, so the text is the id's own text form.
        return cls(coach, _period(year, month), token, text)

    def __str__(self) -> str:
        return self.text


#: The last characters of a canonical token: alphabet positions 0, 16, 32 and 48.
_CANONICAL_TOKEN_ENDS: Final = "AQgw"  # noqa: S105 - base64 letters, not a secret
#: base64url through binascii directly, as ``base64.urlsafe_b64*`` does it underneath
#: two more layers of Python (these run on every reservation and settlement).
_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")
_PERIODS: dict[tuple[int, int], Period] = {}


def _period(year: int, month: int) -> Period:
    """A shared Period per month (they are frozen): ids name a handful of months."""
    period = _PERIODS.get((year, month))
    if period is None:
        if len(_PERIODS) >= 256:
            _PERIODS.clear()
        period = _PERIODS[(year, month)] = Period(year, month)
    return period


def _b64encode(raw: bytes) -> str:
    """``base64.urlsafe_b64encode(raw)`` without its padding, as text."""
    return binascii.b2a_base64(raw, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


def _b64decode_alphabet(text: str) -> bytes:
    """``base64.urlsafe_b64decode`` of padded base64url ``text`` that holds only the
    alphabet's characters; raises ValueError (binascii.Error) where it does."""
    raw = text.encode("ascii")
    return binascii.a2b_base64(raw.translate(_FROM_URLSAFE) + b"=" * (-len(raw) % 4))


def _b64decode(text: str) -> bytes:
    if not text or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError("not base64url") from exc


# --- grants ---------------------------------------------------------------------------


def new_grant_id() -> str:
    """An opaque, unguessable grant id (128 random bits, base64url)."""
    return _b64encode(secrets.token_bytes(_TOKEN_BYTES))


@dataclass(slots=True)
class Grant:
    """Credits added to (or, when negative, removed from) one period's allowance."""

    grant_id: str
    coach_id: str
    period: Period
    credits: int
    reason: str
    granted_at: datetime
    #: The period's usage as the call that read or made the grant left it.
    usage: Usage


# --- what callers read ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeatureAvailability:
    feature: str
    cost: int
    available: bool


def feature_availability(costs: dict[str, int], left: int) -> tuple[FeatureAvailability, ...]:
    return tuple(FeatureAvailability(name, cost, cost <= left) for name, cost in costs.items())


@dataclass(slots=True)
class Usage:
    coach_id: str
    period: Period
    #: The effective allowance, ``effective_allowance(base_allowance, granted)``: what
    #: remaining, levels and percentages are measured against.
    allowance: int
    used: int
    held: int
    features: tuple[FeatureAvailability, ...]
    #: The coach's monthly allowance (its own, else the configured one).
    base_allowance: int
    #: This period's grants, added up; may be negative.
    granted: int

    @classmethod
    def of(
        cls,
        coach_id: str,
        period: Period,
        *,
        allowance: int,
        used: int,
        held: int,
        costs: dict[str, int],
        granted: int = 0,
    ) -> Usage:
        """``allowance`` is the monthly (base) allowance."""
        effective = effective_allowance(allowance, granted)
        features = feature_availability(costs, remaining(effective, used, held))
        return cls(coach_id, period, effective, used, held, features, allowance, granted)

    @property
    def remaining(self) -> int:
        return remaining(self.allowance, self.used, self.held)

    @property
    def percent_used(self) -> int:
        return percent_used(self.used, self.allowance)

    @property
    def level(self) -> Level:
        return level(self.used, self.allowance)

    @property
    def resets_at(self) -> datetime:
        return self.period.resets_at


@dataclass(slots=True)
class Reservation:
    reservation_id: ReservationId
    feature: str
    cost: int
    status: Status
    expires_at: datetime
    usage: Usage
    #: The current period's usage, when it is not ``usage``: an idempotent replay of a
    #: reservation made in an earlier period (its quota headers speak of the current one).
    current: Usage | None = None

    #: The period of the moment this answer was made, when that may differ from the
    #: reservation's own (a hold settled after its month ended); None: the same.
    as_of: Period | None = None

    @property
    def note(self) -> str | None:
        """What the action cost and what is left, once committed: "this month" while the
        answer is made in the reservation's month, else the month it speaks of."""
        if self.status is not Status.COMMITTED:
            return None
        period = self.reservation_id.period
        month = None if self.as_of in (None, period) else period.month_name
        return commit_note(self.cost, self.usage.remaining, self.usage.allowance, month)
