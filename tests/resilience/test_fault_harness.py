"""The seeded fault-injection harness (``tests.support.faults``), a bounded number of seeds.

Thousands more run on demand with ``python -m tests.support.faults --seeds 5000``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.store import AnyRedis, CreditStore
from tests.support.clock import FrozenClock
from tests.support.faults import SOCKET_TIMEOUT, run_seeds

pytestmark = pytest.mark.real_redis

CI_SEEDS = range(25)


@pytest.mark.timeout(300)  # about 70 s on a slow machine
async def test_no_seed_breaks_an_invariant(tmp_path: Path) -> None:
    results = await run_seeds(CI_SEEDS, workdir=tmp_path)
    assert len(results) == len(CI_SEEDS)
    failed = [r.report() for r in results if r.violation]
    assert not failed, "\n\n".join(failed)
    # The steps and the faults really ran, and some requests of unknown fate had in
    # fact been applied, so the retry-to-resolve path was exercised both ways.
    assert all(len(r.steps) >= 40 for r in results)
    steps = [s for r in results for s in r.steps]
    kinds = ["restart", "kill+start", "fault=pause-long", "fault=flush-during", "drop="]
    kinds += ["fault=kill-during", "reserve_many", "settle_many", "clock year-end"]
    kinds += ["grant c", "extend res", "allowance c"]
    for kind in kinds:
        assert any(kind in s for s in steps), kind
    unknown = sum(r.unknown for r in results)
    applied = sum(r.unknown_applied for r in results)
    assert 0 < applied < unknown


class ForgetfulStore(CreditStore):
    """A planted bug: the Idempotency-Key is not passed on, so a retried reserve holds
    again. The harness must catch it, or its green runs prove nothing."""

    async def reserve(self, *args: object, **kwargs: object) -> tuple[object, bool]:  # type: ignore[override]
        kwargs["idempotency_key"] = None
        return await super().reserve(*args, **kwargs)  # type: ignore[arg-type]


def forgetful(redis: AnyRedis, clock: FrozenClock) -> CreditStore:
    return ForgetfulStore(redis, clock=clock, op_timeout_seconds=SOCKET_TIMEOUT * 2.5)


async def test_harness_catches_a_double_hold(tmp_path: Path) -> None:
    results = await run_seeds(range(5), workdir=tmp_path, store_factory=forgetful)
    found = [r.violation for r in results if r.violation]
    assert found, [r.steps for r in results]
    # Caught as what it is, not as a side effect of something else breaking.
    assert any("held again" in v or "records" in v or "2 holds" in v for v in found), found


class ForgetfulGrants(CreditStore):
    """A planted bug: a grant's Idempotency-Key is not passed on, so a retried grant
    grants again."""

    async def grant(self, *args: object, **kwargs: object) -> tuple[object, bool]:  # type: ignore[override]
        kwargs["idempotency_key"] = None
        return await super().grant(*args, **kwargs)  # type: ignore[arg-type]


async def test_harness_catches_a_double_grant(tmp_path: Path) -> None:
    def factory(redis: AnyRedis, clock: FrozenClock) -> CreditStore:
        return ForgetfulGrants(redis, clock=clock, op_timeout_seconds=SOCKET_TIMEOUT * 2.5)

    results = await run_seeds(
        range(10), workdir=tmp_path, store_factory=factory, timing_faults=False
    )
    found = [r.violation for r in results if r.violation]
    assert any("granted again" in v or "usage of" in v for v in found), found


async def test_a_seed_replays_the_same_steps(tmp_path: Path) -> None:
    # Without faults whose effect depends on real timing, a seed is fully deterministic.
    runs = [
        (await run_seeds([11], workdir=tmp_path / str(n), steps=30, timing_faults=False))[0]
        for n in range(2)
    ]
    assert runs[0].violation is None, runs[0].report()
    assert runs[0].steps == runs[1].steps
    assert any("restart" in s or "kill" in s or "flush" in s for s in runs[0].steps)
