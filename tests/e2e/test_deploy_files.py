"""No Docker engine runs in CI, so the deployment files are checked by reading them and
the image's install steps by replaying them in a temporary directory."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dockerfile import inside, replay_copies, run_steps, stages
from tests.support.uv_tool import ROOT, checkout_scripts, installed_app, run, uv_binary


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def production_command() -> list[str]:
    """The production command as docs/deploy.md shows it."""
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    section = deploy.split("## The production command", 1)[1]
    block = re.search(r"```sh\n(.*?)\n```", section, re.S)
    assert block is not None, "docs/deploy.md shows the production command"
    return shlex.split(block[1].strip())


def image_cmd() -> list[str]:
    cmd = stages()[-1].all("CMD")
    assert len(cmd) == 1
    parsed: list[str] = json.loads(cmd[0])
    return parsed


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


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
    assert "CREDITS_ALLOW_OPEN" not in env
    assert "command" not in api, "the image's CMD is the one start command"
    assert api["healthcheck"]["test"][-1].count("/readyz") == 1


def test_the_image_runs_the_documented_production_command() -> None:
    assert image_cmd() == production_command()
    assert image_cmd()[:2] == ["uvicorn", "app.main:app"]
    # Wherever the docs repeat it, they repeat it exactly.
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for line in doc.read_text().splitlines():
            if line.startswith("uvicorn app.main:app") and "--workers" in line:
                assert shlex.split(line) == image_cmd(), doc


def test_the_production_command_bounds_connections() -> None:
    cmd = image_cmd()
    # Room for every usage stream a process allows (CREDITS_STREAMS_MAX, 1,000 by
    # default) and the ordinary requests beside them.
    assert int(flag(cmd, "--limit-concurrency")) > 1000
    assert 1 <= int(flag(cmd, "--timeout-keep-alive")) <= 30
    assert int(flag(cmd, "--backlog")) >= 1024
    assert (flag(cmd, "--loop"), flag(cmd, "--http"), flag(cmd, "--workers")) == (
        "uvloop",
        "httptools",
        "2",
    )
    assert "--no-access-log" in cmd


def test_the_image_builds_the_wheel_in_one_stage_and_runs_it_in_another() -> None:
    build, runtime = stages()
    assert build.name == "build"
    assert runtime.base == build.base
    copied = [source for rest in build.all("COPY") for source in shlex.split(rest)[:-1]]
    assert {"app", "lua", "uv.lock", "pyproject.toml"} <= set(copied)
    steps = " ".join(runtime.all("RUN"))
    assert "uv build" in " ".join(build.all("RUN"))
    assert runtime.all("COPY") == [], "no source tree in the running image"
    assert "-e " not in steps
    assert "--editable" not in steps
    assert "--require-hashes -r /dist/pylock.toml" in steps
    assert runtime.all("USER") not in ([], ["root"], ["0"]), "the service does not run as root"
    assert any("/healthz" in rest for rest in runtime.all("HEALTHCHECK"))
    assert runtime.all("EXPOSE") == ["8000"]


def test_the_build_context_holds_what_the_image_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allow-list: nothing reaches the builder unless named"
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    for stage in stages():
        for rest in stage.all("COPY"):
            *sources, _ = shlex.split(rest)
            assert set(sources) <= allowed, rest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_image_install_steps_make_a_venv_that_runs_the_app(tmp_path: Path) -> None:
    """Every RUN step of the image, in order, with the image's paths under tmp_path and uv
    off the network (what it installs is in its cache)."""
    image = tmp_path / "image"
    uv = uv_binary()
    pinned = (ROOT / "requirements-uv.txt").read_text().split("uv==", 1)[1].split()[0]
    assert run([uv, "--version"], cwd=tmp_path).split()[1] == pinned
    for stage in stages():
        replay_copies(stage, image)
        cwd = inside(image, ".", stage.workdir())
        cwd.mkdir(parents=True, exist_ok=True)
        for step in run_steps(stage):
            replay_step(step, uv, image, cwd)
    (path,) = [e.split("=", 1)[1] for rest in stages()[-1].all("ENV") for e in rest.split()
               if e.startswith("PATH=")]  # fmt: skip
    bin_dir = inside(image, path.split(":", 1)[0], "/")
    assert (bin_dir / image_cmd()[0]).exists(), "the CMD's program is installed"
    location, scripts = installed_app(bin_dir / "python", tmp_path)
    assert location.is_relative_to(bin_dir.parent), location
    assert scripts == checkout_scripts()


def replay_step(words: list[str], uv: str, image: Path, cwd: Path) -> None:
    if words[0] == "pip":
        # Installs uv itself, as `make` does: this test runs that same pinned uv.
        assert {"--require-hashes", "requirements-uv.txt"} <= set(words), words
        return
    if words[0] == "useradd":
        return
    assert words[0] == "uv", f"a step this test does not know how to replay: {words}"
    args = [uv]
    # The image keeps no cache; here the cache is where the packages come from.
    for word in [w for w in words[1:] if w != "--no-cache"]:
        if not word.startswith("/"):
            args.append(word)
            continue
        path = inside(image, word, "/")
        matches = sorted(path.parent.glob(path.name)) if "*" in path.name else [path]
        assert matches, word
        args += [str(m) for m in matches]
    run([*args, "--offline"], cwd=cwd)


def test_readme_opens_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)\n```", readme, re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block[1].splitlines()]
    assert commands == ["make run", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
