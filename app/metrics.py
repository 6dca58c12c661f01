"""Prometheus metrics. Counters are per process; see the README for multi-worker setups."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.samples import Sample


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.reservations = Counter(
            "credits_reservations_total",
            "Reservation outcomes by feature: held, committed, refunded, expired, exhausted, "
            "too_many_holds; and holds extended.",
            ["feature", "outcome"],
            registry=r,
        )
        self.credits = Counter(
            "credits_credits_total",
            "Credits moved by settlement: committed, refunded or expired.",
            ["kind"],
            registry=r,
        )
        self.exhausted = Counter(
            "credits_exhausted_refusals_total",
            "Reservations refused because credits were exhausted.",
            ["feature"],
            registry=r,
        )
        self.redis_latency = Histogram(
            "credits_redis_call_seconds",
            "Latency of one Redis script call or pipeline.",
            ["operation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.commands_per_write = Histogram(
            "credits_redis_commands_per_write",
            "Script calls sent to Redis together in one write (one Redis server: the calls "
            "of one event-loop turn share a write).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.redis_unavailable = Counter(
            "credits_redis_unavailable_total",
            "Requests answered 503 because Redis could not be reached in time.",
            registry=r,
        )
        self.state_lost = Counter(
            "credits_redis_state_lost_total",
            "Times Redis came back without its data (restart without persistence, "
            "FLUSHALL, failover to an empty node): credits used and held were forgotten.",
            registry=r,
        )
        self.scripts_reloaded = Counter(
            "credits_scripts_reloaded_total",
            "Lua scripts loaded again because Redis had lost them.",
            registry=r,
        )
        self.streams_open = Gauge(
            "credits_usage_streams_open",
            "Live usage streams (Server-Sent Events) open in this process.",
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "credits_webhook_deliveries_total",
            "Threshold webhook attempts by outcome: delivered (2xx), retry (failed, tried "
            "again later), failed (given up after the retry window).",
            ["outcome"],
            registry=r,
        )
        self.webhook_pending = Gauge(
            "credits_webhook_deliveries_pending",
            "Threshold webhook deliveries not yet delivered nor given up, as the process "
            "holding the sweeper's lease last counted them (0 elsewhere: take the max).",
            registry=r,
        )
        self.webhook_lag = Histogram(
            "credits_webhook_delivery_lag_seconds",
            "From the commit that crossed a threshold to the endpoint's 2xx answer.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400),
            registry=r,
        )
        #: Feature costs, set by the store, to turn hold counts into credits.
        self.feature_costs: dict[str, int] = {}
        self.held_in_flight = Gauge(
            "credits_held_in_flight",
            "Credits in holds not yet settled, as this process saw them: put on hold here "
            "minus committed, refunded or expired here. Summed over every process of the "
            "service it is the fleet-wide figure (a restarted process forgets its share).",
            registry=r,
        )
        self.held_in_flight.set_function(self._held_in_flight)
        # Each series' add method, found once: ``.labels(...)`` validates the labels and
        # takes a lock, several times per request otherwise. Bound on first use, so
        # /metrics lists a series only once it has happened.
        self._series: dict[tuple[str, ...], Callable[[float], None]] = {}

    def _add(self, metric: Counter | Histogram, name: str, *labels: str) -> Callable[[float], None]:
        key = (name, *labels)
        add = self._series.get(key)
        if add is None:
            child = metric.labels(*labels)
            add = child.observe if isinstance(child, Histogram) else child.inc
            if len(self._series) < 4096:  # features come from Redis replies too
                self._series[key] = add
        return add

    def count(self, feature: str, outcome: str) -> None:
        self._add(self.reservations, "reservations", feature, outcome)(1)

    def add_credits(self, kind: str, amount: int) -> None:
        self._add(self.credits, "credits", kind)(amount)

    def observe_latency(self, operation: str, seconds: float) -> None:
        self._add(self.redis_latency, "latency", operation)(seconds)

    def _held_in_flight(self) -> float:
        # Computed at scrape time from the counters: nothing extra on the hot path. Read
        # from the counters themselves: asking the registry would collect this gauge again.
        held = 0.0
        for sample in _totals(self.reservations):
            if sample.labels.get("outcome") == "held":
                held += self.feature_costs.get(sample.labels["feature"], 0) * sample.value
        settled = sum(
            s.value
            for s in _totals(self.credits)
            if s.labels.get("kind") in ("committed", "refunded", "expired")
        )
        return held - settled


def _totals(counter: Counter) -> list[Sample]:
    return [s for family in counter.collect() for s in family.samples if s.name.endswith("_total")]
