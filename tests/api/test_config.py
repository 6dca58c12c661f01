"""Configuration as the service reads it at start-up: no open mode by accident, errors
that name the setting and never show a key, and process tuning only where it is asked
for (the production entry point)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import fakeredis
import httpx
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from app.config import ConfigurationError, Scope, Settings, load_settings
from app.main import (
    EMBEDDED_TIMEOUT_SECONDS,
    YOUNG_GENERATION_THRESHOLD,
    create_app,
    op_timeout_seconds,
)
from tests.support.redis import free_port

SECRET = "sekrit-key-0123456789-abcdef"
URL = "redis://127.0.0.1:1/0"


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The environment without any CREDITS_ setting of the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("CREDITS_"):
            monkeypatch.delenv(name)
    return monkeypatch


def refusal(**env: str) -> str:
    """The start-up error for these settings, as an operator would read it."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        with pytest.raises(ConfigurationError) as caught:
            load_settings()
    return "".join(traceback.format_exception(caught.value))


@pytest.mark.parametrize("keys", [None, "{}"], ids=["unset", "empty"])
def test_a_redis_url_without_keys_refuses_to_start(
    environment: pytest.MonkeyPatch, keys: str | None
) -> None:
    env = {"CREDITS_REDIS_URL": URL} | ({"CREDITS_API_KEYS": keys} if keys else {})
    text = refusal(**env)
    assert "CREDITS_API_KEYS" in text
    assert "CREDITS_ALLOW_OPEN=true" in text
    assert URL not in text


def test_open_mode_with_a_redis_url_only_when_asked_for(
    environment: pytest.MonkeyPatch,
) -> None:
    environment.setenv("CREDITS_REDIS_URL", URL)
    environment.setenv("CREDITS_ALLOW_OPEN", "true")
    assert load_settings().open_mode
    environment.delenv("CREDITS_ALLOW_OPEN")
    environment.setenv("CREDITS_API_KEYS", json.dumps({SECRET: ["worker"]}))
    settings = load_settings()
    assert not settings.open_mode
    assert settings.api_keys == {SECRET: [Scope.WORKER]}


