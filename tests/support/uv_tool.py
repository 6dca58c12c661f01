"""uv, pinned in requirements-uv.txt, for the tests that build and install the package
without the network: what they need was fetched into uv's cache by `make`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import paths

ROOT = paths.ROOT

#: Seconds one uv call may take before its test fails instead of waiting on.
STEP_SECONDS = 120


def uv_binary() -> str:
    """The uv next to this Python (where `make` installs it), else the one on PATH."""
    beside = Path(sys.executable).with_name("uv")
    found = str(beside) if beside.exists() else shutil.which("uv")
    if found is None:
        pytest.fail("uv is not installed next to this Python or on PATH: `make test` installs it")
    return found


def offline_env() -> dict[str, str]:
    """This environment without the service's settings or the checkout on the path, with
    uv told to stay off the network and to use this Python."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CREDITS_", "UV_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env.update(UV_OFFLINE="1", UV_PYTHON_DOWNLOADS="never", UV_PYTHON=sys.executable)
    return env


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Runs one step to completion within STEP_SECONDS; its output on failure."""
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            env=offline_env() if env is None else env,
            capture_output=True,
            text=True,
            timeout=STEP_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{args} took more than {STEP_SECONDS} s: {exc.stdout!r} {exc.stderr!r}")
    if proc.returncode != 0:
        pytest.fail(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def installed_app(python: Path, cwd: Path) -> tuple[Path, list[str]]:
    """Where ``python`` imports the app from (with ``app.main`` importing cleanly) and the
    Lua scripts it finds as package resources."""
    probe = (
        "import importlib.resources, json, app, app.main\n"
        "scripts = importlib.resources.files('app.lua')\n"
        "names = sorted(p.name for p in scripts.iterdir() if p.name.endswith('.lua'))\n"
        "print(json.dumps([app.__file__, names]))\n"
    )
    location, scripts = json.loads(run([str(python), "-c", probe], cwd=cwd))
    return Path(location), scripts


def checkout_scripts() -> list[str]:
    return sorted(p.name for p in (ROOT / "lua").glob("*.lua"))
