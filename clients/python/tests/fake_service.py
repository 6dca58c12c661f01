"""A small in-memory credits service for ``httpx.MockTransport``.

It answers the routes with the shapes the service documents (reservations,
usage, grants, allowance, extend, events) and can be told to fail: ``fake.fail(...)``
queues answers (transport errors, or ``LOST``: applied, then the answer dropped) that
the next matching requests get instead.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, ClassVar
from urllib.parse import unquote

import httpx
from ai_credits_client import RetryPolicy

BASE_URL = "http://credits.test"
API_KEY = "worker-key-for-offline-tests"
#: Tiny delays so retries cost nothing; four tries in all.
FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.05)
#: Bound on waiting for something the client is expected to do by itself; a hang fails.
WAIT = 10.0


class AnswerLost:
    """A fault: the service applies the request, then the connection drops its answer."""


LOST = AnswerLost()
Answer = httpx.Response | Exception | AnswerLost


def problem(status: int, code: str, detail: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "type": f"https://credits.test/problems/{code}",
        "title": code.replace("_", " "),
        "status": status,
        "detail": detail or f"{code} happened.",
        "code": code,
        **extra,
    }


def problem_response(
    status: int, code: str, detail: str = "", headers: dict[str, str] | None = None, **extra: Any
) -> httpx.Response:
    return httpx.Response(
        status,
        json=problem(status, code, detail, **extra),
        headers={"Content-Type": "application/problem+json", **(headers or {})},
    )


def iso(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Coach:
    base_allowance: int = 50
    override: int | None = None
    granted: int = 0
    used: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    grants: list[dict[str, Any]] = field(default_factory=list)


class FakeService:
    """The credits API in memory, enough to exercise every SDK call."""

    COSTS: ClassVar[dict[str, int]] = {"checkin_draft": 1, "trend_analysis": 3}
    PERIOD: ClassVar[str] = "2099-11"
    RESETS_AT: ClassVar[datetime] = datetime(2099, 12, 1, tzinfo=UTC)

    def __init__(self, default_ttl: int = 300) -> None:
        self.default_ttl = default_ttl
        self.requests: list[httpx.Request] = []
        self.coaches: dict[str, Coach] = {}
        self.reservations: dict[str, dict[str, Any]] = {}
        self.expires: dict[str, float] = {}
        self.replays: dict[tuple[str, str], str] = {}
        self._faults: list[tuple[str, Answer]] = []
        self._seq = itertools.count(1)

    # --- what a test arranges and inspects ------------------------------------------

    def fail(self, route: str, *answers: Answer) -> None:
        """The next requests whose ``METHOD path`` matches ``route`` (a regex) get these."""
        self._faults.extend((route, a) for a in answers)

    def sent(self, route: str) -> list[httpx.Request]:
        return [r for r in self.requests if re.fullmatch(route, f"{r.method} {r.url.path}")]

    def status(self, reservation_id: str) -> str:
        self._lapse()
        return str(self.reservations[reservation_id]["status"])

    # --- the transport ---------------------------------------------------------------

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        line = f"{request.method} {request.url.path}"
        for i, (route, answer) in enumerate(self._faults):
            if re.fullmatch(route, line):
                del self._faults[i]
                if isinstance(answer, Exception):
                    raise answer
                if isinstance(answer, httpx.Response):
                    return answer
                self._answer(request)
                raise httpx.ReadError("connection reset after the answer was sent")
        return self._answer(request)

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self._lapse()
        response = self._route(request)
        response.headers["Date"] = format_datetime(datetime.now(UTC), usegmt=True)
        return response

    def _route(self, request: httpx.Request) -> httpx.Response:
        # Matched on the raw path, as a server routes, so a quoted "/" stays in its segment.
        path, method = request.url.raw_path.decode().partition("?")[0], request.method
        body = request.read()
        payload: Any = httpx.Response(200, content=body).json() if body else None
        routes: list[tuple[str, str, Callable[..., httpx.Response]]] = [
            ("GET", r"/v1/features", self._features),
            ("POST", r"/v1/coaches/([^/]+)/reservations", self._reserve),
            ("GET", r"/v1/reservations/([^/]+)", self._get),
            ("POST", r"/v1/reservations/([^/]+)/(commit|refund)", self._settle),
            ("POST", r"/v1/reservations/([^/]+)/extend", self._extend),
            ("GET", r"/v1/coaches/([^/]+)/usage", self._usage),
            ("GET", r"/v1/coaches/([^/]+)/events", self._events),
            ("POST", r"/v1/coaches/([^/]+)/grants", self._grant),
            ("GET", r"/v1/coaches/([^/]+)/grants", self._grants),
            ("PUT", r"/v1/coaches/([^/]+)/allowance", self._set_allowance),
            ("DELETE", r"/v1/coaches/([^/]+)/allowance", self._delete_allowance),
        ]
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and method == route_method:
                return handler(request, payload, *map(unquote, match.groups()))
        return problem_response(404, "not_found")

    # --- the routes ------------------------------------------------------------------

    def _features(self, request: httpx.Request, payload: Any) -> httpx.Response:
        features = [{"feature": f, "cost": c, "label": f.title()} for f, c in self.COSTS.items()]
        return httpx.Response(200, json={"features": features})

    def _reserve(self, request: httpx.Request, payload: Any, coach_id: str) -> httpx.Response:
        key = request.headers.get("Idempotency-Key")
        if key is not None and (coach_id, key) in self.replays:
            return httpx.Response(200, json=self._reservation(self.replays[(coach_id, key)]))
        feature = payload["feature"]
        if feature not in self.COSTS:
            return problem_response(422, "unknown_feature")
        cost = self.COSTS[feature]
        coach = self.coaches.setdefault(coach_id, Coach())
        if cost > self._remaining(coach_id):
            return problem_response(
                429,
                "credits_exhausted",
                "You've used all 50 AI credits for November.",
                headers={"Retry-After": "86400"},
                feature=feature,
                cost=cost,
                remaining=self._remaining(coach_id),
                resets_at=iso(self.RESETS_AT),
            )
        rid = f"r{secrets.token_hex(12)}"
        ttl = payload.get("ttl_seconds", self.default_ttl)
        self.reservations[rid] = {"coach_id": coach_id, "feature": feature, "cost": cost}
        self.reservations[rid]["status"] = "held"
        self.expires[rid] = time.time() + ttl
        if key is not None:
            self.replays[(coach_id, key)] = rid
        self._log(coach, "held", reservation_id=rid, feature=feature, cost=cost)
        return httpx.Response(201, json=self._reservation(rid))

    def _get(self, request: httpx.Request, payload: Any, rid: str) -> httpx.Response:
        if rid not in self.reservations:
            return problem_response(404, "reservation_not_found")
        return httpx.Response(200, json=self._reservation(rid))

    def _settle(
        self, request: httpx.Request, payload: Any, rid: str, action: str
    ) -> httpx.Response:
        if rid not in self.reservations:
            return problem_response(404, "reservation_not_found")
        record = self.reservations[rid]
        done = "committed" if action == "commit" else "refunded"
        if record["status"] == "held":
            record["status"] = done
            coach = self.coaches[record["coach_id"]]
            if done == "committed":
                coach.used += record["cost"]
            self._log(coach, done, reservation_id=rid, feature=record["feature"])
        elif record["status"] not in (done, "expired" if done == "refunded" else done):
            return problem_response(409, f"reservation_{record['status']}")
        return httpx.Response(200, json=self._reservation(rid))

    def _extend(self, request: httpx.Request, payload: Any, rid: str) -> httpx.Response:
        ttl = payload.get("ttl_seconds") if isinstance(payload, dict) else None
        if not isinstance(ttl, int) or not 1 <= ttl <= 3600:
            return problem_response(422, "invalid_request")
        if rid not in self.reservations:
            return problem_response(404, "reservation_not_found")
        record = self.reservations[rid]
        if record["status"] != "held":
            return problem_response(409, f"reservation_{record['status']}")
        self.expires[rid] = time.time() + ttl
        coach = self.coaches[record["coach_id"]]
        self._log(coach, "extended", reservation_id=rid, expires_at=self._expires_at(rid))
        return httpx.Response(200, json=self._reservation(rid))

    def _usage(self, request: httpx.Request, payload: Any, coach_id: str) -> httpx.Response:
        return httpx.Response(200, json=self._usage_json(coach_id))

    def _events(self, request: httpx.Request, payload: Any, coach_id: str) -> httpx.Response:
        coach = self.coaches.get(coach_id, Coach())
        limit = int(request.url.params.get("limit", "100"))
        before = int(request.url.params.get("before", "0")) or None
        newest = [e for e in reversed(coach.events) if before is None or e["seq"] < before]
        page = newest[:limit]
        more = len(newest) > limit
        return httpx.Response(
            200, json={"events": page, "next_before": page[-1]["seq"] if more else None}
        )

    def _grant(self, request: httpx.Request, payload: Any, coach_id: str) -> httpx.Response:
        coach = self.coaches.setdefault(coach_id, Coach())
        key = request.headers.get("Idempotency-Key")
        for g in coach.grants:
            if key is not None and g["_key"] == key:
                return httpx.Response(200, json=self._grant_json(coach_id, g))
        credits = payload["credits"]
        if credits < 0 and -credits > self._remaining(coach_id):
            return problem_response(409, "grant_exceeds_remaining")
        if len(coach.grants) >= 100:
            return problem_response(409, "grant_limit")
        record = {
            "grant_id": f"g{secrets.token_hex(8)}",
            "credits": credits,
            "reason": payload["reason"],
            "granted_at": iso(datetime.now(UTC)),
            "_key": key,
        }
        coach.grants.append(record)
        coach.granted += credits
        self._log(
            coach, "granted", grant_id=record["grant_id"], credits=credits, reason=record["reason"]
        )
        return httpx.Response(201, json=self._grant_json(coach_id, record))

    def _grants(self, request: httpx.Request, payload: Any, coach_id: str) -> httpx.Response:
        coach = self.coaches.get(coach_id, Coach())
        return httpx.Response(
            200, json={"grants": [self._grant_json(coach_id, g) for g in coach.grants]}
        )

    def _set_allowance(self, request: httpx.Request, payload: Any, coach_id: str) -> httpx.Response:
        coach = self.coaches.setdefault(coach_id, Coach())
        coach.override = payload["monthly_allowance"]
        self._log(coach, "allowance_changed", monthly_allowance=coach.override)
        return httpx.Response(200, json=self._usage_json(coach_id))

    def _delete_allowance(
        self, request: httpx.Request, payload: Any, coach_id: str
    ) -> httpx.Response:
        coach = self.coaches.setdefault(coach_id, Coach())
        coach.override = None
        self._log(coach, "allowance_changed", monthly_allowance=None)
        return httpx.Response(200, json=self._usage_json(coach_id))

    # --- shapes ------------------------------------------------------------------------

    def _lapse(self) -> None:
        now = time.time()
        for rid, record in self.reservations.items():
            if record["status"] == "held" and self.expires[rid] <= now:
                record["status"] = "expired"

    def _held(self, coach_id: str) -> int:
        return sum(
            r["cost"]
            for r in self.reservations.values()
            if r["coach_id"] == coach_id and r["status"] == "held"
        )

    def _allowance(self, coach: Coach) -> int:
        base = coach.override if coach.override is not None else coach.base_allowance
        return base + coach.granted

    def _remaining(self, coach_id: str) -> int:
        coach = self.coaches.get(coach_id, Coach())
        return max(0, self._allowance(coach) - coach.used - self._held(coach_id))

    def _usage_json(self, coach_id: str) -> dict[str, Any]:
        coach = self.coaches.get(coach_id, Coach())
        allowance = self._allowance(coach)
        remaining = self._remaining(coach_id)
        percent = 100 if allowance <= 0 else min(100, coach.used * 100 // allowance)
        return {
            "coach_id": coach_id,
            "period": self.PERIOD,
            "allowance": allowance,
            "base_allowance": allowance - coach.granted,
            "granted": coach.granted,
            "used": coach.used,
            "held": self._held(coach_id),
            "remaining": remaining,
            "percent_used": percent,
            "level": "green" if percent <= 70 else "amber" if percent <= 90 else "red",
            "resets_at": iso(self.RESETS_AT),
            "features": [
                {"feature": f, "cost": c, "available": c <= remaining}
                for f, c in self.COSTS.items()
            ],
        }

    def _expires_at(self, rid: str) -> str:
        return iso(datetime.fromtimestamp(self.expires[rid], UTC))

    def _reservation(self, rid: str) -> dict[str, Any]:
        record = self.reservations[rid]
        body = {
            "reservation_id": rid,
            **{k: record[k] for k in ("coach_id", "feature", "cost", "status")},
            "period": self.PERIOD,
            "expires_at": self._expires_at(rid),
            "usage": self._usage_json(record["coach_id"]),
        }
        if record["status"] == "committed":
            left = self._remaining(record["coach_id"])
            body["note"] = f"Used {record['cost']} credits · {left} of 50 left this month"
        return body

    def _grant_json(self, coach_id: str, record: dict[str, Any]) -> dict[str, Any]:
        shown = {k: v for k, v in record.items() if not k.startswith("_")}
        return {
            **shown,
            "coach_id": coach_id,
            "period": self.PERIOD,
            "usage": self._usage_json(coach_id),
        }

    def _log(self, coach: Coach, kind: str, **fields: Any) -> None:
        at = iso(datetime.now(UTC))
        coach.events.append({"seq": next(self._seq), "at": at, "kind": kind, **fields})