def test_embedded_redis_stays_open_for_trying_out(environment: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.embedded
    assert settings.open_mode
    # A real client handed over in code, as hosts and tests do, is no URL either.
    app = create_app(Settings(), redis=fakeredis.FakeAsyncRedis(decode_responses=True))
    assert app.state.settings.open_mode


async def test_the_embedded_store_gives_a_full_batch_time_whatever_the_deadline_says() -> None:
    # Its Lua runs in Python (~2 ms per item): a deadline meant for a real Redis would
    # cut a full batch off on a slow or busy machine.
    items = [{"coach_id": f"coach-{i}", "feature": "checkin_draft"} for i in range(500)]
    handed_over = fakeredis.FakeAsyncRedis(decode_responses=True)
    for app in (
        create_app(Settings(redis_timeout_seconds=0.05, monthly_allowance=1_000_000)),
        create_app(Settings(redis_timeout_seconds=0.05), redis=handed_over),
    ):
        async with app.router.lifespan_context(app):
            assert app.state.store.transport.timeout_seconds == EMBEDDED_TIMEOUT_SECONDS
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
                held = await client.post("/v1/reservations/batch", json={"reservations": items})
                assert held.status_code == 200, held.text
                results = held.json()["results"]
                assert [r["status"] for r in results] == [201] * 500
                ids = [r["reservation"]["reservation_id"] for r in results]
                settle = [{"reservation_id": i, "action": "commit"} for i in ids]
                settled = await client.post("/v1/reservations/settle", json={"settlements": settle})
                assert settled.status_code == 200, settled.text


def test_a_real_redis_keeps_the_configured_deadline() -> None:
    real = Redis.from_url("redis://127.0.0.1:1/0")
    assert op_timeout_seconds(Settings(redis_timeout_seconds=0.05), real) == 0.05
    cluster = Settings(
        redis_url="redis://127.0.0.1:1/0",
        redis_cluster=True,
        allow_open=True,
        redis_timeout_seconds=0.4,
    )
    assert op_timeout_seconds(cluster, real) == 1.0


#: Malformed CREDITS_API_KEYS values, each holding SECRET.
MALFORMED_KEYS = {
    "scope not in a list": json.dumps({SECRET: "worker"}),
    "unknown scope": json.dumps({SECRET: ["wroker"]}),
    "no scope": json.dumps({SECRET: []}),
    "a list, not an object": json.dumps([SECRET, "worker"]),
    "scopes not strings": json.dumps({SECRET: [1]}),
    "not JSON": '{"' + SECRET + '": [worker]}',
    "cut short": '{"' + SECRET + '": ["worker"]',
    "key too short": json.dumps({SECRET[:12]: ["worker"]}),
}


@pytest.mark.parametrize("value", MALFORMED_KEYS.values(), ids=MALFORMED_KEYS.keys())
def test_malformed_keys_are_named_and_never_shown(
    environment: pytest.MonkeyPatch, value: str
) -> None:
    text = refusal(CREDITS_API_KEYS=value, CREDITS_REDIS_URL=URL)
    assert "CREDITS_API_KEYS" in text
    for secret in (SECRET, SECRET[:12], SECRET[:6]):
        assert secret not in text


@pytest.mark.parametrize("keys", [{SECRET: "worker"}, {SECRET: []}, {SECRET[:12]: ["worker"]}])
def test_settings_errors_in_code_never_show_a_key(keys: object) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings.model_validate({"api_keys": keys})
    text = "".join(traceback.format_exception(caught.value))
    assert "api_keys" in text
    assert SECRET[:6] not in text


def test_every_wrong_setting_is_named(environment: pytest.MonkeyPatch) -> None:
    text = refusal(CREDITS_RESERVATION_TTL_SECONDS="0", CREDITS_MONTHLY_ALLOWANCE="lots")
    assert "CREDITS_RESERVATION_TTL_SECONDS" in text
    assert "CREDITS_MONTHLY_ALLOWANCE" in text
    assert "lots" not in text


def start_service(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``uvicorn app.main:app`` with these settings, expected to exit at start-up."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CREDITS_")}
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--port", str(free_port())]
    return subprocess.run(
        command,
        env=clean | env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "env",
    [
        {"CREDITS_REDIS_URL": URL},
        {"CREDITS_REDIS_URL": URL, "CREDITS_API_KEYS": MALFORMED_KEYS["unknown scope"]},
        {"CREDITS_API_KEYS": MALFORMED_KEYS["not JSON"]},
    ],
    ids=["no keys", "unknown scope", "not JSON"],
)
def test_the_service_refuses_to_start_and_says_why(tmp_path: Path, env: dict[str, str]) -> None:
    done = start_service(env, tmp_path)
    assert done.returncode != 0
    assert "CREDITS_API_KEYS" in done.stderr
    assert "ConfigurationError" in done.stderr
    assert "Application startup complete" not in done.stderr
    assert SECRET[:6] not in done.stdout + done.stderr


async def test_create_app_leaves_gc_settings_alone() -> None:
    before = (gc.get_threshold(), gc.get_freeze_count(), gc.isenabled())
    app = create_app(Settings(), redis=fakeredis.FakeAsyncRedis(decode_responses=True))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as client:
            assert (await client.get("/readyz")).status_code == 200
        assert (gc.get_threshold(), gc.get_freeze_count(), gc.isenabled()) == before
    assert (gc.get_threshold(), gc.get_freeze_count(), gc.isenabled()) == before


#: The production app's lifespan, in a process of its own: it tunes that process.
_PRODUCTION_LIFESPAN = """
import asyncio, gc, json
from app.main import app

async def main():
    before = gc.get_threshold()[0], gc.get_freeze_count()
    async with app.router.lifespan_context(app):
        after = gc.get_threshold()[0], gc.get_freeze_count()
    print(json.dumps({"before": before, "after": after}))

asyncio.run(main())
"""


def test_the_production_app_settles_the_heap(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CREDITS_")}
    done = subprocess.run(
        [sys.executable, "-c", _PRODUCTION_LIFESPAN],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before"][0] < YOUNG_GENERATION_THRESHOLD
    assert result["before"][1] == 0
    assert result["after"][0] >= YOUNG_GENERATION_THRESHOLD
    assert result["after"][1] > 0
