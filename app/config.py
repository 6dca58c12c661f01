"""Settings from the environment (prefix ``CREDITS_``)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.domain import DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS, MIN_TTL_SECONDS


class Scope(StrEnum):
    WORKER = "worker"
    READER = "reader"
    ADMIN = "admin"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CREDITS_", frozen=True)

    redis_url: str | None = None
    redis_cluster: bool = False
    monthly_allowance: Annotated[int, Field(ge=0, le=1_000_000_000)] = 50
    feature_costs: dict[str, Annotated[int, Field(ge=1, le=1_000_000)]] = Field(
        default_factory=lambda: {"checkin_draft": 1, "trend_analysis": 3}
    )
    reservation_ttl_seconds: Annotated[int, Field(ge=MIN_TTL_SECONDS, le=MAX_TTL_SECONDS)] = (
        DEFAULT_TTL_SECONDS
    )
    api_keys: dict[str, list[Scope]] = Field(default_factory=dict)

    #: Bounded waits on Redis: a dead or paused Redis costs a caller at most about this.
    redis_timeout_seconds: Annotated[float, Field(gt=0, le=30)] = 1.0
    redis_max_connections: Annotated[int, Field(ge=1, le=10_000)] = 64
    #: Seconds a client is told to wait (``Retry-After``) while Redis is away.
    unavailable_retry_after_seconds: Annotated[int, Field(ge=1, le=3600)] = 1
    #: Lapsed holds released per script call; more are released only when needed to fit.
    release_batch: Annotated[int, Field(ge=1, le=10_000)] = 100
    #: Events kept per coach and period (the newest ones).
    events_max: Annotated[int, Field(ge=1, le=1000)] = 1000
    #: Live usage streams: how often each polls Redis, how long a quiet stream waits before
    #: a keep-alive comment, and how long a stream lives before the client reconnects.
    stream_poll_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0
    stream_heartbeat_seconds: Annotated[float, Field(gt=0, le=300)] = 15.0
    stream_max_seconds: Annotated[float, Field(gt=0, le=86_400)] = 600.0

    @field_validator("feature_costs")
    @classmethod
    def _feature_names(cls, value: dict[str, int]) -> dict[str, int]:
        if not value:
            raise ValueError("at least one feature is needed")
        for name in value:
            if not name or len(name) > 64 or not all(c.isalnum() or c == "_" for c in name):
                raise ValueError(f"feature names are letters, digits and _: {name!r}")
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: dict[str, list[Scope]]) -> dict[str, list[Scope]]:
        for key, scopes in value.items():
            if len(key) < 16:
                raise ValueError("API keys must be at least 16 characters long")
            if not scopes:
                raise ValueError("each API key needs at least one scope")
        return value

    @model_validator(mode="after")
    def _cluster_needs_url(self) -> Settings:
        if self.redis_cluster and not self.redis_url:
            raise ValueError("CREDITS_REDIS_CLUSTER needs CREDITS_REDIS_URL (a seed node)")
        return self

    @property
    def open_mode(self) -> bool:
        return not self.api_keys

    @property
    def embedded(self) -> bool:
        return self.redis_url is None
