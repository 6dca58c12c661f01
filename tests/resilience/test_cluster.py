"""The service on a real Redis Cluster: three primaries with a replica each.

Coaches spread over every primary while each coach stays in one slot, scripts are on
every primary and come back after a flush, and a primary killed under load is failed
over without restarting the service and without ever overcharging a coach.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import fakeredis
import httpx
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection

from app.config import Settings
from app.domain import Period, Status
from app.errors import (
    BackendUnavailable,
    CreditsError,
    CreditsExhausted,
    ReservationNotFound,
)
from app.main import connect, create_app
from app.store import SCRIPT_NAMES, CreditStore, idempotency_keys, period_keys
from tests.support.clock import FrozenClock
from tests.support.cluster import LocalCluster, wait_for
from tests.support.ledger_view import logged_events

pytestmark = pytest.mark.real_redis

T = TypeVar("T")

#: Far above the store's own bound on a Redis call: tripping it means a call hung.
HANG_GUARD_SECONDS = 15.0


def slot_tag(coach_id: str) -> str:
    return f"{{{coach_id}}}"


@pytest.fixture
def cluster(redis_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session cluster, whole again after any test that broke it."""
    yield redis_cluster
    if not all(redis_cluster.alive(p) for p in redis_cluster.ports):
        redis_cluster.heal()


def cluster_settings(cluster: LocalCluster, **overrides: Any) -> Settings:
    return Settings(
        redis_url=cluster.live_seed_url(), redis_cluster=True, allow_open=True, **overrides
    )


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    """A cluster client built exactly as the service builds it."""
    redis = connect(cluster_settings(cluster))
    assert isinstance(redis, RedisCluster)
    await redis.flushall()
    yield redis
    await redis.flushall()
    await redis.aclose()


def coaches_by_primary(cluster: LocalCluster, coach_ids: list[str]) -> dict[int, list[str]]:
    by_port: dict[int, list[str]] = defaultdict(list)
    primaries = cluster.primaries()
    for coach in coach_ids:
        slot = cluster.keyslot(slot_tag(coach))
        by_port[next(n.port for n in primaries if n.owns(slot))].append(coach)
    return dict(by_port)


def node_stats(cluster: LocalCluster, port: int) -> tuple[int, int]:
    """(NOSCRIPT errors answered, SCRIPT LOAD calls served) by one node so far."""
    with cluster.client(port) as c:
        errors: dict[str, Any] = c.info("errorstats")
        commands: dict[str, Any] = c.info("commandstats")
    noscript = int(errors.get("errorstat_NOSCRIPT", {}).get("count", 0))
    loads = int(commands.get("cmdstat_script|load", {}).get("calls", 0))
    return noscript, loads


# --- the client the service builds --------------------------------------------------


async def test_connect_builds_a_cluster_client_that_sends_each_command_once(
    cluster: LocalCluster,
) -> None:
    settings = cluster_settings(cluster, redis_timeout_seconds=0.5)
    redis = connect(settings)
    try:
        assert isinstance(redis, RedisCluster)
        # No blind resend of a reserve whose reply was lost: retries are the caller's.
        assert redis.retry.get_retries() == 0
        kwargs = redis.nodes_manager.connection_kwargs
        assert kwargs["socket_timeout"] == 0.5
        assert kwargs["socket_connect_timeout"] == 0.5
        assert await redis.ping()
        assert {n.port for n in redis.get_primaries()} == {n.port for n in cluster.primaries()}
    finally:
        await redis.aclose()


async def test_more_concurrent_calls_than_connections_wait_instead_of_failing(
    cluster: LocalCluster, clock: FrozenClock
) -> None:
    """A plain cluster client fails a call at once when a node's pool is in use; the
    service's client makes it wait, as the single-node pool does."""
    redis = connect(cluster_settings(cluster, redis_max_connections=3))
    try:
        store = CreditStore(redis, clock=clock)
        await redis.flushall()
        coaches = [f"crowd-{i}" for i in range(60)]
        reserved = await asyncio.gather(*(store.reserve(c, "checkin_draft") for c in coaches))
        assert all(created for _, created in reserved)
        batches = await asyncio.gather(*(store.usage_many(coaches) for _ in range(4)))
        assert all((u.used, u.held) == (0, 1) for batch in batches for u in batch)
    finally:
        await redis.flushall()
        await redis.aclose()


