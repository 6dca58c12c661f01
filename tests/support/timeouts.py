"""Time limits for the tests Hypothesis drives (a pytest plugin, loaded by the conftest).

pytest-timeout's default method fails a test by raising inside it on SIGALRM. Hypothesis
takes that for a failing example and replays it to shrink it; the alarm is spent, so a
replay that hangs hangs for good. Tests with Hypothesis' ``hypothesis`` marker (its
plugin gives it to every ``@given`` test; tests that run a state machine themselves carry
it by hand) are timed out by the thread method instead: the stuck process is ended, and
under xdist the test is reported failed and a new worker takes the rest of the run.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)  # after Hypothesis' plugin has marked its tests
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # --timeout 0 turns time limits off, as pytest-timeout reads it: keep that.
    option = config.getoption("timeout", None)
    default = option if option is not None else float(config.getini("timeout") or 0)
    for item in items:
        if item.get_closest_marker("hypothesis") is None:
            continue
        own = item.get_closest_marker("timeout")
        seconds = default
        if own is not None:
            seconds = own.args[0] if own.args else own.kwargs.get("timeout", default)
        item.add_marker(pytest.mark.timeout(float(seconds), method="thread"), append=False)
