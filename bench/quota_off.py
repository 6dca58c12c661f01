"""The service as deployed, but with reserve answers that carry no quota headers: the
control the bench measures the headers' cost against.

Run as ``uvicorn bench.quota_off:app`` (same settings as the service).
"""

from __future__ import annotations

from app.api import routes
from app.api.quota import RawHeader
from app.domain import Reservation
from app.main import app
from app.store import CreditStore

__all__ = ["app"]


def _no_headers(store: CreditStore, reservation: Reservation) -> list[RawHeader]:
    return []


# Both ways of answering a reserve (the front and the route) build it with this function.
routes.reserve_quota_headers = _no_headers
