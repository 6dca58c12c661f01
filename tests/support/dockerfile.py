"""The Dockerfile, read as data: no Docker engine runs here, so tests replay its steps
with every absolute path of the image moved under a temporary directory."""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tests.support import paths

ROOT = paths.ROOT


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [rest for o, rest in self.instructions if o == op]

    def workdir(self) -> str:
        return (self.all("WORKDIR") or ["/"])[-1]


def instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    rows = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            op, _, rest = stripped.partition(" ")
            rows.append((op.upper(), " ".join(rest.split())))
    return rows


def stages() -> list[Stage]:
    found: list[Stage] = []
    for op, rest in instructions():
        if op == "FROM":
            base, _, name = rest.partition(" AS ")
            found.append(Stage(base.strip(), name.strip() or None))
        else:
            found[-1].instructions.append((op, rest))
    return found


def inside(image_root: Path, path: str, workdir: str) -> Path:
    """Where a path of the image lives under ``image_root``."""
    absolute = PurePosixPath(workdir) / path
    return image_root.joinpath(*absolute.parts[1:])


def replay_copies(stage: Stage, image_root: Path) -> None:
    """Does the stage's COPY lines from the build context (the checkout)."""
    workdir = stage.workdir()
    for rest in stage.all("COPY"):
        *sources, target = shlex.split(rest)
        assert not any(s.startswith("--") for s in sources), f"COPY {rest}: flags not replayed"
        destination = inside(image_root, target, workdir)
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                shutil.copytree(
                    origin,
                    destination,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                )
            else:
                into_dir = target.endswith("/") or len(sources) > 1
                dest = destination / origin.name if into_dir else destination
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, dest)


def run_steps(stage: Stage) -> list[list[str]]:
    """The stage's RUN commands, each split at ``&&`` into its words. A ``--mount`` must
    bind a path to the same path, so that one directory stands for both stages."""
    steps: list[list[str]] = []
    for rest in stage.all("RUN"):
        step: list[str] = []
        for word in [*shlex.split(rest), "&&"]:
            if word.startswith("--mount="):
                options = dict(kv.split("=", 1) for kv in word[len("--mount=") :].split(","))
                assert options["source"] == options["target"], word
            elif word == "&&":
                steps.append(step)
                step = []
            else:
                step.append(word)
    return steps
