"""A clock that only moves when a test moves it."""

from __future__ import annotations

from datetime import datetime, timedelta


class FrozenClock:
    """A clock that only moves when a test moves it.

    Tests start in 2099: period keys expire at absolute instants derived from this clock,
    and a real Redis (or fakeredis) deletes keys whose instant has already passed."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 0, **delta: float) -> datetime:
        self.now += timedelta(seconds=seconds, **delta)
        return self.now

    def set(self, instant: datetime) -> datetime:
        self.now = instant
        return self.now
