"""Settings from the environment (prefix ``CREDITS_``)."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from app.domain import DEFAULT_TTL_SECONDS, MAX_TTL_SECONDS, MIN_TTL_SECONDS


class Scope(StrEnum):
    WORKER = "worker"
    READER = "reader"
    ADMIN = "admin"


class Settings(BaseSettings):
    # No input in error messages: CREDITS_API_KEYS holds secrets, and the URL may too.
    model_config = SettingsConfigDict(env_prefix="CREDITS_", frozen=True, hide_input_in_errors=True)

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
    #: With a Redis URL and no keys the service refuses to start unless this is true.
    allow_open: bool = False

    #: Bounded waits on Redis: a dead or paused Redis costs a caller at most about this.
    redis_timeout_seconds: Annotated[float, Field(gt=0, le=30)] = 1.0
    redis_max_connections: Annotated[int, Field(ge=1, le=10_000)] = 64
    #: Seconds a client is told to wait (``Retry-After``) while Redis is away.
    unavailable_retry_after_seconds: Annotated[int, Field(ge=1, le=3600)] = 1
    #: Lapsed holds released per script call; more are released only when needed to fit.
    release_batch: Annotated[int, Field(ge=1, le=10_000)] = 100
    #: Events kept per coach and period (the newest ones).
    events_max: Annotated[int, Field(ge=0, le=1_000_000)] = 10_000
    #: Live usage streams: how often each polls Redis, how long a quiet stream waits before
    #: a keep-alive comment, and how long a stream lives before the client reconnects.
    stream_poll_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0
    stream_heartbeat_seconds: Annotated[float, Field(gt=0, le=300)] = 15.0
    stream_max_seconds: Annotated[float, Field(gt=0, le=86_400)] = 600.0
    #: Usage streams open at once in this process; the next is refused 429.
    streams_max: Annotated[int, Field(ge=1, le=100_000)] = 1000

    @field_validator("feature_costs")
    @classmethod
    def _feature_names(cls, value: dict[str, int]) -> dict[str, int]:
        if not value:
            raise ValueError("at least one feature is needed")
        for name in value:
            if not name or len(name) > 64 or not all(c.isalnum() or c == "_" for c in name):
                raise ValueError(f"feature names are letters, digits and _: {name!r}")
        return value

    @field_validator("api_keys", mode="wrap")
    @classmethod
    def _keys(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> dict[str, list[Scope]]:
        # Pydantic's own errors would name the offending key in their location.
        try:
            keys: dict[str, list[Scope]] = handler(value)
        except ValidationError:
            raise ValueError(
                "must be a JSON object that maps each API key to a list of scopes "
                f"({', '.join(s.value for s in Scope)})"
            ) from None
        for key, scopes in keys.items():
            if len(key) < 16:
                raise ValueError("API keys must be at least 16 characters long")
            if not scopes:
                raise ValueError("each API key needs at least one scope")
        return keys

    @model_validator(mode="after")
    def _cluster_needs_url(self) -> Settings:
        if self.redis_cluster and not self.redis_url:
            raise ValueError("CREDITS_REDIS_CLUSTER needs CREDITS_REDIS_URL (a seed node)")
        return self

    @model_validator(mode="after")
    def _no_open_mode_by_accident(self) -> Settings:
        if self.redis_url is not None and not self.api_keys and not self.allow_open:
            raise ValueError(
                "CREDITS_REDIS_URL is set but CREDITS_API_KEYS configures no key, so every "
                "caller could spend and read credits without one. Configure keys, or set "
                "CREDITS_ALLOW_OPEN=true to run open on purpose."
            )
        return self

    @property
    def open_mode(self) -> bool:
        return not self.api_keys

    @property
    def embedded(self) -> bool:
        return self.redis_url is None


class ConfigurationError(Exception):
    """The settings cannot be used: the message names each wrong setting and never
    shows a value."""


def load_settings() -> Settings:
    """The settings from the environment, or a ``ConfigurationError`` that says which
    are wrong."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None
    except SettingsError as exc:
        # pydantic-settings could not decode a JSON setting; its message names the field.
        field = re.search(r'field "(\w+)"', str(exc))
        name = _env_name(field.group(1)) if field else "a JSON setting"
        raise ConfigurationError(f"invalid configuration: {name}: not valid JSON") from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        message = error["msg"].removeprefix("Value error, ")
        loc = error["loc"]
        problems.append(f"{_env_name(str(loc[0]))}: {message}" if loc else message)
    return "invalid configuration: " + "; ".join(problems)


def _env_name(field: str) -> str:
    return f"CREDITS_{field.upper()}"
