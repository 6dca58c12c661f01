"""bench.compare runs two checkouts' services side by side and reads the median of the
per-round ratios. Only that it runs and how it reads its rounds are checked here: the
figures depend on the machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.compare import OPS, Run, table
from tests.support import paths

ROOT = paths.ROOT


def table_rows(text: str) -> dict[str, list[str]]:
    """The comparison table's rows by load, each its cells."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| load"):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            rows[cells[0]] = cells
    return rows


def run(ops: float) -> Run:
    return Run(ops, redis_us=10.0, workers_cpu_us=50.0, redis_cpu_us=20.0)


def test_the_ratio_is_the_median_of_the_rounds_not_of_the_medians() -> None:
    # Per round 1.0, 0.75 and 1.33: the median ratio is 1.00, the medians' ratio 200/150.
    rounds = [(run(100), run(100)), (run(300), run(400)), (run(200), run(150))]
    text = table(Path("/this"), Path("/other"), dict.fromkeys(OPS, rounds))
    assert table_rows(text)["batch reserve"][1:4] == ["1.00", "200", "150"]
    assert "3 rounds" in text


def test_a_checkout_without_its_venv_is_refused_with_what_to_do(tmp_path: Path) -> None:
    proc = paths.run_module("bench.compare", str(tmp_path), "--rounds", "1", timeout=60)
    assert proc.returncode == 2
    assert ".venv/bin/uvicorn is missing" in proc.stderr


@pytest.mark.real_redis
@pytest.mark.timeout(240)
def test_a_checkout_against_itself_reports_every_load(tmp_path: Path) -> None:
    out = tmp_path / "compare.md"
    proc = paths.run_module(
        "bench.compare",
        str(ROOT),
        "--rounds",
        "1",
        "--seconds",
        "1",
        "--out",
        str(out),
        timeout=200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = table_rows(out.read_text())
    assert sorted(rows) == sorted(OPS)
    for cells in rows.values():
        figures = [float(c.replace(",", "")) for c in cells[1:6]]
        assert all(f > 0 for f in figures), cells  # ratio, both ops/s, both Redis times
