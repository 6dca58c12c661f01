"""No Docker engine runs in CI, so the deployment files are checked by reading them."""

from __future__ import annotations

import json
import re
import shlex
from typing import Any

import yaml

from tests.support import paths

ROOT = paths.ROOT


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            op, _, rest = stripped.partition(" ")
            rows.append((op.upper(), rest.strip()))
    return rows


def readme_production_command() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Deploying", 1)[1]
    block = re.search(r"```sh\n(.*?)\n```", section, re.S)
    assert block is not None, "the Deploying section shows the production command"
    return shlex.split(block[1].strip())


def test_compose_has_redis_and_api_with_health_checks() -> None:
    services = compose()["services"]
    assert set(services) >= {"redis", "api"}
    for name in ("redis", "api"):
        assert services[name]["healthcheck"]["test"], f"{name} has a health check"
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_redis_is_durable() -> None:
    command = compose()["services"]["redis"]["command"]
    args = command if isinstance(command, list) else shlex.split(command)
    pairs = dict(zip(args[1::2], args[2::2], strict=False))
    assert args[0] == "redis-server"
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] == "everysec"
    assert compose()["services"]["redis"]["volumes"], "the AOF lives on a volume"


def test_compose_api_points_at_the_redis_service_and_needs_keys() -> None:
    api = compose()["services"]["api"]
    env = api["environment"]
    assert env["CREDITS_REDIS_URL"].startswith("redis://redis:6379")
    # Production never runs open: compose refuses to start without keys.
    assert ":?" in env["CREDITS_API_KEYS"]
    assert "command" not in api, "the image's CMD is the one start command"
    assert api["healthcheck"]["test"][-1].count("/readyz") == 1


def test_dockerfile_runs_the_readme_production_command() -> None:
    rows = dockerfile_instructions()
    cmd = [rest for op, rest in rows if op == "CMD"]
    assert len(cmd) == 1
    assert json.loads(cmd[0]) == readme_production_command()
    assert readme_production_command()[:2] == ["uvicorn", "app.main:app"]


def test_dockerfile_ships_code_and_scripts_and_checks_health() -> None:
    rows = dockerfile_instructions()
    copies = [rest for op, rest in rows if op == "COPY"]
    assert any(c.startswith("app ") for c in copies)
    assert any(c.startswith("lua ") for c in copies), "the Lua scripts are in the image"
    assert any(op == "HEALTHCHECK" and "/healthz" in rest for op, rest in rows)
    assert any(op == "USER" for op, _ in rows), "the service does not run as root"
    assert ("EXPOSE", "8000") in rows


def test_readme_opens_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)\n```", readme, re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block[1].splitlines()]
    assert commands == ["make run", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
