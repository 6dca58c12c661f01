"""Key names: every key of a coach sits in the coach's cluster slot, no two coaches or
months share a key, and nothing a caller sends (idempotency keys, principals) reaches a
key name raw."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Final

import fakeredis
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from app.domain import COACH_ID_RE, Period
from app.store import (
    INSTANCE_KEY,
    CreditStore,
    idempotency_digest,
    idempotency_keys,
    period_keys,
)
from app.store.keys import allowance_key, grant_idempotency_digest, grants_key
from tests.support.clock import FrozenClock

#: The whole contract charset and length range for coach ids.
coach_ids = st.from_regex(COACH_ID_RE, fullmatch=True)
periods = st.builds(Period, st.integers(1970, 9999), st.integers(1, 12))
#: Printable ASCII, as the API admits, weighted towards characters that could break a
#: key name if they got into one.
caller_keys = st.text(
    alphabet=st.sampled_from([chr(c) for c in range(0x20, 0x7F)] + ["{", "}", ":", " "] * 8),
    min_size=1,
    max_size=255,
)
principals = st.text(min_size=0, max_size=64)

#: What may follow the hash tag: a period key, an idempotency generation or the coach's
#: own allowance, nothing else (a caller's Idempotency-Key is hashed into a field name,
#: never into a key name).
SUFFIX: Final = re.compile(
    r":(?:[0-9]{4}-[0-9]{2}:(?:account|holds|events|grants|settled:[0-2])|idem:[0-2]|allowance)"
)


def names_for(coach_id: str, period: Period) -> set[str]:
    return {
        *period_keys(coach_id, period),
        grants_key(coach_id, period),
        *idempotency_keys(coach_id),
        allowance_key(coach_id),
    }


def assert_well_formed(name: str, coach_id: str) -> None:
    tag = f"{{{coach_id}}}"
    assert name.startswith(f"credits:{tag}"), name
    # Exactly one tag, and it is the coach id: no brace from anywhere else.
    assert name.count("{") == 1, name
    assert name.count("}") == 1, name
    assert SUFFIX.fullmatch(name[len(f"credits:{tag}") :]), name
    assert key_slot(name.encode()) == key_slot(coach_id.encode())


@given(
    coach_ids,
    st.lists(periods, min_size=1, max_size=4),
)
@example("a", [Period(2099, 11)])
@example("a" * 128, [Period(2099, 12)])
def test_every_key_of_a_coach_is_tagged_and_in_one_slot(
    coach_id: str, coach_periods: list[Period]
) -> None:
    slots = set()
    for period in coach_periods:
        for name in names_for(coach_id, period):
            assert_well_formed(name, coach_id)
            slots.add(key_slot(name.encode()))
    assert len(slots) == 1


@given(coach_ids, periods, coach_ids, periods)
@example("a", Period(2099, 11), "a:2099-11", Period(2099, 11))
@example("a", Period(2099, 11), "a:2099-11", Period(2099, 12))
@example("a", Period(2099, 11), "ab", Period(2099, 11))
@example("a", Period(2099, 11), "a", Period(2099, 12))
@example("a-1", Period(2099, 1), "a", Period(2099, 11))
def test_no_two_coaches_or_months_share_a_key(
    coach_a: str, period_a: Period, coach_b: str, period_b: Period
) -> None:
    assume((coach_a, period_a) != (coach_b, period_b))
    a = names_for(coach_a, period_a)
    b = names_for(coach_b, period_b)
    if coach_a == coach_b:
        # One coach: only the idempotency records are shared across months, by design (a
        # replay after midnight finds the earlier reservation or grant), and the coach's
        # own allowance, which holds every month.
        assert a & b == {*idempotency_keys(coach_a), allowance_key(coach_a)}
    else:
        assert not a & b


@given(principals, caller_keys, principals, caller_keys)
@example("p", "k", "p\nk", "k")
@example("open", "a:b", "open:a", "b")
def test_idempotency_keys_are_scoped_to_principal_and_key(
    principal_a: str, key_a: str, principal_b: str, key_b: str
) -> None:
    assume((principal_a, key_a) != (principal_b, key_b))
    assert idempotency_digest(principal_a, key_a) != idempotency_digest(principal_b, key_b)
    assert grant_idempotency_digest(principal_a, key_a) != grant_idempotency_digest(
        principal_b, key_b
    )
    # A reserve's record and a grant's never meet, even for the same key.
    assert idempotency_digest(principal_a, key_a) != grant_idempotency_digest(principal_a, key_a)


# --- a real store on fakeredis -------------------------------------------------------


async def drive(coach_ids: list[str], keys: list[str]) -> list[str]:
    """Every operation that writes, for every coach, then every key name in the DB."""
    redis = fakeredis.FakeAsyncRedis(decode_responses=True)
    clock = FrozenClock(datetime(2099, 11, 30, 23, 59, 0, tzinfo=UTC))
    store = CreditStore(redis, clock=clock)
    try:
        for coach_id in coach_ids:
            for i, key in enumerate(keys):
                reservation, _ = await store.reserve(
                    coach_id, "checkin_draft", idempotency_key=key, principal=f"p{{{i}}} :x"
                )
                rid = str(reservation.reservation_id)
                await (store.commit(rid) if i % 2 else store.refund(rid))
                await store.extend(
                    str((await store.reserve(coach_id, "checkin_draft"))[0].reservation_id), 60
                )
                await store.get_reservation(rid)
                await store.grant(coach_id, 1, "r", idempotency_key=key, principal=f"p{{{i}}} :x")
            await store.reserve(coach_id, "trend_analysis", ttl_seconds=1)
            clock.advance(minutes=2)  # into December: a second period's keys
            await store.reserve(coach_id, "trend_analysis")
            await store.usage(coach_id)
            await store.grants(coach_id)
            clock.advance(minutes=-2)
            await store.set_allowance(coach_id, 70)
        await store.usage_many(coach_ids)
        return [k async for k in redis.scan_iter(count=1000)]
    finally:
        await redis.aclose()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(coach_ids, min_size=1, max_size=3, unique=True),
    st.lists(caller_keys, min_size=1, max_size=3, unique=True),
)
@example(["a", "a:2099-11", "a:2099-12:account"], ["{evil}", "x:y z", "}{"])
def test_a_real_store_writes_only_tagged_keys(coach_ids: list[str], keys: list[str]) -> None:
    names = asyncio.run(drive(coach_ids, keys))
    # The data-set epoch is the one key that belongs to no coach.
    coach_keys = [n for n in names if n != INSTANCE_KEY]
    assert coach_keys
    owners: dict[str, list[str]] = {}
    for name in coach_keys:
        owner = name[len("credits:{") : name.index("}")]
        assert owner in coach_ids, name
        assert_well_formed(name, owner)
        owners.setdefault(owner, []).append(name)
    for coach_id in coach_ids:
        # Two periods (November and December), three keys each, November's grants, the
        # first generation of idempotency records (a reserve's and a grant's share it)
        # and the coach's own allowance: nothing else is stored for a coach this small
        # (settled records move out of the account only past 100).
        assert len(owners[coach_id]) == 6 + 1 + 1 + 1, owners[coach_id]
