"""A Hypothesis test that hangs fails in its time limit, and the run ends: the suite's
own plugins (tests.conftest) time such tests out by the thread method, as
tests.support.timeouts says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import paths

HANGING = {
    "given": """
import time
from hypothesis import given, settings, strategies as st

@settings(deadline=None, max_examples=5, database=None)
@given(st.integers())
def test_hangs(n):
    time.sleep(600)
""",
    "machine run by hand": """
import time
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

class Hangs(RuleBasedStateMachine):
    @rule()
    def sleep(self):
        time.sleep(600)

@pytest.mark.hypothesis
def test_hangs():
    run_state_machine_as_test(Hangs, settings=settings(deadline=None, database=None))
""",
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("source", HANGING.values(), ids=HANGING.keys())
def test_a_hanging_hypothesis_test_fails_in_its_time_limit(tmp_path: Path, source: str) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_hangs.py").write_text(source)
    args = ["-p", "tests.conftest", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    args += ["-c", str(tmp_path / "pytest.ini"), "--timeout", "3", str(tmp_path / "test_hangs.py")]
    # Under the signal method Hypothesis replays the interrupted example and hangs for good.
    run = paths.run_module("pytest", *args, timeout=90)
    assert run.returncode != 0, run.stdout
    assert "Timeout" in run.stdout + run.stderr, run.stdout[-2000:]
