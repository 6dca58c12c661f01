"""The service is a package: its dependencies are bounded, and its wheel, installed
without -e into a fresh venv from the lock and without the network, serves from a
directory outside the checkout."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.support.dockerfile import inside, replay_copies, stages
from tests.support.redis import free_port
from tests.support.uv_tool import ROOT, checkout_scripts, installed_app, offline_env, run, uv_binary

#: Seconds the installed service gets to answer /readyz.
START_SECONDS = 60


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def test_every_runtime_dependency_has_a_floor_and_stops_before_its_next_major() -> None:
    for req in runtime_requirements():
        bounds = {spec.operator: Version(spec.version) for spec in req.specifier}
        assert set(bounds) == {">=", "<"}, req
        assert bounds["<"] == Version(f"{bounds['>='].major + 1}"), req


def test_redis_py_parses_replies_with_hiredis() -> None:
    # redis-py quietly falls back to its Python parser when hiredis is too old for it.
    from redis.utils import HIREDIS_AVAILABLE

    assert HIREDIS_AVAILABLE


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built as a release is (through the sdist, with the pinned setuptools)
    from exactly the files the image's build stage copies: a file the build needs but
    nobody copies fails here, and no stale build output of the checkout can hide it."""
    image = tmp_path_factory.mktemp("image")
    (build,) = [stage for stage in stages() if stage.name == "build"]
    replay_copies(build, image)
    out = tmp_path_factory.mktemp("dist")
    run(
        [
            uv_binary(),
            "build",
            "--build-constraints",
            str(ROOT / "build-constraints.txt"),
            "--require-hashes",
            "--out-dir",
            str(out),
            str(inside(image, ".", build.workdir())),
        ],
        cwd=out,
    )
    (built,) = out.glob("*.whl")
    return built


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_wheel_holds_every_file_of_the_package_and_the_lua_scripts(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "app").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert {"app/main.py", "app/py.typed", "app/static/panel.html"} <= package
    assert package - names == set(), "every module, the panel and py.typed ship"
    scripts = {f"app/lua/{name}" for name in checkout_scripts()}
    assert scripts, "the checkout has Lua scripts"
    assert scripts - names == set()
    assert not [n for n in names if n.startswith(("lua/", "tests/", "bench/", "clients/"))]


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel (not editable) and the lock's runtime dependencies,
    taken from uv's cache by the very files the lock names (a PEP 751 lock carries their
    URLs, so no index page is needed offline)."""
    work = tmp_path_factory.mktemp("installed")
    uv = uv_binary()
    requirements = work / "pylock.toml"
    run(
        [uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--format", "pylock.toml",
         "-o", str(requirements)],
        cwd=ROOT,
    )  # fmt: skip
    venv = work / "venv"
    python = str(venv / "bin" / "python")
    run([uv, "venv", str(venv)], cwd=work)
    run(
        [uv, "pip", "install", "--python", python, "--no-deps", "--require-hashes",
         "-r", str(requirements)],
        cwd=work,
    )  # fmt: skip
    run([uv, "pip", "install", "--python", python, "--no-deps", str(wheel)], cwd=work)
    run([uv, "pip", "check", "--python", python], cwd=work)
    return venv


@pytest.fixture
def served(installed: Path, tmp_path: Path) -> Iterator[str]:
    """`uvicorn app.main:app` from the venv, started in an empty directory with no
    CREDITS_ settings: open mode on the embedded Redis."""
    port = free_port()
    log_path = tmp_path / "uvicorn.log"
    env = {**offline_env(), "PATH": f"{installed / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    command = [str(installed / "bin" / "uvicorn"), "app.main:app", "--port", str(port)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert proc.poll() is None, f"uvicorn exited:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready:\n{log_path.read_text()}"
            time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_installed_wheel_reads_its_scripts_from_inside_the_venv(
    installed: Path, tmp_path: Path
) -> None:
    location, scripts = installed_app(installed / "bin" / "python", tmp_path)
    assert location.is_relative_to(installed), location
    assert scripts == checkout_scripts()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_installed_wheel_serves_a_reserve_and_a_commit(served: str) -> None:
    with httpx.Client(base_url=served, timeout=10) as http:
        held = http.post("/v1/coaches/packaged/reservations", json={"feature": "trend_analysis"})
        assert held.status_code == 201, held.text
        rid = held.json()["reservation_id"]
        committed = http.post(f"/v1/reservations/{rid}/commit")
        assert committed.status_code == 200, committed.text
        assert committed.json()["status"] == "committed"
        usage = http.get("/v1/coaches/packaged/usage").json()
        assert (usage["used"], usage["held"]) == (3, 0)