async def test_concurrent_calls_share_one_write_per_primary_and_get_their_own_replies(
    client: RedisCluster, cluster: LocalCluster, clock: FrozenClock
) -> None:
    store = CreditStore(client, clock=clock)
    await store.ensure_scripts()
    await store.usage("warm")  # the cluster client learns the slot map
    coaches = [f"share-{i}" for i in range(90)]
    assert len(coaches_by_primary(cluster, coaches)) == 3
    registry = store.metrics.registry
    writes_before = registry.get_sample_value("credits_redis_commands_per_write_count") or 0
    features = ["trend_analysis" if i % 3 else "checkin_draft" for i in range(90)]
    made = await asyncio.gather(
        *(store.reserve(c, f) for c, f in zip(coaches, features, strict=True))
    )
    for coach, feature, (reservation, created) in zip(coaches, features, made, strict=True):
        assert created
        assert reservation.reservation_id.coach_id == coach
        assert reservation.feature == feature
    writes = (
        registry.get_sample_value("credits_redis_commands_per_write_count") or 0
    ) - writes_before
    assert writes == 3  # one per primary
    committed = await asyncio.gather(*(store.commit(str(r.reservation_id)) for r, _ in made))
    assert [r.status for r in committed] == [Status.COMMITTED] * 90


async def test_a_call_sent_to_the_wrong_primary_is_redirected_and_runs_once(
    client: RedisCluster, cluster: LocalCluster, clock: FrozenClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot map gone stale (a slot migrated, a failover): the node answers MOVED, the
    call never ran there, and the cluster client sends it where it belongs."""
    store = CreditStore(client, clock=clock)
    await store.ensure_scripts()
    await store.usage("warm")
    right = client.get_node_from_key(slot_tag("moved-coach"))
    assert right is not None
    wrong = next(n for n in client.get_primaries() if n.name != right.name)
    monkeypatch.setattr(client, "get_node_from_key", lambda key, replica=False: wrong)
    _, created = await store.reserve("moved-coach", "trend_analysis")
    assert created
    monkeypatch.undo()
    usage = await store.usage("moved-coach")
    assert (usage.used, usage.held) == (0, 3)  # held once, on the right node
    with cluster.client(int(wrong.port)) as c:
        assert int(c.info("errorstats").get("errorstat_MOVED", {}).get("count", 0)) >= 1


async def test_a_connection_torn_down_under_a_call_is_unavailable_not_a_crash(
    clock: FrozenClock,
) -> None:
    """During a failover the cluster client closes every connection on CLUSTERDOWN,
    also ones other tasks are about to write on; redis-py then raises AttributeError
    from its socket code. That is Redis being unavailable, not a server error."""
    store = CreditStore(fakeredis.FakeAsyncRedis(decode_responses=True), clock=clock)
    torn = Connection()  # its writer is gone, as after a concurrent disconnect
    with pytest.raises(BackendUnavailable) as caught:
        await store.transport.guard(torn._send_packed_command([b"PING\r\n"]))
    assert isinstance(caught.value.__cause__, AttributeError)

    async def our_own_bug() -> None:
        raise AttributeError("a bug of ours stays a bug")

    with pytest.raises(AttributeError, match="bug of ours"):
        await store.transport.guard(our_own_bug())


# --- placement -------------------------------------------------------------------------


async def test_coaches_spread_over_all_primaries_and_each_stays_in_one_slot(
    cluster: LocalCluster, client: RedisCluster, clock: FrozenClock
) -> None:
    store = CreditStore(client, clock=clock)
    coaches = [f"coach-{i}" for i in range(100)]
    for coach in coaches:
        reservation, _ = await store.reserve(coach, "trend_analysis", idempotency_key="k1")
        await store.commit(str(reservation.reservation_id))

    slots: dict[str, set[int]] = defaultdict(set)
    homes: dict[str, set[int]] = defaultdict(set)
    found: dict[str, set[str]] = defaultdict(set)
    for node in cluster.primaries():
        with cluster.client(node.port) as c:
            for key in c.scan_iter(match="credits:{*", count=1000):
                coach = key.split("{", 1)[1].split("}", 1)[0]
                slots[coach].add(int(c.execute_command("CLUSTER", "KEYSLOT", key)))
                homes[coach].add(node.port)
                found[coach].add(key)

    assert set(slots) == set(coaches)
    period = Period.containing(clock())
    for coach in coaches:
        # Account, event log and idempotency records (the holds set is gone once empty),
        # all in the slot of the coach's hash tag, on one primary.
        keys = period_keys(coach, period)
        assert found[coach] == {keys.account, keys.events, idempotency_keys(coach)[0]}
        assert slots[coach] == {cluster.keyslot(slot_tag(coach))}
        assert len(homes[coach]) == 1
    per_primary = Counter(next(iter(h)) for h in homes.values())
    assert len(per_primary) == 3, per_primary
    assert all(count > 0 for count in cluster.dbsize_by_primary().values())
    for coach in coaches:
        usage = await store.usage(coach)
        assert (usage.used, usage.held) == (3, 0)


async def test_usage_many_reads_coaches_on_every_primary_without_creating_keys(
    cluster: LocalCluster, client: RedisCluster, clock: FrozenClock
) -> None:
    store = CreditStore(client, clock=clock)
    touched = [f"touched-{i}" for i in range(60)]
    untouched = [f"never-seen-{i}" for i in range(240)]
    for i, coach in enumerate(touched):
        held, _ = await store.reserve(coach, "checkin_draft")
        if i % 2:
            await store.commit(str(held.reservation_id))
    assert len(coaches_by_primary(cluster, touched)) == 3
    keys_before = sum(cluster.dbsize_by_primary().values())

    order = [c for pair in zip(untouched[::4], touched, strict=True) for c in pair]
    order += untouched
    batch = await store.usage_many(order)

    assert [u.coach_id for u in batch] == order
    for i, coach in enumerate(touched):
        one = await store.usage(coach)
        got = next(u for u in batch if u.coach_id == coach)
        assert got == one
        assert (one.used, one.held) == ((1, 0) if i % 2 else (0, 1))
    for usage in batch:
        if usage.coach_id.startswith("never-seen"):
            assert (usage.used, usage.held, usage.remaining) == (0, 0, store.allowance)
    assert sum(cluster.dbsize_by_primary().values()) == keys_before


# --- scripts ---------------------------------------------------------------------------


async def test_app_start_loads_every_script_on_every_primary(
    cluster: LocalCluster, clock: FrozenClock
) -> None:
    for port in cluster.ports:
        cluster.node_call(port, "SCRIPT", "FLUSH")
    app = create_app(cluster_settings(cluster), clock=clock)
    async with app.router.lifespan_context(app):
        shas = [s.sha for s in app.state.store.scripts.by_name.values()]
        assert len(shas) == len(SCRIPT_NAMES)
        for node in cluster.primaries():
            with cluster.client(node.port) as c:
                assert c.script_exists(*shas) == [True] * len(shas), node.port
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as http:
            assert (await http.get("/readyz")).status_code == 200


async def test_script_flush_on_one_primary_is_answered_by_one_reload_and_one_retry(
    cluster: LocalCluster, client: RedisCluster, clock: FrozenClock
) -> None:
    store = CreditStore(client, clock=clock)
    await store.ensure_scripts()
    coaches = [f"flush-{i}" for i in range(90)]
    by_primary = coaches_by_primary(cluster, coaches)
    victim, *others = sorted(by_primary)
    for coach in coaches:  # every primary has run its scripts
        await store.reserve(coach, "checkin_draft")

    stats_before = {p: node_stats(cluster, p) for p in by_primary}
    cluster.node_call(victim, "SCRIPT", "FLUSH")

    # One call: exactly one NOSCRIPT on that node, a reload, and the call succeeds.
    first = by_primary[victim][0]
    reservation, created = await store.reserve(first, "checkin_draft")
    assert created
    assert reservation.usage.held == 2
    noscript, loads = node_stats(cluster, victim)
    assert noscript - stats_before[victim][0] == 1
    assert 1 <= loads - stats_before[victim][1] <= len(SCRIPT_NAMES)
    with cluster.client(victim) as c:
        assert c.script_exists(store.scripts["reserve"].sha) == [True]

    # Later calls on that node need no reload.
    for coach in by_primary[victim]:
        await store.reserve(coach, "checkin_draft")
    assert node_stats(cluster, victim)[0] - stats_before[victim][0] == 1
    for port in others:  # a flush on one node costs the others nothing
        assert node_stats(cluster, port)[0] == stats_before[port][0]

    # A concurrent burst after another flush: each call meets NOSCRIPT at most once
    # (never a reload loop) and all of them succeed.
    burst = by_primary[victim]
    noscript_before, loads_before = node_stats(cluster, victim)
    cluster.node_call(victim, "SCRIPT", "FLUSH")
    results = await asyncio.gather(*(store.reserve(c, "checkin_draft") for c in burst))
    assert all(created for _, created in results)
    noscript, loads = node_stats(cluster, victim)
    assert 1 <= noscript - noscript_before <= len(burst)
    assert 1 <= loads - loads_before <= len(SCRIPT_NAMES)
    for coach in burst:
        usage = await store.usage(coach)
        assert usage.held == (4 if coach == first else 3)


# --- failover --------------------------------------------------------------------------


@dataclass
class Acked:
    """What one reservation's caller was told."""

    coach_id: str
    cost: int
    settle: str | None = None  # "commit" or "refund": the caller's decision
    outcome: str | None = None  # what the settle call answered, once acknowledged


@dataclass
class Observed:
    """Everything the callers saw during the run."""

    kill_at: float = 0.0
    unavailable: list[tuple[float, str]] = field(default_factory=list)
    successes: list[tuple[float, str]] = field(default_factory=list)
    exhausted: int = 0
    reservations: dict[str, Acked] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    http_statuses: Counter[int] = field(default_factory=Counter)


async def until_answered(
    observed: Observed, coach_id: str, call: Callable[[], Awaitable[T]]
) -> T | CreditsError:
    """Call until Redis answers, as a careful caller would: a reserve retried with its
    Idempotency-Key, a commit or refund retried as is. Returns the answer or the
    domain error it raised; BackendUnavailable is recorded and retried."""
    deadline = time.monotonic() + 60
    while True:
        try:
            async with asyncio.timeout(HANG_GUARD_SECONDS):
                result = await call()
        except TimeoutError:
            observed.unexpected.append(f"a call for {coach_id} hung")
            raise
        except BackendUnavailable:
            observed.unavailable.append((time.monotonic(), coach_id))
            assert time.monotonic() < deadline, "Redis never came back"
            await asyncio.sleep(0.02)
            continue
        except CreditsError as exc:
            observed.successes.append((time.monotonic(), coach_id))
            return exc
        observed.successes.append((time.monotonic(), coach_id))
        return result


async def spend(
    store: CreditStore, observed: Observed, coaches: list[str], n: int, stop: asyncio.Event
) -> None:
    rng = random.Random(n)
    i = 0
    while not stop.is_set():
        i += 1
        coach = rng.choice(coaches)
        feature = rng.choice(["checkin_draft", "checkin_draft", "trend_analysis"])
        key = f"w{n}-{i}"
        got = await until_answered(
            observed, coach, partial(store.reserve, coach, feature, idempotency_key=key)
        )
        if isinstance(got, CreditsExhausted):
            observed.exhausted += 1
            continue
        if isinstance(got, CreditsError):
            observed.unexpected.append(f"reserve: {got!r}")
            continue
        reservation, _ = got
        rid = str(reservation.reservation_id)
        acked = observed.reservations.setdefault(rid, Acked(coach, reservation.cost))
        acked.settle = "commit" if rng.random() < 0.6 else "refund"
        settle = store.commit if acked.settle == "commit" else store.refund
        settled = await until_answered(observed, coach, partial(settle, rid))
        if isinstance(settled, ReservationNotFound):
            acked.outcome = "not_found"  # its reserve was lost in the failover
        elif isinstance(settled, CreditsError):
            observed.unexpected.append(f"{acked.settle} {rid}: {settled!r}")
        else:
            acked.outcome = settled.status.value


async def probe_http(
    http: httpx.AsyncClient, observed: Observed, coaches: list[str], stop: asyncio.Event
) -> None:
    """The HTTP face of the same failover: 503 with a problem body, never a 500."""
    rng = random.Random(-1)
    while not stop.is_set():
        coach = rng.choice(coaches)
        async with asyncio.timeout(HANG_GUARD_SECONDS):
            r = await http.post(f"/v1/coaches/{coach}/reservations", json={"feature": "x1"})
        observed.http_statuses[r.status_code] += 1
        if r.status_code == 503:
            body = r.json()
            assert body["code"] == "backend_unavailable", body
            assert int(r.headers["Retry-After"]) >= 1
            assert r.headers["content-type"].startswith("application/problem+json")
            await asyncio.sleep(0.02)
        elif r.status_code == 201:
            rid = r.json()["reservation_id"]
            while True:
                async with asyncio.timeout(HANG_GUARD_SECONDS):
                    settled = await http.post(f"/v1/reservations/{rid}/refund")
                observed.http_statuses[settled.status_code] += 1
                if settled.status_code != 503:
                    break
                await asyncio.sleep(0.02)
        else:
            assert r.status_code == 429, r.text


async def test_primary_killed_under_load_fails_over_without_overcharging(
    cluster: LocalCluster, clock: FrozenClock
) -> None:
    cluster.wait_healthy()
    victim = cluster.primaries()[0].port
    # The victim is the seed the service was configured with: the service must not
    # depend on it once it knows the cluster.
    settings = Settings(
        redis_url=f"redis://127.0.0.1:{victim}",
        redis_cluster=True,
        allow_open=True,
        feature_costs={"x1": 1, "checkin_draft": 1, "trend_analysis": 3},
        # Small, so many coaches reach their ceiling while the primary dies.
        monthly_allowance=20,
    )
    coaches = [f"failover-{i}" for i in range(90)]
    http_coaches = [f"failover-http-{i}" for i in range(30)]
    on_victim = set(coaches_by_primary(cluster, coaches + http_coaches)[victim])
    assert len(coaches_by_primary(cluster, coaches)) == 3

    app = create_app(settings, clock=clock)
    observed = Observed()
    async with app.router.lifespan_context(app):
        store: CreditStore = app.state.store
        assert isinstance(store.redis, RedisCluster)
        await store.redis.flushall()
        await store.ensure_scripts()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://credits") as http:
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(spend(store, observed, coaches, n, stop)) for n in range(12)
            ]
            tasks += [
                asyncio.create_task(probe_http(http, observed, http_coaches, stop))
                for _ in range(3)
            ]
            try:
                # Load for a second at least, and until some coach has reached its ceiling
                # (how long that takes depends on the machine): the primary then dies with
                # the ceiling under test too.
                started = time.monotonic()
                while observed.exhausted == 0 or time.monotonic() - started < 1.0:
                    assert time.monotonic() - started < 30, "no coach reached its ceiling"
                    await asyncio.sleep(0.05)
                observed.kill_at = time.monotonic()
                cluster.kill(victim)

                def failed_over() -> bool:
                    ports = [n.port for n in cluster.primaries()]
                    return victim not in ports and len(ports) == 3 and cluster.state_ok()

                await asyncio.to_thread(wait_for, "failover", failed_over, 30.0)
                failed_over_at = time.monotonic()

                def recovered() -> bool:
                    return any(t > failed_over_at and c in on_victim for t, c in observed.successes)

                deadline = time.monotonic() + 30
                while not recovered():
                    assert time.monotonic() < deadline, "calls never reached the new primary"
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1.0)  # keep going on the healed topology
            finally:
                stop.set()
                results = await asyncio.gather(*tasks, return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, errors

            # --- the same client, never recreated, now reads everything --------------
            usage = {u.coach_id: u for u in await store.usage_many(coaches)}
            server: dict[str, Status | None] = {}
            for rid in observed.reservations:
                try:
                    server[rid] = (await store.get_reservation(rid)).status
                except ReservationNotFound:
                    server[rid] = None
            events = await settle_events(store, coaches, Period.containing(clock()))
            assert (await http.get("/readyz")).status_code == 200

    assert not observed.unexpected, observed.unexpected
    # No 500s, no hangs: every HTTP answer was a success, a calm 429 or a 503.
    assert set(observed.http_statuses) <= {200, 201, 429, 503}, observed.http_statuses
    assert observed.http_statuses[503] > 0
    gap_calls = [t for t, c in observed.unavailable if t >= observed.kill_at]
    assert gap_calls, "killing a primary went unnoticed"
    # Coaches on the other primaries may see 503s too: with the default
    # cluster-require-full-coverage, every node answers CLUSTERDOWN from the moment the
    # victim is marked failed until its replica is promoted.
    elsewhere = [t for t, c in observed.unavailable if c not in on_victim]

    # Every acknowledged settlement either stands or was lost with the old primary;
    # none turned into the other outcome, and no reservation was settled twice.
    acked_used: Counter[str] = Counter()
    lost: Counter[str] = Counter()
    for rid, acked in observed.reservations.items():
        assert acked.outcome is not None, rid
        now = server[rid]
        if acked.outcome == "committed":
            acked_used[acked.coach_id] += acked.cost
            assert now in (Status.COMMITTED, Status.HELD, None), (rid, now)
            lost["commit"] += now is not Status.COMMITTED
        elif acked.outcome == "refunded":
            assert now in (Status.REFUNDED, Status.HELD, None), (rid, now)
            lost["refund"] += now is not Status.REFUNDED
        else:
            assert acked.outcome == "not_found"
            assert now is None
            lost["reserve"] += 1
        if now is None:
            assert acked.coach_id in on_victim
    for coach, settled_tokens in events.items():
        assert all(n == 1 for n in settled_tokens.values()), (coach, settled_tokens)

    for coach in coaches:
        u = usage[coach]
        # A lost write can only undercharge: never more used than acknowledged.
        assert u.used <= acked_used[coach], coach
        assert u.used + u.held <= settings.monthly_allowance, coach
        held_on_server = sum(
            a.cost
            for rid, a in observed.reservations.items()
            if a.coach_id == coach and server[rid] is Status.HELD
        )
        assert u.held == held_on_server, coach
        if coach not in on_victim:
            assert u.used == acked_used[coach], coach

    gap_end = max(t for t, _ in observed.unavailable)
    print(
        f"\nFAILOVER: first 503 after kill {min(gap_calls) - observed.kill_at:.2f}s, "
        f"last {gap_end - observed.kill_at:.2f}s after kill, "
        f"cluster ok {failed_over_at - observed.kill_at:.2f}s after kill; "
        f"{len(gap_calls)} unavailable answers ({len(elsewhere)} for coaches on other "
        f"primaries, the last {max(elsewhere, default=observed.kill_at) - observed.kill_at:.2f}s "
        "after kill); "
        f"{len(observed.reservations)} acknowledged reservations, "
        f"{observed.exhausted} exhausted; lost acknowledged writes: {dict(lost) or 0}; "
        f"http {dict(observed.http_statuses)}"
    )


async def settle_events(
    store: CreditStore, coaches: list[str], period: Period
) -> dict[str, Counter[str]]:
    """Per coach, how many settle events (committed, refunded, expired) each token has."""
    out: dict[str, Counter[str]] = {}
    for coach in coaches:
        counts: Counter[str] = Counter()
        for event in await logged_events(store, coach, period):
            if event.kind in ("committed", "refunded", "expired") and event.reservation_id:
                counts[event.reservation_id.token] += 1
        out[coach] = counts
    return out
