"""Path parameter types shared by the routers."""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor


class AnyCoachId(Convertor[str]):
    """Matches any non-empty text, slashes and line breaks included, so that every
    malformed coach id (``a%2Fb``, ``a%0Ab``) reaches the coach id check and is answered
    422 invalid_coach_id instead of missing the route with a 404."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("coach_id", AnyCoachId())


class ReservationIdText(Convertor[str]):
    """One path segment, but not ``batch`` or ``settle``: those are the batch routes'
    paths, which only take POST, and a method they do not take is answered 405 with
    their own Allow header, not as a reservation id."""

    regex = r"(?!(?:batch|settle)$)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("reservation_id", ReservationIdText())
